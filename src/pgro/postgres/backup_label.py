"""`backup_label`: the mark of an online backup (`pg_backup_start`/`pg_backup_stop`,
`pg_basebackup`), read defensively.

A data directory holding `backup_label` is a base backup: PostgreSQL must replay the WAL
from the label's start location up to the backup's end before the database is
consistent. Without that WAL the backup is incomplete, and resetting the WAL
(`pg_resetwal -f`) would start an inconsistent database, so pgro never does it there
(`server.start_resetting_wal_if_needed`).

The file comes from the snapshot and is untrusted: it is read without following a link,
only when it is a regular file, and at most `LABEL_LIMIT` bytes; only values matching the
exact formats PostgreSQL writes are taken from it, and none is used as a path (the WAL
segment it names is looked up among the names pg_wal lists).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pgro.postgres.account import RunAccount
    from pgro.postgres.binaries import PostgresBinaries

BACKUP_LABEL: Final = "backup_label"
# PostgreSQL writes a few hundred bytes; anything larger is not a label worth reading.
LABEL_LIMIT: Final = 64 * 1024
# "START WAL LOCATION: 0/20000D0 (file 000000010000000000000002)"
_START = re.compile(
    r"^START WAL LOCATION: ([0-9A-F]{1,8}/[0-9A-F]{1,8}) \(file ([0-9A-F]{24})\)$", re.M
)
_CHECKPOINT = re.compile(r"^CHECKPOINT LOCATION: ([0-9A-F]{1,8}/[0-9A-F]{1,8})$", re.M)
_TIMELINE = re.compile(r"^START TIMELINE: ([0-9]{1,10})$", re.M)
_SEGMENT = re.compile(r"[0-9A-F]{24}")
# pg_controldata's lines for a backup recovery that has not reached the backup's end.
_CONTROL_BACKUP_START = re.compile(
    r"^Backup start location:\s*([0-9A-F]{1,8})/([0-9A-F]{1,8})$", re.M
)
_CONTROL_TIMELINE = re.compile(r"^Latest checkpoint's TimeLineID:\s*([0-9]{1,10})$", re.M)
_CONTROL_SEGMENT_SIZE = re.compile(r"^Bytes per WAL segment:\s*([0-9]{1,12})$", re.M)


@dataclass(frozen=True)
class BackupLabel:
    """What a `backup_label` says, where it says it in PostgreSQL's own format."""

    start_wal_location: str | None = None
    start_wal_file: str | None = None
    checkpoint_location: str | None = None
    start_timeline: int | None = None

    @classmethod
    def parse(cls, text: str) -> BackupLabel:
        start = _START.search(text)
        checkpoint = _CHECKPOINT.search(text)
        timeline = _TIMELINE.search(text)
        return cls(
            start_wal_location=start.group(1) if start else None,
            start_wal_file=start.group(2) if start else None,
            checkpoint_location=checkpoint.group(1) if checkpoint else None,
            start_timeline=int(timeline.group(1)) if timeline else None,
        )


def has_backup_label(pgdata: Path) -> bool:
    """Whether `pgdata` holds a `backup_label` entry of any kind (never followed)."""
    try:
        os.lstat(pgdata / BACKUP_LABEL)
    except OSError:
        return False
    return True


def read_backup_label(pgdata: Path) -> BackupLabel | None:
    """The parsed label, an empty `BackupLabel` when the entry is there but cannot be read
    as a label (a link, a directory, unreadable), or None when there is none."""
    if not has_backup_label(pgdata):
        return None
    try:
        fd = os.open(pgdata / BACKUP_LABEL, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return BackupLabel()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return BackupLabel()
        raw = os.read(fd, LABEL_LIMIT)
    except OSError:
        return BackupLabel()
    finally:
        os.close(fd)
    return BackupLabel.parse(raw.decode("ascii", errors="replace"))


def segment_name(timeline: int, lsn: int, segment_size: int) -> str:
    """The WAL file holding `lsn` (PostgreSQL's XLogFileName)."""
    segno = lsn // segment_size
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def pending_backup_recovery(
    binaries: PostgresBinaries, pgdata: Path, account: RunAccount, timeout: float = 60.0
) -> BackupLabel | None:
    """What `pg_control` says of a backup recovery that has not reached the backup's end
    (its start location), or None. A start of an online backup renames `backup_label` to
    `backup_label.old` before it replays; when that start fails, only `pg_control` still
    says the data directory is an online backup."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", **account.env()}
    try:
        proc = subprocess.run(  # type: ignore[call-overload]
            [binaries.tool("pg_controldata"), "-D", str(pgdata)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=env,
            cwd="/",
            **account.popen_kwargs(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = str(proc.stdout)
    start = _CONTROL_BACKUP_START.search(out)
    if proc.returncode != 0 or start is None:
        return None
    lsn = (int(start.group(1), 16) << 32) | int(start.group(2), 16)
    if lsn == 0:
        return None
    location = f"{start.group(1)}/{start.group(2)}"
    timeline, size = _CONTROL_TIMELINE.search(out), _CONTROL_SEGMENT_SIZE.search(out)
    if timeline is None or size is None or int(size.group(1)) <= 0:
        return BackupLabel(start_wal_location=location)
    name = segment_name(int(timeline.group(1)), lsn, int(size.group(1)))
    return BackupLabel(start_wal_location=location, start_wal_file=name)


def wal_segments(pgdata: Path) -> list[str]:
    """The WAL segment names pg_wal lists (sorted), ignoring anything else."""
    try:
        names = os.listdir(pgdata / "pg_wal")
    except OSError:
        return []
    return sorted(name for name in names if _SEGMENT.fullmatch(name))


def missing_wal_message(label: BackupLabel, segments: list[str]) -> str:
    """Why this online backup cannot be recovered, and what to do, for an error message."""
    if label.start_wal_file is None:
        what = (
            "the data directory holds a backup_label (it is an online backup) that does not "
            "name its start WAL location, and PostgreSQL could not find the WAL it needs"
        )
        first = "the backup's start"
    else:
        where = f"WAL location {label.start_wal_location} (segment {label.start_wal_file})"
        if label.start_wal_file not in segments:
            found = "pg_wal is empty" if not segments else f"pg_wal holds {_span(segments)}"
            what = (
                f"the snapshot is an online backup (backup_label) that started at {where}, "
                f"and that segment is missing: {found}"
            )
        else:
            what = (
                f"the snapshot is an online backup (backup_label) that started at {where}; "
                f"pg_wal holds {_span(segments)}, which ends before the backup's end"
            )
        first = f"segment {label.start_wal_file}"
    return (
        f"{what}. Without that WAL the backup is incomplete, and pgro does not reset the WAL "
        "of an online backup (that would start an inconsistent database). Restore the WAL "
        f"archived for this backup into pg_wal (from {first} up to the backup's end), or "
        "take the backup with its WAL (pg_basebackup --wal-method=stream, or copy pg_wal "
        "after pg_backup_stop)"
    )


def _span(segments: list[str]) -> str:
    if len(segments) == 1:
        return f"only segment {segments[0]}"
    return f"{len(segments)} segments, {segments[0]} to {segments[-1]}"


def incomplete_online_backup(pgdata: Path) -> str | None:
    """Without starting anything: why `pgdata` is an online backup that cannot be
    recovered as restored (its `backup_label` names a start segment pg_wal does not hold),
    else None. Where the label names no segment, or the segment is there, only a start
    tells (`server.start_resetting_wal_if_needed`)."""
    label = read_backup_label(pgdata)
    if label is None or label.start_wal_file is None:
        return None
    segments = wal_segments(pgdata)
    if label.start_wal_file in segments:
        return None
    return missing_wal_message(label, segments)
