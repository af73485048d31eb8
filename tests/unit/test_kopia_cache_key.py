"""Which kopia cache a repository gets: keyed by where it is, never by a secret."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pgro.api.secret import FilesystemLocation, S3Location
from pgro.kopia.cache import KEPT_CACHE_FLAGS, location_key, repository_cache_dir


def test_the_key_names_the_location_only() -> None:
    s3 = S3Location(bucket="backups", region="eu-west-1", prefix="db")
    # The region does not say where the bucket is: its name does.
    assert location_key(s3) == location_key(
        S3Location(bucket="backups", region="us-east-1", prefix="db")
    )
    # A canopy repository's endpoint is its proxy (""): the same bucket and prefix.
    assert location_key(s3) == location_key(
        S3Location(bucket="backups", region="eu-west-1", prefix="db", endpoint="", disable_tls=True)
    )
    others: list[S3Location | FilesystemLocation] = [
        S3Location(bucket="backups", region="eu-west-1", prefix="other"),
        S3Location(bucket="backups", region="eu-west-1", prefix="db/"),  # kopia's literal prefix
        S3Location(bucket="backups-2", region="eu-west-1", prefix="db"),
        S3Location(bucket="backups", region="eu-west-1", prefix="db", endpoint="minio:9000"),
        FilesystemLocation("/srv/backups"),
    ]
    keys = {location_key(s3), *(location_key(o) for o in others)}
    assert len(keys) == 1 + len(others)
    assert location_key(FilesystemLocation("/srv/backups/")) == location_key(
        FilesystemLocation("/srv/x/../backups")
    )
    assert all(len(k) == 32 and k.isalnum() for k in keys)


def test_the_directory_is_private_and_recreated(tmp_path: Path) -> None:
    root = tmp_path / "kopia-cache"
    old = os.umask(0o077)
    try:
        made = repository_cache_dir(root, FilesystemLocation("/srv/backups"))
    finally:
        os.umask(old)
    assert made.parent == root and made.name == location_key(FilesystemLocation("/srv/backups"))
    root.chmod(0o755)
    made.rmdir()
    again = repository_cache_dir(root, FilesystemLocation("/srv/backups"))
    assert again == made
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(again.stat().st_mode) == 0o700


def test_the_flags_bound_the_contents_and_keep_listings_fresh() -> None:
    flags = {f[2:].partition("=")[0]: f.partition("=")[2] for f in KEPT_CACHE_FLAGS}
    assert flags["content-cache-size-limit-mb"] == flags["content-cache-size-mb"] == "1"
    assert int(flags["metadata-cache-size-limit-mb"]) >= int(flags["metadata-cache-size-mb"]) > 0
    assert flags["max-list-cache-duration"] == "0s"
    assert "disable-repository-format-cache" in flags
