"""Online checks that read the data of a started server: amcheck and a full read.

In every connectable database: `bt_index_check` on every btree index (`heapallindexed` at
full depth), `verify_heapam` on every heap and TOAST relation (PostgreSQL 14+, full depth)
and a sequential read of every page of every table and TOAST relation (full depth).

amcheck is created in a schema of its own, dropped afterwards: nothing the checks read is
changed. A database that already has amcheck is checked with it only when its functions
are the installed C library's (a snapshot's SQL function of that name would otherwise run
as the superuser). Relations are checked in parallel by a few sessions; a deadline stops
starting new ones and the verdict says how far it got.

No false alarms: unlogged relations (emptied at start), temporary relations of other
sessions, indexes left invalid or unready (a failed CREATE INDEX CONCURRENTLY),
unpopulated materialized views and non-btree indexes are "not checked" with the reason.
Every query error on a relation is that relation's finding, in the server's words.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgro.core.verify_depth import (
    BTREE,
    FULL_READ,
    HEAP,
    CheckVerdict,
    Finding,
    Skip,
    block_in_message,
    incomplete,
    not_checked,
    plan_for,
    shape,
    shape_skips,
)
from pgro.postgres.checksums import quote_ident

if TYPE_CHECKING:
    import psycopg

APPLICATION = "pgro-verify"
SETUP = "integrity_setup"
RECONNECT_S = 30.0  # a backend that crashed on damaged data restarts every session
MAX_MESSAGE = 400

# Plans that read each relation from end to end, on one core per session.
_WORKER_SETTINGS = (
    "SET enable_indexscan = off",
    "SET enable_indexonlyscan = off",
    "SET enable_bitmapscan = off",
    "SET max_parallel_workers_per_gather = 0",
)

_DATABASES = (
    "SELECT datname FROM pg_catalog.pg_database "
    "WHERE datallowconn AND datconnlimit <> -2 ORDER BY datname"
)

_RELATIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relpersistence, c.relispopulated,
       COALESCE(am.amname, ''), COALESCE(i.indisvalid, true), COALESCE(i.indisready, true),
       tn.nspname, t.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_catalog.pg_class t ON t.oid = COALESCE(
    i.indrelid,
    (SELECT o.oid FROM pg_catalog.pg_class o WHERE o.reltoastrelid = c.oid LIMIT 1))
LEFT JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
WHERE c.relkind IN ('r', 'm', 't', 'i')
ORDER BY pg_catalog.pg_relation_size(c.oid) DESC, c.oid
"""

# amcheck's functions as CREATE EXTENSION installs them: C, in the installed library.
_FOREIGN_AMCHECK = """
SELECT count(*) FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_depend d
  ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
 AND d.deptype = 'e'
WHERE d.refobjid = %s
  AND (p.prolang <> (SELECT oid FROM pg_catalog.pg_language WHERE lanname = 'c')
       OR p.probin IS DISTINCT FROM '$libdir/amcheck')
"""


@dataclass(frozen=True)
class _Relation:
    database: str
    oid: int
    name: str  # schema-qualified, for people
    schema: str
    relname: str
    kind: str
    table: str | None  # the table of an index or TOAST relation
    checks: tuple[str, ...]


@dataclass
class _Database:
    name: str
    amcheck_schema: str | None = None
    created_schema: bool = False
    heapallindexed: bool = False
    verify_heapam: bool = False
    amcheck_missing: str | None = None


@dataclass
class IntegrityReport:
    verdicts: list[CheckVerdict] = field(default_factory=list)
    relations_total: int = 0
    relations_done: int = 0

    @property
    def complete(self) -> bool:
        return self.relations_done == self.relations_total

    @property
    def healthy(self) -> bool:
        """No check failed (a verdict that is incomplete or not checked is not a failure)."""
        return all(v.status != "fail" for v in self.verdicts)


def _message(exc: Exception) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    detail = getattr(diag, "message_detail", None)
    text = str(primary or exc).strip() or type(exc).__name__
    if detail:
        text += f" ({detail.strip()})"
    return text[:MAX_MESSAGE]


def _connect(conninfo: str) -> psycopg.Connection[tuple[object, ...]]:
    from pgro.postgres.session import connect

    return connect(conninfo, application_name=APPLICATION)


def _connect_retrying(conninfo: str) -> psycopg.Connection[tuple[object, ...]]:
    """A session, waiting out the restart that follows a backend crashing on damaged data."""
    import psycopg

    give_up = time.monotonic() + RECONNECT_S
    while True:
        try:
            return _connect(conninfo)
        except psycopg.OperationalError as exc:
            recovering = "starting up" in str(exc) or "recovery" in str(exc)
            if not recovering or time.monotonic() > give_up:
                raise
            time.sleep(0.2)


def _prepare_amcheck(conn: psycopg.Connection[tuple[object, ...]], db: _Database) -> None:
    """amcheck usable in `db`: the installed one in a schema of pgro's, or the database's
    own when it is the installed C library. Sets `amcheck_missing` when neither."""
    import psycopg
    from psycopg import sql

    row = conn.execute(
        "SELECT e.oid, n.nspname FROM pg_catalog.pg_extension e "
        "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'amcheck'"
    ).fetchone()
    if row is not None:
        foreign = conn.execute(_FOREIGN_AMCHECK, (row[0],)).fetchone()
        if foreign is None or foreign[0] != 0:
            db.amcheck_missing = (
                "the database's own amcheck extension is not the installed C library"
            )
            return
        db.amcheck_schema = str(row[1])
    else:
        schema = f"pgro_amcheck_{secrets.token_hex(4)}"
        try:
            # Event triggers of the snapshot must not run on pgro's DDL.
            conn.execute("SET session_replication_role = replica")
            # A read-only restore (default_transaction_read_only, pgro run's replicas)
            # still gets pgro's own schema, which is dropped afterwards.
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            db.amcheck_schema = schema
            db.created_schema = True
            conn.execute(
                sql.SQL("CREATE EXTENSION amcheck SCHEMA {}").format(sql.Identifier(schema))
            )
        except psycopg.Error as exc:
            db.amcheck_missing = f"amcheck could not be created: {_message(exc)}"
            return
    functions = conn.execute(
        "SELECT proname, max(pronargs) FROM pg_catalog.pg_proc "
        "WHERE pronamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = %s) "
        "AND proname IN ('bt_index_check', 'verify_heapam') GROUP BY proname",
        (db.amcheck_schema,),
    ).fetchall()
    nargs = {str(name): int(str(n)) for name, n in functions}
    db.heapallindexed = nargs.get("bt_index_check", 0) >= 2
    db.verify_heapam = "verify_heapam" in nargs
    if "bt_index_check" not in nargs:
        db.amcheck_missing = "amcheck has no bt_index_check"


def _drop_schema(conninfo: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    try:
        with _connect_retrying(conninfo) as conn:
            conn.execute("SET session_replication_role = replica")
            # A read-only restore (default_transaction_read_only, pgro run's replicas)
            # still gets pgro's own schema, which is dropped afterwards.
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    except psycopg.Error:
        pass  # the verification's copy is thrown away; a leftover schema harms nothing


def _classify(
    db: _Database,
    row: tuple[object, ...],
    plan_btree: bool,
    plan_heap: bool,
    plan_read: bool,
    skips: set[Skip],
) -> _Relation | None:
    oid, nsp, rel, kind, persistence, populated, am, valid, ready, tnsp, trel = row
    name = f"{quote_ident(str(nsp))}.{quote_ident(str(rel))}"
    table = None if trel is None else f"{quote_ident(str(tnsp))}.{quote_ident(str(trel))}"
    checks: list[str] = []
    reason: str | None = None
    if kind == "i":
        if not plan_btree:
            return None
        if am != "btree":
            reason = f"{am} index (amcheck checks btree indexes only)"
        elif not (valid and ready):
            reason = "invalid index (a failed or unfinished CREATE INDEX CONCURRENTLY)"
        elif db.amcheck_missing is None:
            checks.append(BTREE)
    else:
        if not (plan_heap or plan_read):
            return None
        if kind == "m" and not populated:
            reason = "materialized view never populated"
        else:
            if plan_heap and db.verify_heapam and db.amcheck_missing is None:
                checks.append(HEAP)
            if plan_read:
                checks.append(FULL_READ)
    if persistence == "u":
        reason = "unlogged (its contents are reset when the server starts)"
    elif persistence == "t":
        reason = "temporary relation of a session that no longer exists"
    if reason is not None:
        skips.add(Skip(db.name, name, reason))
        return None
    if not checks:
        return None
    return _Relation(
        db.name, int(str(oid)), name, str(nsp), str(rel), str(kind), table, tuple(checks)
    )


def _run_relation(
    conn: psycopg.Connection[tuple[object, ...]],
    db: _Database,
    rel: _Relation,
    heapallindexed: bool,
) -> list[Finding]:
    import psycopg
    from psycopg import sql

    findings: list[Finding] = []

    def found(check: str, message: str, block: int | None = None) -> None:
        findings.append(
            Finding(
                check,
                message,
                database=rel.database,
                relation=rel.name,
                block=block if block is not None else block_in_message(message),
                table=rel.table,
            )
        )

    schema = sql.Identifier(db.amcheck_schema or "pg_catalog")
    for check in rel.checks:
        try:
            if check == BTREE:
                if heapallindexed and db.heapallindexed:
                    conn.execute(
                        sql.SQL("SELECT {}.bt_index_check(%s::pg_catalog.regclass, true)").format(
                            schema
                        ),
                        (rel.oid,),
                    )
                else:
                    conn.execute(
                        sql.SQL("SELECT {}.bt_index_check(%s::pg_catalog.regclass)").format(schema),
                        (rel.oid,),
                    )
            elif check == HEAP:
                rows = conn.execute(
                    sql.SQL(
                        "SELECT blkno, offnum, attnum, msg FROM {}.verify_heapam("
                        "%s::pg_catalog.regclass, on_error_stop => false, "
                        "check_toast => %s, skip => 'none')"
                    ).format(schema),
                    (rel.oid, rel.kind != "t"),
                ).fetchall()
                for blkno, offnum, attnum, msg in rows:
                    where = f"offset {offnum}" + (f", attribute {attnum}" if attnum else "")
                    found(HEAP, f"{where}: {msg}"[:MAX_MESSAGE], int(str(blkno)))
            elif check == FULL_READ:
                conn.execute(
                    sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
                        sql.Identifier(rel.schema), sql.Identifier(rel.relname)
                    )
                ).fetchone()
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            found(check, _message(exc))
            if conn.closed:
                break
    return findings


def check(
    conninfo_for: Callable[[str], str],
    depth: str,
    *,
    workers: int = 2,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> IntegrityReport:
    """The online integrity checks of `depth` in every connectable database.

    `conninfo_for(dbname)` gives a libpq string for the bootstrap superuser (used with
    `session.connect`). `workers` sessions check relations in parallel (keep it at most the
    CPU count). `deadline` is a `clock()` instant after which no relation starts and a
    running query is cancelled; the report is then incomplete ("incomplete after N of M
    relations"). Never raises for what the server says: errors are findings.
    """
    import psycopg

    plan = plan_for(depth)
    report = IntegrityReport()
    if not plan.reads_data:
        return report
    amcheck_wanted = plan.btree or plan.heap
    setup_findings: list[Finding] = []
    skips: set[Skip] = set()
    databases: list[_Database] = []
    relations: list[_Relation] = []
    server_major = 0
    available = False
    try:
        with _connect(conninfo_for("postgres")) as conn:
            names = [str(r[0]) for r in conn.execute(_DATABASES).fetchall()]
            version = conn.execute("SHOW server_version_num").fetchone()
            server_major = int(str(version[0])) // 10000 if version else 0
            available = (
                conn.execute(
                    "SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'amcheck'"
                ).fetchone()
                is not None
            )
    except psycopg.Error as exc:
        report.verdicts.append(shape(SETUP, [Finding(SETUP, _message(exc))], 0, "databases"))
        return report

    for name in names:
        db = _Database(name)
        if amcheck_wanted and not available:
            db.amcheck_missing = "amcheck missing"
        try:
            with _connect(conninfo_for(name)) as conn:
                if amcheck_wanted and db.amcheck_missing is None:
                    _prepare_amcheck(conn, db)
                rows = conn.execute(_RELATIONS).fetchall()
        except psycopg.Error as exc:
            setup_findings.append(Finding(SETUP, _message(exc), database=name))
            if db.created_schema and db.amcheck_schema:
                _drop_schema(conninfo_for(name), db.amcheck_schema)
            continue
        databases.append(db)
        if db.amcheck_missing is not None:
            skips.add(Skip(name, "(its indexes and tables)", f"amcheck: {db.amcheck_missing}"))
        for row in rows:
            rel = _classify(db, row, plan.btree, plan.heap, plan.full_read, skips)
            if rel is not None:
                relations.append(rel)

    by_name = {db.name: db for db in databases}
    report.relations_total = len(relations)
    findings: list[Finding] = []
    lock = threading.Lock()
    tasks: queue.Queue[_Relation] = queue.Queue()
    for rel in relations:
        tasks.put(rel)
    done = 0

    def worker() -> None:
        nonlocal done
        conn: psycopg.Connection[tuple[object, ...]] | None = None
        current = ""
        try:
            while True:
                if deadline is not None and clock() >= deadline:
                    return
                try:
                    rel = tasks.get_nowait()
                except queue.Empty:
                    return
                try:
                    if conn is None or conn.closed or current != rel.database:
                        if conn is not None:
                            conn.close()
                        conn = None
                        conn = _connect_retrying(conninfo_for(rel.database))
                        current = rel.database
                        for setting in _WORKER_SETTINGS:
                            conn.execute(setting)
                    if deadline is not None:
                        left_ms = max(1, int((deadline - clock()) * 1000))
                        conn.execute(f"SET statement_timeout = {left_ms}")
                    found = _run_relation(conn, by_name[rel.database], rel, plan.heapallindexed)
                except psycopg.errors.QueryCanceled:
                    return  # the deadline: this relation is not done
                except psycopg.Error as exc:
                    found = [
                        Finding(
                            rel.checks[0],
                            _message(exc),
                            database=rel.database,
                            relation=rel.name,
                            table=rel.table,
                        )
                    ]
                with lock:
                    findings.extend(found)
                    done += 1
        finally:
            if conn is not None:
                conn.close()

    threads = [
        threading.Thread(target=worker, name=f"pgro-integrity-{i}", daemon=True)
        for i in range(max(1, min(workers, len(relations) or 1)))
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for db in databases:
            if db.created_schema and db.amcheck_schema:
                _drop_schema(conninfo_for(db.name), db.amcheck_schema)

    report.relations_done = done
    report.verdicts = _verdicts(
        plan.btree, plan.heap, plan.full_read, databases, relations, findings, server_major
    )
    if setup_findings:
        report.verdicts.insert(0, shape(SETUP, setup_findings, len(names), "databases"))
    if skipped := shape_skips(sorted(skips, key=lambda s: (s.database, s.relation))):
        report.verdicts.append(skipped)
    if not report.complete:
        report.verdicts.append(incomplete(report.relations_done, report.relations_total))
    return report


def _verdicts(
    btree: bool,
    heap: bool,
    full_read: bool,
    databases: list[_Database],
    relations: list[_Relation],
    findings: list[Finding],
    server_major: int,
) -> list[CheckVerdict]:
    verdicts: list[CheckVerdict] = []
    missing = sorted({db.amcheck_missing for db in databases if db.amcheck_missing})

    def of(check: str) -> list[Finding]:
        return sorted(
            (f for f in findings if f.check == check),
            key=lambda f: (f.database or "", f.relation or "", f.block or 0),
        )

    def counted(check: str) -> int:
        return sum(1 for r in relations if check in r.checks)

    if btree:
        if missing and not counted(BTREE):
            verdicts.append(not_checked(BTREE, "; ".join(missing)))
        else:
            verdicts.append(shape(BTREE, of(BTREE), counted(BTREE), "btree indexes"))
    if heap:
        if missing and not counted(HEAP):
            verdicts.append(not_checked(HEAP, "; ".join(missing)))
        elif not any(db.verify_heapam for db in databases):
            verdicts.append(
                not_checked(
                    HEAP,
                    f"verify_heapam needs PostgreSQL 14 or later (this is {server_major}); "
                    "the full read covers heap and TOAST",
                )
            )
        else:
            verdicts.append(shape(HEAP, of(HEAP), counted(HEAP), "heap and TOAST relations"))
    if full_read:
        verdicts.append(
            shape(FULL_READ, of(FULL_READ), counted(FULL_READ), "tables and TOAST relations")
        )
    return verdicts
