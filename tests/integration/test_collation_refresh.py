"""Collation-version drift on a real PostgreSQL with ICU (features.md §2.4).

The drift is forged the way a snapshot from another host would carry it: the recorded
versions of an ICU collation (`pg_collation.collversion`) and of an ICU database's default
collation (`pg_database.datcollversion`) are set to '0.0'. pgro must find both, rebuild the
indexes that depend on them (and no other), and refresh the versions only when every rebuild
of the database succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, find_binaries
from pgro.postgres.collation_refresh import CollationMismatch, detect, repair
from pgro.postgres.locale_aliases import build_locales, spec_for
from pgro.postgres.locale_fix import full_reindex, quick_reindex
from pgro.postgres.server import PostgresServer, socket_dir_for
from tests.fixtures.majors import (
    CACHED_MAJORS,
    DEBIAN_MAJOR,
    SUPPORTED_MAJORS,
    installed_in_cache,
    server_readable_cache,
)
from tests.fixtures.scratch_server import initdb_any_major, scratch_server

ROWS = 500


def _conninfo_for(server: PostgresServer) -> Callable[[str], str]:
    return lambda dbname: server.endpoint.conninfo(dbname, "postgres")


def _connect(server: PostgresServer, dbname: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(server.endpoint.conninfo(dbname, "postgres"), autocommit=True)


def _one(server: PostgresServer, dbname: str, sql: str) -> object:
    with _connect(server, dbname) as conn:
        row = conn.execute(sql.encode()).fetchone()
        assert row is not None
        return row[0]


def _relfilenode(server: PostgresServer, dbname: str, index: str) -> int:
    sql = f"SELECT relfilenode FROM pg_class WHERE relname = '{index}'"
    return int(str(_one(server, dbname, sql)))


@pytest.fixture
def drifted(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[PostgresServer]:
    """A server whose `en_icu` collation (in `postgres`) and ICU database `icudb` record a
    version '0.0' their library does not have."""
    with scratch_server(scratch_root, account, binaries, "collation") as server:
        with _connect(server, "postgres") as conn:
            row = conn.execute("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")
            if int(str(row.fetchone()[0])) == 0:  # type: ignore[index]
                pytest.skip("this PostgreSQL has no ICU")
            conn.execute("CREATE COLLATION en_icu (provider = icu, locale = 'en-US')")
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text COLLATE en_icu, code text)")
            conn.execute(
                f"INSERT INTO t SELECT g, 'name ' || g, 'code ' || g "
                f"FROM generate_series(1, {ROWS}) g"
            )
            conn.execute("CREATE INDEX t_name ON t (name)")  # on en_icu
            conn.execute("CREATE INDEX t_code ON t (code)")  # the C default: sound
            conn.execute("CREATE INDEX t_expr ON t ((lower(code) COLLATE en_icu))")
            conn.execute(
                "CREATE DATABASE icudb TEMPLATE template0 LOCALE_PROVIDER icu "
                "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
            conn.execute("UPDATE pg_collation SET collversion = '0.0' WHERE collname = 'en_icu'")
            conn.execute("UPDATE pg_database SET datcollversion = '0.0' WHERE datname = 'icudb'")
        with _connect(server, "icudb") as conn:
            conn.execute("CREATE TABLE words (id int PRIMARY KEY, w text)")
            conn.execute(f"INSERT INTO words SELECT g, 'w' || g FROM generate_series(1, {ROWS}) g")
            conn.execute("CREATE INDEX words_w ON words (w)")
        yield server


def _actual(server: PostgresServer) -> tuple[str, str]:
    collation = _one(
        server,
        "postgres",
        "SELECT pg_collation_actual_version(oid) FROM pg_collation WHERE collname = 'en_icu'",
    )
    database = _one(
        server,
        "postgres",
        "SELECT pg_database_collation_actual_version(oid) FROM pg_database WHERE datname = 'icudb'",
    )
    return str(collation), str(database)


def test_detection_finds_the_forged_versions(drifted: PostgresServer) -> None:
    collation, database = _actual(drifted)
    assert collation != "0.0"
    found = detect(_conninfo_for(drifted))
    assert set(found) == {
        CollationMismatch("postgres", "public", "en_icu", "0.0", collation),
        CollationMismatch("icudb", "pg_catalog", "default", "0.0", database),
    }


def test_repair_rebuilds_the_dependent_indexes_then_refreshes(drifted: PostgresServer) -> None:
    server = drifted
    conninfo_for = _conninfo_for(server)
    before = {
        name: _relfilenode(server, "postgres", name) for name in ("t_name", "t_code", "t_expr")
    }
    words = _relfilenode(server, "icudb", "words_w")

    result = repair(conninfo_for)

    assert result.failures == ()
    assert {str(i) for i in result.rebuilt} == {
        "postgres:public.t_name",
        "postgres:public.t_expr",
        "icudb:public.words_w",
        # The primary key of an int column depends on no collation: not rebuilt.
    }
    assert result.repaired
    assert result.remaining == ()
    assert set(result.refreshed) == set(result.mismatches)
    assert _relfilenode(server, "postgres", "t_name") != before["t_name"]
    assert _relfilenode(server, "postgres", "t_expr") != before["t_expr"]
    assert _relfilenode(server, "postgres", "t_code") == before["t_code"]
    assert _relfilenode(server, "icudb", "words_w") != words
    collation, database = _actual(server)
    recorded = _one(
        server, "postgres", "SELECT collversion FROM pg_collation WHERE collname = 'en_icu'"
    )
    assert recorded == collation
    recorded = _one(
        server, "postgres", "SELECT datcollversion FROM pg_database WHERE datname = 'icudb'"
    )
    assert recorded == database
    assert _one(server, "postgres", "SELECT count(*) FROM t") == ROWS
    assert detect(conninfo_for) == ()
    assert any("refreshed 2 collation version(s)" in note for note in result.notes())
    # Nothing left to do a second time.
    again = repair(conninfo_for)
    assert not again.needed
    assert again.rebuilt == ()


def test_a_rebuild_that_cannot_take_its_lock_refreshes_nothing(drifted: PostgresServer) -> None:
    server = drifted
    conninfo_for = _conninfo_for(server)
    before = _relfilenode(server, "postgres", "t_name")
    with _connect(server, "postgres") as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        result = repair(conninfo_for, lock_timeout="200ms")
        holder.execute("ROLLBACK")

    failed = {f"{f.database}:{f.schema}.{f.name}" for f in result.failures}
    assert failed == {"postgres:public.t_name", "postgres:public.t_expr"}
    assert all("lock timeout" in f.error for f in result.failures)
    assert _relfilenode(server, "postgres", "t_name") == before
    # No REFRESH where a rebuild failed: the mismatch stays, recorded and reported.
    collation, _ = _actual(server)
    assert (
        _one(server, "postgres", "SELECT collversion FROM pg_collation WHERE collname = 'en_icu'")
        == "0.0"
    )
    remaining = result.remaining
    assert [(m.database, m.name) for m in remaining] == [("postgres", "en_icu")]
    assert not result.repaired
    notes = " ".join(result.notes())
    assert "remain, not refreshed" in notes
    assert "en_icu" in notes
    assert "t_name" in notes
    assert detect(conninfo_for) == (
        CollationMismatch("postgres", "public", "en_icu", "0.0", collation),
    )
    # The other database's rebuild succeeded, so its version was refreshed.
    assert [(m.database, m.name) for m in result.refreshed] == [("icudb", "default")]
    # Once the lock is gone, the repair completes.
    assert repair(conninfo_for).repaired
    assert detect(conninfo_for) == ()


def test_a_failed_concurrent_rebuild_leaves_no_invalid_copy(drifted: PostgresServer) -> None:
    """REINDEX CONCURRENTLY that fails while building leaves `<name>_ccnew`, invalid, which
    every write would maintain: pgro drops it, and the snapshot's own invalid index stays."""
    server = drifted
    with _connect(server, "postgres") as conn:
        conn.execute(
            "CREATE FUNCTION tag(text) RETURNS text LANGUAGE plpgsql IMMUTABLE "
            "AS $$BEGIN RETURN 't' || $1; END$$"
        )
        conn.execute("CREATE INDEX t_tag ON t ((tag(name)))")
        # The snapshot's own invalid index (a CREATE INDEX CONCURRENTLY that failed there).
        conn.execute("CREATE INDEX t_broken ON t (name)")
        conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'public.t_broken'::regclass"
        )
        conn.execute(
            "CREATE OR REPLACE FUNCTION tag(text) RETURNS text LANGUAGE plpgsql IMMUTABLE "
            "AS $$BEGIN RAISE EXCEPTION 'tag refused'; END$$"
        )

    result = repair(_conninfo_for(server))

    assert [(f.name, f.error) for f in result.failures] == [("t_tag", "tag refused")]
    assert {i.name for i in result.rebuilt} >= {"t_name", "t_expr"}
    invalid = _one(
        server,
        "postgres",
        "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 't'::regclass AND NOT i.indisvalid",
    )
    assert invalid == "t_broken"
    assert [m.name for m in result.remaining] == ["en_icu"]


# --- every supported major, with a glibc collation ----------------------------------------


@pytest.fixture(scope="module")
def bindirs(scratch_root: Path) -> Path:
    installed = tuple(m for m in CACHED_MAJORS if installed_in_cache(m))
    return server_readable_cache(scratch_root, installed)


@pytest.mark.parametrize("major", SUPPORTED_MAJORS)
def test_each_major_refreshes_a_drifted_glibc_collation(
    major: str, bindirs: Path, scratch: Path, account: RunAccount
) -> None:
    """A libc collation records the glibc version (13+): forged old, it is found, its index
    rebuilt (plainly before 14) and its version refreshed. The locale comes from a private
    LOCPATH, as a restore's aliases would give it."""
    if major == DEBIAN_MAJOR:
        binaries = find_binaries(major)
    elif (bindirs / major / "bin" / "postgres").exists():
        binaries = PostgresBinaries(major, bindirs / major / "bin")
    else:
        pytest.skip(f"PostgreSQL {major} is not installed (scripts/install-postgres-major.sh)")
    spec = spec_for("en_US.UTF-8")
    assert spec is not None
    locales = build_locales(scratch / "locales", [spec])
    pgdata = scratch / "data"
    initdb_any_major(binaries, pgdata, account)
    server = PostgresServer(
        pgdata,
        binaries,
        account,
        socket_dir=socket_dir_for(scratch / "run"),
        log_path=scratch / "pg.log",
        env=locales.env(),
    )
    server.start(60)
    try:
        with _connect(server, "postgres") as conn:
            conn.execute("CREATE COLLATION en_libc (provider = libc, locale = 'en_US.UTF-8')")
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text COLLATE en_libc)")
            conn.execute(f"INSERT INTO t SELECT g, 'n' || g FROM generate_series(1, {ROWS}) g")
            conn.execute("CREATE INDEX t_name ON t (name)")
            conn.execute("UPDATE pg_collation SET collversion = '0.0' WHERE collname = 'en_libc'")
        actual = str(
            _one(
                server,
                "postgres",
                "SELECT pg_collation_actual_version(oid) FROM pg_collation "
                "WHERE collname = 'en_libc'",
            )
        )
        assert detect(_conninfo_for(server)) == (
            CollationMismatch("postgres", "public", "en_libc", "0.0", actual),
        )
        before = _relfilenode(server, "postgres", "t_name")
        result = repair(_conninfo_for(server))
        assert result.repaired
        assert [str(i) for i in result.rebuilt] == ["postgres:public.t_name"]
        assert _relfilenode(server, "postgres", "t_name") != before
        recorded = _one(
            server, "postgres", "SELECT collversion FROM pg_collation WHERE collname = 'en_libc'"
        )
        assert recorded == actual
        assert detect(_conninfo_for(server)) == ()
    finally:
        server.stop()


def test_a_cluster_without_the_postgres_database_is_handled(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    with scratch_server(scratch_root, account, binaries, "nopostgres") as server:
        with _connect(server, "template1") as conn:
            conn.execute("DROP DATABASE postgres")
            conn.execute("CREATE DATABASE app")
        with _connect(server, "app") as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
            conn.execute("CREATE INDEX t_name ON t (name)")
        conninfo_for = _conninfo_for(server)
        assert detect(conninfo_for) == ()
        assert not repair(conninfo_for).needed
        assert quick_reindex(conninfo_for).reindexed == ("app:public.t_name",)
        assert set(full_reindex(conninfo_for).reindexed) == {"app", "template1"}


def test_a_report_names_the_mismatches_still_in_the_catalog(drifted: PostgresServer) -> None:
    """What the runtimes' verification reports add (pgro run, the operator): the repair ran
    before ready, so a mismatch found now is one it could not fix: unhealthy, named."""
    from pgro.pipeline.locale_repair import remaining_collations
    from pgro.postgres.health import COLLATION_CHECK, COLLATION_MISMATCH, HealthReport

    report = HealthReport()
    remaining_collations(report, _conninfo_for(drifted))
    [check] = [c for c in report.checks if c.name == COLLATION_CHECK]
    assert check.status == "fail"
    assert "en_icu" in check.detail
    assert report.failure_reason == COLLATION_MISMATCH

    repair(_conninfo_for(drifted))
    sound = HealthReport()
    remaining_collations(sound, _conninfo_for(drifted))
    assert [(c.name, c.status) for c in sound.checks] == [(COLLATION_CHECK, "pass")]
    assert sound.failure_reason is None
