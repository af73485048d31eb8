"""`backup_label` read defensively (`pgro.postgres.backup_label`): PostgreSQL's own format
only, never followed, never a path, and the message that names the missing WAL."""

from __future__ import annotations

import os
from pathlib import Path

from pgro.postgres.backup_label import (
    LABEL_LIMIT,
    BackupLabel,
    incomplete_online_backup,
    missing_wal_message,
    read_backup_label,
    segment_name,
    wal_segments,
)

LABEL = (
    "START WAL LOCATION: 0/20000D0 (file 000000010000000000000002)\n"
    "CHECKPOINT LOCATION: 0/2013600\n"
    "BACKUP METHOD: streamed\n"
    "BACKUP FROM: primary\n"
    "START TIME: 2026-12-04 13:46:57 UTC\n"
    "LABEL: pgro-test\n"
    "START TIMELINE: 1\n"
)
START = "000000010000000000000002"


def _pgdata(tmp_path: Path, label: str | None, segments: tuple[str, ...] = ()) -> Path:
    pgdata = tmp_path / "main"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    for name in segments:
        (pgdata / "pg_wal" / name).write_bytes(b"")
    if label is not None:
        (pgdata / "backup_label").write_text(label)
    return pgdata


def test_a_label_is_parsed_in_postgresql_s_format() -> None:
    label = BackupLabel.parse(LABEL)
    assert label == BackupLabel("0/20000D0", START, "0/2013600", 1)


def test_values_in_another_format_are_not_taken() -> None:
    hostile = (
        "START WAL LOCATION: 0/20000D0 (file ../../../../etc/passwd)\n"
        "CHECKPOINT LOCATION: 0/2013600; rm -rf /\n"
        "START TIMELINE: 99999999999999999999\n"
        " START WAL LOCATION: 0/1 (file 000000010000000000000001)\n"
    )
    assert BackupLabel.parse(hostile) == BackupLabel()
    assert BackupLabel.parse("") == BackupLabel()
    assert BackupLabel.parse("\x00\xff" * 100) == BackupLabel()


def test_no_label_is_none_and_an_unreadable_one_is_an_empty_label(tmp_path: Path) -> None:
    assert read_backup_label(_pgdata(tmp_path / "a", None)) is None
    linked = _pgdata(tmp_path / "b", None)
    (tmp_path / "elsewhere").write_text(LABEL)
    os.symlink(tmp_path / "elsewhere", linked / "backup_label")
    assert read_backup_label(linked) == BackupLabel()  # present, never followed
    directory = _pgdata(tmp_path / "c", None)
    (directory / "backup_label").mkdir()
    assert read_backup_label(directory) == BackupLabel()


def test_only_the_first_bytes_of_a_huge_label_are_read(tmp_path: Path) -> None:
    pgdata = _pgdata(tmp_path, "x" * LABEL_LIMIT + "\n" + LABEL)
    assert read_backup_label(pgdata) == BackupLabel()
    assert read_backup_label(_pgdata(tmp_path / "ok", LABEL + "y" * LABEL_LIMIT)) == (
        BackupLabel.parse(LABEL)
    )


def test_wal_segments_lists_segment_names_only(tmp_path: Path) -> None:
    pgdata = _pgdata(tmp_path, None, (START, "000000010000000000000003", "00000002.history"))
    (pgdata / "pg_wal" / "000000010000000000000004.partial").write_bytes(b"")
    assert wal_segments(pgdata) == [START, "000000010000000000000003"]
    assert wal_segments(tmp_path / "nowhere") == []


def test_segment_names_follow_postgresql() -> None:
    mib16 = 16 * 2**20
    assert segment_name(1, 0x20000D0, mib16) == START
    assert segment_name(3, (0x1 << 32) | 0xFF000028, mib16) == "0000000300000001000000FF"
    assert segment_name(1, (0x2 << 32) | 0x40000000, 2**30) == "000000010000000200000001"


def test_a_label_whose_start_segment_is_missing_is_incomplete(tmp_path: Path) -> None:
    message = incomplete_online_backup(_pgdata(tmp_path, LABEL))
    assert message is not None
    assert message.startswith(
        f"the snapshot is an online backup (backup_label) that started at WAL location "
        f"0/20000D0 (segment {START}), and that segment is missing: pg_wal is empty."
    )
    assert "Restore the WAL archived for this backup into pg_wal" in message
    later = _pgdata(tmp_path / "later", LABEL, ("000000010000000000000005",))
    assert "pg_wal holds only segment 000000010000000000000005" in str(
        incomplete_online_backup(later)
    )


def test_only_a_start_can_judge_the_rest(tmp_path: Path) -> None:
    assert incomplete_online_backup(_pgdata(tmp_path / "a", None)) is None
    assert incomplete_online_backup(_pgdata(tmp_path / "b", LABEL, (START,))) is None
    assert incomplete_online_backup(_pgdata(tmp_path / "c", "garbage")) is None


def test_the_message_for_a_label_without_a_start_or_with_part_of_its_wal() -> None:
    assert "does not name its start WAL location" in missing_wal_message(BackupLabel(), [])
    partial = missing_wal_message(BackupLabel.parse(LABEL), [START, "000000010000000000000003"])
    assert (
        f"pg_wal holds 2 segments, {START} to 000000010000000000000003, which ends before "
        "the backup's end"
    ) in partial
