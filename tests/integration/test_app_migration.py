"""The application migration (`migrateTo`, features §2.2) on real servers.

`pgro.postgres.app_migration`'s SQL, and the shared step `pgro.pipeline.app_migration.
AppMigration` driving the test-only fake migrator (`tests/fixtures/fake_migrator.py`) as a
subprocess, each against a scratch cluster standing in for a restore:

- the hand-over snapshot: an application database owned by a NOLOGIN role `app`, with a
  table of the bootstrap superuser's, serial and identity sequences, a partitioned table, a
  view, a materialized view, a foreign table, an enum, a domain, a range, a composite type,
  a function and a procedure, quoted names, two contrib extensions, pgro's own `_pgro` schema
  and an event trigger that raises on any DDL (provisioning must have disabled it). It is
  provisioned write-capable as a `migrateTo` restore is, before anything else runs;
- the migrating restore: one application database whose `logs.migrations` already holds an
  older batch (the snapshot's), so every run's result must be its own batch only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.app_migration import (
    EVENT_DROP_REFUSED,
    EVENT_FAILED,
    EVENT_FINISHED,
    EVENT_STARTED,
    MASK,
    UNKNOWN_MIGRATION,
    Run,
    scrub,
)
from pgro.core.observations import WorkState
from pgro.core.plan import EmitEvent, EventType
from pgro.pipeline.app_migration import AppMigration
from pgro.postgres import app_migration as sql
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.schema_migration import Conninfo
from pgro.postgres.server import PostgresServer, make_conninfo
from pgro.postgres.users import RoleCredentials, generate_password, provision_users
from tests.fixtures.majors import installed_in_cache, server_readable_cache
from tests.fixtures.manifests import replica, restore
from tests.fixtures.scratch_server import scratch_server
from tests.integration.test_users import _binaries_13

FAKE_MIGRATOR = Path(__file__).resolve().parent.parent / "fixtures" / "fake_migrator.py"
MIGRATIONS = ("1721000001-addProbeColumn.js", "1721000002-addProbeTable.js")
PATIENT = "Jane Doe"  # what the fake migrator's output quotes of a row
WEIRD = 'we"ird ; schema'

# One statement each: CREATE DATABASE cannot run in a transaction block.
SNAPSHOT_ROLES = ("CREATE ROLE app NOLOGIN", "CREATE DATABASE myapp OWNER app")
# Created as the bootstrap superuser in `myapp`; the event trigger comes last (it blocks DDL).
SNAPSHOT = """
CREATE EXTENSION citext;
CREATE SCHEMA ext;
CREATE EXTENSION pg_trgm SCHEMA ext;
CREATE FOREIGN DATA WRAPPER dummy;
CREATE SERVER nowhere FOREIGN DATA WRAPPER dummy;
CREATE SCHEMA _pgro;
CREATE TABLE _pgro.restore_info (id int PRIMARY KEY);
CREATE SCHEMA clinic AUTHORIZATION app;
CREATE SCHEMA "we""ird ; schema" AUTHORIZATION app;
GRANT USAGE ON FOREIGN SERVER nowhere TO app;
SET ROLE app;
CREATE TYPE public.sex AS ENUM ('female', 'male');
CREATE DOMAIN public.positive AS int CHECK (VALUE > 0);
CREATE TYPE public.span AS RANGE (subtype = int4);
CREATE TYPE public.pair AS (a int, b text);
CREATE TABLE public.patients (id serial PRIMARY KEY, name public.citext UNIQUE, sex public.sex);
CREATE TABLE public.visits (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    patient int REFERENCES public.patients, score public.positive, during public.span);
CREATE TABLE clinic.notes (at date, body text) PARTITION BY RANGE (at);
CREATE TABLE clinic.notes_2026 PARTITION OF clinic.notes
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE "we""ird ; schema"."Odd ""T"" table" (id int);
CREATE SEQUENCE public.counter;
CREATE VIEW public.patient_names AS SELECT name FROM public.patients;
CREATE MATERIALIZED VIEW clinic.note_count AS SELECT count(*) AS n FROM clinic.notes;
CREATE FOREIGN TABLE clinic.remote (id int) SERVER nowhere;
CREATE FUNCTION public.add_one(i int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT i + 1';
CREATE FUNCTION "we""ird ; schema"."f(x)"(p public.pair) RETURNS int LANGUAGE sql
    AS 'SELECT 1';
CREATE PROCEDURE public.touch() LANGUAGE sql AS 'SELECT 1';
RESET ROLE;
CREATE TABLE public.settings (id serial PRIMARY KEY, v text);
CREATE FUNCTION public.block_ddl() RETURNS event_trigger LANGUAGE plpgsql AS
    $$BEGIN RAISE EXCEPTION 'the snapshot event trigger ran as %', current_user; END$$;
CREATE EVENT TRIGGER snapshot_ddl ON ddl_command_start EXECUTE FUNCTION public.block_ddl();
"""
# What the analytics user must be able to do once it owns the objects (rolled back).
DDL_AS_OWNER = [
    "ALTER TABLE public.patients ADD COLUMN probe int",
    "ALTER TABLE public.visits ADD COLUMN probe int",
    "ALTER TABLE public.settings ADD COLUMN probe int",
    "ALTER TABLE clinic.notes ADD COLUMN probe int",
    'ALTER TABLE "we""ird ; schema"."Odd ""T"" table" ADD COLUMN probe int',
    "ALTER SEQUENCE public.counter RESTART",
    "ALTER SEQUENCE public.patients_id_seq RESTART",
    "ALTER SEQUENCE public.settings_id_seq RESTART",
    "CREATE OR REPLACE VIEW public.patient_names AS SELECT name, id FROM public.patients",
    "REFRESH MATERIALIZED VIEW clinic.note_count",
    "ALTER FOREIGN TABLE clinic.remote ADD COLUMN probe int",
    "ALTER TYPE public.sex ADD VALUE 'unknown'",
    "ALTER DOMAIN public.positive SET DEFAULT 1",
    "ALTER TYPE public.pair ADD ATTRIBUTE c int",
    "ALTER TYPE public.span RENAME TO span2",
    "CREATE OR REPLACE FUNCTION public.add_one(i int) RETURNS int LANGUAGE sql IMMUTABLE"
    " AS 'SELECT i + 2'",
    'ALTER FUNCTION "we""ird ; schema"."f(x)"(public.pair) RENAME TO g',
    "ALTER PROCEDURE public.touch() RENAME TO touched",
    "ALTER SCHEMA clinic RENAME TO clinic2",
    "CREATE TABLE public.created_by_the_migration (id int)",
]
# Every object of the handed-over schemas that is not an extension member and not owned by
# `analytics`, whatever its kind (indexes, array and multirange types included).
NOT_HANDED_OVER = """
WITH handed AS (
  SELECT oid FROM pg_namespace
  WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('information_schema', '_pgro')),
members AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e'),
analytics AS (SELECT oid FROM pg_roles WHERE rolname = 'analytics')
SELECT 'schema ' || nspname FROM pg_namespace
  WHERE oid IN (SELECT oid FROM handed) AND nspowner <> (SELECT oid FROM analytics)
UNION ALL
SELECT 'relation ' || oid::regclass::text FROM pg_class
  WHERE relnamespace IN (SELECT oid FROM handed) AND relowner <> (SELECT oid FROM analytics)
    AND ('pg_class'::regclass, oid) NOT IN (SELECT classid, objid FROM members)
UNION ALL
SELECT 'routine ' || oid::regprocedure::text FROM pg_proc
  WHERE pronamespace IN (SELECT oid FROM handed) AND proowner <> (SELECT oid FROM analytics)
    AND ('pg_proc'::regclass, oid) NOT IN (SELECT classid, objid FROM members)
UNION ALL
SELECT 'type ' || oid::regtype::text FROM pg_type t
  WHERE typnamespace IN (SELECT oid FROM handed) AND typowner <> (SELECT oid FROM analytics)
    AND ('pg_type'::regclass, oid) NOT IN (SELECT classid, objid FROM members)
    -- An extension's array types are not members themselves: their element type is.
    AND NOT EXISTS (SELECT 1 FROM members m, pg_type e WHERE e.typarray = t.oid
                    AND m.classid = 'pg_type'::regclass AND m.objid = e.oid)
"""
EXTENSION_MEMBER_OWNERS = """
SELECT DISTINCT r.rolname FROM pg_depend d
  LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
  LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
  LEFT JOIN pg_type t ON d.classid = 'pg_type'::regclass AND t.oid = d.objid
  JOIN pg_roles r ON r.oid = coalesce(c.relowner, p.proowner, t.typowner)
WHERE d.deptype = 'e'
"""


@dataclass
class Cluster:
    server: PostgresServer
    analytics: RoleCredentials = field(
        default_factory=lambda: RoleCredentials("analytics", generate_password())
    )

    def conninfo_for(self, dbname: str) -> str:
        return self.server.endpoint.conninfo(dbname, "postgres")

    def superuser(self, dbname: str = "myapp") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.conninfo_for(dbname), autocommit=True)

    def login(self, dbname: str = "myapp") -> psycopg.Connection[tuple[object, ...]]:
        """The analytics user as a client logs in: over TCP with its password."""
        return psycopg.connect(
            make_conninfo(
                host="127.0.0.1",
                port=str(self.server.port),
                dbname=dbname,
                user=self.analytics.username,
                password=self.analytics.password,
                connect_timeout="10",
            ),
            autocommit=True,
        )

    def url(self, dbname: str) -> str:
        password = urllib.parse.quote(self.analytics.password, safe="")
        return (
            f"postgresql://{self.analytics.username}:{password}@127.0.0.1:{self.server.port}"
            f"/{dbname}"
        )

    def provision(self) -> None:
        """As a `migrateTo` restore is provisioned before it migrates: write-capable."""
        provision_users(
            self.conninfo_for, analytics=self.analytics, extra_users=[], read_only=False
        )

    def rows(self, query: str, dbname: str = "myapp") -> list[tuple[object, ...]]:
        with self.superuser(dbname) as conn:
            return conn.execute(query.encode()).fetchall()


def _run_sql(cluster: Cluster, dbname: str, script: str) -> None:
    with cluster.superuser(dbname) as conn:
        conn.execute(script.encode())


def _binaries_for(
    request: pytest.FixtureRequest, scratch_root: Path, binaries: PostgresBinaries
) -> PostgresBinaries:
    major = str(request.param)
    if major == "newest":
        return binaries
    if major == "13":
        found = _binaries_13(scratch_root)
        if found is not None:
            return found
    elif installed_in_cache(major):
        root = server_readable_cache(scratch_root, (major,))
        return PostgresBinaries(major=major, bindir=root / major / "bin")
    pytest.skip(
        f"PostgreSQL {major} server binaries are not installed: run "
        f"`scripts/install-postgres-major.sh {major}`"
    )


@pytest.fixture(scope="module", params=["newest", "13", "14", "16", "17"])
def snapshot(
    request: pytest.FixtureRequest,
    scratch_root: Path,
    account: RunAccount,
    binaries: PostgresBinaries,
) -> Iterator[Cluster]:
    """The hand-over snapshot, provisioned; on the newest Debian PostgreSQL and on the
    cached majors (`scripts/install-postgres-major.sh`)."""
    found = _binaries_for(request, scratch_root, binaries)
    with scratch_server(scratch_root, account, found, "app-migration") as server:
        c = Cluster(server)
        for statement in SNAPSHOT_ROLES:
            _run_sql(c, "postgres", statement)
        _run_sql(c, "myapp", SNAPSHOT)
        c.provision()
        yield c


# --- hand_over --------------------------------------------------------------------------


def test_provisioning_disabled_the_snapshot_event_trigger(snapshot: Cluster) -> None:
    assert snapshot.rows("SELECT evtname, evtenabled FROM pg_event_trigger") == [
        ("snapshot_ddl", "D")
    ]


def test_hand_over_refuses_while_an_event_trigger_is_enabled(snapshot: Cluster) -> None:
    _run_sql(snapshot, "myapp", "ALTER EVENT TRIGGER snapshot_ddl ENABLE")
    try:
        with pytest.raises(sql.HandOverRefused, match=r"snapshot_ddl.*catalog guard"):
            sql.hand_over(snapshot.conninfo_for, "myapp", "analytics")
    finally:
        _run_sql(snapshot, "myapp", "ALTER EVENT TRIGGER snapshot_ddl DISABLE")


def test_hand_over_refuses_a_superuser_or_a_missing_role(snapshot: Cluster) -> None:
    with pytest.raises(sql.HandOverRefused, match="superuser"):
        sql.hand_over(snapshot.conninfo_for, "myapp", "postgres")
    with pytest.raises(sql.HandOverRefused, match="does not exist"):
        sql.hand_over(snapshot.conninfo_for, "myapp", "nobody")


def test_hand_over_lets_the_analytics_user_alter_every_application_object(
    snapshot: Cluster,
) -> None:
    with snapshot.login() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("ALTER TABLE public.patients ADD COLUMN probe int")

    changed = sql.hand_over(snapshot.conninfo_for, "myapp", "analytics")

    assert changed > 0
    assert snapshot.rows(NOT_HANDED_OVER) == []
    # Nothing left to do: the step may run again after a crash.
    assert sql.hand_over(snapshot.conninfo_for, "myapp", "analytics") == 0
    with snapshot.login() as conn, conn.transaction(force_rollback=True):
        for statement in DDL_AS_OWNER:
            conn.execute(statement.encode())


def test_hand_over_leaves_extensions_and_pgro_s_schema_alone(snapshot: Cluster) -> None:
    sql.hand_over(snapshot.conninfo_for, "myapp", "analytics")
    assert snapshot.rows(EXTENSION_MEMBER_OWNERS) == [("postgres",)]
    owners = snapshot.rows(
        "SELECT n.nspowner::regrole::text, c.relowner::regrole::text FROM pg_namespace n"
        " JOIN pg_class c ON c.relnamespace = n.oid WHERE c.oid = '_pgro.restore_info'::regclass"
    )
    assert owners == [("postgres", "postgres")]
    # Schemas only an extension uses stay handed over; its members do not.
    ext = snapshot.rows("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'ext'")
    assert ext == [("analytics",)]
    with (
        snapshot.login() as conn,
        conn.transaction(force_rollback=True),
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("ALTER FUNCTION ext.similarity(text, text) RENAME TO s")


def test_the_analytics_user_stays_unprivileged(snapshot: Cluster) -> None:
    sql.hand_over(snapshot.conninfo_for, "myapp", "analytics")
    role = snapshot.rows(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
        " FROM pg_roles WHERE rolname = 'analytics'"
    )
    assert role == [(False, False, False, False, False)]
    member_of = snapshot.rows(
        "SELECT m.roleid::regrole::text FROM pg_auth_members m"
        " WHERE m.member = 'analytics'::regrole"
    )
    assert {str(r[0]) for r in member_of} <= {"pg_read_all_data"}
    with snapshot.login() as conn:
        for escalation in ("SET ROLE postgres", "ALTER ROLE analytics SUPERUSER"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(escalation.encode())


def test_hand_over_in_small_transactions_converges(snapshot: Cluster) -> None:
    """Thousands of tables are re-owned some at a time (the lock table holds only so many);
    a pass cut short between two transactions is finished by the next."""
    with snapshot.superuser("postgres") as conn:
        conn.execute("DROP DATABASE IF EXISTS many")
        conn.execute("CREATE DATABASE many OWNER app")
    _run_sql(
        snapshot,
        "many",
        "SET ROLE app; DO $$BEGIN FOR i IN 1..12 LOOP"
        " EXECUTE format('CREATE TABLE t%s (id serial PRIMARY KEY, at date)', i);"
        " EXECUTE format('CREATE INDEX ON t%s (at)', i); END LOOP; END$$",
    )
    # As if an earlier pass had stopped after some: those are not counted again.
    _run_sql(snapshot, "many", "ALTER TABLE public.t1 OWNER TO analytics")
    assert sql.hand_over(snapshot.conninfo_for, "many", "analytics", batch=5) == 12
    assert snapshot.rows(NOT_HANDED_OVER, "many") == []
    assert sql.hand_over(snapshot.conninfo_for, "many", "analytics", batch=5) == 0


# --- drop_schemas -------------------------------------------------------------------------


def test_drop_schemas_drops_those_present_and_ends_other_sessions(snapshot: Cluster) -> None:
    _run_sql(
        snapshot,
        "myapp",
        "CREATE SCHEMA stale_a; CREATE TABLE stale_a.t (id int);"
        " CREATE SCHEMA stale_b AUTHORIZATION app",
    )
    other = snapshot.login()
    try:
        dropped = sql.drop_schemas(
            snapshot.conninfo_for, "myapp", ["stale_a", "never_there", "stale_b"]
        )
        assert dropped == ["stale_a", "stale_b"]
        left = snapshot.rows("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'stale%'")
        assert left == []
        with pytest.raises(psycopg.OperationalError):
            other.execute("SELECT 1")
    finally:
        other.close()
    assert sql.drop_schemas(snapshot.conninfo_for, "myapp", ["stale_a"]) == []


# --- baseline and batch -------------------------------------------------------------------

BATCHES = """
DROP SCHEMA IF EXISTS logs CASCADE;
CREATE SCHEMA logs;
CREATE TABLE logs.migrations (migrations jsonb, direction text, batch_duration_ms bigint,
    stats jsonb, logged_at timestamptz DEFAULT now());
INSERT INTO logs.migrations VALUES
    ('["0001-old.js"]', 'up', 1000, '{"durationMsPerMigration": {"0001-old.js": 1000}}',
     '2020-01-01 00:00:00.123456+00'),
    ('["undated.js"]', 'up', 1, '{}', NULL);
"""


def test_batches_after_the_baseline_only(snapshot: Cluster) -> None:
    _run_sql(snapshot, "myapp", "DROP SCHEMA IF EXISTS logs CASCADE")
    assert sql.latest_batch_at(snapshot.conninfo_for, "myapp") is None
    assert sql.read_batch(snapshot.conninfo_for, "myapp", None) is None

    _run_sql(snapshot, "myapp", BATCHES)
    baseline = sql.latest_batch_at(snapshot.conninfo_for, "myapp")
    assert baseline is not None and baseline.startswith("2020-01-01 00:00:00.123456")
    assert sql.read_batch(snapshot.conninfo_for, "myapp", baseline) is None
    old = sql.read_batch(snapshot.conninfo_for, "myapp", None)
    assert old is not None and list(old.migrations) == ["0001-old.js"]

    _run_sql(
        snapshot,
        "myapp",
        """INSERT INTO logs.migrations (migrations, direction, batch_duration_ms, stats)
           VALUES ('["b.js", "a.js"]', 'up', 2500, '{"failedMigration": "c.js"}');
           INSERT INTO logs.migrations (migrations, direction, logged_at)
           VALUES ('["down.js"]', 'down', now() + interval '1 hour')""",
    )
    new = sql.read_batch(snapshot.conninfo_for, "myapp", baseline)
    assert new is not None
    assert list(new.migrations) == ["b.js", "a.js"]  # the array's order, not sorted
    assert new.batch_duration_ms == 2500
    assert new.stats == {"failedMigration": "c.js"}


@pytest.mark.parametrize(
    ("migrations", "duration", "stats", "expected"),
    [
        ("'{\"a\": 1}'", "NULL", "'[1, 2]'", ([], None, None)),
        ("'\"one.js\"'", "NULL", "'\"text\"'", ([], None, None)),
        ('\'["a.js", 7, null, "b.js"]\'', "-5", "NULL", (["a.js", "b.js"], -5, None)),
        ("NULL", "NULL", "'{}'", ([], None, {})),
    ],
)
def test_odd_batch_content_reads_as_absent(
    snapshot: Cluster, migrations: str, duration: str, stats: str, expected: tuple[Any, ...]
) -> None:
    _run_sql(snapshot, "myapp", BATCHES)
    _run_sql(
        snapshot,
        "myapp",
        "INSERT INTO logs.migrations (migrations, direction, batch_duration_ms, stats)"
        f" VALUES ({migrations}, 'up', {duration}, {stats})",
    )
    batch = sql.read_batch(snapshot.conninfo_for, "myapp", "2021-01-01 00:00:00+00")
    assert batch is not None
    assert (list(batch.migrations), batch.batch_duration_ms, batch.stats) == expected


def test_columns_of_other_types_are_read_defensively(snapshot: Cluster) -> None:
    _run_sql(
        snapshot,
        "myapp",
        "DROP SCHEMA IF EXISTS logs CASCADE; CREATE SCHEMA logs;"
        " CREATE TABLE logs.migrations (migrations text, direction text,"
        " batch_duration_ms numeric, stats text, logged_at timestamptz DEFAULT now());"
        " INSERT INTO logs.migrations (migrations, direction, batch_duration_ms, stats)"
        " VALUES ('[\"a\"]', 'up', 12, '{}')",
    )
    batch = sql.read_batch(snapshot.conninfo_for, "myapp", None)
    assert batch is not None
    assert (list(batch.migrations), batch.batch_duration_ms, batch.stats) == ([], 12, None)


def test_a_table_without_timestamps_reads_as_no_batch(snapshot: Cluster) -> None:
    _run_sql(
        snapshot,
        "myapp",
        "DROP SCHEMA IF EXISTS logs CASCADE; CREATE SCHEMA logs;"
        " CREATE TABLE logs.migrations (migrations jsonb, direction text,"
        " batch_duration_ms bigint, stats jsonb, logged_at text);"
        " INSERT INTO logs.migrations VALUES ('[\"a\"]', 'up', 12, '{}', 'yesterday-ish')",
    )
    baseline = sql.latest_batch_at(snapshot.conninfo_for, "myapp")
    assert baseline == "yesterday-ish"
    assert sql.read_batch(snapshot.conninfo_for, "myapp", baseline) is None
    assert sql.read_batch(snapshot.conninfo_for, "myapp", None) is None


def test_a_view_in_place_of_the_table_is_never_read(snapshot: Cluster) -> None:
    """The migrator owns `logs` after the hand-over: a view calling its function would run
    that function as pgro's superuser."""
    _run_sql(
        snapshot,
        "myapp",
        """DROP SCHEMA IF EXISTS logs CASCADE; CREATE SCHEMA logs;
        CREATE TABLE public.pwned (who text);
        CREATE FUNCTION public.pwn() RETURNS timestamptz LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO public.pwned VALUES (current_user); RETURN now(); END$$;
        CREATE VIEW logs.migrations AS SELECT '["x"]'::jsonb AS migrations,
          'up'::text AS direction, 1::bigint AS batch_duration_ms, '{}'::jsonb AS stats,
          public.pwn() AS logged_at""",
    )
    try:
        assert sql.latest_batch_at(snapshot.conninfo_for, "myapp") is None
        assert sql.read_batch(snapshot.conninfo_for, "myapp", None) is None
        assert snapshot.rows("SELECT count(*) FROM public.pwned") == [(0,)]
    finally:
        _run_sql(
            snapshot,
            "myapp",
            "DROP SCHEMA logs CASCADE; DROP FUNCTION public.pwn(); DROP TABLE public.pwned",
        )


# --- the whole step -----------------------------------------------------------------------

RESTORE_SNAPSHOT = """
CREATE TABLE public.patients (id serial PRIMARY KEY, name text UNIQUE);
INSERT INTO public.patients (name) VALUES ('Jane Doe');
ALTER TABLE public.patients OWNER TO app;
CREATE SCHEMA scratchpad AUTHORIZATION app;
CREATE TABLE scratchpad.junk AS SELECT 1 AS n;
CREATE SCHEMA logs;
CREATE TABLE logs.migrations (migrations jsonb, direction text, batch_duration_ms bigint,
    stats jsonb, logged_at timestamptz DEFAULT now());
INSERT INTO logs.migrations VALUES
    ('["0001-old.js"]', 'up', 1000, '{"durationMsPerMigration": {"0001-old.js": 1000}}',
     '2020-01-01 00:00:00+00');
"""


@pytest.fixture(scope="module")
def migrating(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Cluster]:
    """A restore of a snapshot whose logs.migrations holds an older batch, provisioned."""
    with scratch_server(scratch_root, account, binaries, "app-migration-step") as server:
        c = Cluster(server)
        for statement in SNAPSHOT_ROLES:
            _run_sql(c, "postgres", statement)
        _run_sql(c, "myapp", RESTORE_SNAPSHOT)
        c.provision()
        yield c


@dataclass
class FakeMigrator:
    """The runtime side, as a test: runs the fake migrator synchronously on `start`."""

    cluster: Cluster
    version: str
    state: WorkState = WorkState.NOT_STARTED
    log_tail: str = ""
    starts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "fiji-1-migrate"

    def conninfo_for(self) -> Conninfo:
        return self.cluster.conninfo_for

    def observe(self) -> Run:
        return Run(self.state, self.log_tail if self.state in ENDED else "")

    def start(self, *, database: str) -> None:
        self.starts.append(database)
        creds = self.cluster.analytics
        done = subprocess.run(
            [sys.executable, str(FAKE_MIGRATOR), "migrate"],
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "DATABASE_URL": self.cluster.url(database),
                "CONFIG_SYNC_DB_USERNAME": creds.username,
                "CONFIG_SYNC_DB_PASSWORD": creds.password,
                "PGRO_MIGRATE_VERSION": self.version,
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.state = WorkState.SUCCEEDED if done.returncode == 0 else WorkState.FAILED
        tail = (done.stdout + done.stderr).splitlines()[-200:]
        self.log_tail = scrub("\n".join(tail), [creds.password])


ENDED = (WorkState.SUCCEEDED, WorkState.FAILED)


@dataclass
class Step:
    """One restore's migration step, with what it patched and emitted."""

    migrator: FakeMigrator
    drop: list[str] | None = None
    patches: list[Mapping[str, Any]] = field(default_factory=list)
    events: list[EmitEvent] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)

    def _replica(self) -> PostgresPhysicalReplica:
        return replica("fiji", preMigrateDropSchemas=self.drop)

    def _restore(self) -> PostgresPhysicalRestore:
        return restore(
            "fiji-1",
            "fiji",
            migrateTo={"version": self.migrator.version, "versionId": "9b0c6a52-1f44"},
            status={"phase": "Migrating", **self.status},
        )

    def _patch(self, patch: Mapping[str, Any]) -> None:
        self.patches.append(patch)
        self.status.update(patch)

    def run(self) -> None:
        """One pass, on the restore as the patches so far left it."""
        AppMigration(
            self._replica(),
            self._restore(),
            self.migrator,
            patch=self._patch,
            event=self.events.append,
        ).run()

    def reasons(self) -> list[tuple[EventType, str]]:
        return [(e.type, e.reason) for e in self.events]

    def everything(self) -> str:
        return repr(self.patches) + repr(self.events)


def _step(cluster: Cluster, version: str, drop: list[str] | None = None) -> Step:
    return Step(FakeMigrator(cluster, version), drop=drop)


def test_a_successful_migration_records_its_own_batch(migrating: Cluster) -> None:
    step = _step(migrating, "2.1.0")
    step.run()  # starts the migrator (which here runs to the end at once)
    assert step.migrator.starts == ["myapp"]
    assert step.reasons() == [(EventType.NORMAL, EVENT_STARTED)]
    baseline = step.status["migrationBaseline"]
    assert isinstance(baseline, str)  # the snapshot's batch, before the run
    assert step.status["migrationJob"] == {"name": "fiji-1-migrate", "phase": "Running"}

    step.run()  # observes the end and reads the result

    result = step.status["migrationResult"]
    assert [t["name"] for t in result["timings"]] == list(MIGRATIONS)  # not 0001-old.js
    assert result["timings"][1]["elapsedSeconds"] == 2
    assert result["timings"][0]["elapsedSeconds"] >= 1
    assert result["totalElapsedSeconds"] >= 3
    assert "failedMigration" not in result and "error" not in result
    assert result["dataBytesAfter"] > result["dataBytesBefore"] > 0
    assert step.status["migrationJob"] == {"name": "fiji-1-migrate", "phase": "Succeeded"}
    assert step.reasons() == [
        (EventType.NORMAL, EVENT_STARTED),
        (EventType.NORMAL, EVENT_FINISHED),
    ]
    assert "passed: 2 migration(s)" in step.events[-1].note
    assert [set(p) for p in step.patches] == [
        {"migrationBaseline"},
        {"migrationJob"},
        {"migrationJob", "migrationResult"},
    ]
    # The migrator's DDL on `app`'s table went through: the hand-over made it possible.
    assert migrating.rows(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.patients'::regclass"
        " AND attname = 'probe'"
    ) == [(1,)]

    before = (list(step.patches), list(step.events), list(step.migrator.starts))
    step.run()  # the result is recorded: nothing more to do
    assert (step.patches, step.events, step.migrator.starts) == before


def test_a_running_migrator_is_not_started_again(migrating: Cluster) -> None:
    step = _step(migrating, "2.1.0")
    step.migrator.state = WorkState.RUNNING
    step.run()
    step.run()
    assert step.migrator.starts == []
    assert step.patches == [] and step.events == []


def test_a_failed_migration_names_it_and_keeps_the_row_out(migrating: Cluster) -> None:
    step = _step(migrating, "2.2.0-fail")
    step.run()
    step.run()
    result = step.status["migrationResult"]
    assert result["failedMigration"] == MIGRATIONS[1]
    assert [t["name"] for t in result["timings"]] == [MIGRATIONS[0]]
    assert result["error"] == (
        '23505: duplicate key value violates unique constraint "…" '
        "[patients.name, patients_name_key]"
    )
    assert step.status["migrationJob"]["phase"] == "Failed"
    assert step.reasons() == [
        (EventType.NORMAL, EVENT_STARTED),
        (EventType.WARNING, EVENT_FAILED),
    ]
    assert f"failed at {MIGRATIONS[1]}" in step.events[-1].note
    assert PATIENT not in step.everything()
    assert PATIENT in step.migrator.log_tail  # it was there to leak


def test_a_migrator_dying_before_any_batch_fails_unknown_without_secrets(
    migrating: Cluster,
) -> None:
    step = _step(migrating, "2.3.0-die")
    step.run()
    step.run()
    result = step.status["migrationResult"]
    assert result["failedMigration"] == UNKNOWN_MIGRATION
    assert result["timings"] == [] and result["totalElapsedSeconds"] == 0
    assert result["dataBytesBefore"] == result["dataBytesAfter"]
    error = result["error"]
    assert f"analytics:{MASK}@db/app" in error
    assert 'ERROR: relation "…" is invalid for "…"' in error
    assert migrating.analytics.password not in step.everything()
    assert PATIENT not in step.everything()
    assert step.reasons()[-1] == (EventType.WARNING, EVENT_FAILED)


def test_refused_drop_schemas_warn_and_are_kept(migrating: Cluster) -> None:
    step = _step(
        migrating, "2.4.0", drop=["public", "scratchpad", "pg_catalog", "information_schema"]
    )
    step.run()
    refused = [e for e in step.events if e.reason == EVENT_DROP_REFUSED]
    assert len(refused) == 1 and refused[0].type is EventType.WARNING
    assert "public, pg_catalog, information_schema" in refused[0].note
    schemas = {str(r[0]) for r in migrating.rows("SELECT nspname FROM pg_namespace")}
    assert "scratchpad" not in schemas
    assert {"public", "pg_catalog", "information_schema"} <= schemas
    assert migrating.rows("SELECT count(*) FROM public.patients") == [(1,)]
    step.run()
    assert "failedMigration" not in step.status["migrationResult"]
