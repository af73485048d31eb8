"""Backups of a running server (issue 16, part 4): `pgro verify` end to end on kopia
snapshots taken while a real write load ran (tests/fixtures/live.py).

- a plain live snapshot (pg_wal, no backup_label) recovers by crash recovery and verifies;
- an online backup with its WAL recovers and verifies, with every row committed before
  `pg_backup_stop` was called;
- an online backup without its WAL fails `BackupIncomplete`, naming the backup's start WAL
  location and the fix, and its WAL is never reset (the reference resets it);
- the same with only part of its WAL, at the server level: also `BackupIncomplete`;
- an online backup that fails for another reason is retried once and never reset;
- the operator: the restore Job fails an online backup without its start WAL segment
  `BackupIncomplete` (permanent), and the pod's setup script never resets an online backup
  whose WAL ends early, not even when its pod is retried.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.pipeline.restore_job import parse_message
from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.backup_label import BACKUP_LABEL
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.server import (
    ONLINE_BACKUP_NOT_RESET,
    BackupIncomplete,
    PostgresServer,
    StartupFailed,
    socket_dir_for,
    start_resetting_wal_if_needed,
)
from pgro.runtimes.kubernetes.scripts import FIX_RESET_WAL_FLAG
from tests.fixtures.live_backups import LedgerBounds, LiveBackups, build_live_backups
from tests.fixtures.manifests import fs_manifest
from tests.integration.test_kube_setup_script import run_setup
from tests.integration.test_restore_job import _run as run_restore_job
from tests.integration.test_verify_cli import PGRO, processes_mentioning
from tests.integration.test_wal_reset_last_resort import corrupt_control_checksum


@pytest.fixture(scope="session")
def live(scratch_root: Path, account: RunAccount, binaries: PostgresBinaries) -> LiveBackups:
    """The three snapshots taken under write load (tests/fixtures/live.py)."""
    return build_live_backups(scratch_root / "live-backups", binaries, account)


def _verify(live: LiveBackups, kind: str, scratch: Path) -> tuple[int, dict[str, Any], str, Path]:
    """`pgro verify --keep` of the snapshot of `kind`: (exit code, report, progress, the
    kept work directory)."""
    manifest = fs_manifest(
        scratch / "m.yaml",
        live.path,
        live.password,
        snapshotFilter={"tags": {"kind": kind}},
    )
    work = scratch / "work"
    work.mkdir()
    os.chmod(work, 0o711)
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--json", "--work-dir", str(work), "--keep"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(proc.stdout)
    assert report["snapshot_id"] == live.snapshots[kind]
    assert processes_mentioning(str(work)) == []
    (kept,) = work.iterdir()
    return proc.returncode, report, proc.stderr, kept


def _kept_server(kept: Path, major: str, binaries: PostgresBinaries, account: RunAccount) -> Any:
    return PostgresServer(
        kept / "data" / major / "main",
        binaries,
        account,
        socket_dir=socket_dir_for(kept / "check"),
        log_path=kept / "check.log",
    )


def _assert_ledger(
    kept: Path,
    bounds: LedgerBounds,
    major: str,
    binaries: PostgresBinaries,
    account: RunAccount,
) -> int:
    """The restored database, started again on the kept data: `ledger` is exactly 1..k
    within `bounds`, one `load` row per ledger number, and its indexes check clean."""
    server = _kept_server(kept, major, binaries, account)
    server.start(120)
    try:
        conninfo = server.endpoint.conninfo("myapp", "postgres")
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute("SELECT count(*), min(n), max(n) FROM ledger").fetchone()
            assert row is not None
            count, low, high = row
            assert (count, low) == (high, 1), f"ledger is not 1..k: {row}"
            assert bounds.at_least <= high <= bounds.at_most, (high, bounds)
            assert conn.execute("SELECT count(*) FROM load").fetchone() == (high,)
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            for index in ("load_pkey", "load_k", "ledger_pkey"):
                conn.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
            return int(high)
    finally:
        server.stop()


def test_a_live_snapshot_recovers_and_verifies(
    live: LiveBackups,
    scratch: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
) -> None:
    code, report, _, kept = _verify(live, "live", scratch)
    assert code == 0, json.dumps(report, indent=1)
    assert report["outcome"] == "success"
    fixes = report["health_details"]["fixes"]
    assert fixes["reset_wal"] is False  # crash recovery replayed the WAL
    assert fixes["removed_stale_pid"] is True
    # pg_checksums refuses a copy that was not shut down cleanly; once single-user mode
    # has replayed its WAL and stopped cleanly, every page is read.
    [checksums] = [c for c in report["health_details"]["checks"] if c["name"] == "checksums"]
    assert checksums["status"] == "pass", checksums
    assert "blocks checked" in checksums["detail"]
    _assert_ledger(kept, live.ledger["live"], live.major, binaries, account)


def test_an_online_backup_with_its_wal_recovers_every_row_committed_before_it_ended(
    live: LiveBackups,
    scratch: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
) -> None:
    code, report, _, kept = _verify(live, "labelled", scratch)
    assert code == 0, json.dumps(report, indent=1)
    assert report["outcome"] == "success"
    assert report["health_details"]["fixes"]["reset_wal"] is False
    # Recovered from its backup_label (single-user mode, the first to open the data, ran
    # the backup recovery): PostgreSQL renames the label once the backup's end is reached.
    pgdata = kept / "data" / live.major / "main"
    assert not (pgdata / BACKUP_LABEL).exists()
    used = (pgdata / f"{BACKUP_LABEL}.old").read_text()
    assert f"START WAL LOCATION: {live.start_wal_location}" in used
    _assert_ledger(kept, live.ledger["labelled"], live.major, binaries, account)


def test_an_online_backup_without_its_wal_fails_backup_incomplete_and_is_not_reset(
    live: LiveBackups, scratch: Path
) -> None:
    code, report, progress, kept = _verify(live, "labelled-nowal", scratch)
    assert code == 1, json.dumps(report, indent=1)
    assert report["outcome"] == "failure"
    assert report["replica_healthy"] is False
    assert report["reason"] == "BackupIncomplete"
    error = report["error"]
    assert error.startswith(
        f"the snapshot is an online backup (backup_label) that started at WAL location "
        f"{live.start_wal_location} (segment {live.start_wal_file}), and "
        "that segment is missing: pg_wal is empty."
    )
    assert "Restore the WAL archived for this backup into pg_wal" in error
    assert "or take the backup with its WAL" in error
    assert report["health_details"]["fixes"]["reset_wal"] is False
    assert "pg_resetwal" not in progress
    # The evidence is as restored: no reset wrote a new segment, the label is intact.
    pgdata = kept / "data" / live.major / "main"
    assert sorted(p.name for p in (pgdata / "pg_wal").iterdir()) == ["archive_status"]
    assert (pgdata / BACKUP_LABEL).read_text() == live.labelfile
    assert (kept / "postgres.log").read_text().count("starting PostgreSQL") == 1


@pytest.fixture
def labelled_copy(live: LiveBackups, scratch: Path, account: RunAccount) -> Path:
    """A private copy of the online backup's data directory, WAL included."""
    assert live.labelled_tree is not None
    target = scratch / "labelled"
    shutil.copytree(live.labelled_tree, target, symlinks=True)
    hand_over(target, account)
    pgdata = target / live.major / "main"
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    return pgdata


def _server(pgdata: Path, scratch: Path, binaries: PostgresBinaries, account: RunAccount) -> Any:
    return PostgresServer(
        pgdata,
        binaries,
        account,
        socket_dir=socket_dir_for(scratch / "run"),
        log_path=scratch / "server.log",
        options={"listen_addresses": ""},
    )


def test_an_online_backup_missing_the_end_of_its_wal_fails_backup_incomplete(
    live: LiveBackups,
    labelled_copy: Path,
    scratch: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
) -> None:
    first, *rest = live.wal_segments
    for name in rest:
        (labelled_copy / "pg_wal" / name).unlink()
    server = _server(labelled_copy, scratch, binaries, account)
    notes: list[str] = []
    with pytest.raises(BackupIncomplete) as failed:
        start_resetting_wal_if_needed(server, 60, notes.append)
    assert not server.running()
    message = str(failed.value)
    assert (
        f"started at WAL location {live.start_wal_location} (segment {first}); "
        f"pg_wal holds only segment {first}, which ends before the backup's end"
    ) in message
    assert "WAL ends before end of online backup" in failed.value.log_tail
    assert notes == []  # no retry, no reset
    assert sorted(p.name for p in (labelled_copy / "pg_wal").iterdir()) == [
        first,
        "archive_status",
    ]
    # PostgreSQL renamed the label once it read it; pg_control still says the backup's
    # end is needed, and a second attempt gives the same verdict.
    assert (labelled_copy / f"{BACKUP_LABEL}.old").read_text() == live.labelfile
    with pytest.raises(BackupIncomplete) as again:
        start_resetting_wal_if_needed(server, 60, notes.append)
    assert f"started at WAL location {live.start_wal_location} (segment {first})" in str(
        again.value
    )
    assert notes == []


def test_an_online_backup_failing_for_another_reason_is_retried_and_never_reset(
    labelled_copy: Path,
    scratch: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
) -> None:
    corrupt_control_checksum(labelled_copy)
    control = (labelled_copy / "global" / "pg_control").read_bytes()
    segments = sorted(p.name for p in (labelled_copy / "pg_wal").iterdir())
    server = _server(labelled_copy, scratch, binaries, account)
    notes: list[str] = []
    with pytest.raises(StartupFailed) as failed:
        start_resetting_wal_if_needed(server, 60, notes.append)
    assert type(failed.value) is StartupFailed
    assert str(failed.value).endswith(ONLINE_BACKUP_NOT_RESET)
    assert "incorrect checksum in control file" in failed.value.log_tail
    assert len(notes) == 1 and "retrying once" in notes[0]
    # Untouched: pg_resetwal would have rewritten pg_control and pg_wal.
    assert (labelled_copy / "global" / "pg_control").read_bytes() == control
    assert sorted(p.name for p in (labelled_copy / "pg_wal").iterdir()) == segments


def test_the_restore_job_fails_an_online_backup_without_its_wal(
    live: LiveBackups, scratch: Path
) -> None:
    code, message, output = run_restore_job(
        {
            "SNAPSHOT_ID": live.snapshots["labelled-nowal"],
            "KOPIA_FILESYSTEM_PATH": str(live.path),
            "KOPIA_PASSWORD": live.password,
        },
        scratch,
    )
    assert code == 2, output  # permanent: a retry restores the same files
    version, failure = parse_message(message)
    assert version is None
    assert failure.startswith(
        f"BackupIncomplete: the snapshot is an online backup (backup_label) that started at "
        f"WAL location {live.start_wal_location} (segment {live.start_wal_file})"
    )
    assert not (scratch / "pgdata-volume" / "pgdata").exists()  # nothing for a pod to serve


def test_the_pod_setup_script_never_resets_an_online_backup(
    live: LiveBackups,
    labelled_copy: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
) -> None:
    first, *rest = live.wal_segments
    for name in rest:
        (labelled_copy / "pg_wal" / name).unlink()
    root = labelled_copy.parent.parent
    control = (labelled_copy / "global" / "pg_control").read_bytes()
    for attempt in ("first", "retried pod"):
        run = run_setup(binaries, account, labelled_copy, root)
        assert run.returncode == 1, (attempt, run.output)
        assert "setup: BackupIncomplete: the data directory is an online backup" in run.output
        assert "Restore the WAL archived for this backup into pg_wal" in run.output
        assert "running pg_resetwal" not in run.output
        assert not (root / FIX_RESET_WAL_FLAG).exists()
        assert sorted(p.name for p in (labelled_copy / "pg_wal").iterdir()) == [
            first,
            "archive_status",
        ]
    # The first attempt's recovery renamed the label: the retry knew it from pg_control.
    assert not (labelled_copy / BACKUP_LABEL).exists()
    assert (labelled_copy / "global" / "pg_control").read_bytes() != control
