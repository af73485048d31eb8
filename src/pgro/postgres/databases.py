"""Which database of a restored cluster is its "main" one.

A snapshot usually holds one application database next to `postgres` and the templates; the
steps that work on a single database (the persistent-schema migration, persistent users) pick
it the way the reference does (features.md §2.1): the largest connectable, non-template
database other than `postgres`, by `pg_database_size`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import psycopg

MAINTENANCE_DATABASE: Final = "postgres"

# Ties (equal sizes) go to the first name, so the choice is the same on every run.
# datconnlimit -2 marks a database left invalid by an interrupted DROP DATABASE.
_MAIN_DATABASE_QUERY: Final = (
    "SELECT datname FROM pg_catalog.pg_database "
    "WHERE datallowconn AND NOT datistemplate AND datconnlimit <> -2 "
    "AND datname NOT IN ('postgres', 'template0', 'template1') "
    "ORDER BY pg_catalog.pg_database_size(oid) DESC, datname LIMIT 1"
)


def main_database(conn: psycopg.Connection[tuple[object, ...]]) -> str | None:
    """The cluster's main database, or None when it holds only `postgres` and templates.

    `conn` is a superuser session in any database of the cluster (pg_database_size needs
    CONNECT on each database, or pg_read_all_stats)."""
    row = conn.execute(_MAIN_DATABASE_QUERY).fetchone()
    return None if row is None else str(row[0])


def main_database_or_maintenance(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """main_database, falling back to `postgres` for a cluster with no application database."""
    return main_database(conn) or MAINTENANCE_DATABASE
