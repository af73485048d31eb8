"""`pgro detect-version`: recover the PostgreSQL major version from a restored data volume.

The operator's fallback (reference restore-pipeline §3.6) when a restore Job finished but
its termination message never reached the operator (an evicted pod loses it). In the
`<restore>-version-detect` Job's pod, on the data volume the restore Job filled:

1. if `<root>/pgdata` leads (inside the volume) to a cluster root, its `PG_VERSION` is it;
2. else the restore's locate logic runs again on `<root>/postgres`, and as a last resort on
   the whole volume;
3. `<root>/pgdata` and `<root>/.postgres-version` are (re)written as the restore Job writes
   them, and the major version is the termination message (`error: <reason>: <detail>`
   and exit 1 when there is none).

The volume holds a snapshot's content, so it is read as hostile: no link is followed out of
the volume, and `PG_VERSION` must hold a major version.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from pgro.pipeline.job import classify
from pgro.postgres.confine import ConfinedTree, EscapesRoot, NotARegularFile, tame
from pgro.postgres.layout import NotPostgres, locate_data_directory, parse_major

# What the restore Job leaves at the volume root (`pipeline.restore_job`).
PGDATA_LINK: Final = "pgdata"
VERSION_FILE: Final = ".postgres-version"
RESTORED_DIR: Final = "postgres"
# Kubernetes keeps at most 4096 bytes of a termination message.
MESSAGE_LIMIT: Final = 4096
EXIT_FAILED: Final = 1
FOUND_VIA_LINK: Final = "pgdata-link"
FOUND_VIA_VOLUME: Final = "volume-search"


class PgdataInTheWay(NotPostgres):
    """`<root>/pgdata` is something pgro did not make and will not replace."""

    reason = "PgdataInTheWay"


@dataclass(frozen=True)
class DetectedVersion:
    major: str
    pgdata: PurePosixPath  # relative to the volume root, links resolved
    found_via: str  # FOUND_VIA_LINK, FOUND_VIA_VOLUME, or locate's "current-symlink"/"search"


@dataclass(frozen=True)
class DetectOutcome:
    detected: DetectedVersion | None
    reason: str = ""
    error: str = ""

    @property
    def message(self) -> str:
        """The termination message: the major version alone (the reference's), or the
        failure in the restore Job's form."""
        if self.detected is not None:
            return self.detected.major
        return f"error: {self.reason}: {self.error}"

    @property
    def exit_code(self) -> int:
        return 0 if self.detected is not None else EXIT_FAILED


def link_data_directory(root: Path, data: Path, major: str) -> PurePosixPath:
    """Point `<root>/pgdata` at `data` (a relative link, so it works wherever the volume is
    mounted) and write `<root>/.postgres-version`, replacing what was there; never writes
    through a link. `data` must be inside `root` (EscapesRoot otherwise)."""
    tree = ConfinedTree(root)
    target = tree.relative(data)
    with tree.parent(PGDATA_LINK) as (dfd, name):
        existing = _lstat(name, dfd)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise PgdataInTheWay(
                f"{root / PGDATA_LINK} is a directory, not the link the restore Job makes; "
                "it was not made by pgro: remove it, or delete the restore to restore again"
            )
        tmp = f".{name}.pgro-new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        os.symlink(str(target), tmp, dir_fd=dfd)
        # Atomic: the server's pod never sees the link missing.
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    tree.write_text(VERSION_FILE, major + "\n", mode=0o644)
    return target


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _is_directory(tree: ConfinedTree, path: PurePosixPath) -> bool:
    st = tree.lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _linked(root: Path, notes: list[str]) -> DetectedVersion | None:
    """The cluster `<root>/pgdata` leads to, if it stays in the volume and is one."""
    tree = ConfinedTree(root)
    link = root / PGDATA_LINK
    if tree.lstat(PGDATA_LINK) is None:
        notes.append(f"{link} is missing")
        return None
    try:
        real = tree.relative(PGDATA_LINK)
        if not (_is_directory(tree, real) and _is_directory(tree, real / "global")):
            notes.append(f"{link} does not lead to a PostgreSQL data directory")
            return None
        text = tree.read_text(real / "PG_VERSION", limit=64)
    except EscapesRoot as exc:
        notes.append(f"{link} is not followed, it leads out of the data volume: {tame(str(exc))}")
        return None
    except (NotARegularFile, FileNotFoundError, NotADirectoryError) as exc:
        notes.append(f"{link}: {tame(str(exc))}")
        return None
    if text is None:
        notes.append(f"{link} leads to a directory without PG_VERSION")
        return None
    try:
        major = parse_major(text, link / "PG_VERSION")
    except NotPostgres as exc:
        notes.append(str(exc))
        return None
    return DetectedVersion(major, real, FOUND_VIA_LINK)


def _locate(root: Path, notes: list[str]) -> DetectedVersion:
    """The restore's locate on what it restored, then on the whole volume."""
    restored = root / RESTORED_DIR
    tree = ConfinedTree(root)
    # A real directory only: a walk starting at a link would follow it out of the volume.
    if _is_directory(tree, PurePosixPath(RESTORED_DIR)):
        try:
            data = locate_data_directory(restored)
            return DetectedVersion(data.major, tree.relative(data.path), data.found_via)
        except NotPostgres as exc:
            notes.append(f"{restored}: {exc}")
    else:
        notes.append(f"{restored} is not a directory")
    try:
        data = locate_data_directory(root)
    except NotPostgres as exc:
        # What was tried is in the pod's log (`notes`); the message stays short.
        raise NotPostgres(
            f"no PostgreSQL data directory on the data volume {root} ({exc}); delete the "
            "restore to have the replica restore again"
        ) from None
    return DetectedVersion(data.major, tree.relative(data.path), FOUND_VIA_VOLUME)


def detect_version(root: Path, notes: list[str] | None = None) -> DetectedVersion:
    """The major version of the cluster on the volume at `root`, with `pgdata` and
    `.postgres-version` left as the restore Job leaves them. NotPostgres (or EscapesRoot)
    when there is none; `notes` collects why the earlier ways did not find it."""
    notes = [] if notes is None else notes
    linked = _linked(root, notes)
    if linked is not None:
        ConfinedTree(root).write_text(VERSION_FILE, linked.major + "\n", mode=0o644)
        return linked
    found = _locate(root, notes)
    link_data_directory(root, root / found.pgdata, found.major)
    return found


def run(root: Path) -> DetectOutcome:
    """Detect; never raises (the outcome is the termination message)."""
    notes: list[str] = []
    try:
        return DetectOutcome(detect_version(root, notes))
    except Exception as exc:
        reason, error = classify(exc)
        return DetectOutcome(None, reason, error)
    finally:
        for note in notes:
            print(f"  {note}", flush=True)


def main(root: Path, termination_log: Path) -> None:
    outcome = run(root)
    try:
        termination_log.write_bytes(outcome.message.encode()[:MESSAGE_LIMIT])
    except OSError as exc:
        print(f"cannot write the termination message to {termination_log}: {exc}", file=sys.stderr)
    if outcome.detected is not None:
        found = outcome.detected
        print(
            f"done: PostgreSQL {found.major} (PGDATA {found.pgdata}, found via {found.found_via})"
        )
    else:
        print(outcome.message, file=sys.stderr)
    sys.exit(outcome.exit_code)
