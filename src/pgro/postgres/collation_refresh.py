"""Collation-version drift: detect it, rebuild what depends on it, then refresh the versions
(features.md §2.4, restore-pipeline.md §4.3 step 17 and §4.5).

A collation records the version of the library (glibc, ICU) that defined its order when it
was created. Restored on a host whose library differs, an index built under the old order
can silently miss rows. PostgreSQL only warns; pgro detects the mismatch, rebuilds every
valid user index that depends on a mismatched collation (its key's collation or a key
column's collation), and only when every rebuild of a database succeeded records the new
versions there (`ALTER COLLATION … REFRESH VERSION`; `ALTER DATABASE … REFRESH COLLATION
VERSION` from PostgreSQL 15 when the database's own default collation drifted). Refreshing
without rebuilding would hide the problem, so a failed rebuild leaves the mismatch in place
and reported.

Detection runs only where `pg_collation_actual_version(oid)` exists (`to_regprocedure`:
calling a missing function fails at parse time). Names come from an untrusted catalog:
quoted with `psycopg.sql`, shown through `printable_name`; errors keep only their primary
message (a DETAIL can quote row data). Every session turns `default_transaction_read_only`
off and rebuilds with a `lock_timeout`, so a client holding a lock fails one rebuild instead
of stalling the repair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pgro.postgres.config import printable_name
from pgro.postgres.locale_fix import (
    DEFAULT_COLLATION_OID,
    EXCLUDED_NAMESPACES_SQL,
    INDEX_COLUMNS,
    cluster_session,
    concurrent_index_rebuild,
    connectable_databases,
    error_text,
    list_indexes,
    maintenance_session,
    rebuild,
    rebuild_statement,
)

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("pgro.postgres")

APPLICATION_NAME: Final = "pgro-collation-refresh"
LOCK_TIMEOUT: Final = "30s"

HAS_ACTUAL_VERSION_SQL: Final = (
    "SELECT pg_catalog.to_regprocedure('pg_catalog.pg_collation_actual_version(oid)') "
    "IS NOT NULL, pg_catalog.to_regprocedure("
    "'pg_catalog.pg_database_collation_actual_version(oid)') IS NOT NULL"
)

# Collations whose recorded version is not the library's (a NULL on either side is no
# mismatch: unversioned, or PostgreSQL cannot tell).
MISMATCHED_COLLATIONS_SQL: Final = (
    "SELECT c.oid, n.nspname, c.collname, c.collversion, "
    "pg_catalog.pg_collation_actual_version(c.oid) "
    "FROM pg_catalog.pg_collation c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace "
    "WHERE c.collversion IS NOT NULL "
    "AND c.collversion <> pg_catalog.pg_collation_actual_version(c.oid) "
    "ORDER BY n.nspname, c.collname"
)

# The current database's default collation (PostgreSQL 15+ records its version).
MISMATCHED_DATABASE_SQL: Final = (
    "SELECT datcollversion, pg_catalog.pg_database_collation_actual_version(oid) "
    "FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database() "
    "AND datcollversion IS NOT NULL "
    "AND datcollversion <> pg_catalog.pg_database_collation_actual_version(oid)"
)

# Valid user indexes depending on any of the collations (%s: oid[]) through their key's
# collation, a key column's collation, or an expression or predicate (pg_depend).
DEPENDENT_INDEXES_SQL: Final = (
    f"SELECT {INDEX_COLUMNS} "
    "FROM pg_catalog.pg_index i "
    "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE i.indisvalid "
    f"AND {EXCLUDED_NAMESPACES_SQL} "
    "AND (EXISTS (SELECT 1 FROM pg_catalog.unnest(i.indcollation::pg_catalog.oid[]) "
    "AS k(coll) WHERE k.coll = ANY(%(colls)s)) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = i.indrelid "
    "AND a.attnum = ANY(i.indkey::pg_catalog.int2[]) AND a.attcollation = ANY(%(colls)s)) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d "
    "WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = i.indexrelid "
    "AND d.refclassid = 'pg_catalog.pg_collation'::pg_catalog.regclass "
    "AND d.refobjid = ANY(%(colls)s))) "
    "ORDER BY n.nspname, c.relname"
)

DEFAULT_COLLATION_NAME: Final = "default"


@dataclass(frozen=True)
class CollationMismatch:
    """A collation (or, as schema `pg_catalog` and name `default`, a database's default
    collation) whose recorded version differs from the library's. Names are printable."""

    database: str
    schema: str
    name: str
    recorded: str
    actual: str

    def __str__(self) -> str:
        return (
            f"{self.database}:{self.schema}.{self.name} (recorded {self.recorded}, "
            f"library {self.actual})"
        )


@dataclass(frozen=True)
class RebuiltIndex:
    database: str
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.database}:{self.schema}.{self.name}"


@dataclass(frozen=True)
class RebuildFailure:
    database: str
    schema: str
    name: str
    error: str

    def __str__(self) -> str:
        return f"{self.database}:{self.schema}.{self.name}: {self.error}"


@dataclass(frozen=True)
class CollationRefreshResult:
    mismatches: tuple[CollationMismatch, ...]  # as detected before the repair
    rebuilt: tuple[RebuiltIndex, ...] = ()
    failures: tuple[RebuildFailure, ...] = ()
    refreshed: tuple[CollationMismatch, ...] = ()  # versions now recorded as the library's

    @property
    def needed(self) -> bool:
        return bool(self.mismatches)

    @property
    def remaining(self) -> tuple[CollationMismatch, ...]:
        """Mismatches left in place (a rebuild in their database failed)."""
        return tuple(m for m in self.mismatches if m not in self.refreshed)

    @property
    def repaired(self) -> bool:
        return self.needed and not self.remaining

    def notes(self) -> list[str]:
        if not self.needed:
            return []
        notes = []
        if self.refreshed:
            notes.append(
                f"refreshed {len(self.refreshed)} collation version(s) after rebuilding "
                f"{len(self.rebuilt)} index(es): " + ", ".join(str(m) for m in self.refreshed)
            )
        if self.remaining:
            failed = "; ".join(str(f) for f in self.failures[:5]) or "see the log"
            notes.append(
                f"{len(self.remaining)} collation version mismatch(es) remain, not refreshed "
                f"because {len(self.failures)} index rebuild(s) failed ({failed}): "
                + ", ".join(str(m) for m in self.remaining)
            )
        return notes


@dataclass(frozen=True)
class _Found:
    mismatch: CollationMismatch
    oid: int
    raw_schema: str  # for quoting, never for display
    raw_name: str


def _connect(conninfo: str) -> psycopg.Connection[tuple[object, ...]]:
    return maintenance_session(conninfo, APPLICATION_NAME)


def _version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT pg_catalog.current_setting('server_version_num')::int").fetchone()
    assert row is not None
    return int(str(row[0]))


def _detect_in(conn: psycopg.Connection[tuple[object, ...]], dbname: str) -> list[_Found]:
    row = conn.execute(HAS_ACTUAL_VERSION_SQL).fetchone()
    if row is None or row[0] is not True:
        return []
    shown = printable_name(dbname)
    found = []
    for oid, schema, name, recorded, actual in conn.execute(MISMATCHED_COLLATIONS_SQL):
        mismatch = CollationMismatch(
            shown,
            printable_name(str(schema)),
            printable_name(str(name)),
            printable_name(str(recorded)),
            printable_name(str(actual)),
        )
        found.append(_Found(mismatch, int(str(oid)), str(schema), str(name)))
    if row[1] is True:
        db = conn.execute(MISMATCHED_DATABASE_SQL).fetchone()
        if db is not None:
            mismatch = CollationMismatch(
                shown,
                "pg_catalog",
                DEFAULT_COLLATION_NAME,
                printable_name(str(db[0])),
                printable_name(str(db[1])),
            )
            found.append(_Found(mismatch, DEFAULT_COLLATION_OID, "", ""))
    return found


def detect(conninfo_for: Callable[[str], str]) -> tuple[CollationMismatch, ...]:
    """Every collation-version mismatch in the connectable databases (none on servers
    without `pg_collation_actual_version`). `conninfo_for(dbname)` is a superuser's libpq
    string. Cheap: one query per database."""
    with cluster_session(conninfo_for, APPLICATION_NAME) as conn:
        databases = connectable_databases(conn)
    mismatches: list[CollationMismatch] = []
    for dbname in databases:
        with _connect(conninfo_for(dbname)) as db:
            mismatches += [f.mismatch for f in _detect_in(db, dbname)]
    return tuple(mismatches)


def refresh_statements(
    found: Sequence[tuple[str, str]], *, database: str | None, server_version_num: int
) -> list[psycopg.sql.Composed]:
    """The version refreshes, run only after every rebuild in the database succeeded:
    `ALTER COLLATION schema.name REFRESH VERSION` for each (schema, name), then
    `ALTER DATABASE db REFRESH COLLATION VERSION` when `database` (its default collation
    drifted) and the server is 15 or later."""
    from psycopg import sql

    statements: list[sql.Composed] = [
        sql.SQL("ALTER COLLATION {}.{} REFRESH VERSION").format(
            sql.Identifier(schema), sql.Identifier(name)
        )
        for schema, name in found
    ]
    if database is not None and server_version_num >= 150000:
        statements.append(
            sql.SQL("ALTER DATABASE {} REFRESH COLLATION VERSION").format(sql.Identifier(database))
        )
    return statements


@dataclass(frozen=True)
class RepairPlan:
    """One database's repair: every rebuild first; the refreshes only once all succeeded."""

    rebuilds: tuple[psycopg.sql.Composed, ...]
    refreshes: tuple[psycopg.sql.Composed, ...]

    def ordered(self) -> list[psycopg.sql.Composed]:
        return [*self.rebuilds, *self.refreshes]


def repair_plan(
    indexes: Sequence[tuple[str, str]],
    collations: Sequence[tuple[str, str]],
    *,
    database: str | None,
    server_version_num: int,
) -> RepairPlan:
    """The statements repairing one database: rebuild each (schema, name) index
    (concurrently from 14), then refresh the (schema, name) collations and, when `database`
    is given, its default collation."""
    concurrently = concurrent_index_rebuild(server_version_num)
    return RepairPlan(
        tuple(rebuild_statement(s, n, concurrently=concurrently) for s, n in indexes),
        tuple(
            refresh_statements(collations, database=database, server_version_num=server_version_num)
        ),
    )


def _repair_in(
    db: psycopg.Connection[tuple[object, ...]],
    dbname: str,
    found: list[_Found],
    lock_timeout: str,
) -> tuple[list[RebuiltIndex], list[RebuildFailure], list[CollationMismatch]]:
    import psycopg

    db.execute("SELECT pg_catalog.set_config('lock_timeout', %s, false)", (lock_timeout,))
    indexes = list_indexes(db, dbname, DEPENDENT_INDEXES_SQL, {"colls": [f.oid for f in found]})
    collations = [f for f in found if f.oid != DEFAULT_COLLATION_OID]
    default = [f for f in found if f.oid == DEFAULT_COLLATION_OID]
    version = _version(db)
    plan = repair_plan(
        [(i.schema, i.name) for i in indexes],
        [(f.raw_schema, f.raw_name) for f in collations],
        database=dbname if default else None,
        server_version_num=version,
    )
    concurrently = concurrent_index_rebuild(version)
    rebuilt: list[RebuiltIndex] = []
    failures: list[RebuildFailure] = []
    for index, statement in zip(indexes, plan.rebuilds, strict=True):
        shown = RebuiltIndex(
            printable_name(dbname), printable_name(index.schema), printable_name(index.name)
        )
        error = rebuild(db, index, statement, concurrently=concurrently)
        if error is None:
            rebuilt.append(shown)
        else:
            failures.append(RebuildFailure(shown.database, shown.schema, shown.name, error))
    if failures:
        return rebuilt, failures, []
    refreshed: list[CollationMismatch] = []
    targets = [f.mismatch for f in (*collations, *default)][: len(plan.refreshes)]
    for statement, target in zip(plan.refreshes, targets, strict=True):
        try:
            db.execute(statement)
            refreshed.append(target)
        except psycopg.Error as exc:
            failures.append(
                RebuildFailure(target.database, target.schema, target.name, error_text(exc))
            )
    return rebuilt, failures, refreshed


def repair(
    conninfo_for: Callable[[str], str], *, lock_timeout: str = LOCK_TIMEOUT
) -> CollationRefreshResult:
    """Detect, then per database with a mismatch: rebuild the dependent indexes
    (concurrently from 14), and only if none failed refresh the versions. Does not gate
    readiness; failures are counted in the result, not raised (a database that cannot be
    opened counts as a failure of its mismatches)."""
    import psycopg

    with cluster_session(conninfo_for, APPLICATION_NAME) as conn:
        databases = connectable_databases(conn)
    mismatches: list[CollationMismatch] = []
    rebuilt: list[RebuiltIndex] = []
    failures: list[RebuildFailure] = []
    refreshed: list[CollationMismatch] = []
    for dbname in databases:
        try:
            with _connect(conninfo_for(dbname)) as db:
                found = _detect_in(db, dbname)
                if not found:
                    continue
                mismatches += [f.mismatch for f in found]
                done, failed, fresh = _repair_in(db, dbname, found, lock_timeout)
        except psycopg.Error as exc:
            failures.append(RebuildFailure(printable_name(dbname), "", "", error_text(exc)))
            continue
        rebuilt += done
        failures += failed
        refreshed += fresh
    result = CollationRefreshResult(
        tuple(mismatches), tuple(rebuilt), tuple(failures), tuple(refreshed)
    )
    for note in result.notes():
        log.info("%s", note)
    return result
