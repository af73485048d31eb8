"""Redaction on a restored server (features §2.6) with pgro's native masking engine
(pgro.core.masks): plain SQL, no extension.

`apply_manifest` runs in one superuser session on the main database
(pgro.postgres.session: nothing the restored catalog names is loaded, `search_path =
pg_catalog`), with `default_transaction_read_only = off` (a restore is served read-only) and
`session_replication_role = replica`, so the database's own triggers, rules and foreign-key
checks do not run on pgro's statements (a trigger could put values back; a table whose
triggers or rules fire even then is refused). Then, like the reference:

1. every table mask (`truncate`) is a `TRUNCATE TABLE s.t CASCADE` in its own transaction;
2. every masked column is looked up in one batch (type through domains, NOT NULL, default,
   identity, generated, length); a column not found, on something that is not a table, or
   whose kind does not fit its type is a counted failure;
3. per table, one transaction and one set-based statement for all its masked columns:
   `UPDATE s.t SET c1 = <expr>, c2 = <expr>, …`. When it fails on the data (a constraint, a
   value out of range), each column is tried alone in a savepoint, so the columns that work
   are applied and the ones that do not are counted. The tables holding a deterministic
   mask are masked in one transaction together (each table a savepoint in it): a run that
   stops half-way leaves all of them masked or none, so a rerun, with another key, masks
   them all again alike and joins on their masked keys still hold.

What is counted makes the redaction `partial` (the reference's semantics; it still serves,
visibly). What says the server cannot be written at all (read-only recovery, a lock not
granted in time, the connection lost) raises RedactionFailed instead: nothing serves.

Failures name schemas, tables, columns, kinds, types, constraints and SQLSTATEs, never a
PostgreSQL message (their DETAIL quotes rows) and never a value.

With `engine="anon"` (opt-in), the kinds the reference masked with postgresql_anonymizer
call its functions instead (pgro.core.masks), in the same statements and transactions. The
session first checks that the server has `anon` (`pg_available_extensions`: the server's
own installation, not the restored catalog), refuses a database with enabled event triggers
(they would run on the DDL), replaces any `anon` extension the snapshot (or an earlier run)
left (its functions would be the catalog's, not the server's: `DROP EXTENSION anon`, then
the extensions in schema `anon`, then the schema; refused when something else depends on
them or the schema holds objects of its own), then runs `CREATE SCHEMA anon`, `CREATE
EXTENSION IF NOT EXISTS anon SCHEMA anon CASCADE` (what CASCADE installs goes into `anon`
too, not into the session's `pg_catalog`) and `SELECT anon.init()`, in one transaction.
No SECURITY LABEL and no `anon.anonymize_database()`: masking stays static UPDATEs.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import psycopg
from psycopg import sql

from pgro.api.names import ANNOTATION_REDACTION_ENGINE
from pgro.api.replica import Redaction
from pgro.core.masks import DEFAULT_ENGINE, KEY_SETTING, ColumnInfo, Engine, MaskUnfit, assignment
from pgro.core.redaction_manifest import (
    ColumnMask,
    Manifest,
    RedactionSpecInvalid,
    TableMask,
    check_version,
    shown,
)
from pgro.postgres.session import connect

if TYPE_CHECKING:
    from collections.abc import Iterator

APPLICATION: Final = "pgro-redaction"
LOCK_TIMEOUT_MS: Final = 60_000
VERSION_QUERY_TIMEOUT_MS: Final = 30_000
# SQLSTATE classes that are about the data or the statement (counted per column or table):
# data exceptions, integrity constraints, syntax or access rule (a missing relation, a type
# mismatch), WITH CHECK OPTION. Anything else says the server cannot do the work now.
_COUNTED_CLASSES: Final = frozenset({"22", "23", "42", "44"})

Session = psycopg.Connection[tuple[object, ...]]
Assignment = tuple[ColumnMask, sql.Composable]


class RedactionFailed(Exception):
    """The redaction cannot run or finish; the message holds no value from the data."""


@dataclass(frozen=True)
class MaskFailure:
    target: str  # `schema.table` or `schema.table.column`, printable
    kind: str
    reason: str
    column: bool

    def message(self) -> str:
        return f"{'column' if self.column else 'table'} {self.target} ({self.kind}): {self.reason}"


@dataclass(frozen=True)
class RedactionResult:
    """What a run of `apply_manifest` did. Holds names and reasons, never a value."""

    columns_attempted: int
    columns_masked: tuple[str, ...]
    tables_attempted: int
    tables_truncated: tuple[str, ...]
    failures: tuple[MaskFailure, ...]

    @property
    def columns_failed(self) -> int:
        return sum(1 for f in self.failures if f.column)

    @property
    def tables_failed(self) -> int:
        return sum(1 for f in self.failures if not f.column)

    @property
    def partial(self) -> bool:
        """Something was not applied: the phase is `partial`, not `complete`."""
        return bool(self.failures)

    def summary(self) -> str:
        text = (
            f"{len(self.columns_masked)} of {self.columns_attempted} columns masked, "
            f"{len(self.tables_truncated)} of {self.tables_attempted} tables truncated"
        )
        if self.failures:
            shown_failures = "; ".join(f.message() for f in self.failures[:10])
            more = f" and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
            text += f"; failed: {shown_failures}{more}"
        return text


def _reason(error: psycopg.Error) -> str:
    """An error as a failure reason: its class, SQLSTATE and constraint, not its message."""
    reason = f"{type(error).__name__} (SQLSTATE {error.sqlstate or 'unknown'})"
    constraint = error.diag.constraint_name
    if constraint:
        reason += f" on constraint {shown(constraint)}"
    return reason


def _counted(conn: Session, error: psycopg.Error) -> bool:
    """Whether `error` is about this table or column (else the whole run fails)."""
    return not conn.broken and (error.sqlstate or "")[:2] in _COUNTED_CLASSES


def _fatal(conn: Session, what: str, error: psycopg.Error) -> RedactionFailed:
    state = "the connection was lost" if conn.broken else _reason(error)
    return RedactionFailed(f"redaction stopped at {what}: {state}")


def _session(conninfo: str, key: str, lock_timeout_ms: int) -> Session:
    conn = connect(conninfo, application_name=APPLICATION)
    try:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("SET session_replication_role = replica")
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(lock_timeout_ms)))
        # A bind parameter: the key is in no statement text (the server logs those on errors).
        conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (KEY_SETTING, key))
    except BaseException:
        conn.close()
        raise
    return conn


# --- the anon engine

ANON_EXTENSION: Final = "anon"


def _prepare_anon(conn: Session) -> None:
    """Make the server's own `anon` extension ready in the database (see the module's
    docstring); RedactionFailed when it cannot be."""
    step = "checking the anon extension"
    try:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int / 10000, EXISTS ("
            "SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = %s), ("
            "SELECT count(*) FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D')",
            (ANON_EXTENSION,),
        ).fetchone()
        assert row is not None
        major, available, event_triggers = row
        if not available:
            raise RedactionFailed(
                f"postgresql_anonymizer (anon) is not installed for PostgreSQL {major}; remove "
                f"the annotation {ANNOTATION_REDACTION_ENGINE}=anon to mask with pgro's "
                "built-in engine"
            )
        if event_triggers:
            raise RedactionFailed(
                "the database has enabled event triggers, which would run on the anon "
                "extension's DDL as a superuser: neutralise the catalog first (provisioning "
                "does)"
            )
        with conn.transaction():
            step = "replacing the anon extension the snapshot brought"
            conn.execute("DROP EXTENSION IF EXISTS anon")
            # What an earlier run's CASCADE installed into the schema (pgcrypto for anon 1.x).
            step = "dropping the extensions in schema anon"
            members = conn.execute(
                "SELECT e.extname::text FROM pg_catalog.pg_extension e "
                "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
                "WHERE n.nspname = 'anon'"
            ).fetchall()
            if members:
                conn.execute(
                    sql.SQL("DROP EXTENSION {}").format(
                        sql.SQL(", ").join(sql.Identifier(str(m[0])) for m in members)
                    )
                )
            # The extension's functions must not stand beside whatever a schema `anon` holds.
            step = "checking that no schema anon holds objects of its own"
            conn.execute("DROP SCHEMA IF EXISTS anon")
            conn.execute("CREATE SCHEMA anon")
            # SCHEMA anon: the extensions CASCADE installs go there too, not into the
            # session's pg_catalog.
            step = "CREATE EXTENSION anon"
            conn.execute("CREATE EXTENSION IF NOT EXISTS anon SCHEMA anon CASCADE")
            step = "anon.init()"
            conn.execute("SELECT anon.init()")
    except psycopg.Error as error:
        raise RedactionFailed(
            f"the anon engine cannot start: {step} failed: "
            + ("the connection was lost" if conn.broken else _reason(error))
        ) from None


# --- the catalog

_COLUMNS_QUERY: Final = """
SELECT u.i::int, c.relkind::text, a.attnum IS NOT NULL, a.attnotnull, a.atthasdef,
       a.attidentity::text, a.attgenerated::text, a.atttypid::int8, a.atttypmod,
       pg_catalog.format_type(a.atttypid, a.atttypmod)
FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS u(s, t, col, i)
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = u.s
LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.t
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attname = u.col AND a.attnum > 0 AND NOT a.attisdropped
"""
_TYPES_QUERY: Final = """
SELECT oid::int8, typname::text, typcategory::text, typtype::text, typbasetype::int8, typtypmod
FROM pg_catalog.pg_type WHERE oid = ANY(%s::oid[])
"""
# Triggers and rules that run even with session_replication_role = replica (enabled ALWAYS
# or REPLICA), on a table or anything that inherits from it.
_FIRING_QUERY: Final = """
WITH RECURSIVE rel(oid) AS (
    SELECT c.oid FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %s AND c.relname = %s
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN rel ON i.inhparent = rel.oid
)
SELECT 'trigger ' || t.tgname::text FROM pg_catalog.pg_trigger t JOIN rel ON t.tgrelid = rel.oid
 WHERE NOT t.tgisinternal AND t.tgenabled IN ('A', 'R')
UNION ALL
SELECT 'rule ' || r.rulename::text FROM pg_catalog.pg_rewrite r JOIN rel ON r.ev_class = rel.oid
 WHERE r.ev_type = '2' AND r.ev_enabled IN ('A', 'R')
"""
_TABLE_KINDS: Final = {"r", "p"}
_RELKIND_NAMES: Final = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "i": "an index",
    "c": "a composite type",
}
_MAX_DOMAIN_DEPTH: Final = 32


def _resolve_types(conn: Session, type_oids: set[int]) -> dict[int, tuple[str, str, int]]:
    """type oid -> (base typname, base typcategory, the typmod a domain chain sets or -1)."""
    rows: dict[int, tuple[str, str, str, int, int]] = {}
    pending = set(type_oids)
    for _ in range(_MAX_DOMAIN_DEPTH):
        if not pending:
            break
        for oid, name, category, typtype, base, typmod in conn.execute(
            _TYPES_QUERY, (sorted(pending),)
        ).fetchall():
            rows[int(str(oid))] = (
                str(name),
                str(category),
                str(typtype),
                int(str(base)),
                int(str(typmod)),
            )
        pending = {r[3] for r in rows.values() if r[2] == "d" and r[3] not in rows}
    resolved: dict[int, tuple[str, str, int]] = {}
    for oid in type_oids:
        current, typmod = oid, -1
        for _ in range(_MAX_DOMAIN_DEPTH):
            row = rows.get(current)
            if row is None or row[2] != "d":
                break
            if typmod == -1:
                typmod = row[4]
            current = row[3]
        row = rows.get(current)
        resolved[oid] = (row[0], row[1], typmod) if row is not None else ("?", "X", -1)
    return resolved


def read_columns(conn: Session, masks: Sequence[ColumnMask]) -> list[ColumnInfo | str]:
    """For each mask, its column's ColumnInfo, or why it cannot be masked (not found, not a
    table). One query for all columns, one per level of domains."""
    if not masks:
        return []
    rows = conn.execute(
        _COLUMNS_QUERY,
        ([m.schema for m in masks], [m.table for m in masks], [m.column for m in masks]),
    ).fetchall()
    by_index = {int(str(r[0])): r for r in rows}
    types = _resolve_types(conn, {int(str(r[7])) for r in rows if r[7] is not None})
    out: list[ColumnInfo | str] = []
    for index in range(1, len(masks) + 1):
        row = by_index.get(index)
        if row is None or row[1] is None:
            out.append("table not found")
            continue
        relkind = str(row[1])
        if relkind not in _TABLE_KINDS:
            out.append(f"not a table ({_RELKIND_NAMES.get(relkind, 'relkind ' + relkind)})")
            continue
        if not row[2]:
            out.append("column not found")
            continue
        type_oid, typmod = int(str(row[7])), int(str(row[8]))
        name, category, domain_typmod = types[type_oid]
        if typmod == -1:
            typmod = domain_typmod
        max_length = typmod - 4 if name in ("varchar", "bpchar") and typmod >= 4 else None
        identity = str(row[5])
        out.append(
            ColumnInfo(
                type_name=name,
                category=category,
                display_type=str(row[9]),
                nullable=not row[3],
                has_default=bool(row[4]) or identity != "",
                max_length=max_length,
                generated=str(row[6]) != "",
                identity_always=identity == "a",
            )
        )
    return out


def _firing(conn: Session, schema: str, table: str) -> list[str]:
    return [str(r[0]) for r in conn.execute(_FIRING_QUERY, (schema, table)).fetchall()]


# --- applying


def _table_name(schema: str, table: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def _truncate(conn: Session, mask: TableMask) -> MaskFailure | None:
    statement = sql.SQL("TRUNCATE TABLE {} CASCADE").format(_table_name(mask.schema, mask.table))
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.Error as error:
        if not _counted(conn, error):
            raise _fatal(conn, f"table {shown(mask.target, 200)}", error) from None
        return MaskFailure(shown(mask.target, 200), mask.kind, _reason(error), False)
    return None


def _update(
    conn: Session, schema: str, table: str, assignments: list[Assignment]
) -> list[MaskFailure]:
    """One transaction for the table (a savepoint inside a transaction): one UPDATE of
    every column, else one per column."""

    def statement(parts: list[Assignment]) -> sql.Composed:
        return sql.SQL("UPDATE {} SET {}").format(
            _table_name(schema, table), sql.SQL(", ").join(a for _, a in parts)
        )

    where = f"table {shown(f'{schema}.{table}', 200)}"
    failures: list[MaskFailure] = []
    try:
        with conn.transaction():
            try:
                with conn.transaction():
                    conn.execute(statement(assignments))
                return []
            except psycopg.Error as error:
                if not _counted(conn, error):
                    raise _fatal(conn, where, error) from None
                if len(assignments) == 1:
                    mask = assignments[0][0]
                    return [MaskFailure(shown(mask.target, 200), mask.kind, _reason(error), True)]
            for mask, part in assignments:
                try:
                    with conn.transaction():
                        conn.execute(statement([(mask, part)]))
                except psycopg.Error as error:
                    if not _counted(conn, error):
                        raise _fatal(conn, where, error) from None
                    failures.append(
                        MaskFailure(shown(mask.target, 200), mask.kind, _reason(error), True)
                    )
    except psycopg.Error as error:  # the COMMIT
        raise _fatal(conn, where, error) from None
    return failures


def _by_table(items: list[Assignment]) -> Iterator[tuple[tuple[str, str], list[Assignment]]]:
    grouped: dict[tuple[str, str], list[Assignment]] = defaultdict(list)
    for mask, part in items:
        grouped[(mask.schema, mask.table)].append((mask, part))
    yield from grouped.items()


def apply_manifest(
    conninfo: str,
    manifest: Manifest,
    *,
    key: str | None = None,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    engine: Engine = DEFAULT_ENGINE,
) -> RedactionResult:
    """Apply `manifest` to the database `conninfo` names (the main database, as the
    bootstrap superuser). `key` keys the deterministic masks (a fresh random one when None:
    equal values then mask alike within this run only). `engine`: pgro's built-in
    expressions, or `anon`'s functions where the reference used them (RedactionFailed when
    the server has no anon). RedactionFailed when the server cannot be written (see the
    module's docstring); counted failures are in the result."""
    failures = [MaskFailure(r.target, r.kind, r.reason, r.column) for r in manifest.rejected]
    truncated: list[str] = []
    masked: list[str] = []
    try:
        conn = _session(
            conninfo, key if key is not None else secrets.token_hex(32), lock_timeout_ms
        )
    except psycopg.Error as error:
        raise RedactionFailed(
            f"redaction cannot connect to the restored server: {type(error).__name__}"
        ) from None
    with conn:
        if engine == "anon":
            _prepare_anon(conn)
        try:
            for table_mask in manifest.tables:
                failure = _truncate(conn, table_mask)
                if failure is None:
                    truncated.append(shown(table_mask.target, 200))
                else:
                    failures.append(failure)

            infos = read_columns(conn, manifest.columns)
            ready: list[Assignment] = []
            for mask, info in zip(manifest.columns, infos, strict=True):
                if isinstance(info, str):
                    failures.append(MaskFailure(shown(mask.target, 200), mask.kind, info, True))
                    continue
                try:
                    ready.append((mask, assignment(mask, info, engine)))
                except MaskUnfit as unfit:
                    failures.append(
                        MaskFailure(shown(mask.target, 200), mask.kind, str(unfit), True)
                    )

            def mask_table(schema: str, table: str, items: list[Assignment]) -> None:
                firing = _firing(conn, schema, table)
                if firing:
                    reason = (
                        "the table has triggers or rules that run even for pgro's masking "
                        f"(enabled ALWAYS or REPLICA): {', '.join(shown(f) for f in firing[:5])}"
                    )
                    failures.extend(
                        MaskFailure(shown(m.target, 200), m.kind, reason, True) for m, _ in items
                    )
                    return
                table_failures = _update(conn, schema, table, items)
                failures.extend(table_failures)
                failed = {f.target for f in table_failures}
                masked.extend(
                    shown(m.target, 200) for m, _ in items if shown(m.target, 200) not in failed
                )

            tables = list(_by_table(ready))
            keyed = [t for t in tables if any(m.deterministic for m, _ in t[1])]
            # The tables with a deterministic mask, in one transaction (each table then a
            # savepoint): a run stopped half-way leaves all of them masked or none, and a
            # rerun masks all of them again, alike, so their joins still hold.
            if keyed:
                try:
                    with conn.transaction():
                        for (schema, table), items in keyed:
                            mask_table(schema, table, items)
                except psycopg.Error as error:
                    raise _fatal(conn, "the deterministic masks", error) from None
            done = {name for name, _ in keyed}
            for (schema, table), items in tables:
                if (schema, table) not in done:
                    mask_table(schema, table, items)
        except psycopg.Error as error:
            raise _fatal(conn, "reading the catalog", error) from None

    return RedactionResult(
        columns_attempted=len(manifest.columns) + manifest.columns_rejected,
        columns_masked=tuple(masked),
        tables_attempted=len(manifest.tables) + manifest.tables_rejected,
        tables_truncated=tuple(truncated),
        failures=tuple(failures),
    )


# --- the version


def resolve_version(conninfo: str, redaction: Redaction) -> str | None:
    """The manifest version: `redaction.version`, else the first column of the first row
    of `redaction.versionQuery` in the database `conninfo` names, else None.

    The query runs as one statement (a prepared one: no `;`-chained second statement) in a
    read-only transaction with a statement timeout. RedactionFailed when it fails or gives
    no row, a NULL or something that is not a version; the message quotes no value."""
    if redaction.version is not None:
        try:
            return check_version(redaction.version, "redaction.version")
        except RedactionSpecInvalid as error:
            raise RedactionFailed(str(error)) from None
    if redaction.version_query is None:
        return None
    try:
        with connect(conninfo, application_name=APPLICATION) as conn:
            conn.execute(
                sql.SQL("SET statement_timeout = {}").format(sql.Literal(VERSION_QUERY_TIMEOUT_MS))
            )
            # The query names the application's tables as their users write them; the
            # built-ins still come first.
            conn.execute("SET search_path = pg_catalog, public")
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                cursor = conn.execute(redaction.version_query.encode(), prepare=True)
                row = cursor.fetchone() if cursor.description else None
    except psycopg.Error as error:
        raise RedactionFailed(f"versionQuery failed: {_reason(error)}") from None
    if row is None:
        raise RedactionFailed("versionQuery returned no rows")
    if not row or row[0] is None:
        raise RedactionFailed("versionQuery returned NULL")
    try:
        return check_version(str(row[0]), "versionQuery")
    except RedactionSpecInvalid as error:
        raise RedactionFailed(str(error)) from None
