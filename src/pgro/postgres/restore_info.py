"""`_pgro.restore_info`: which restore and snapshot a server holds, and its stage.

One row (`id = 1`) in the `postgres` database, written when a restored server is
provisioned and before it serves (reference restore-pipeline.md §4.3 step 20, §5.2;
docs/roles.md "_pgro.restore_info"): the snapshot id and time, when it was restored, the
repairs the restore made (`fixes`) and the `stage`, which clients may poll:
`restored` → `reindexing` → `ready` → `outgoing` (marked on the superseded restore right after
a switchover, as a best effort).

The restored catalog is untrusted and may already hold a `_pgro` schema: an old copy of
the table (a snapshot of a restored copy), or a view, a table with a trigger, a rule, an
expression index, a domain-typed column or an owner from the source. pgro writes the row as
a superuser, so anything of the snapshot's that such a write runs would run as one. The
table is therefore kept (and upgraded with the columns it lacks) only when it is exactly
what pgro creates: a plain table owned by pgro's role in a schema owned by that role, with
only pgro's columns and built-in types, only its primary key, and no trigger, rule, policy,
statistics object, inheritance or generated column. Anything else is moved out of the way
(`ALTER SCHEMA _pgro RENAME TO _pgro_snapshot…`, which runs nothing and keeps whatever
depends on it) and a fresh schema is created. The privileges on the schema and the table
are reset to the owner's plus the analytics user's. It must run after
`catalog_guard.neutralise_catalog` (provisioning runs it first): event triggers would fire
on this DDL, and it refuses to run while one is enabled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from pgro.postgres.config import printable_name

if TYPE_CHECKING:
    import psycopg

    from pgro.api.restore import PostgresPhysicalRestore

log = logging.getLogger("pgro.postgres")

SCHEMA: Final = "_pgro"
TABLE: Final = "restore_info"
DATABASE: Final = "postgres"
APPLICATION_NAME: Final = "pgro-restore-info"
CONNECT_TIMEOUT_S: Final = 10
# The outgoing mark runs on a restore that still serves: a client holding a lock on the
# row must not stall the reconciler.
MARK_LOCK_TIMEOUT: Final = "5s"
MARK_STATEMENT_TIMEOUT: Final = "15s"

STAGE_RESTORED: Final = "restored"
STAGE_REINDEXING: Final = "reindexing"
STAGE_READY: Final = "ready"
STAGE_OUTGOING: Final = "outgoing"
STAGES: Final = (STAGE_RESTORED, STAGE_REINDEXING, STAGE_READY, STAGE_OUTGOING)

# Built-in type OIDs (src/include/catalog/pg_type.dat): fixed numbers, not names.
_INT4, _TEXT, _TIMESTAMPTZ, _JSONB = 23, 25, 1184, 3802
# Column -> (type OID, may be NOT NULL, its definition when added to an old table).
_COLUMNS: Final[dict[str, tuple[int, bool, str]]] = {
    "id": (_INT4, True, ""),
    "snapshot_id": (_TEXT, True, ""),
    "snapshot_time": (_TIMESTAMPTZ, False, "pg_catalog.timestamptz"),
    "restored_at": (_TIMESTAMPTZ, True, "pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now()"),
    "stage": (_TEXT, True, "pg_catalog.text NOT NULL DEFAULT 'restored'"),
    "last_transition_time": (
        _TIMESTAMPTZ,
        True,
        "pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now()",
    ),
    "fixes": (_JSONB, False, "pg_catalog.jsonb"),
}
# An old table has at least these (the reference's first version); the rest may be added.
_REQUIRED: Final = ("id", "snapshot_id")
# initdb gives every object it creates an OID below this (catalog_guard relies on it too).
_FIRST_NORMAL_OBJECT_ID: Final = 16384
# Catalog OIDs (src/include/catalog/pg_*.h), for pg_depend.
_PG_TYPE, _PG_PROC, _PG_ATTRDEF, _PG_OPERATOR = 1247, 1255, 2604, 2617

_CREATE_TABLE: Final = (
    "CREATE TABLE _pgro.restore_info ("
    "id pg_catalog.int4 PRIMARY KEY DEFAULT 1, "
    "snapshot_id pg_catalog.text NOT NULL, "
    "snapshot_time pg_catalog.timestamptz, "
    "restored_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(), "
    "stage pg_catalog.text NOT NULL DEFAULT 'restored', "
    "last_transition_time pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(), "
    "fixes pg_catalog.jsonb)"
)
# A row already there for the same snapshot is this restore's own (a server restarted
# and provisioned again: no snapshot can hold a row naming itself): it keeps its
# restored_at and an `outgoing` mark. A row from the snapshot is replaced.
_UPSERT: Final = (
    "INSERT INTO _pgro.restore_info AS r "
    "(id, snapshot_id, snapshot_time, restored_at, stage, last_transition_time, fixes) "
    "VALUES (1, %(snapshot_id)s, NULLIF(%(snapshot_time)s, '')::pg_catalog.timestamptz, "
    "pg_catalog.now(), %(stage)s, pg_catalog.now(), %(fixes)s::pg_catalog.jsonb) "
    "ON CONFLICT (id) DO UPDATE SET "
    "snapshot_id = EXCLUDED.snapshot_id, "
    "snapshot_time = EXCLUDED.snapshot_time, "
    "fixes = EXCLUDED.fixes, "
    "restored_at = CASE WHEN r.snapshot_id = EXCLUDED.snapshot_id "
    "THEN r.restored_at ELSE EXCLUDED.restored_at END, "
    "stage = CASE WHEN r.snapshot_id = EXCLUDED.snapshot_id AND r.stage = 'outgoing' "
    "THEN r.stage ELSE EXCLUDED.stage END, "
    "last_transition_time = CASE WHEN r.snapshot_id = EXCLUDED.snapshot_id "
    "AND (r.stage = EXCLUDED.stage OR r.stage = 'outgoing') "
    "THEN r.last_transition_time ELSE EXCLUDED.last_transition_time END"
)


class RestoreInfoFailed(Exception):
    """`_pgro.restore_info` could not be written; the message names the cause."""

    reason = "RestoreInfoFailed"


@dataclass(frozen=True)
class RestoreInfo:
    """What the row records about one restore."""

    snapshot_id: str
    snapshot_time: str = ""  # kopia's startTime; empty when unknown (stored as NULL)
    fixes: Mapping[str, bool] | None = None  # the restore's status.fixes
    # The full reindex after pg_resetwal still to run (`core.full_reindex`) starts the row
    # at `restored`; that step moves it with set_stage: `reindexing`, then `ready`.
    reindex_pending: bool = False

    @classmethod
    def of(cls, restore: PostgresPhysicalRestore, *, reindex_pending: bool = False) -> RestoreInfo:
        return cls(
            snapshot_id=restore.spec.snapshot,
            snapshot_time=restore.spec.snapshot_time or "",
            fixes=restore.status.fixes,
            reindex_pending=reindex_pending,
        )

    @property
    def stage(self) -> str:
        return STAGE_RESTORED if self.reindex_pending else STAGE_READY


@dataclass
class _Found:
    """What the catalog holds under `_pgro.restore_info`."""

    schema: bool = False
    table: bool = False
    columns: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _connect(conninfo: str) -> psycopg.Connection[tuple[object, ...]]:
    from pgro.postgres.session import connect

    conn = connect(conninfo, application_name=APPLICATION_NAME, connect_timeout=CONNECT_TIMEOUT_S)
    try:
        # A read-only replica's configuration makes every transaction read-only.
        conn.execute("SET default_transaction_read_only = off")
        is_superuser = conn.execute("SELECT current_setting('is_superuser')").fetchone()
        if is_superuser != ("on",):
            raise RestoreInfoFailed(
                "the session writing _pgro.restore_info is not a superuser: connect as the "
                "bootstrap superuser (pgro run) or the operator's admin role"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _count(conn: psycopg.Connection[tuple[object, ...]], query: str, *params: object) -> int:
    row = conn.execute(query, params).fetchone()
    return int(str(row[0])) if row is not None else 0


def _inspect(conn: psycopg.Connection[tuple[object, ...]]) -> _Found:
    """Whether `_pgro` and its table are exactly what pgro creates; reads catalogs only."""
    found = _Found()
    me = "(SELECT oid FROM pg_catalog.pg_authid WHERE rolname = current_user)"
    schema = conn.execute(
        f"SELECT n.oid, n.nspowner = {me} FROM pg_catalog.pg_namespace n WHERE n.nspname = %s",
        (SCHEMA,),
    ).fetchone()
    if schema is None:
        return found
    found.schema = True
    nsp = int(str(schema[0]))
    if schema[1] is not True:
        found.problems.append("the schema is owned by another role")
    rel = conn.execute(
        f"SELECT c.oid, c.relkind::text, c.relowner = {me}, c.relhassubclass, "
        "c.relrowsecurity, c.relispartition FROM pg_catalog.pg_class c "
        "WHERE c.relnamespace = %s AND c.relname = %s",
        (nsp, TABLE),
    ).fetchone()
    if rel is None:
        if _count(
            conn,
            "SELECT count(*) FROM pg_catalog.pg_type WHERE typnamespace = %s AND typname = %s",
            nsp,
            TABLE,
        ):
            found.problems.append("a type named restore_info is in the way")
        return found
    oid, relkind, owned, has_children, row_security, is_partition = rel
    found.table = True
    if relkind != "r":
        found.problems.append(f"restore_info is not a plain table (relkind {relkind})")
        return found
    if owned is not True:
        found.problems.append("the table is owned by another role")
    if has_children is True or is_partition is True or row_security is True:
        found.problems.append("the table has inheritance, partitions or row security")
    hooks = {
        "triggers": "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = %s",
        "rules": "SELECT count(*) FROM pg_catalog.pg_rewrite WHERE ev_class = %s",
        "policies": "SELECT count(*) FROM pg_catalog.pg_policy WHERE polrelid = %s",
        "statistics objects": (
            "SELECT count(*) FROM pg_catalog.pg_statistic_ext WHERE stxrelid = %s"
        ),
        "parent tables": "SELECT count(*) FROM pg_catalog.pg_inherits WHERE inhrelid = %s",
        # Only the primary key (and, from 18, NOT NULL) constraints: a CHECK or foreign
        # key runs expressions or queries on every write.
        "constraints other than its primary key": (
            "SELECT count(*) FROM pg_catalog.pg_constraint WHERE conrelid = %s "
            "AND contype::text <> 'p' AND contype::text <> 'n'"
        ),
        # pgro's statements name every column, so no default runs in them; a default that
        # calls the snapshot's code would still run in the next writer's, so it is not kept.
        "column defaults that use the snapshot's functions, operators or types": (
            "SELECT count(*) FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_depend p "
            f"ON p.classid = {_PG_ATTRDEF} AND p.objid = d.oid WHERE d.adrelid = %s "
            f"AND p.refclassid IN ({_PG_PROC}, {_PG_OPERATOR}, {_PG_TYPE}) "
            f"AND p.refobjid >= {_FIRST_NORMAL_OBJECT_ID}"
        ),
        # An index runs its expressions, predicate and operator class functions on every
        # write: only a plain index over built-in operator classes is pgro's.
        "indexes with expressions, predicates or non-built-in operator classes": (
            "SELECT count(*) FROM pg_catalog.pg_index i WHERE i.indrelid = %s "
            "AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL OR EXISTS ("
            "SELECT 1 FROM pg_catalog.unnest(i.indclass::pg_catalog.oid[]) k "
            f"WHERE k >= {_FIRST_NORMAL_OBJECT_ID}"
            "))"
        ),
    }
    for what, query in hooks.items():
        if _count(conn, query, oid):
            found.problems.append(f"the table has {what}")
    if not _count(
        conn,
        "SELECT count(*) FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = %s AND i.indisprimary AND i.indnatts = 1 AND a.attname = 'id'",
        oid,
    ):
        found.problems.append("the table has no primary key on id")
    generated = "a.attgenerated::text" if conn.info.server_version >= 120000 else "''"
    for name, type_oid, not_null, gen in conn.execute(
        f"SELECT a.attname, a.atttypid, a.attnotnull, {generated} "
        "FROM pg_catalog.pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 "
        "AND NOT a.attisdropped",
        (oid,),
    ).fetchall():
        column = str(name)
        expected = _COLUMNS.get(column)
        # Only pgro's columns: their defaults are never evaluated by pgro's statements
        # (they name every column), and a domain or user type would run its checks.
        if expected is None:
            found.problems.append(f"the table has a column pgro does not create ({column!r})")
        elif int(str(type_oid)) != expected[0]:
            found.problems.append(f"column {column} has another type")
        elif not_null is True and not expected[1]:
            found.problems.append(f"column {column} is NOT NULL")
        elif gen:
            found.problems.append(f"column {column} is generated")
        else:
            found.columns.add(column)
    missing = [c for c in _REQUIRED if c not in found.columns]
    if missing and not any("column" in p for p in found.problems):
        found.problems.append("the table lacks " + ", ".join(missing))
    return found


def _move_aside(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """Rename the snapshot's `_pgro` out of the way; renaming runs nothing of it, and what
    depends on it (a view elsewhere) follows it."""
    from psycopg import sql

    taken = {
        str(r[0])
        for r in conn.execute(
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname LIKE '\\_pgro\\_snapshot%'"
        ).fetchall()
    }
    name = next(
        n
        for n in (f"_pgro_snapshot{'' if i == 0 else f'_{i}'}" for i in range(1000))
        if n not in taken
    )
    conn.execute(
        sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(SCHEMA), sql.Identifier(name))
    )
    return name


def _refuse_event_triggers(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    if _count(conn, "SELECT count(*) FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D'"):
        raise RestoreInfoFailed(
            "the postgres database has enabled event triggers, which would run on pgro's "
            "DDL as a superuser: neutralise the catalog first (provisioning does)"
        )


def _reset_privileges(
    conn: psycopg.Connection[tuple[object, ...]], analytics: str, analytics_may_write: bool
) -> None:
    """Only the owner and the analytics user hold anything on the schema and the table
    (a kept table may carry the snapshot's grants, column grants included)."""
    from psycopg import sql

    grantees = conn.execute(
        "SELECT DISTINCT g.grantee, r.rolname FROM ("
        "SELECT (pg_catalog.aclexplode(n.nspacl)).grantee, n.nspowner AS owner "
        "FROM pg_catalog.pg_namespace n WHERE n.nspname = %(s)s "
        "UNION ALL SELECT (pg_catalog.aclexplode(c.relacl)).grantee, c.relowner "
        "FROM pg_catalog.pg_class c WHERE c.oid = %(t)s::pg_catalog.regclass "
        "UNION ALL SELECT (pg_catalog.aclexplode(a.attacl)).grantee, c.relowner "
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "WHERE a.attrelid = %(t)s::pg_catalog.regclass) g "
        "LEFT JOIN pg_catalog.pg_authid r ON r.oid = g.grantee WHERE g.grantee <> g.owner",
        {"s": SCHEMA, "t": f"{SCHEMA}.{TABLE}"},
    ).fetchall()
    for grantee, rolname in grantees:
        if int(str(grantee)) != 0 and rolname is None:
            continue  # a dropped role's leftover entry grants nothing
        who = sql.SQL("PUBLIC") if int(str(grantee)) == 0 else sql.Identifier(str(rolname))
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA _pgro FROM {}").format(who))
        # At table level this revokes the column grants too.
        conn.execute(sql.SQL("REVOKE ALL ON TABLE _pgro.restore_info FROM {}").format(who))
    who = sql.Identifier(analytics)
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA _pgro TO {}").format(who))
    # The reference grants UPDATE always (its operator marked `outgoing` as this user);
    # pgro marks as its own role, and on a read-only replica the analytics user must have
    # no write path even after `SET default_transaction_read_only = off` (docs/roles.md).
    privileges = "SELECT, UPDATE" if analytics_may_write else "SELECT"
    conn.execute(
        sql.SQL("GRANT {} ON TABLE _pgro.restore_info TO {}").format(sql.SQL(privileges), who)
    )


def record_restore(
    conninfo: str, info: RestoreInfo, *, analytics: str, analytics_may_write: bool
) -> list[str]:
    """Create or upgrade `_pgro.restore_info`, write row 1 and grant the analytics user
    read access (and UPDATE when the replica writes). Idempotent.

    `conninfo` is a superuser session in the `postgres` database of a provisioned server.
    Returns notes (names only) about a snapshot `_pgro` that was moved aside, or about a
    restore without a `postgres` database (nothing written). Raises RestoreInfoFailed.
    """
    import psycopg

    notes: list[str] = []
    try:
        with _connect(conninfo) as conn:
            conn.execute("SET statement_timeout = 0")
            conn.execute("SET lock_timeout = 0")
            _refuse_event_triggers(conn)
            with conn.transaction():
                found = _inspect(conn)
                if found.problems:
                    aside = _move_aside(conn)
                    notes.append(
                        f"the snapshot's {SCHEMA} schema was renamed to {aside} because "
                        + "; ".join(printable_name(p, 120) for p in found.problems)
                    )
                    found = _Found()
                conn.execute("CREATE SCHEMA IF NOT EXISTS _pgro")
                if not found.table:
                    conn.execute(_CREATE_TABLE)
                else:
                    for column, (_, _, definition) in _COLUMNS.items():
                        if definition and column not in found.columns:
                            conn.execute(
                                f"ALTER TABLE _pgro.restore_info ADD COLUMN IF NOT EXISTS "
                                f"{column} {definition}"
                            )
                conn.execute(
                    _UPSERT,
                    {
                        "snapshot_id": info.snapshot_id,
                        "snapshot_time": info.snapshot_time,
                        "stage": info.stage,
                        "fixes": None if info.fixes is None else json.dumps(dict(info.fixes)),
                    },
                )
                _reset_privileges(conn, analytics, analytics_may_write)
    except psycopg.OperationalError as exc:
        if f'database "{DATABASE}" does not exist' not in str(exc):
            raise RestoreInfoFailed(
                f"cannot write {SCHEMA}.{TABLE} in database {DATABASE}: {str(exc).strip()}"
            ) from exc
        # The source dropped it: the metadata has nowhere to go, the restore still serves.
        notes.append(f"the restore has no {DATABASE} database: {SCHEMA}.{TABLE} not written")
    except psycopg.Error as exc:
        raise RestoreInfoFailed(
            f"cannot write {SCHEMA}.{TABLE} in database {DATABASE}: {str(exc).strip()}"
        ) from exc
    return notes


def reset_access(conninfo: str, *, analytics: str, analytics_may_write: bool) -> bool:
    """Put the privileges on `_pgro` back to record_restore's after the login roles were
    provisioned again (users.provision_users grants a writing analytics user DML on every
    table and CREATE on every schema, `_pgro` included; a reset drops its grants).

    False when there is no table of pgro's. Raises RestoreInfoFailed.
    """
    import psycopg

    try:
        with _connect(conninfo) as conn, conn.transaction():
            found = _inspect(conn)
            if not found.table or found.problems:
                return False
            _reset_privileges(conn, analytics, analytics_may_write)
            return True
    except psycopg.Error as exc:
        raise RestoreInfoFailed(
            f"cannot reset the privileges on {SCHEMA}.{TABLE}: {str(exc).strip()}"
        ) from exc


def _update_stage(conn: psycopg.Connection[tuple[object, ...]], stage: str) -> bool:
    """Set the stage if the table is pgro's plain table; False when it is not there."""
    with conn.transaction():
        found = _inspect(conn)
        if (
            not found.table
            or found.problems
            or not {"stage", "last_transition_time"} <= found.columns
        ):
            return False
        # A superseded restore stays `outgoing`: a background reindex ending after the
        # switchover must not advertise it as `ready` again.
        cur = conn.execute(
            "UPDATE _pgro.restore_info SET stage = %s, "
            "last_transition_time = pg_catalog.now() WHERE id = 1 "
            "AND (stage IS DISTINCT FROM 'outgoing' OR %s = 'outgoing')",
            (stage, stage),
        )
        return cur.rowcount == 1


def set_stage(conninfo: str, stage: str) -> bool:
    """Move the row to `stage` (e.g. `reindexing`, then `ready` around a reindex).

    False when there is no row to move (the table is missing or not pgro's). Raises
    RestoreInfoFailed when the server cannot be written.
    """
    import psycopg

    if stage not in STAGES:
        raise ValueError(f"unknown restore_info stage {stage!r}; one of {', '.join(STAGES)}")
    try:
        with _connect(conninfo) as conn:
            conn.execute(f"SET lock_timeout = '{MARK_LOCK_TIMEOUT}'")
            conn.execute(f"SET statement_timeout = '{MARK_STATEMENT_TIMEOUT}'")
            return _update_stage(conn, stage)
    except psycopg.Error as exc:
        raise RestoreInfoFailed(
            f"cannot set {SCHEMA}.{TABLE}.stage to {stage}: {str(exc).strip()}"
        ) from exc


def mark_outgoing(conninfo: str, *, label: str = "", scrub: Callable[[str], str] = str) -> bool:
    """Best effort: mark the superseded restore's row `outgoing`. Never raises; a failure
    is logged (through `scrub`, which removes secrets) and returns False."""
    try:
        if set_stage(conninfo, STAGE_OUTGOING):
            log.info("restore %s: _pgro.restore_info marked outgoing", label)
            return True
        log.info("restore %s: no _pgro.restore_info row of pgro's to mark outgoing", label)
    except Exception as exc:
        log.warning(
            "restore %s: cannot mark _pgro.restore_info outgoing: %s", label, scrub(str(exc))
        )
    return False
