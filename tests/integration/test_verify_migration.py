"""`pgro verify --migrate-to` (issue 14), end to end: the real CLI, real kopia, real
PostgreSQL, and the stand-in migrator (tests/fixtures/fake_migrator.py) run as the PostgreSQL
account through a small wrapper that records what the migrator was given.

One snapshot serves every case (module fixture). It carries what production leaves behind:
an application table, a scratch schema the rehearsal drops, an older batch in
`logs.migrations` (the baseline: never reported as this run's), and an `analytics` role that
is a restored SUPERUSER, which pgro must demote before the migrator logs in as it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.cli.output import render_migration
from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries
from tests.fixtures.clusters import build_debian_cluster
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import Backups
from tests.integration.test_verify_cli import with_ctrl_c

PGRO = str(Path(sys.executable).parent / "pgro")
PASSWORD = "verify-migration-repo-password"
FAKE_MIGRATOR = Path(__file__).parents[1] / "fixtures" / "fake_migrator.py"
VERSION_ID = "55555555-5555-5555-5555-555555555555"
OLD_MIGRATION = "1600000000-createPatients.js"
NEW_MIGRATIONS = ["1721000001-addProbeColumn.js", "1721000002-addProbeTable.js"]
PATIENT = "Jane Doe"
MARK = "verify-migration-interrupt-case"
SOURCE_SQL = [
    "CREATE TABLE patients (id int PRIMARY KEY, name text UNIQUE)",
    f"INSERT INTO patients VALUES (1, '{PATIENT}')",
    "CREATE SCHEMA scratchpad",
    "CREATE TABLE scratchpad.junk AS SELECT 1 AS n",
    "CREATE SCHEMA logs",
    "CREATE TABLE logs.migrations (migrations jsonb, direction text, batch_duration_ms bigint,"
    " stats jsonb, logged_at timestamptz DEFAULT now())",
    "INSERT INTO logs.migrations VALUES"
    f" ('[\"{OLD_MIGRATION}\"]', 'up', 900, '{{\"durationMsPerMigration\":"
    f" {{\"{OLD_MIGRATION}\": 900}}}}', now() - interval '1 day')",
    # The source site made its analytics user a superuser (the reference did): restored as is.
    "CREATE ROLE analytics LOGIN SUPERUSER PASSWORD 'restored-analytics-password'",
]
# Runs as the PostgreSQL account: records the password it was given (so the test can look
# for it in pgro's output) and what its role may do, then becomes the fake migrator.
WRAPPER = """\
import os, sys
import psycopg
version = os.environ["PGRO_MIGRATE_VERSION"]
with open(os.path.join({given!r}, version + ".pw"), "w") as f:
    f.write(os.environ["CONFIG_SYNC_DB_PASSWORD"])
with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
    row = conn.execute(
        "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
print(f"role check: {{row[0]}} superuser={{row[1]}} id={{os.environ['PGRO_MIGRATE_VERSION_ID']}}",
      flush=True)
os.execv("/usr/bin/python3", ["/usr/bin/python3", {fake!r}, *sys.argv[1:]])
"""


@dataclass
class Setup:
    root: Path
    manifest: Path
    migrator: str
    given: Path
    account: RunAccount

    def password(self, version: str) -> str:
        return (self.given / f"{version}.pw").read_text()

    def work(self, name: str) -> Path:
        work = self.root / name
        work.mkdir()
        os.chmod(work, 0o711)
        return work


@pytest.fixture(scope="module")
def setup(account: RunAccount, binaries: PostgresBinaries) -> Iterator[Setup]:
    root = Path(tempfile.mkdtemp(prefix="pgro-verify-migration-"))
    os.chmod(root, 0o711)
    try:
        source = root / "source"
        pgdata = build_debian_cluster(source, binaries, account, root)
        (pgdata / "pg_hba.conf").write_text("local all all trust\n")
        (pgdata / "pg_ident.conf").write_text("")
        hand_over(source, account)
        creds = KopiaCredentials(FilesystemLocation(str(root / "repo")), PASSWORD)
        kopia = KopiaRepository(creds, root / "kopia-author")
        kopia.create()
        try:
            Backups(root / "repo", kopia, source, binaries, account, root).snapshot(
                "v1", SOURCE_SQL
            )
        finally:
            kopia.close()
        manifest = write_manifest(
            root / "m.yaml",
            secret_doc(
                "kopia", {"filesystemPath": str(root / "repo"), "repositoryPassword": PASSWORD}
            ),
            replica_doc(
                "rehearsal",
                preMigrateDropSchemas=["scratchpad", "public", "pg_catalog"],
            ),
        )
        given = root / "given"
        given.mkdir()
        os.chmod(given, 0o700)
        if os.geteuid() == 0:
            os.chown(given, account.uid, account.gid)
        wrapper = root / "wrapper.py"
        wrapper.write_text(WRAPPER.format(given=str(given), fake=str(FAKE_MIGRATOR)))
        os.chmod(wrapper, 0o644)
        migrator = shlex.join(["/usr/bin/python3", str(wrapper), "migrate"])
        yield Setup(root, manifest, migrator, given, account)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def verify(setup: Setup, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGRO, "verify", "-f", str(setup.manifest), "--work-dir", str(work), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def migrate(setup: Setup, work: Path, version: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = verify(setup, work, "--migrate-to", version, "--migrator", setup.migrator, *args)
    # Whatever happened, the restore, its server, the migrator and its log are gone.
    assert list(work.iterdir()) == [], proc.stderr
    return proc


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.count("\n") == 1, f"{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_a_passing_migration_is_timed_and_its_size_change_reported(setup: Setup) -> None:
    proc = migrate(setup, setup.work("pass"), "2.1.0", "--migrate-to-id", VERSION_ID, "--json")
    report = report_of(proc)
    assert proc.returncode == 0, proc.stderr
    assert report["outcome"] == "success"
    assert report["replica_healthy"] is True
    # The health checks ran as without --migrate-to, and stand (the fixture has no data
    # checksums: that check is not run).
    assert {c["status"] for c in report["health_details"]["checks"]} <= {"pass", "not_checked"}
    assert "pass" in {c["status"] for c in report["health_details"]["checks"]}
    migration = report["migration"]
    assert migration["version"] == "2.1.0"
    assert migration["versionId"] == VERSION_ID
    assert "failedMigration" not in migration
    # Only this run's batch: the snapshot's older one is the baseline.
    assert [t["name"] for t in migration["timings"]] == NEW_MIGRATIONS
    assert migration["timings"][1]["elapsedSeconds"] == 2  # the batch's 2500 ms
    assert migration["totalElapsedSeconds"] >= 3
    assert migration["dataBytesAfter"] > migration["dataBytesBefore"] > 0
    assert report["timings"]["migrate"] > 0
    # `public` and `pg_catalog` refused, the scratch schema dropped.
    assert any("preMigrateDropSchemas names public, pg_catalog" in n for n in report["notes"])
    assert any("dropped scratchpad" in n for n in report["notes"])
    # The restored superuser was demoted before the migrator logged in as it; its DDL on the
    # snapshot's tables worked, so they were handed over to it.
    assert f"role check: analytics superuser=False id={VERSION_ID}" in proc.stderr
    assert "fake migrator: done" in proc.stderr  # its output, line by line
    password = setup.password("2.1.0")
    assert len(password) == 32
    assert password not in proc.stdout + proc.stderr


def test_a_failing_migration_exits_3_naming_it_without_row_data(setup: Setup) -> None:
    proc = migrate(setup, setup.work("fail"), "2.1.0-fail", "--json")
    report = report_of(proc)
    assert proc.returncode == 3, proc.stderr
    assert report["outcome"] == "failure"
    assert report["reason"] == "MigrationFailed"
    # The backup itself is healthy: the checks stay as they were.
    # The health checks stand (no data checksums in the fixture: that check is not run).
    assert {c["status"] for c in report["health_details"]["checks"]} <= {"pass", "not_checked"}
    assert "pass" in {c["status"] for c in report["health_details"]["checks"]}
    migration = report["migration"]
    assert migration["failedMigration"] == NEW_MIGRATIONS[1]
    assert [t["name"] for t in migration["timings"]] == NEW_MIGRATIONS[:1]
    assert "23505" in migration["error"]
    assert report["error"] == migration["error"]
    everything = proc.stdout + proc.stderr
    assert PATIENT not in everything
    assert setup.password("2.1.0-fail") not in everything


def test_a_migrator_that_dies_exits_3_with_its_password_masked(setup: Setup) -> None:
    # The human report this time.
    proc = migrate(setup, setup.work("die"), "2.1.0-die")
    assert proc.returncode == 3, proc.stderr
    password = setup.password("2.1.0-die")
    everything = proc.stdout + proc.stderr
    assert password not in everything
    assert PATIENT not in everything
    assert "VERIFIED" in proc.stdout  # the backup is healthy
    assert "MIGRATION FAILED" in proc.stdout
    assert "unknown" in proc.stdout  # no batch named the failed migration
    # Its output, password masked, reached the report's error and the progress lines.
    assert "connecting to postgresql://analytics:***@db/app" in proc.stdout
    assert "connecting to postgresql://analytics:***@db/app" in proc.stderr
    assert "exit code 2" in proc.stderr


def test_interrupting_a_migration_stops_it_and_cleans_up(setup: Setup) -> None:
    work = setup.work("interrupt")
    # The extra argument marks this case's processes (the fake migrator ignores it).
    argv = ["/usr/bin/env", "FAKE_MIGRATOR_SLEEP=120", *shlex.split(setup.migrator), MARK]
    slow = shlex.join(argv)
    options = ["--migrate-to", "2.1.0-slow", "--migrator"]
    proc = subprocess.Popen(
        [PGRO, "verify", "-f", str(setup.manifest), "--work-dir", str(work), *options, slow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=with_ctrl_c,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "migrating to 2.1.0-slow" in line:
            proc.send_signal(signal.SIGINT)
            break
    else:
        pytest.fail("the migrator never started:\n" + "".join(seen))
    proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    assert list(work.iterdir()) == []
    assert _processes_running(str(FAKE_MIGRATOR), MARK) == []


def _processes_running(*texts: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(t in cmdline for t in texts):
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--migrate-to", "2.1.0"], "--migrate-to needs --migrator"),
        (["--migrator", "/bin/true"], "--migrator needs --migrate-to"),
        (["--migrate-to-id", VERSION_ID], "--migrate-to-id needs --migrate-to"),
        (["--migrate-to", "2.1.0", "--migrator", "'unbalanced"], "cannot be split"),
    ],
)
def test_options_come_together_or_not_at_all(setup: Setup, args: list[str], named: str) -> None:
    work = setup.work(f"usage-{abs(hash(tuple(args)))}")
    proc = verify(setup, work, *args)
    assert proc.returncode == 2
    assert named in proc.stderr
    assert list(work.iterdir()) == []


def test_a_migrator_the_run_account_cannot_run_is_refused_before_restoring(setup: Setup) -> None:
    script = setup.root / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o644)
    work = setup.work("not-executable")
    proc = verify(setup, work, "--migrate-to", "2.1.0", "--migrator", str(script), "--json")
    report = report_of(proc)
    assert proc.returncode == 2
    assert report["reason"] == "MigratorNotExecutable"
    assert str(script) in report["error"]
    assert report["snapshot_id"] is None  # refused before the repository was opened
    assert list(work.iterdir()) == []


def test_the_migration_table_lists_batch_order_total_and_size_change() -> None:
    console = Console(record=True, width=120)
    render_migration(
        console,
        {
            "version": "2.1.0",
            "totalElapsedSeconds": 7,
            "dataBytesBefore": 10 * 2**20,
            "dataBytesAfter": 12 * 2**20,
            "timings": [
                {"name": "b-second.js", "elapsedSeconds": 5},
                {"name": "a-first.js", "elapsedSeconds": 1},
            ],
        },
    )
    text = console.export_text()
    assert text.index("b-second.js") < text.index("a-first.js")  # batch order, not sorted
    assert "total" in text and " 7" in text
    assert "10.0 MiB → 12.0 MiB (+2.0 MiB)" in text
    assert "MIGRATED" in text and "2 migration(s) in 7s" in text
