"""A kept kopia cache per repository: metadata only, bounded, keyed by location.

`pgro run` lists and restores the same repositories again and again, and so do the
operator's restore Jobs, which keep theirs on the replica's kopia-cache volume
(`<volume>/cache/<location_key>`, `PGRO_KOPIA_CACHE_ROOT`; docs/kubernetes.md, "Kopia
cache"), evicted when the volume is 85 % full (`relieve_cache_pressure`, features.md §2.12).
kopia's cache holds what it read from a repository: index blobs, the directory and manifest
objects of snapshots ("metadata") and file contents. With a fresh cache every time, each
connect downloads the indexes again and each listing the manifests. A kept cache of
*metadata* saves that (docs/benchmarks.md, "kopia cache"), while the contents, which a
restore reads once, stay out of it: a content cache the size of the snapshot would be kept
on disk for a read that never comes (every restore of pgro is of a new snapshot or into a
new place).

What the directory holds, all of it kopia's: `index-blobs`, `indexes`, `metadata`, a 1 MB
`contents`, `blob-list`, `own-writes` and the repository's format blob (`kopia.repository`,
encrypted as it is in storage). kopia keeps the repository config and the password in the
config file (a throwaway state directory, `--no-persist-credentials`), never in the cache;
`tests/integration/test_kopia_cache.py` checks the directory for the password's bytes.

Every cached item is protected by an HMAC whose key derives from the repository's own
secret: an item written for another repository (one recreated at the same location) fails
the check and is dropped. Several kopia processes may share the directory (a listing and a
restore, two restores): kopia writes cache files atomically (a temporary file renamed),
tolerates files another process swept, and re-reads a bad item from storage. Deleting the
directory is harmless: kopia (and `repository_cache_dir`) recreate it on the next use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from math import ceil
from pathlib import Path
from typing import Final

from pgro.api.secret import FilesystemLocation, S3Location

# kopia's `repository connect` flags for a kept cache.
#
# - contents: 1 MB, soft and hard limit (0 would turn every cache off, metadata included).
#   kopia sweeps contents younger than 10 minutes only above the hard limit, so without
#   one a restore would fill the cache with the whole snapshot first.
# - metadata (directory listings, manifests; the index blobs share its soft limit): 256 MB
#   desired, 512 MB at most. A PGDATA snapshot's metadata is small (1.5 MiB for a 761 MB
#   cluster of ~1,000 files); the bound is for clusters of 100,000s of relation files and
#   repositories of many snapshots, whose metadata kopia would otherwise keep for 24 hours.
#   The indexes (`indexes`) are bounded by the repository itself: kopia needs every
#   active index to open it, fresh cache or kept, and drops unused ones after an hour.
# - `--max-list-cache-duration=0s`: no cached list of index blobs. A listing must see a
#   snapshot taken a second ago (canopy offers it at once); kopia's default caches the
#   list for 30 s, which a kept cache would carry from one command to the next.
# - `--disable-repository-format-cache`: the format blob is read from storage on every
#   open, not from a copy up to 15 minutes old. The cache is keyed by location, not by
#   repository: one recreated at the same place must not be opened with the old format.
#   (A hidden flag of kopia's `repository connect`, present in the pinned v0.22.)
CONTENT_CACHE_MB: Final = 1
METADATA_CACHE_MB: Final = 256
METADATA_CACHE_LIMIT_MB: Final = 512
KEPT_CACHE_FLAGS: Final = (
    f"--content-cache-size-mb={CONTENT_CACHE_MB}",
    f"--content-cache-size-limit-mb={CONTENT_CACHE_MB}",
    f"--metadata-cache-size-mb={METADATA_CACHE_MB}",
    f"--metadata-cache-size-limit-mb={METADATA_CACHE_LIMIT_MB}",
    "--max-list-cache-duration=0s",
    "--disable-repository-format-cache",
)
# A throwaway cache (one restore, then deleted: `pgro verify`, a restore Job without
# `PGRO_KOPIA_CACHE_ROOT`):
# only the content bound. kopia's default would first copy every file the restore reads
# into a content cache of up to 5,000 MB that nothing reads again (about 0.25 s of a 761 MB
# restore, and the snapshot's size in scratch disk; docs/benchmarks.md).
ONE_SHOT_CACHE_FLAGS: Final = KEPT_CACHE_FLAGS[:2]
PRIVATE: Final = 0o700
# The operator's restore Job keeps the caches here, under its kopia-cache volume (beside
# its throwaway kopia state, `restore`): `<volume>/cache/<location_key>`.
JOB_CACHE_SUBDIR: Final = "cache"
# features.md §2.12: at this share of the cache volume used, the Job evicts the cache.
PRESSURE_PERCENT: Final = 85

log = logging.getLogger("pgro.kopia")


def location_key(location: S3Location | FilesystemLocation) -> str:
    """A digest of where the repository is: the storage kind and its path, or its S3
    endpoint, bucket and prefix. Never of a password or a key: the cache belongs to the
    repository, whichever credentials open it (a wrong password fails on the format blob,
    which is read from storage each time, and cannot use what the cache holds)."""
    parts: tuple[str, ...]
    if isinstance(location, FilesystemLocation):
        parts = ("filesystem", os.path.normpath(os.path.abspath(location.path)))
    else:
        # A canopy repository's endpoint is the proxy (""), which reaches the bucket the
        # location names; a direct one may leave it unset: the same repository. The prefix
        # is kopia's literal key prefix ("db" and "db/" are two repositories).
        parts = ("s3", location.endpoint or "", location.bucket, location.prefix)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def repository_cache_dir(root: Path, location: S3Location | FilesystemLocation) -> Path:
    """`root/<location_key>`, created 0700 (with `root`) if missing, e.g. after a user
    deleted it."""
    path = root / location_key(location)
    for directory in (root, path):
        directory.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o777 != PRIVATE:
            directory.chmod(PRIVATE)
    return path


# -- cache pressure (features.md §2.12) --------------------------------------------------
def volume_used_percent(
    volume: Path, statvfs: Callable[[Path], os.statvfs_result] = os.statvfs
) -> int:
    """How full the filesystem holding `volume` is, in whole percent rounded up, as `df`
    shows it: used blocks over those a user may fill (used + available to non-root)."""
    st = statvfs(volume)
    used = st.f_blocks - st.f_bfree
    usable = used + st.f_bavail
    return 0 if usable <= 0 else ceil(100 * used / usable)


def relieve_cache_pressure(
    volume: Path,
    cache_root: Path,
    statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
) -> int | None:
    """Before a restore Job connects: when the cache volume is `PRESSURE_PERCENT` or more
    full, remove every kept cache under `cache_root` (all of it
    kopia's, all regenerable from the repositories) and recreate `cache_root` empty (0700).
    Returns the percentage that triggered it (the caller logs `PGRO_CACHE_PRESSURE` and
    reports it), else None (nothing touched). An unreadable
    volume (statvfs failing) is no pressure: the restore goes on."""
    try:
        percent = volume_used_percent(volume, statvfs)
    except OSError as exc:
        log.warning("cannot read how full the kopia cache volume is: %s", exc)
        return None
    if percent < PRESSURE_PERCENT:
        return None
    shutil.rmtree(cache_root, ignore_errors=True)
    cache_root.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    cache_root.chmod(PRIVATE)
    return percent
