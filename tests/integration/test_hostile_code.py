"""No library or program named by a snapshot is loaded or run (issue 18, items 3 and 6).

Each hostile snapshot is a real initdb'd cluster carrying a shared library (built here with
gcc, `tests/fixtures/evil_library.py`) whose constructor appends to a marker file, plus one
route that would load it: a config setting, an include file, a per-role or per-database
setting, an event trigger or a C function. The snapshots go through real kopia and the real
verification pipeline; the marker file must never appear. The marker directory is writable
by the server's account, so a regression shows up as a marker line, not as a silent error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.events import SilentObserver
from pgro.pipeline.report import VerificationReport
from pgro.pipeline.restore import restore_snapshot
from pgro.pipeline.verify import VerifyOptions, verify_snapshot
from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.catalog_guard import REFUSED_LIBRARY, neutralise_catalog
from pgro.postgres.health import check_health
from pgro.postgres.initdb import init_cluster
from pgro.postgres.server import PostgresServer, bootstrap_superuser
from tests.conftest import REPO_PASSWORD, Repo
from tests.fixtures.clusters import app_database_sql
from tests.fixtures.evil_library import EvilLibraries, build_evil_libraries
from tests.fixtures.manifests import replica

# Relative to $libdir (/usr/lib/postgresql/15/lib): climbs to / and enters the server's
# working directory, which is PGDATA. No knowledge of where the restore lives is needed.
JIT_ESCAPE = "../../../../../proc/self/cwd/lib/plain"

EVENT_TRIGGER_SQL = """
CREATE FUNCTION public.on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $body$
BEGIN
  COPY (SELECT 'event trigger ran') TO PROGRAM 'cat >> {marker}';
END
$body$;
CREATE EVENT TRIGGER pgro_test_pwn ON ddl_command_start EXECUTE FUNCTION public.on_ddl();
"""


@dataclass
class Hostile:
    repo: Repo
    libraries: EvilLibraries
    base: Path  # the cluster every variant was copied from (cleanly stopped)
    snapshots: dict[str, str] = field(default_factory=dict)


@contextmanager
def _server(
    pgdata: Path, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> Iterator[PostgresServer]:
    scratch.mkdir(exist_ok=True)
    os.chmod(scratch, 0o711)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=scratch / "run", log_path=scratch / "pg.log"
    )
    server.start(120)
    try:
        yield server
    finally:
        server.stop()


def _sql(server: PostgresServer, dbname: str, *statements: str) -> None:
    with psycopg.connect(server.endpoint.conninfo(dbname, "postgres"), autocommit=True) as c:
        for stmt in statements:
            c.execute(stmt.encode())


@pytest.fixture(scope="session")
def evil(scratch_root: Path, binaries: PostgresBinaries) -> EvilLibraries:
    return build_evil_libraries(scratch_root / "evil-libraries", binaries.major)


@pytest.fixture(scope="session")
def hostile(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries, evil: EvilLibraries
) -> Iterator[Hostile]:
    """One repository with a hostile variant per route, all copies of one base cluster."""
    root = scratch_root / "hostile-code"
    root.mkdir()
    os.chmod(root, 0o711)
    repo = Repo(path=root / "repository", password=REPO_PASSWORD)
    base = root / "base"
    found = Hostile(repo=repo, libraries=evil, base=base)
    base_pgdata = base / binaries.major / "main"
    init_cluster(binaries, base_pgdata, account)
    with _server(base_pgdata, binaries, account, root) as server:
        _sql(server, "postgres", "CREATE DATABASE myapp", "CREATE ROLE reader LOGIN")
        _sql(server, "myapp", *app_database_sql(), "GRANT SELECT ON test_data TO reader")

    def variant(
        name: str,
        *,
        conf: str = "",
        files: dict[str, str] | None = None,
        sql: dict[str, list[str]] | None = None,
    ) -> None:
        tree = root / name
        shutil.copytree(base, tree, symlinks=True)
        pgdata = tree / binaries.major / "main"
        (pgdata / "lib").mkdir()
        shutil.copy(evil.plain, pgdata / "lib" / "plain.so")
        shutil.copy(evil.magic, pgdata / "lib" / "magic.so")
        hand_over(tree, account)
        if sql:
            # Before the hostile config: the fixture must not depend on the code under test.
            with _server(pgdata, binaries, account, root / f"{name}-build") as server:
                for dbname, statements in sql.items():
                    _sql(server, dbname, *statements)
        if conf:
            with (pgdata / "postgresql.conf").open("a") as f:
                f.write("\n" + conf + "\n")
        for rel, text in (files or {}).items():
            (pgdata / rel).write_text(text)
        hand_over(tree, account)
        assert evil.ran() == "", f"building {name} loaded the library"
        found.snapshots[name] = kopia.snapshot_create(
            tree,
            tags={"kind": name},
            description=f"hostile {name}",
            override_source=f"postgres@{name}:/var/lib/postgresql",
        )

    marker = evil.marker
    kopia = KopiaRepository(repo.credentials, root / "kopia-state")
    kopia.create()
    try:
        variant("jit", conf=f"jit_provider = '{JIT_ESCAPE}'\njit_above_cost = 0\n")
        # The magic build: PostgreSQL accepts it, so a load would pass unnoticed.
        variant(
            "include",
            conf="include 'evil.conf'",
            files={"evil.conf": "shared_preload_libraries = 'lib/magic.so'\n"},
        )
        variant(
            "local-preload",
            conf="local_preload_libraries = 'lib/plain'\nsession_preload_libraries = 'lib/magic'",
        )
        variant(
            "role-setting",
            sql={"postgres": ["ALTER ROLE postgres SET session_preload_libraries = 'lib/magic'"]},
        )
        variant(
            "database-setting",
            sql={
                "postgres": [
                    "ALTER DATABASE myapp SET session_preload_libraries = 'lib/magic'",
                    "ALTER ROLE reader IN DATABASE myapp SET session_preload_libraries = "
                    "'lib/plain'",
                ]
            },
        )
        # A bare name resolves through dynamic_library_path, which points into PGDATA.
        variant(
            "library-path",
            conf="dynamic_library_path = '/proc/self/cwd/lib:$libdir'\n"
            "shared_preload_libraries = 'magic'",
            sql={
                "postgres": [
                    "ALTER DATABASE myapp SET dynamic_library_path = '/proc/self/cwd/lib'",
                    "ALTER DATABASE myapp SET session_preload_libraries = 'magic'",
                ]
            },
        )
        trigger = EVENT_TRIGGER_SQL.format(marker=marker)
        variant("event-trigger", sql={"postgres": [trigger], "myapp": [trigger]})
        variant(
            "c-function",
            sql={
                "myapp": [
                    # CREATE FUNCTION … LANGUAGE c loads the library to check it, so the
                    # functions are created on a harmless host library and then pointed at
                    # the snapshot's, as a hostile source would write its catalog.
                    "CREATE FUNCTION public.evil_fn() RETURNS int LANGUAGE c "
                    "AS '$libdir/plpgsql', 'plpgsql_call_handler'",
                    "CREATE FUNCTION public.evil_abs() RETURNS int LANGUAGE c "
                    "AS '$libdir/plpgsql', 'plpgsql_call_handler'",
                    "CREATE VIEW public.uses_evil AS SELECT public.evil_fn() AS n",
                    "UPDATE pg_proc SET probin = 'lib/magic', prosrc = 'evil_fn' "
                    "WHERE proname = 'evil_fn'",
                    "UPDATE pg_proc SET probin = "
                    "'$libdir/../../../../../proc/self/cwd/lib/magic', prosrc = 'evil_fn' "
                    "WHERE proname = 'evil_abs'",
                ]
            },
        )
        # A built-in deleted and re-created in PL/pgSQL: any session calling it runs a program.
        variant(
            "hijacked-builtin",
            sql={
                "postgres": [
                    "DELETE FROM pg_catalog.pg_proc "
                    "WHERE oid = 'pg_catalog.pg_is_in_recovery()'::regprocedure",
                    "CREATE FUNCTION pg_catalog.pg_is_in_recovery() RETURNS boolean "
                    "LANGUAGE plpgsql AS $body$ BEGIN "
                    f"COPY (SELECT 'hijacked built-in ran') TO PROGRAM 'cat >> {marker}'; "
                    "RETURN false; END $body$",
                ]
            },
        )
        variant(
            "broken-function",
            sql={
                "postgres": [
                    "ALTER FUNCTION pg_catalog.pg_database_size(oid) "
                    "RENAME TO pg_database_size_gone"
                ]
            },
        )
    finally:
        kopia.close()
    yield found


def _verify(hostile: Hostile, name: str, work: Path) -> VerificationReport:
    hostile.libraries.reset()
    work.mkdir(exist_ok=True)
    os.chmod(work, 0o711)
    return verify_snapshot(
        replica(f"hostile-{name}", namespace="default", snapshotFilter={"hostPattern": name}),
        hostile.repo.credentials,
        VerifyOptions(snapshot_id=hostile.snapshots[name], work_root=work),
    )


@contextmanager
def _served(
    hostile: Hostile, name: str, scratch: Path, account: RunAccount
) -> Iterator[PostgresServer]:
    """The snapshot restored and started as `pgro run` serves it, catalog guard applied."""
    hostile.libraries.reset()
    with KopiaRepository(hostile.repo.credentials, scratch / "kopia") as repo:
        snap = next(s for s in repo.list_snapshots() if s.id == hostile.snapshots[name])
        restored = restore_snapshot(repo, snap, scratch / "data", account, SilentObserver())
    with _server(restored.data.path, restored.binaries, account, scratch) as server:
        endpoint = server.endpoint
        neutralise_catalog(lambda db: endpoint.conninfo(db, "postgres"))
        yield server


def test_the_fixture_library_runs_when_loaded(evil: EvilLibraries, account: RunAccount) -> None:
    """Control: loading the library as the server's account does leave a marker."""
    evil.reset()
    for lib in (evil.plain, evil.magic):
        subprocess.run(
            [
                "runuser",
                "-u",
                account.name,
                "--",
                "python3",
                "-c",
                f"import ctypes; ctypes.CDLL({str(lib)!r})",
            ],
            check=True,
        )
    assert f"library=plain uid={account.uid}" in evil.ran()
    assert f"library=magic uid={account.uid}" in evil.ran()
    evil.reset()


# Each route: (snapshot, a note the report must carry).
ROUTES = [
    ("jit", "jit_provider"),
    ("include", "include evil.conf"),
    ("local-preload", "local_preload_libraries (lib/plain not installed here)"),
    ("role-setting", "session_preload_libraries (role postgres)"),
    ("database-setting", "session_preload_libraries (database myapp)"),
    ("library-path", "dynamic_library_path (database myapp)"),
    ("event-trigger", "pgro_test_pwn (database myapp)"),
    ("c-function", "public.evil_fn (database myapp)"),
]


@pytest.mark.parametrize(("name", "note"), ROUTES, ids=[r[0] for r in ROUTES])
def test_verify_never_loads_snapshot_code(
    hostile: Hostile, scratch: Path, name: str, note: str
) -> None:
    report = _verify(hostile, name, scratch / "work")
    assert hostile.libraries.ran() == "", f"{name}: snapshot code ran"
    assert report.outcome == "success", (report.reason, report.error)
    assert report.exit_code == 0
    notes = "\n".join(report.notes)
    assert note in notes, notes


def test_served_database_setting_reaches_no_session(
    hostile: Hostile, scratch: Path, account: RunAccount
) -> None:
    """After the guard, ordinary sessions (a non-superuser's, as through PgBouncer, and a
    superuser's without pgro's startup options) get no preload from the catalog."""
    with _served(hostile, "database-setting", scratch, account) as server:
        for user in ("reader", "postgres"):
            with psycopg.connect(server.endpoint.conninfo("myapp", user)) as conn:
                assert conn.execute("SELECT count(*) FROM test_data").fetchone() == (1000,)
        with psycopg.connect(server.endpoint.conninfo("myapp", "postgres")) as conn:
            assert conn.execute("SHOW session_preload_libraries").fetchone() == ("",)
        with psycopg.connect(server.endpoint.conninfo("postgres", "postgres")) as conn:
            left = conn.execute("SELECT count(*) FROM pg_db_role_setting").fetchone()
        assert left == (0,)
    assert hostile.libraries.ran() == ""


def test_served_library_path_is_reset(hostile: Hostile, scratch: Path, account: RunAccount) -> None:
    with _served(hostile, "library-path", scratch, account) as server:
        with psycopg.connect(server.endpoint.conninfo("myapp", "reader")) as conn:
            assert conn.execute("SELECT count(*) FROM test_data").fetchone() == (1000,)
        # A superuser session without pgro's startup options sees what every session gets.
        with psycopg.connect(server.endpoint.conninfo("myapp", "postgres")) as conn:
            assert conn.execute("SHOW dynamic_library_path").fetchone() == ("$libdir",)
            assert conn.execute("SHOW session_preload_libraries").fetchone() == ("",)
            assert conn.execute("SHOW shared_preload_libraries").fetchone() == ("",)
    assert hostile.libraries.ran() == ""


def test_served_event_triggers_are_disabled(
    hostile: Hostile, scratch: Path, account: RunAccount
) -> None:
    """Provisioning issues DDL as a superuser: the snapshot's event trigger must not fire."""
    with _served(hostile, "event-trigger", scratch, account) as server:
        for db in ("postgres", "myapp"):
            _sql(server, db, "CREATE TABLE pgro_probe ()", "GRANT SELECT ON pgro_probe TO reader")
            with psycopg.connect(server.endpoint.conninfo(db, "postgres")) as conn:
                rows = conn.execute("SELECT evtname, evtenabled FROM pg_event_trigger").fetchall()
            assert rows == [("pgro_test_pwn", "D")]
    assert hostile.libraries.ran() == ""


def test_served_c_functions_outside_libdir_cannot_load(
    hostile: Hostile, scratch: Path, account: RunAccount
) -> None:
    with _served(hostile, "c-function", scratch, account) as server:
        for call in (
            "SELECT public.evil_fn()",
            "SELECT public.evil_abs()",
            "SELECT * FROM uses_evil",
        ):
            with (
                psycopg.connect(server.endpoint.conninfo("myapp", "postgres")) as conn,
                pytest.raises(psycopg.errors.UndefinedFile, match="pgro-refused"),
            ):
                conn.execute(call.encode())
        with psycopg.connect(server.endpoint.conninfo("myapp", "postgres")) as conn:
            probins = conn.execute(
                "SELECT DISTINCT probin FROM pg_proc WHERE proname LIKE 'evil%'"
            ).fetchall()
        assert probins == [(REFUSED_LIBRARY,)]
    assert hostile.libraries.ran() == ""


def test_a_failing_health_query_is_a_failed_check(hostile: Hostile, scratch: Path) -> None:
    """Item 6: the server's error on a health query is that check's failure (QueryFailed),
    not an UnexpectedError blamed on pgro."""
    report = _verify(hostile, "broken-function", scratch / "work")
    assert report.outcome == "failure"
    assert report.reason == "QueryFailed", (report.reason, report.error)
    assert report.exit_code == 1
    assert report.error is not None
    assert "pg_database_size(oid) does not exist" in report.error
    assert "pgro bug" not in report.error
    failed = [c for c in report.checks if c.status == "fail"]
    assert [c.name for c in failed] == ["list_databases"]


def test_health_reports_each_query_failure(
    hostile: Hostile, scratch: Path, account: RunAccount
) -> None:
    with _served(hostile, "broken-function", scratch, account) as server:
        health = check_health(server.endpoint, "postgres")
    assert not health.healthy
    assert health.failure_reason == "QueryFailed"
    assert [(c.name, c.status) for c in health.checks] == [
        ("connect", "pass"),
        ("primary", "pass"),
        ("list_databases", "fail"),
    ]


def test_command_line_alone_overrides_every_config_file(
    hostile: Hostile, scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    """Without any repair, the server's forced settings beat postgresql.conf, an include and
    postgresql.auto.conf: no preload, JIT provider, library path, archive command or HBA
    file from the data directory takes effect, in multi-user and in single-user mode."""
    tree = scratch / "cluster"
    shutil.copytree(hostile.base, tree, symlinks=True)
    pgdata = tree / binaries.major / "main"
    (pgdata / "lib").mkdir()
    shutil.copy(hostile.libraries.plain, pgdata / "lib" / "plain.so")
    shutil.copy(hostile.libraries.magic, pgdata / "lib" / "magic.so")
    marker = hostile.libraries.marker
    (pgdata / "trust-all.conf").write_text("local all all trust\nhost all all 0.0.0.0/0 trust\n")
    (pgdata / "evil.conf").write_text("shared_preload_libraries = 'lib/magic.so'\n")
    with (pgdata / "postgresql.conf").open("a") as f:
        f.write(
            "\ninclude 'evil.conf'\n"
            f"jit_provider = '{JIT_ESCAPE}'\njit_above_cost = 0\n"
            "dynamic_library_path = '/proc/self/cwd/lib:$libdir'\n"
            "session_preload_libraries = 'magic'\n"
            "local_preload_libraries = 'lib/plain'\n"
            "archive_mode = on\n"
            f"archive_command = 'echo archive command ran >> {marker}'\n"
            f"hba_file = '{pgdata}/trust-all.conf'\n"
        )
    (pgdata / "postgresql.auto.conf").write_text("shared_preload_libraries = 'lib/plain'\n")
    hand_over(tree, account)
    hostile.libraries.reset()

    assert bootstrap_superuser(binaries, pgdata, account) == "postgres"
    with (
        _server(pgdata, binaries, account, scratch / "srv") as server,
        psycopg.connect(server.endpoint.conninfo("myapp", "postgres"), autocommit=True) as c,
    ):
        c.execute("SET jit = on")
        assert c.execute("SELECT count(*) FROM test_data").fetchone() == (1000,)
        shown = {
            name: c.execute(f"SHOW {name}".encode()).fetchone()
            for name in (
                "shared_preload_libraries",
                "session_preload_libraries",
                "local_preload_libraries",
                "dynamic_library_path",
                "jit_provider",
                "archive_mode",
                "hba_file",
            )
        }
        c.execute("CREATE TABLE wal_filler AS SELECT generate_series(1, 1000) AS n")
        c.execute("SELECT pg_switch_wal()")
        c.execute("CHECKPOINT")
    assert shown == {
        "shared_preload_libraries": ("",),
        "session_preload_libraries": ("",),
        "local_preload_libraries": ("",),
        "dynamic_library_path": ("$libdir",),
        "jit_provider": ("llvmjit",),
        "archive_mode": ("off",),
        "hba_file": (f"{pgdata.absolute()}/pg_hba.conf",),
    }
    assert hostile.libraries.ran() == ""


def test_functions_added_to_pg_catalog_are_refused(hostile: Hostile, scratch: Path) -> None:
    report = _verify(hostile, "hijacked-builtin", scratch / "work")
    assert hostile.libraries.ran() == "", "the hijacked built-in ran"
    assert report.outcome == "failure"
    assert report.reason == "UnsafeSnapshot", (report.reason, report.error)
    assert report.exit_code == 1
    assert "function pg_is_in_recovery" in (report.error or "")
