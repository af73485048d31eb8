"""`pgro run` and an online backup without its WAL (issue 16, part 4): the restore fails
`BackupIncomplete` in the restore worker's first start, naming the backup's start WAL
segment, its WAL is never reset, and the restore already serving keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pgro.postgres.account import hand_over
from pgro.postgres.server import PostgresServer
from tests.fixtures.live_backups import OnlineBackup, take_online_backup
from tests.fixtures.run_harness import Backups, Running, StartRun, manifest_for, marker

SOURCE = "postgres@db-run:/var/lib/postgresql"


def _online_backup_without_wal(backups: Backups) -> tuple[str, OnlineBackup]:
    """An online backup of the source (pg_backup_start/stop around a file copy), its WAL
    archived elsewhere: backup_label, an empty pg_wal. Returns (snapshot, backup)."""
    pgdata = backups.source / backups.binaries.major / "main"
    (pgdata / "postgresql.conf").touch()
    server = PostgresServer(
        pgdata,
        backups.binaries,
        backups.account,
        socket_dir=backups.scratch / "src-online",
        log_path=backups.scratch / "src.log",
    )
    target = backups.scratch / "online-backup"
    server.start(60)
    try:
        backup = take_online_backup(
            server.endpoint.conninfo("myapp", "postgres"),
            backups.source,
            target,
            backups.binaries.major,
        )
    finally:
        server.stop()
    for tree in (pgdata, target / backups.binaries.major / "main"):
        (tree / "postgresql.conf").unlink()
    hand_over(target, backups.account)
    return backups.kopia.snapshot_create(target, override_source=SOURCE), backup


def _restore_of(run: Running, snapshot: str) -> dict[str, Any] | None:
    for restore in run.replica("orders")["restores"]:
        if restore["spec"]["snapshot"] == snapshot:
            return dict(restore)
    return None


def test_an_online_backup_without_its_wal_fails_and_the_serving_restore_keeps_serving(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("good")
    run = start_run(manifest_for(scratch / "m.yaml", backups, schedule="* * * * *"))
    run.wait_for(
        "the good snapshot to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
        timeout=180,
    )
    serving = run.replica("orders")["status"]["currentRestore"]
    assert marker(run.replica("orders")) == "good"

    snapshot, backup = _online_backup_without_wal(backups)
    run.wait_for(
        "the restore of the incomplete backup to fail",
        lambda: (
            (r := _restore_of(run, snapshot)) is not None and r["status"].get("phase") == "Failed"
        ),
        timeout=240,
    )
    failed = _restore_of(run, snapshot)
    assert failed is not None
    shown = json.dumps(failed["status"]) + json.dumps(run.replica("orders").get("events", []))
    assert "BackupIncomplete" in shown
    assert (
        f"started at WAL location {backup.start_wal_location} "
        f"(segment {backup.start_wal_file}), and that segment is missing: pg_wal is empty"
    ) in shown
    assert "pg_resetwal" not in shown
    work_log = (run.state / "restores" / "default" / failed["name"] / "work.log").read_text()
    assert "resetting WAL" not in work_log

    entry = run.replica("orders")
    assert entry["status"]["currentRestore"] == serving
    assert marker(entry) == "good"
    assert run.stop() == 0
