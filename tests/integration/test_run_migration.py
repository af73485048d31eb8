"""`migrateTo` in `pgro run` (features §2.2), end to end: a real kopia snapshot of a real
cluster that already carries an older migration batch, the real `pgro run --migrator` with the
stand-in migrator (tests/fixtures/fake_migrator.py) run as the PostgreSQL account, results read
back from the restored database.

One `pgro run` holds the three `--migrator` cases side by side (a passing migration, a failing
one, and a slow one during which pgro is killed with SIGKILL and started again), so they share
the slow part; a second run without `--migrator` shows the refusal."""

from __future__ import annotations

import json
import shlex
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import PASSWORD, PGRO, Backups, Running, StartRun, connect

FAKE_MIGRATOR = Path(__file__).parents[1] / "fixtures" / "fake_migrator.py"
# Debian's interpreter with psycopg (setup installs python3-psycopg): the PostgreSQL account
# cannot run the project's virtualenv under root's private home.
MIGRATOR = shlex.join(
    ["/usr/bin/env", "FAKE_MIGRATOR_SLEEP=8", "/usr/bin/python3", str(FAKE_MIGRATOR), "migrate"]
)
VERSION_ID = "44444444-4444-4444-4444-444444444444"
OLD_MIGRATION = "1600000000-createPatients.js"
# The snapshot as production leaves it: an application table, a scratch schema the
# rehearsal drops first, and the batch that built it, logged a day before the backup.
SOURCE_SQL = [
    "CREATE TABLE patients (id int PRIMARY KEY, name text UNIQUE)",
    "INSERT INTO patients VALUES (1, 'Jane Doe')",
    "CREATE SCHEMA scratchpad",
    "CREATE TABLE scratchpad.junk AS SELECT 1 AS n",
    "CREATE SCHEMA logs",
    "CREATE TABLE logs.migrations (migrations jsonb, direction text, batch_duration_ms bigint,"
    " stats jsonb, logged_at timestamptz DEFAULT now())",
    "INSERT INTO logs.migrations VALUES"
    f" ('[\"{OLD_MIGRATION}\"]', 'up', 900, '{{\"durationMsPerMigration\":"
    f" {{\"{OLD_MIGRATION}\": 900}}}}', now() - interval '1 day')",
]


def _manifest(path: Path, backups: Backups, **versions: str) -> Path:
    return write_manifest(
        path,
        secret_doc("kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        *(
            replica_doc(
                name,
                ephemeral=False,
                scheduleJitter="0s",
                migrateTo={"version": version, "versionId": VERSION_ID},
                preMigrateDropSchemas=["scratchpad", "public", "pg_catalog"],
            )
            for name, version in versions.items()
        ),
    )


def _restore(run: Running, name: str) -> dict[str, Any]:
    restores = run.replica(name)["restores"]
    assert len(restores) <= 1
    return restores[0]  # type: ignore[no-any-return]


def _result(run: Running, name: str) -> dict[str, Any] | None:
    return _restore(run, name)["status"].get("migrationResult")  # type: ignore[no-any-return]


def _serving(run: Running, name: str) -> bool:
    return bool(run.replica(name)["status"].get("phase") == "Ready")


def _migrate_dir(run: Running, name: str) -> Path:
    return run.state / "restores" / "default" / str(_restore(run, name)["name"]) / "migrate"


def _events(entry: dict[str, Any], reason: str) -> list[str]:
    return [e["note"] for e in entry.get("events", []) if e["reason"] == reason]


def test_migrations_run_once_against_the_restore_and_are_read_back(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("v1", SOURCE_SQL)
    manifest = _manifest(
        scratch / "m.yaml",
        backups,
        good="2.1.0",
        bad="2.1.0-fail",
        slow="2.1.0-slow",
        dies="2.1.0-die",
    )
    run = start_run(manifest, "--migrator", MIGRATOR)
    # pgro is killed while the slow migration runs: its migrator outlives it.
    run.wait_for(
        "the slow migration to run",
        lambda: _restore(run, "slow")["status"].get("migrationJob", {}).get("phase") == "Running",
        timeout=240,
    )
    run.proc.kill()
    run.proc.wait(30)
    run = start_run(manifest, "--migrator", MIGRATOR)
    for name in ("good", "bad", "slow", "dies"):
        run.wait_for(f"{name} to serve", partial(_serving, run, name), 240)

    good, bad, slow, dies = (run.replica(n) for n in ("good", "bad", "slow", "dies"))
    for entry in (good, bad, slow):
        [restore] = entry["restores"]
        status = restore["status"]
        # Served only once its migration ended; a failed migration does not fail the restore.
        assert entry["status"]["currentRestore"] == restore["name"]
        assert status["phase"] == "Active"
        assert status["migrationJob"]["name"] == f"{restore['name']}-migrate"
        # Only what this run wrote: the snapshot's older batch is the baseline.
        names = [t["name"] for t in status["migrationResult"]["timings"]]
        assert OLD_MIGRATION not in names
        assert status["migrationBaseline"]
        # `public` and `pg_catalog` are refused, the scratch schema dropped.
        assert _events(entry, "PreMigrateDropRefused")
        with connect(entry) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'scratchpad'"
            ).fetchone() == (0,)
            # The migrator's DDL needed the tables' owner: the analytics user, never a superuser.
            owners = conn.execute(
                "SELECT DISTINCT r.rolname, r.rolsuper FROM pg_class c"
                " JOIN pg_roles r ON r.oid = c.relowner"
                " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
            ).fetchall()
            assert owners == [("analytics", False)]
            assert conn.execute(
                "SELECT count(*) FROM information_schema.columns WHERE column_name = 'probe'"
            ).fetchone() == (1,)

    passed = good["restores"][0]["status"]
    assert passed["migrationJob"]["phase"] == "Succeeded"
    result = passed["migrationResult"]
    assert result.get("failedMigration") is None
    assert result["totalElapsedSeconds"] >= 3  # the batch's own duration, from its row
    assert [t["name"] for t in result["timings"]] == [
        "1721000001-addProbeColumn.js",
        "1721000002-addProbeTable.js",
    ]
    assert result["dataBytesAfter"] > result["dataBytesBefore"] > 0
    assert _events(good, "MigrationFinished")

    failed = bad["restores"][0]["status"]
    assert failed["migrationJob"]["phase"] == "Failed"
    assert failed["migrationResult"]["failedMigration"] == "1721000002-addProbeTable.js"
    assert "23505" in failed["migrationResult"]["error"]
    assert _events(bad, "MigrationFailed")

    # Died before writing a batch: failed, its error from its output, which printed the
    # password in a URL and quoted a row.
    died = dies["restores"][0]["status"]
    assert died["migrationJob"]["phase"] == "Failed"
    assert died["migrationResult"]["failedMigration"]
    assert died["migrationResult"]["timings"] == []
    assert "connecting to postgresql://analytics:***@db/app" in died["migrationResult"]["error"]

    # Killed mid-run, adopted by the next pgro run, never started twice.
    adopted = slow["restores"][0]["status"]
    assert adopted["migrationJob"]["phase"] == "Succeeded"
    assert adopted["migrationResult"].get("failedMigration") is None
    log = (_migrate_dir(run, "slow") / "migrate.log").read_text()
    assert log.count("fake migrator: migrating to 2.1.0-slow") == 1
    assert (_migrate_dir(run, "slow") / "status.json").exists()

    # The migrator's password and the rows it quoted reach no status, event or log.
    password = next(c["password"] for c in good["credentials"] if c["username"] == "analytics")
    shown = subprocess.run(
        [PGRO, "status", "--state-dir", str(run.state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "migrationResult" in shown
    exposed = shown + "".join(p.read_text(errors="replace") for p in scratch.glob("run-*.log"))
    assert password not in exposed
    assert "Jane Doe" not in exposed
    assert run.stop() == 0


def test_without_a_migrator_a_migrate_to_restore_fails_naming_the_option(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("v1", SOURCE_SQL)
    run = start_run(_manifest(scratch / "m.yaml", backups, plain="2.1.0"))
    run.wait_for(
        "the restore to fail",
        lambda: _restore(run, "plain")["status"].get("phase") == "Failed",
        timeout=240,
    )
    status = _restore(run, "plain")["status"]
    shown = json.dumps(status) + json.dumps(run.replica("plain").get("events", []))
    assert "MigrationUnsupported" in shown
    assert "--migrator" in shown
    assert run.stop() == 0


def test_a_migrator_that_is_not_a_program_stops_the_start(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    run = start_run(
        _manifest(scratch / "m.yaml", backups, plain="2.1.0"),
        "--migrator",
        str(scratch / "no-such-migrate"),
    )
    assert run.proc.wait(60) == 2
    assert "no-such-migrate" in run.log.read_text()
    assert "is not an executable file" in run.log.read_text()
