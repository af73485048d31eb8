"""SQL of the persistent-schema migration (features §2.1), on the serving restore (the source)
and the switching one (the target), as the bootstrap superuser.

Every session uses `pgro.postgres.session.connect` (nothing the restored catalog names is
loaded into it). Names from the catalog are hostile: identifiers are quoted by psycopg.sql,
values are parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from psycopg import sql

from pgro.postgres.databases import MAINTENANCE_DATABASE, main_database_or_maintenance
from pgro.postgres.session import connect

APPLICATION: Final = "pgro-schema-migration"
# The copy's own sessions (pg_dump, pg_restore): how a stopped copy's leftovers are found.
COPY_APPLICATION: Final = "pgro-schema-copy"
# Dropping the schemas after a timeout must not hang on a lock the stopped copy left.
DROP_TIMEOUT_MS: Final = 60_000

# dbname -> a libpq conninfo for the bootstrap superuser in that database.
Conninfo = Callable[[str], str]


def main_database(conninfo_for: Conninfo) -> str:
    """The database the copy works in (pgro.postgres.databases), on one restore."""
    with connect(conninfo_for(MAINTENANCE_DATABASE), application_name=APPLICATION) as conn:
        return main_database_or_maintenance(conn)


def schemas_present(conninfo_for: Conninfo, dbname: str, schemas: Sequence[str]) -> list[str]:
    """Those of `schemas` that exist in `dbname`, in the order given."""
    with connect(conninfo_for(dbname), application_name=APPLICATION) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname = ANY(%s)",
            (list(schemas),),
        ).fetchall()
    found = {str(r[0]) for r in rows}
    return [s for s in schemas if s in found]


def database_size(conninfo_for: Conninfo, dbname: str) -> int:
    with connect(conninfo_for(MAINTENANCE_DATABASE), application_name=APPLICATION) as conn:
        row = conn.execute("SELECT pg_catalog.pg_database_size(%s)", (dbname,)).fetchone()
    return int(str(row[0])) if row is not None and row[0] is not None else 0


def prepare_target(conninfo_for: Conninfo, dbname: str, schemas: Sequence[str]) -> None:
    """Make room for the copy on the switching restore: its other sessions end and the
    schemas of these names (the snapshot's stale copies, or a copy an interrupted attempt
    left) are dropped. The copy creates each again as the analytics user it runs as (a
    dump made with `--schema` creates even `public`), so none is owned by a superuser."""
    with connect(conninfo_for(dbname), application_name=APPLICATION) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_catalog.pg_backend_pid()"
        )
        with conn.transaction():
            for schema in schemas:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def drop_schemas(conninfo_for: Conninfo, dbname: str, schemas: Sequence[str]) -> None:
    """Drop the schemas of an abandoned copy, so the switching restore serves without a
    half-copied one (best effort: the caller swallows errors)."""
    with connect(conninfo_for(dbname), application_name=APPLICATION) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(DROP_TIMEOUT_MS)))
        conn.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_catalog.pg_backend_pid()"
            " AND application_name = %s",
            (COPY_APPLICATION,),
        )
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
