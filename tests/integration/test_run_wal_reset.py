"""`pgro run` resets the WAL of a restored cluster that cannot start, as `pgro verify` and the
operator's pod do (features.md §1.E): the restore worker starts the server once privately
with `start_resetting_wal_if_needed`, and the server `pgro run` serves then starts cleanly.

Two real clusters that need it:
- a snapshot taken after an unclean stop whose WAL is gone: crash recovery cannot find its
  checkpoint record (a known WAL signature), so the WAL is reset at once;
- a snapshot whose `pg_control` checksum no longer matches (a torn copy of the file):
  PostgreSQL refuses it for a reason pgro does not recognise, so the start is retried once
  and the WAL then reset as the last resort.
In both, every row was written before a checkpoint, so all of them survive the reset.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psycopg

from pgro.postgres.server import LAST_RESORT_NOTE, RESET_WAL_NOTE, PostgresServer
from tests.fixtures.run_harness import Backups, Running, StartRun, connect, manifest_for, marker
from tests.integration.test_wal_reset_last_resort import corrupt_control_checksum

ROWS = 50
SOURCE = "postgres@db-run:/var/lib/postgresql"


def _serving(run: Running) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(replica entry, serving restore, its directory) once the replica serves."""
    run.wait_for(
        "the restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
        timeout=180,
    )
    entry = run.replica("orders")
    serving = entry["status"]["currentRestore"]
    restore = next(r for r in entry["restores"] if r["name"] == serving)
    return entry, restore, run.state / "restores" / "default" / serving


def _assert_all_rows_served(entry: dict[str, Any], expected_marker: str) -> None:
    assert marker(entry) == expected_marker
    with connect(entry) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (ROWS,)


def _crash_and_lose_the_wal(backups: Backups) -> None:
    """The source cluster, its rows checkpointed, stopped uncleanly (immediate shutdown:
    crash recovery is due) and its WAL segments then removed."""
    pgdata = backups.source / backups.binaries.major / "main"
    (pgdata / "postgresql.conf").touch()
    server = PostgresServer(
        pgdata,
        backups.binaries,
        backups.account,
        socket_dir=backups.scratch / "src-crash",
        log_path=backups.scratch / "src.log",
    )
    server.start(60)
    try:
        conninfo = server.endpoint.conninfo("myapp", "postgres")
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("CREATE TABLE marker (v text)")
            c.execute("INSERT INTO marker VALUES ('crashed')")
            c.execute(f"CREATE TABLE kept AS SELECT generate_series(1, {ROWS}) AS v")
            c.execute("CHECKPOINT")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGQUIT)
    finally:
        server.stop()
    (pgdata / "postgresql.conf").unlink()
    segments = [p for p in (pgdata / "pg_wal").iterdir() if p.is_file()]
    assert segments
    for segment in segments:
        segment.unlink()


def test_a_snapshot_missing_its_wal_is_reset_at_once_and_serves(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    _crash_and_lose_the_wal(backups)
    crashed = backups.kopia.snapshot_create(backups.source, override_source=SOURCE)
    run = start_run(manifest_for(scratch / "m.yaml", backups, schedule="* * * * *"))
    entry, restore, rdir = _serving(run)
    assert restore["spec"]["snapshot"] == crashed
    assert restore["status"]["fixes"]["reset_wal"] is True
    _assert_all_rows_served(entry, "crashed")

    work_log = (rdir / "work.log").read_text()
    assert "crash recovery cannot find its WAL" in work_log
    assert RESET_WAL_NOTE in work_log
    assert "retrying once" not in work_log  # a known signature: no retry first
    server_log = (rdir / "postgres.log").read_text()
    assert server_log.count("could not locate a valid checkpoint record") == 1
    assert run.stop() == 0


def test_a_snapshot_that_cannot_start_is_reset_as_the_last_resort_and_serves(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("torn", [f"CREATE TABLE kept AS SELECT generate_series(1, {ROWS}) AS v"])
    corrupt_control_checksum(backups.source / backups.binaries.major / "main")
    torn = backups.kopia.snapshot_create(backups.source, override_source=SOURCE)
    run = start_run(manifest_for(scratch / "m.yaml", backups, schedule="* * * * *"))
    entry, restore, rdir = _serving(run)
    assert restore["spec"]["snapshot"] == torn
    assert restore["status"]["fixes"]["reset_wal"] is True
    _assert_all_rows_served(entry, "torn")

    work_log = (rdir / "work.log").read_text()
    assert "retrying once" in work_log
    assert LAST_RESORT_NOTE in work_log
    # Refused twice (the worker's start and its retry), never again: the server pgro run
    # serves started on the reset cluster, first time, without a restart.
    server_log = (rdir / "postgres.log").read_text()
    assert server_log.count("incorrect checksum in control file") == 2
    assert run.stop() == 0
