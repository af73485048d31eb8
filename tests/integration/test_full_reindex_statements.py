"""Reference `deployment_runtime_reindex_handles_full_database_flag` on a real server: the full
reindex after `pg_resetwal` is one blind `REINDEX DATABASE CONCURRENTLY` per connectable
database (from PostgreSQL 12) and never calls amcheck (`bt_index_check` wedged on the
reference's production data), as every statement the server logged shows. Not repeating it
once done is the scenario tests' (tests/scenarios/test_full_reindex.py).
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.locale_fix import full_reindex
from tests.fixtures.scratch_server import scratch_server


def test_the_full_reindex_is_reindex_database_concurrently_and_no_amcheck(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    with scratch_server(scratch_root, account, binaries, "fullreindex") as server:

        def conninfo_for(dbname: str) -> str:
            return server.endpoint.conninfo(dbname, "postgres")

        with psycopg.connect(conninfo_for("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
            conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            conn.execute("SELECT pg_reload_conf()")
        with psycopg.connect(conninfo_for("app"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
            row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't_pkey'")
            before = row.fetchone()
        mark = server.log_path.stat().st_size

        result = full_reindex(conninfo_for)

        assert set(result.reindexed) == {"postgres", "app", "template1"}  # not template0
        assert not result.failures
        with psycopg.connect(conninfo_for("app"), autocommit=True) as conn:
            row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't_pkey'")
            assert row.fetchone() != before
        with server.log_path.open("rb") as log:
            log.seek(mark)
            logged = log.read().decode(errors="replace")
        for db in ("postgres", "app", "template1"):
            assert f'REINDEX DATABASE CONCURRENTLY "{db}"' in logged, logged[-2000:]
        assert "bt_index_check" not in logged
        assert "amcheck" not in logged
