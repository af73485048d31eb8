"""`pgro run` resets the WAL of a restored cluster that cannot start, as `pgro verify` and the
operator's pod do (features.md §1.E): the restore worker starts the server once privately
with `start_resetting_wal_if_needed`, and the server `pgro run` serves then starts cleanly.

The cluster: a snapshot whose `pg_control` checksum no longer matches (a torn copy of the
file). PostgreSQL refuses it for a reason pgro does not recognise, so the start is retried
once and the WAL then reset as the last resort; pg_resetwal rewrites pg_control and the data
is all there.
"""

from __future__ import annotations

from pathlib import Path

from pgro.postgres.server import LAST_RESORT_NOTE
from tests.fixtures.run_harness import Backups, StartRun, connect, manifest_for, marker
from tests.integration.test_wal_reset_last_resort import corrupt_control_checksum

ROWS = 50


def test_a_snapshot_that_cannot_start_is_reset_and_serves(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("torn", [f"CREATE TABLE kept AS SELECT generate_series(1, {ROWS}) AS v"])
    corrupt_control_checksum(backups.source / backups.binaries.major / "main")
    torn = backups.kopia.snapshot_create(
        backups.source, override_source="postgres@db-run:/var/lib/postgresql"
    )
    run = start_run(manifest_for(scratch / "m.yaml", backups, schedule="* * * * *"))
    run.wait_for(
        "the restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
        timeout=180,
    )
    entry = run.replica("orders")
    serving = entry["status"]["currentRestore"]
    restore = next(r for r in entry["restores"] if r["name"] == serving)
    assert restore["spec"]["snapshot"] == torn
    assert restore["status"]["fixes"]["reset_wal"] is True
    # The data survived the reset, and the analytics user reads it through the endpoint.
    assert marker(entry) == "torn"
    with connect(entry) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (ROWS,)

    rdir = run.state / "restores" / "default" / serving
    work_log = (rdir / "work.log").read_text()
    assert "retrying once" in work_log
    assert LAST_RESORT_NOTE in work_log
    # Refused twice (the worker's start and its retry), never again: the server pgro run
    # serves started on the reset cluster, first time, without a restart.
    server_log = (rdir / "postgres.log").read_text()
    assert server_log.count("incorrect checksum in control file") == 2
    assert run.stop() == 0
