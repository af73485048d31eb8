"""`_pgro.restore_info` through `pgro run` end to end: real kopia snapshots, real servers,
the real endpoint (features.md §2.7; the reference's `switchover.rs` stage asserts)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.runtimes.embedded.store import Store
from tests.fixtures.run_harness import Backups, StartRun, connect, manifest_for, phases

ROW = (
    "SELECT snapshot_id, snapshot_time, stage, fixes, restored_at, last_transition_time "
    "FROM _pgro.restore_info WHERE id = 1"
)


def _row(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, Any]:
    cur = conn.execute(ROW)
    found = cur.fetchone()
    assert found is not None and cur.description is not None
    return {d.name: v for d, v in zip(cur.description, found, strict=True)}


def _through_endpoint(entry: dict[str, Any]) -> dict[str, Any]:
    """Row 1 as the analytics user reads it through the replica's endpoint (PgBouncer)."""
    with connect(entry, "postgres") as conn:
        return _row(conn)


def _on_own_server(state: Path, restore: str) -> dict[str, Any]:
    """Row 1 of a restore's own server, over the private socket pgro recorded for it."""
    store = Store(state / "state.db")
    try:
        socket = store.setting(f"server-socket/default/{restore}")
        port = store.setting(f"server-port/default/{restore}")
    finally:
        store.close()
    assert socket and port, f"no server recorded for {restore}"
    with psycopg.connect(host=socket, port=port, user="postgres", dbname="postgres") as conn:
        return _row(conn)


def _restore(entry: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in entry["restores"] if r["name"] == name)


def _assert_describes(row: dict[str, Any], restore: dict[str, Any], stage: str) -> None:
    assert row["snapshot_id"] == restore["spec"]["snapshot"]
    # kopia's nanoseconds: PostgreSQL rounds to the microsecond, Python truncates.
    expected_time = datetime.fromisoformat(restore["spec"]["snapshotTime"])
    assert abs(row["snapshot_time"] - expected_time) <= timedelta(microseconds=1)
    assert row["stage"] == stage
    assert row["fixes"] == restore["status"]["fixes"]
    assert row["restored_at"] is not None and row["last_transition_time"] is not None


def test_restore_info_names_the_serving_restore_and_marks_the_superseded_one_outgoing(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("old")
    manifest = manifest_for(
        scratch / "m.yaml",
        backups,
        schedule="* * * * *",
        # The old restore keeps running long enough to be read after the switchover.
        switchoverGracePeriod="30m",
    )
    run = start_run(manifest)
    run.wait_for(
        "the first restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
    )
    entry = run.replica("orders")
    first = entry["status"]["currentRestore"]
    first_doc = _restore(entry, first)
    assert first_doc["status"]["fixes"], "the restore reports its repairs"
    # The analytics user reads it through the endpoint, and only reads it.
    _assert_describes(_through_endpoint(entry), first_doc, "ready")
    with connect(entry, "postgres") as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE _pgro.restore_info SET stage = 'x'")
        conn.rollback()
        conn.autocommit = True  # the next statement's transaction starts writable
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE _pgro.restore_info SET stage = 'x'")

    backups.snapshot("new")
    run.wait_for(
        "the switchover to the new snapshot",
        lambda: run.replica("orders")["status"].get("currentRestore") not in (None, first),
        timeout=180,
    )
    entry = run.replica("orders")
    second = entry["status"]["currentRestore"]
    # Before the sweep: the superseded restore still runs, marked outgoing on its server.
    assert phases(entry)[first] == "Active"
    run.wait_for(
        "the outgoing mark on the old restore",
        lambda: _on_own_server(run.state, first)["stage"] == "outgoing",
        timeout=30,
    )
    old_row = _on_own_server(run.state, first)
    _assert_describes(old_row, first_doc, "outgoing")
    assert old_row["last_transition_time"] > old_row["restored_at"]
    # The endpoint serves the new restore, which says so.
    second_doc = _restore(entry, second)
    assert second_doc["spec"]["snapshot"] != first_doc["spec"]["snapshot"]
    _assert_describes(_through_endpoint(entry), second_doc, "ready")
    _assert_describes(_on_own_server(run.state, second), second_doc, "ready")
    assert run.stop() == 0
