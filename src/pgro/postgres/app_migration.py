"""SQL of the application migration (`migrateTo`, features §2.2) on the migrating restore,
as the bootstrap superuser.

Every session uses `pgro.postgres.session.connect`. Names from the catalog are hostile:
identifiers are quoted by psycopg.sql (or are PostgreSQL's own `regclass`/`regprocedure`/
`regtype` text), values are parameters.

`logs.migrations` is written by the migrator, which logs in as the analytics user and, after
`hand_over`, owns the `logs` schema: it could replace the table by a view calling its own
function, which pgro's superuser session would then run. So the batch is read only from a
plain table (`FROM ONLY`: no view, foreign table or inheritance child is read), and what it
holds is checked shape by shape: anything else reads as "no batch".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Final

import psycopg
from psycopg import sql

from pgro.core.app_migration import Batch, whole_number
from pgro.postgres.config import printable_name
from pgro.postgres.restore_info import SCHEMA as PGRO_SCHEMA
from pgro.postgres.schema_migration import Conninfo, prepare_target, schemas_present
from pgro.postgres.schema_migration import database_size as database_size
from pgro.postgres.session import connect

log = logging.getLogger("pgro.postgres")

APPLICATION: Final = "pgro-app-migration"
# Re-owning locks each application table: a client still holding one must not stall the
# reconciler (the step is retried on the next pass).
LOCK_TIMEOUT: Final = "60s"
# Objects re-owned per transaction: with PostgreSQL's default lock table (64 locks per
# connection slot), one transaction over about 2,000 tables with an index each fails "out
# of shared memory"; 200 tables with a dozen indexes each fit.
HAND_OVER_BATCH: Final = 200
# ISO output carries the UTC offset, so the baseline goes back to PostgreSQL exactly,
# whatever DateStyle a restored per-database setting chose.
_DATESTYLE: Final = "SET DateStyle = ISO, YMD"
# The batch is read only from a plain table (module docstring).
_BATCH_TABLE: Final = (
    "SELECT c.relkind FROM pg_catalog.pg_class c"
    " WHERE c.oid = pg_catalog.to_regclass('logs.migrations')"
)
_LATEST: Final = "SELECT max(logged_at)::text FROM ONLY logs.migrations"
# `($1 IS NULL OR …)` as the reference writes it; a row without a time is never the newest.
_NEWEST_UP: Final = (
    "SELECT migrations, batch_duration_ms, stats FROM ONLY logs.migrations"
    " WHERE direction = 'up' AND (%(baseline)s::text IS NULL"
    " OR logged_at > %(baseline)s::text::timestamptz)"
    " ORDER BY logged_at DESC NULLS LAST LIMIT 1"
)

# What `hand_over` re-owns: the schemas (oid, name, already owned), then the objects in
# them as (keyword of the ALTER, PostgreSQL's own quoted name).
_SCHEMAS: Final = """
SELECT n.oid, n.nspname, n.nspowner = r.oid AS owned
FROM pg_catalog.pg_namespace n, pg_catalog.pg_roles r
WHERE r.rolname = %(role)s
  AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema'
  AND n.nspname <> %(pgro_schema)s
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
                    AND d.objid = n.oid AND d.deptype = 'e')
ORDER BY n.nspname
"""
_RELATIONS: Final = """
SELECT CASE c.relkind WHEN 'r' THEN 'TABLE' WHEN 'p' THEN 'TABLE' WHEN 'v' THEN 'VIEW'
         WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
         ELSE 'SEQUENCE' END,
       c.oid::pg_catalog.regclass::pg_catalog.text
FROM pg_catalog.pg_class c, pg_catalog.pg_roles r
WHERE r.rolname = %(role)s AND c.relowner <> r.oid
  AND c.relnamespace = ANY(%(schemas)s::pg_catalog.oid[])
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND d.objid = c.oid
                    AND (d.deptype = 'e'
                         -- A serial's or identity's sequence goes with its table.
                         OR (c.relkind = 'S' AND d.deptype IN ('a', 'i')
                             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass)))
ORDER BY c.oid
"""
_ROUTINES: Final = """
SELECT {kind}, p.oid::pg_catalog.regprocedure::pg_catalog.text
FROM pg_catalog.pg_proc p, pg_catalog.pg_roles r
WHERE r.rolname = %(role)s AND p.proowner <> r.oid
  AND p.pronamespace = ANY(%(schemas)s::pg_catalog.oid[])
  AND {routine}
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                    AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY p.oid
"""
# `prokind` is new in PostgreSQL 11; before it there were no procedures.
_ROUTINES_11: Final = _ROUTINES.format(
    kind="CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END",
    routine="p.prokind IN ('f', 'p', 'w')",
)
_ROUTINES_10: Final = _ROUTINES.format(kind="'FUNCTION'", routine="NOT p.proisagg")
# Enums, domains, ranges and standalone composites; array types follow their element type,
# a table's row type goes with the table. Multiranges come after their ranges moved:
# PostgreSQL 14-16 leave one with its old owner, 17 carries it and refuses it alone.
_TYPES_OF: Final = """
SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
       t.oid::pg_catalog.regtype::pg_catalog.text
FROM pg_catalog.pg_type t, pg_catalog.pg_roles r
WHERE r.rolname = %(role)s AND t.typowner <> r.oid
  AND t.typnamespace = ANY(%(schemas)s::pg_catalog.oid[])
  AND (t.typtype IN {kinds}
       OR (t.typtype = 'c' AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                       WHERE c.oid = t.typrelid AND c.relkind = 'c')))
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
                    AND d.objid = t.oid AND d.deptype = 'e')
ORDER BY t.oid
"""
_TYPES: Final = _TYPES_OF.format(kinds="('e', 'd', 'r')")
_MULTIRANGES: Final = _TYPES_OF.format(kinds="('m')")
_KEYWORDS: Final = {
    k: sql.SQL(k)
    for k in (
        "TABLE",
        "VIEW",
        "MATERIALIZED VIEW",
        "FOREIGN TABLE",
        "SEQUENCE",
        "FUNCTION",
        "PROCEDURE",
        "DOMAIN",
        "TYPE",
    )
}


class HandOverRefused(Exception):
    """The restore is not in a state where its objects may be given to the analytics user."""


def _session(conninfo_for: Conninfo, dbname: str) -> psycopg.Connection[tuple[object, ...]]:
    return connect(conninfo_for(dbname), application_name=APPLICATION)


def _batch_table_is_plain(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute(_BATCH_TABLE).fetchone()
    if row is None:
        return False
    if row[0] != "r":
        log.warning("logs.migrations is not a plain table (relkind %r): not read", row[0])
        return False
    return True


def latest_batch_at(conninfo_for: Conninfo, dbname: str) -> str | None:
    """`max(logged_at)::text` of `logs.migrations`, or None when the table is absent or
    empty. Kept as text: it goes back to PostgreSQL unparsed."""
    with _session(conninfo_for, dbname) as conn:
        if not _batch_table_is_plain(conn):
            return None
        conn.execute(_DATESTYLE)
        try:
            row = conn.execute(_LATEST).fetchone()
        except (psycopg.errors.ProgrammingError, psycopg.errors.DataError) as exc:
            log.warning("logs.migrations has no usable logged_at: %s", type(exc).__name__)
            return None
    return None if row is None or row[0] is None else str(row[0])


def read_batch(conninfo_for: Conninfo, dbname: str, baseline: str | None) -> Batch | None:
    """The newest `direction = 'up'` batch logged after `baseline` (any, when None)."""
    with _session(conninfo_for, dbname) as conn:
        if not _batch_table_is_plain(conn):
            return None
        conn.execute(_DATESTYLE)
        try:
            row = conn.execute(_NEWEST_UP, {"baseline": baseline}).fetchone()
        except (psycopg.errors.ProgrammingError, psycopg.errors.DataError) as exc:
            # Columns of other names or types than the migrator's: nothing pgro can read.
            log.warning("logs.migrations cannot be read as batches: %s", type(exc).__name__)
            return None
    if row is None:
        return None
    migrations, duration, stats = row
    return Batch(
        migrations=[m for m in migrations if isinstance(m, str)]
        if isinstance(migrations, list)
        else [],
        batch_duration_ms=whole_number(duration),
        stats=stats if isinstance(stats, Mapping) else None,
    )


def drop_schemas(conninfo_for: Conninfo, dbname: str, schemas: Sequence[str]) -> list[str]:
    """End the database's other sessions and drop those of `schemas` that exist, with
    everything in them; returns the dropped ones."""
    present = schemas_present(conninfo_for, dbname, schemas)
    if present:
        # The same work as making room for a persistent-schema copy.
        prepare_target(conninfo_for, dbname, present)
    return present


def hand_over(conninfo_for: Conninfo, dbname: str, role: str, *, batch: int | None = None) -> int:
    """Make `role` the owner of the application's objects in `dbname` (schemas other than
    pg_* and information_schema, their tables, views, sequences, functions, types), so a
    migrator logging in as it can run DDL; returns how many objects changed owner.

    Extension members stay the extension's; pgro's own `_pgro` schema stays pgro's (its
    table is written by pgro's superuser, so an owner could make that write run its code).
    Refused while `role` is a superuser or an event trigger is enabled (the catalog guard,
    run by provisioning, disables them: one would run on every ALTER here).

    One transaction per HAND_OVER_BATCH objects (`batch`): each ALTER holds locks on the
    object, its indexes, TOAST table and sequences to the commit, and one transaction over
    thousands of tables overflows the lock table. A pass stopped between two leaves some
    objects handed over; the next pass skips those (the migrator starts only after this
    returned)."""
    owner = sql.Identifier(role)
    size = max(batch or HAND_OVER_BATCH, 1)
    with _session(conninfo_for, dbname) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        _check_hand_over(conn, dbname, role)
        routines = _ROUTINES_11 if conn.info.server_version >= 110000 else _ROUTINES_10
        changed = 0
        for queries in ((_RELATIONS, routines, _TYPES), (_MULTIRANGES,)):
            statements = _ownership_changes(conn, role, owner, queries)
            for first in range(0, len(statements), size):
                with conn.transaction():
                    for statement in statements[first : first + size]:
                        conn.execute(statement)
            changed += len(statements)
    return changed


def _ownership_changes(
    conn: psycopg.Connection[tuple[object, ...]],
    role: str,
    owner: sql.Identifier,
    queries: tuple[str, ...],
) -> list[sql.Composed]:
    """The `ALTER … OWNER TO` statements still to run, schemas first."""
    schemas = conn.execute(_SCHEMAS, {"role": role, "pgro_schema": PGRO_SCHEMA}).fetchall()
    statements = [
        sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(str(name)), owner)
        for _oid, name, owned in schemas
        if owned is not True
    ]
    params = {"role": role, "schemas": [int(str(oid)) for oid, _, _ in schemas]}
    for query in queries:
        for kind, name in conn.execute(query, params).fetchall():
            # `name` is PostgreSQL's own quoted, schema-qualified text (search_path is
            # pg_catalog), never one pgro quoted itself.
            statements.append(
                sql.SQL("ALTER {} {} OWNER TO {}").format(
                    _KEYWORDS[str(kind)], sql.SQL(str(name)), owner
                )
            )
    return statements


def _check_hand_over(conn: psycopg.Connection[tuple[object, ...]], dbname: str, role: str) -> None:
    row = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = %s", (role,))
    found = row.fetchone()
    if found is None:
        raise HandOverRefused(
            f"role {printable_name(role)} does not exist in the restore: provision the users "
            "before migrating"
        )
    if found[0] is True:
        raise HandOverRefused(
            f"role {printable_name(role)} is a superuser: provisioning must reset it before "
            "the application's objects are handed to it"
        )
    enabled = conn.execute(
        "SELECT evtname FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D' ORDER BY 1"
    ).fetchall()
    if enabled:
        names = ", ".join(printable_name(str(r[0])) for r in enabled)
        raise HandOverRefused(
            f"database {printable_name(dbname)} has enabled event triggers ({names}), which "
            "would run as pgro's superuser on every ownership change: the catalog guard "
            "(pgro.postgres.catalog_guard.neutralise_catalog) must run first"
        )
