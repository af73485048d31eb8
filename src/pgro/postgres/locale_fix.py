"""The locale rewrite and the reindexes that follow it (features.md §2.3).

A database created with a libc locale (`en_US.UTF-8`, a Windows name) orders its text
indexes by that locale as the source host's C library defined it. Restored here, the
locale may be missing (the server refuses the database) or differ (the index silently
returns wrong answers). pgro rewrites every such database to `C.UTF-8` (`C` for a
database whose encoding is not UTF-8: PostgreSQL refuses `C.UTF-8` with any other) and
then rebuilds the indexes that used the database's default collation.

Building blocks, in the order a restore runs them:
1. `rewrite_in_single_user`: before any server, in one single-user session (the probe
   and the rewrite on separate lines: single-user mode ends a statement at a newline and
   reports no row counts). A non-zero count is the fix `locale` and marks the restore
   "needs reindex" (the caller keeps that marker durably).
2. `rewrite_after_start`: the same rewrite as a counted fallback, and each connectable
   database's `default` row of `pg_collation`.
3. `quick_reindex`: the valid indexes with a column on the default collation, per
   connectable database (`REINDEX INDEX CONCURRENTLY` from 14). It gates readiness.
4. `full_reindex`: after `pg_resetwal`, every connectable database but template0
   (`REINDEX DATABASE CONCURRENTLY` from 12). It runs after Ready.

Every session here turns `default_transaction_read_only` off (a read-only replica's
configuration would refuse the writes and REINDEX). Names come from a restored, untrusted
catalog: they are quoted with `psycopg.sql`, never formatted into SQL, and shown only
through `printable_name`. Errors are counted and named by their primary message only (a
DETAIL can quote row data).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.config import printable_name
from pgro.postgres.databases import MAINTENANCE_DATABASE
from pgro.postgres.single_user import DEFAULT_DATABASE, SingleUserFailed, run_single_user

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("pgro.postgres")

APPLICATION_NAME: Final = "pgro-locale-fix"
# Locales that need no rewrite: C and its aliases, glibc's C.UTF-8 in both spellings, and
# the builtin provider's locale (PostgreSQL 17+).
CONFORMING_LOCALES: Final = ("C", "POSIX", "C.UTF-8", "C.utf8", "PG_UNICODE_FAST")
TARGET_UTF8: Final = "C.UTF-8"
TARGET_OTHER: Final = "C"
MISMATCH_LABEL: Final = "pgro_locale_mismatch"
DEFAULT_COLLATION_OID: Final = 100
# Never reindexed by pgro: the catalogs (REINDEX CONCURRENTLY refuses them), the SQL
# standard's views, TOAST and other sessions' temporary schemas.
# (No `LIKE 'pg\_toast%'`: a `%` would be taken for a parameter where the query has them.)
EXCLUDED_NAMESPACES_SQL: Final = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND NOT pg_catalog.starts_with(n.nspname, 'pg_toast') "
    "AND NOT pg_catalog.starts_with(n.nspname, 'pg_temp')"
)
MAX_MESSAGE: Final = 300

_MISMATCH_COUNT = re.compile(rf'\b{MISMATCH_LABEL} = "(\d+)"')


# ---------------------------------------------------------------------------------------
# SQL text (pure)


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _conforming_list() -> str:
    return ", ".join(_quote_literal(x) for x in CONFORMING_LOCALES)


def non_conforming_predicate() -> str:
    """A `pg_database` row whose collate or ctype needs the rewrite."""
    allowed = _conforming_list()
    return f"(datcollate NOT IN ({allowed}) OR datctype NOT IN ({allowed}))"


def _target_locale() -> str:
    return (
        f"CASE WHEN encoding = pg_catalog.pg_char_to_encoding('UTF8') "
        f"THEN {_quote_literal(TARGET_UTF8)} ELSE {_quote_literal(TARGET_OTHER)} END"
    )


def mismatch_probe_statement() -> str:
    """The labelled count of databases to rewrite (read from single-user output)."""
    return (
        f"SELECT count(*) AS {MISMATCH_LABEL} FROM pg_catalog.pg_database "
        f"WHERE {non_conforming_predicate()};"
    )


def _set_clause(server_version_num: int) -> str:
    target = _target_locale()
    clause = f"datcollate = {target}, datctype = {target}"
    # datcollversion exists from PostgreSQL 15: the old version would warn on every connection.
    if server_version_num >= 150000:
        clause += ", datcollversion = NULL"
    return clause


def rewrite_statement(server_version_num: int) -> str:
    """The rewrite, one line (for single-user mode)."""
    return (
        f"UPDATE pg_catalog.pg_database SET {_set_clause(server_version_num)} "
        f"WHERE {non_conforming_predicate()};"
    )


def single_user_statements(server_version_num: int) -> list[str]:
    """Probe then rewrite: two lines of one single-user session."""
    return [mismatch_probe_statement(), rewrite_statement(server_version_num)]


def fallback_rewrite_statement(server_version_num: int) -> str:
    """The rewrite on a running server, returning how many databases it changed."""
    return (
        f"WITH rewritten AS (UPDATE pg_catalog.pg_database SET "
        f"{_set_clause(server_version_num)} WHERE {non_conforming_predicate()} "
        f"RETURNING 1) SELECT count(*) FROM rewritten"
    )


def default_collation_statement() -> str:
    """The `default` row of a database's `pg_collation`, when it names another locale
    (before PostgreSQL 15 it may; from 15 its locale columns are NULL and left alone)."""
    allowed = _conforming_list()
    return (
        f"WITH rewritten AS (UPDATE pg_catalog.pg_collation "
        f"SET collcollate = {_quote_literal(TARGET_UTF8)}, "
        f"collctype = {_quote_literal(TARGET_UTF8)} "
        f"WHERE oid = {DEFAULT_COLLATION_OID} AND collname = 'default' "
        f"AND ((collcollate <> '' AND collcollate NOT IN ({allowed})) "
        f"OR (collctype <> '' AND collctype NOT IN ({allowed}))) "
        f"RETURNING 1) SELECT count(*) FROM rewritten"
    )


CONNECTABLE_DATABASES_SQL: Final = (
    "SELECT datname FROM pg_catalog.pg_database "
    "WHERE datallowconn AND datconnlimit <> -2 AND datname <> 'template0' ORDER BY datname"
)


# What the index listings return, read by `IndexRef.of`: the index, its table, its names.
INDEX_COLUMNS: Final = "i.indexrelid, i.indrelid, n.nspname, c.relname"

# A table's invalid indexes: a failed REINDEX CONCURRENTLY leaves its new copy among them.
INVALID_INDEXES_SQL: Final = (
    "SELECT i.indexrelid, n.nspname, c.relname FROM pg_catalog.pg_index i "
    "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE i.indrelid = %s AND NOT i.indisvalid"
)


def default_collation_indexes_sql() -> str:
    """Valid user indexes with any column on the database's default collation."""
    return (
        f"SELECT {INDEX_COLUMNS} FROM pg_catalog.pg_index i "
        "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE i.indisvalid AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a "
        "WHERE a.attrelid = i.indexrelid AND a.attnum > 0 "
        f"AND a.attcollation = {DEFAULT_COLLATION_OID}) "
        f"AND {EXCLUDED_NAMESPACES_SQL} "
        "ORDER BY n.nspname, c.relname"
    )


def concurrent_index_rebuild(server_version_num: int) -> bool:
    """REINDEX INDEX CONCURRENTLY from 14 (as the reference: 12 and 13 had fixes to it)."""
    return server_version_num >= 140000


def concurrent_database_rebuild(server_version_num: int) -> bool:
    return server_version_num >= 120000


def parse_mismatch_count(stdout: str) -> int | None:
    """The probe's count from single-user output, None if it is not there."""
    m = _MISMATCH_COUNT.search(stdout)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class IndexRef:
    """An index found in a restored catalog: raw names (for quoting only) and OIDs."""

    database: str
    oid: int
    table: int
    schema: str
    name: str

    @classmethod
    def of(cls, database: str, row: tuple[object, ...]) -> IndexRef:
        oid, table, schema, name = row
        return cls(database, int(str(oid)), int(str(table)), str(schema), str(name))

    def __str__(self) -> str:
        """Printable, for results and logs."""
        return (
            f"{printable_name(self.database)}:{printable_name(self.schema)}."
            f"{printable_name(self.name)}"
        )


@dataclass(frozen=True)
class ReindexFailure:
    target: str  # an IndexRef's text or a database name, printable
    error: str  # the primary message, printable


@dataclass(frozen=True)
class ReindexResult:
    reindexed: tuple[str, ...]  # printable index names (quick) or database names (full)
    failures: tuple[ReindexFailure, ...]

    @property
    def ran(self) -> bool:
        return bool(self.reindexed or self.failures)

    def note(self, what: str) -> str:
        text = f"{what}: rebuilt {len(self.reindexed)}"
        if self.failures:
            text += f", {len(self.failures)} failed ({self.failures[0].target}: "
            text += f"{self.failures[0].error})"
        return text


@dataclass(frozen=True)
class LocaleRewrite:
    """What the single-user rewrite found and changed."""

    rewritten: int  # databases whose locale was rewritten

    @property
    def needs_reindex(self) -> bool:
        return self.rewritten > 0


@dataclass(frozen=True)
class LocaleFallback:
    rewritten: int  # databases the post-start UPDATE still rewrote
    default_collations: tuple[str, ...]  # databases whose `default` collation row changed

    @property
    def changed(self) -> bool:
        return bool(self.rewritten or self.default_collations)


class LocaleRewriteFailed(SingleUserFailed):
    reason = "LocaleRewriteFailed"


def error_text(exc: BaseException) -> str:
    """A failed statement's primary message, never its DETAIL (which can quote rows)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    text = str(primary or str(exc).strip().split("\n")[0] or type(exc).__name__).strip()
    return printable_name(text, MAX_MESSAGE)


# ---------------------------------------------------------------------------------------
# Effects


def server_version_of(binaries: PostgresBinaries) -> int:
    """`server_version_num`'s scale for a major (only the major matters here)."""
    return int(binaries.major.split(".")[0]) * 10000


def rewrite_in_single_user(
    binaries: PostgresBinaries,
    pgdata: Path,
    account: RunAccount,
    *,
    env: Mapping[str, str] | None = None,
    database: str = DEFAULT_DATABASE,
) -> LocaleRewrite:
    """Probe and rewrite in one single-user session (before the first start).

    `env` must carry the private locales (`LocaleAliases.env()`) when the cluster names a
    locale this host lacks: single-user mode refuses such a database like a server does.
    This is the first time PostgreSQL opens the restored data, so crash recovery runs here:
    `SingleUserFailed.log_tail` is what `server.classify_startup_failure` decides a WAL
    reset from."""
    version = server_version_of(binaries)
    out = run_single_user(
        binaries, pgdata, account, single_user_statements(version), env=env, database=database
    )
    count = parse_mismatch_count(out.stdout)
    if count is None:
        raise LocaleRewriteFailed(
            "the locale probe printed no count in single-user mode",
            "\n".join(out.stderr.splitlines()[-15:]),
        )
    if count:
        log.info("rewrote the locale of %d database(s) to C.UTF-8 in single-user mode", count)
    return LocaleRewrite(rewritten=count)


def maintenance_session(
    conninfo: str, application_name: str = APPLICATION_NAME
) -> psycopg.Connection[tuple[object, ...]]:
    """A superuser session (`session.connect`: nothing the snapshot names is loaded) for
    writes and rebuilds: not read-only, and without the time limits a restored database's
    own settings may impose (a `statement_timeout` would cancel a long REINDEX)."""
    from pgro.postgres.session import connect

    conn = connect(conninfo, application_name=application_name)
    try:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("SET statement_timeout = 0")
        conn.execute("SET lock_timeout = 0")
    except BaseException:
        conn.close()
        raise
    return conn


def cluster_session(
    conninfo_for: Callable[[str], str], application_name: str = APPLICATION_NAME
) -> psycopg.Connection[tuple[object, ...]]:
    """A `maintenance_session` for cluster-wide work: in `postgres`, or in template1 when a
    snapshot has no `postgres` database."""
    import psycopg

    try:
        return maintenance_session(conninfo_for(MAINTENANCE_DATABASE), application_name)
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    return maintenance_session(conninfo_for(DEFAULT_DATABASE), application_name)


def _version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT pg_catalog.current_setting('server_version_num')::int").fetchone()
    assert row is not None
    return int(str(row[0]))


def connectable_databases(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """Every database pgro can open, but template0 (which must stay untouched)."""
    return [str(r[0]) for r in conn.execute(CONNECTABLE_DATABASES_SQL).fetchall()]


def _count(conn: psycopg.Connection[tuple[object, ...]], statement: str) -> int:
    row = conn.execute(statement.encode()).fetchone()
    return int(str(row[0])) if row else 0


def rewrite_after_start(conninfo_for: Callable[[str], str]) -> LocaleFallback:
    """On the running server: the rewrite as a counted fallback, then each connectable
    database's `default` collation row. `conninfo_for(dbname)` is a superuser's libpq
    string. A non-zero `rewritten` also means "needs reindex"."""
    with cluster_session(conninfo_for) as conn:
        rewritten = _count(conn, fallback_rewrite_statement(_version(conn)))
        databases = connectable_databases(conn)
    changed = []
    for dbname in databases:
        with maintenance_session(conninfo_for(dbname)) as db:
            if _count(db, default_collation_statement()):
                changed.append(printable_name(dbname))
    if rewritten:
        log.info("rewrote the locale of %d database(s) after start", rewritten)
    return LocaleFallback(rewritten=rewritten, default_collations=tuple(changed))


def rebuild_statement(schema: str, name: str, *, concurrently: bool) -> psycopg.sql.Composed:
    """`REINDEX INDEX [CONCURRENTLY] schema.name`, the names quoted."""
    from psycopg import sql

    return sql.SQL("REINDEX INDEX {}{}.{}").format(
        sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL(""),
        sql.Identifier(schema),
        sql.Identifier(name),
    )


def _invalid_indexes(
    conn: psycopg.Connection[tuple[object, ...]], table: int
) -> dict[int, tuple[str, str]]:
    rows = conn.execute(INVALID_INDEXES_SQL, (table,)).fetchall()
    return {int(str(oid)): (str(schema), str(name)) for oid, schema, name in rows}


def rebuild(
    conn: psycopg.Connection[tuple[object, ...]],
    index: IndexRef,
    statement: psycopg.sql.Composed,
    *,
    concurrently: bool,
) -> str | None:
    """Run `statement` (`rebuild_statement` of `index`) in an autocommit session (CONCURRENTLY
    refuses a transaction block). None when it succeeded, else its error.

    A failed concurrent rebuild can leave its new copy behind (`<name>_ccnew`, invalid),
    which every write to the table would keep maintaining: the invalid indexes of the table
    that were not there before are dropped, concurrently (a failure to is only logged)."""
    import psycopg
    from psycopg import sql

    before = _invalid_indexes(conn, index.table) if concurrently else {}
    try:
        conn.execute(statement)
        return None
    except psycopg.Error as exc:
        error = error_text(exc)
    if concurrently:
        try:
            leftovers = {
                oid: names
                for oid, names in _invalid_indexes(conn, index.table).items()
                if oid not in before
            }
            for schema, name in leftovers.values():
                conn.execute(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(name)
                    )
                )
        except psycopg.Error as exc:
            log.warning(
                "could not drop what the failed rebuild of %s left: %s", index, error_text(exc)
            )
    return error


def list_indexes(
    conn: psycopg.Connection[tuple[object, ...]],
    dbname: str,
    query: str,
    params: Mapping[str, object] | None = None,
) -> list[IndexRef]:
    """The indexes `query` (selecting `INDEX_COLUMNS`) lists, read whole before the first
    rebuild changes the catalog being read."""
    return [IndexRef.of(dbname, row) for row in conn.execute(query.encode(), params).fetchall()]


def quick_reindex(conninfo_for: Callable[[str], str]) -> ReindexResult:
    """Rebuild, in every connectable database, the valid user indexes with a column on the
    default collation (after the locale rewrite; it gates readiness). Failures are counted,
    not raised; the list is read whole before the first rebuild."""
    import psycopg

    with cluster_session(conninfo_for) as conn:
        databases = connectable_databases(conn)
    reindexed: list[str] = []
    failures: list[ReindexFailure] = []
    for dbname in databases:
        try:
            db = maintenance_session(conninfo_for(dbname))
        except psycopg.Error as exc:
            failures.append(ReindexFailure(printable_name(dbname), error_text(exc)))
            continue
        with db:
            try:
                concurrently = concurrent_index_rebuild(_version(db))
                indexes = list_indexes(db, dbname, default_collation_indexes_sql())
                for index in indexes:
                    statement = rebuild_statement(
                        index.schema, index.name, concurrently=concurrently
                    )
                    error = rebuild(db, index, statement, concurrently=concurrently)
                    if error is None:
                        reindexed.append(str(index))
                    else:
                        failures.append(ReindexFailure(str(index), error))
            except psycopg.Error as exc:  # the session itself failed
                failures.append(ReindexFailure(printable_name(dbname), error_text(exc)))
    result = ReindexResult(tuple(reindexed), tuple(failures))
    log.info("%s", result.note("quick reindex of default-collation indexes"))
    return result


def full_reindex(conninfo_for: Callable[[str], str]) -> ReindexResult:
    """`REINDEX DATABASE [CONCURRENTLY]` in every connectable database but template0 (after
    `pg_resetwal`: torn index pages show up later as "unexpected zero page"). It does not
    gate readiness. Failures are counted, not raised."""
    import psycopg
    from psycopg import sql

    with cluster_session(conninfo_for) as conn:
        databases = connectable_databases(conn)
    reindexed: list[str] = []
    failures: list[ReindexFailure] = []
    for dbname in databases:
        try:
            with maintenance_session(conninfo_for(dbname)) as db:
                concurrently = concurrent_database_rebuild(_version(db))
                db.execute(
                    sql.SQL("REINDEX DATABASE {}{}").format(
                        sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL(""),
                        sql.Identifier(dbname),
                    )
                )
            reindexed.append(printable_name(dbname))
        except psycopg.Error as exc:
            failures.append(ReindexFailure(printable_name(dbname), error_text(exc)))
    result = ReindexResult(tuple(reindexed), tuple(failures))
    log.info("%s", result.note("full reindex after pg_resetwal"))
    return result
