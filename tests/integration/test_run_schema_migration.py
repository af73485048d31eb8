"""The persistent-schema migration in `pgro run` (features §2.1), end to end: real kopia
snapshots of a real cluster, the real `pgro run`, rows written through the stable endpoint.

Each test runs two replicas side by side in one `pgro run`, so the cases share the slow part
(a first restore, a second snapshot, a second restore)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psycopg

from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import PASSWORD, Backups, Running, StartRun, connect, marker

# "* * * * *": a restore of each new snapshot within a minute, and a copy budget of 12 s
# (20 % of the cron interval).
SCHEDULE = "* * * * *"


def _manifest(path: Path, backups: Backups, **replicas: dict[str, Any]) -> Path:
    return write_manifest(
        path,
        secret_doc("kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        *(
            replica_doc(
                name,
                ephemeral=False,
                scheduleJitter="0s",
                schedule=SCHEDULE,
                switchoverGracePeriod="10m",
                **spec,
            )
            for name, spec in replicas.items()
        ),
    )


def _serving(run: Running, name: str) -> str:
    run.wait_for(f"{name} to serve", lambda: run.replica(name)["status"].get("phase") == "Ready")
    return str(run.replica(name)["status"]["currentRestore"])


def _switched(run: Running, name: str, old: str, timeout: float = 240) -> dict[str, Any]:
    run.wait_for(
        f"{name} to switch over from {old}",
        lambda: run.replica(name)["status"].get("currentRestore") not in (None, old),
        timeout=timeout,
    )
    return run.replica(name)


def _events(entry: dict[str, Any], reason: str) -> list[str]:
    return [e["note"] for e in entry.get("events", []) if e["reason"] == reason]


def _rows(entry: dict[str, Any], query: str) -> list[tuple[Any, ...]]:
    with connect(entry) as conn:
        return conn.execute(query).fetchall()


def test_persistent_schemas_are_carried_to_the_next_restore(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    # The first snapshot has a table the second one lacks (a view on it cannot be copied),
    # and the second carries a stale `persistent_data` the copy must replace.
    backups.snapshot("old", ["CREATE TABLE only_old (id int)"])
    run = start_run(
        _manifest(
            scratch / "m.yaml",
            backups,
            orders={
                "persistentSchemas": ["persistent_data", "nonexistent_schema"],
                "extraUsers": [{"name": "reporter", "schemas": ["persistent_data"]}],
                "persistentUsers": [{"name": "reader", "readSchemas": ["persistent_data"]}],
            },
            views={"persistentSchemas": ["reports"]},
            # The schema the application's own tables live in (reference: "conflict").
            whole={"persistentSchemas": ["public"]},
        )
    )
    first = {name: _serving(run, name) for name in ("orders", "views", "whole")}
    orders, views, whole = (run.replica(n) for n in ("orders", "views", "whole"))
    # The first restore needs no migration.
    assert orders["status"].get("schemaMigrationPhase") is None

    # Users write into the persistent schemas through the stable endpoint, as analytics.
    with connect(orders) as conn:
        conn.execute("CREATE SCHEMA persistent_data")
        conn.execute("CREATE TABLE persistent_data.t (id int PRIMARY KEY, note text)")
        conn.execute(
            "INSERT INTO persistent_data.t SELECT g, 'row ' || g FROM generate_series(1, 42) g"
        )
        conn.commit()
    with connect(views) as conn:
        conn.execute("CREATE SCHEMA reports")
        conn.execute("CREATE TABLE reports.kept AS SELECT 7 AS n")
        conn.execute("CREATE VIEW reports.broken AS SELECT id FROM public.only_old")
        conn.commit()
    with connect(whole) as conn:
        conn.execute("CREATE TABLE public.mine AS SELECT 'written on the first' AS note")
        conn.commit()

    backups.snapshot(
        "new",
        [
            "DROP TABLE only_old",
            "CREATE SCHEMA persistent_data",
            "CREATE TABLE persistent_data.t (stale text)",
            "INSERT INTO persistent_data.t VALUES ('from the snapshot')",
        ],
    )
    orders = _switched(run, "orders", first["orders"])
    views = _switched(run, "views", first["views"])
    whole = _switched(run, "whole", first["whole"])

    # Carried: the rows users wrote, not the snapshot's stale copy, on the new snapshot.
    assert marker(orders) == "new"
    assert _rows(orders, "SELECT count(*), count(DISTINCT note) FROM persistent_data.t") == [
        (42, 42)
    ]
    columns = _rows(
        orders,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'persistent_data' AND table_name = 't' ORDER BY 1",
    )
    assert columns == [("id",), ("note",)]
    # Owned by the analytics user, never by a superuser (the copy runs as that role).
    owners = _rows(
        orders,
        "SELECT DISTINCT r.rolname, r.rolsuper FROM pg_class c"
        " JOIN pg_roles r ON r.oid = c.relowner"
        " WHERE c.relnamespace = 'persistent_data'::regnamespace",
    )
    assert owners == [("analytics", False)]
    status = orders["status"]
    # The dump carries no privileges: the roles' grants hold on what the copy created.
    for role in ("reporter", "reader"):
        with connect(orders, user=role) as conn:
            assert conn.execute("SELECT count(*) FROM persistent_data.t").fetchone() == (42,)
    assert status["schemaMigrationPhase"] == "complete"
    assert status["persistentSchemasMissing"] == ["nonexistent_schema"]
    assert status["persistentSchemaDataSize"]
    assert _events(orders, "PersistentSchemaMissingOnSource")
    assert "nonexistent_schema" in _events(orders, "PersistentSchemaMissingOnSource")[0]
    # The old restore still serves, untouched, until the grace period ends.
    old_status = {r["name"]: r["status"].get("phase") for r in orders["restores"]}
    assert old_status[first["orders"]] == "Active"

    # Partial: the view's DDL fails on the new restore; the rest came, and it serves.
    assert views["status"]["schemaMigrationPhase"] == "partial"
    assert _rows(views, "SELECT n FROM reports.kept") == [(7,)]
    assert _events(views, "SchemaMigrationPartial") == ["1 statement error(s) while copying"]

    # `public` itself carried: the new restore serves the old one's, marker included, and
    # is Active, not Failed.
    assert whole["status"]["schemaMigrationPhase"] == "complete"
    assert _rows(whole, "SELECT note FROM public.mine") == [("written on the first",)]
    assert marker(whole) == "old"
    assert {r["status"].get("phase") for r in whole["restores"]} == {"Active"}

    # What analytics creates in a carried schema later is readable by the roles granted the
    # schema (default privileges for its owner).
    with connect(orders) as conn:
        conn.execute("CREATE TABLE persistent_data.later AS SELECT 1 AS n")
        conn.commit()
    for role in ("reporter", "reader"):
        with connect(orders, user=role) as conn:
            assert conn.execute("SELECT n FROM persistent_data.later").fetchone() == (1,)
    assert run.stop() == 0


def test_a_copy_over_budget_is_skipped_and_a_killed_one_is_retried(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("old")
    manifest = _manifest(
        scratch / "m.yaml",
        backups,
        slow={"persistentSchemas": ["persistent_data"]},
        killed={"persistentSchemas": ["persistent_data"]},
    )
    run = start_run(manifest)
    first = {name: _serving(run, name) for name in ("slow", "killed")}
    locks: dict[str, psycopg.Connection[Any]] = {}
    for name in ("slow", "killed"):
        entry = run.replica(name)
        with connect(entry) as conn:
            conn.execute("CREATE SCHEMA persistent_data")
            conn.execute("CREATE TABLE persistent_data.t AS SELECT 1 AS id")
            conn.commit()
        # A session on the serving restore that pg_dump's lock waits behind.
        locks[name] = connect(entry)
        locks[name].execute("LOCK TABLE persistent_data.t IN ACCESS EXCLUSIVE MODE")

    backups.snapshot("new")
    run.wait_for(
        "the copy of `killed` to start",
        lambda: run.replica("killed")["status"].get("schemaMigrationPhase") == "active",
        timeout=240,
    )
    # kill -9 in the middle of the copy; the servers and endpoints keep running.
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(30)
    locks.pop("killed").close()
    run = start_run(manifest, state=run.state)

    # Retried, not claimed: the copy that died with pgro is recorded failed, then redone.
    killed = _switched(run, "killed", first["killed"])
    assert killed["status"]["schemaMigrationPhase"] == "complete"
    assert _rows(killed, "SELECT id FROM persistent_data.t") == [(1,)]
    assert any("without a result" in n for n in _events(killed, "SchemaMigrationFailed"))

    # Over budget (12 s) behind the lock: abandoned, the schema dropped on the new restore,
    # and the switchover goes ahead.
    slow = _switched(run, "slow", first["slow"])
    assert slow["status"]["schemaMigrationPhase"] == "timeout-skipped"
    assert _rows(slow, "SELECT count(*) FROM pg_namespace WHERE nspname = 'persistent_data'") == [
        (0,)
    ]
    [note] = _events(slow, "SchemaMigrationTimedOut")
    assert "Persistent schemas [persistent_data] were dropped" in note
    assert not _copy_processes()
    locks.pop("slow").close()
    assert run.stop() == 0


def _copy_processes() -> list[int]:
    """pg_dump or pg_restore processes still running anywhere on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if os.path.basename(argv0) in (b"pg_dump", b"pg_restore"):
                found.append(int(entry.name))
    return found
