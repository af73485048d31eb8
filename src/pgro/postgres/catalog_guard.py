"""Neutralising what a restored catalog stores that would load code into a session.

The server's command line (`config.forced_settings`) decides what the configuration files
may do, but the catalog travels with the data and ranks above the command line:

- `pg_db_role_setting` (`ALTER ROLE … SET`, `ALTER DATABASE … SET`) can name
  `session_preload_libraries`, `local_preload_libraries` or `dynamic_library_path` for every
  session of a role or database, including the analytics users' sessions through PgBouncer;
- event triggers run on the DDL pgro's provisioning issues (GRANT, ALTER DEFAULT PRIVILEGES);
- a C-language function whose `probin` is a path (`lib/evil`, relative to the server's
  working directory, which is PGDATA) loads a library shipped inside the snapshot as soon as
  anyone calls it, directly or as a trigger, type I/O or language handler.

`neutralise_catalog` removes the first, disables the second and points the third at a
library name that does not exist, so a call fails with "could not access file" instead of
loading anything. A database with functions or operators added to `pg_catalog` (which every
session searches first, so they stand in for built-ins) is refused outright. It must run
before anything but pgro's own guarded sessions (`session.connect`) reaches the server.
What it changed is returned as names only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgro.postgres.config import CODE_RUNNING_PL_KEYS, bare_library, printable_name

if TYPE_CHECKING:
    import psycopg

# Stored per-role/per-database settings that load a library or run code.
CODE_LOADING_SETTINGS = frozenset(
    {
        "session_preload_libraries",
        "local_preload_libraries",
        "dynamic_library_path",
        "jit_provider",
        *CODE_RUNNING_PL_KEYS,
    }
)
# What a refused function's `probin` becomes: a name no PostgreSQL installation ships.
REFUSED_LIBRARY = "$libdir/pgro-refused-snapshot-library"

# Fixed OIDs (src/include/catalog/pg_*.dat): looked up by number, not by a name a
# tampered catalog could redefine.
C_LANGUAGE_OID = 13
PG_PROC_OID = 1255
PG_OPERATOR_OID = 2617
PG_CATALOG_NAMESPACE_OID = 11
# initdb gives every object it creates an OID below this; later objects get one above.
FIRST_NORMAL_OBJECT_ID = 16384

APPLICATION_NAME = "pgro-catalog-guard"


class CatalogGuardFailed(Exception):
    """The catalog could not be checked or neutralised: serving it would not be safe."""

    reason = "UnsafeSnapshot"


@dataclass
class CatalogGuardResult:
    """What `neutralise_catalog` changed, as sanitised names (never values)."""

    reset_settings: list[str] = field(default_factory=list)
    disabled_event_triggers: list[str] = field(default_factory=list)
    refused_functions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.reset_settings or self.disabled_event_triggers or self.refused_functions)

    def notes(self) -> list[str]:
        out = []
        if self.reset_settings:
            out.append(
                "removed stored settings that load code (ALTER ROLE/DATABASE … RESET): "
                + ", ".join(self.reset_settings)
            )
        if self.disabled_event_triggers:
            out.append(
                "disabled the snapshot's event triggers: " + ", ".join(self.disabled_event_triggers)
            )
        if self.refused_functions:
            out.append(
                "made C functions whose library is a path outside $libdir unloadable "
                f"(calls now fail; probin set to {REFUSED_LIBRARY}): "
                + ", ".join(self.refused_functions)
            )
        return out


def library_is_trusted(probin: str) -> bool:
    """True if `probin` can only name a library installed in the host's $libdir.

    A bare name is looked up in dynamic_library_path, which the server's command line and
    pgro's sessions force to `$libdir`; `$libdir/sub/name` stays beneath it. Anything else
    (`lib/evil`, `/abs/path`, `$libdir/../..`) can reach a file the snapshot shipped.
    """
    if bare_library(probin) == probin.strip():
        return True
    if not probin.startswith("$libdir/"):
        return False
    parts = probin.removeprefix("$libdir/").split("/")
    return all(part and part not in (".", "..") and bare_library(part) == part for part in parts)


def _setting_key(entry: str) -> str:
    return entry.split("=", 1)[0].strip().lower()


def _guc_name(key: str) -> psycopg.sql.Composable:
    from psycopg import sql

    # A custom setting (`plperl.on_init`) is two identifiers joined by a dot.
    return sql.SQL(".").join(sql.Identifier(part) for part in key.split("."))


def _reset_statement(database: str | None, role: str | None, key: str) -> psycopg.sql.Composed:
    from psycopg import sql

    name = _guc_name(key)
    if role is None and database is not None:
        return sql.SQL("ALTER DATABASE {} RESET {}").format(sql.Identifier(database), name)
    target = sql.SQL("ALL") if role is None else sql.Identifier(role)
    if database is None:
        return sql.SQL("ALTER ROLE {} RESET {}").format(target, name)
    return sql.SQL("ALTER ROLE {} IN DATABASE {} RESET {}").format(
        target, sql.Identifier(database), name
    )


def _label(database: str | None, role: str | None) -> str:
    if database is None and role is None:
        return "all roles"
    if role is None:
        return f"database {printable_name(database or '')}"
    if database is None:
        return f"role {printable_name(role)}"
    return f"role {printable_name(role)} in database {printable_name(database)}"


def _connect(conninfo: str) -> psycopg.Connection[tuple[object, ...]]:
    from pgro.postgres.session import connect

    conn = connect(conninfo, application_name=APPLICATION_NAME)
    # A read-only replica's postgresql.conf makes transactions read-only by default.
    conn.execute("SET default_transaction_read_only = off")
    return conn


def _reset_stored_settings(
    conn: psycopg.Connection[tuple[object, ...]], result: CatalogGuardResult
) -> None:
    rows = conn.execute(
        "SELECT d.datname, r.rolname, s.setdatabase, s.setrole, s.setconfig "
        "FROM pg_catalog.pg_db_role_setting s "
        "LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase "
        "LEFT JOIN pg_catalog.pg_authid r ON r.oid = s.setrole"
    ).fetchall()
    for datname, rolname, setdatabase, setrole, setconfig in rows:
        if (setdatabase and datname is None) or (setrole and rolname is None):
            continue  # an orphaned row (its database or role is gone) applies to no one
        database = str(datname) if setdatabase else None
        role = str(rolname) if setrole else None
        keys = sorted(
            {_setting_key(str(e)) for e in (setconfig if isinstance(setconfig, list) else [])}
            & CODE_LOADING_SETTINGS
        )
        for key in keys:
            conn.execute(_reset_statement(database, role, key))
            result.reset_settings.append(f"{key} ({_label(database, role)})")


def _disable_event_triggers(
    conn: psycopg.Connection[tuple[object, ...]], dbname: str, result: CatalogGuardResult
) -> None:
    from psycopg import sql

    rows = conn.execute(
        "SELECT evtname FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D'"
    ).fetchall()
    for (name,) in rows:
        conn.execute(sql.SQL("ALTER EVENT TRIGGER {} DISABLE").format(sql.Identifier(str(name))))
        result.disabled_event_triggers.append(
            f"{printable_name(str(name))} (database {printable_name(dbname)})"
        )


def _refuse_foreign_libraries(
    conn: psycopg.Connection[tuple[object, ...]], dbname: str, result: CatalogGuardResult
) -> None:
    rows = conn.execute(
        "SELECT p.oid, n.nspname, p.proname, p.probin FROM pg_catalog.pg_proc p "
        "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.prolang = %s AND p.probin IS NOT NULL",
        (C_LANGUAGE_OID,),
    ).fetchall()
    refused = [row for row in rows if not library_is_trusted(str(row[3]))]
    if not refused:
        return
    # The UPDATE below must run nothing of the snapshot's: a trigger or rule on pg_proc
    # (which only a tampered catalog has) would run with our privileges.
    hooks = conn.execute(
        "SELECT (SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = %s) "
        "+ (SELECT count(*) FROM pg_catalog.pg_rewrite WHERE ev_class = %s)",
        (PG_PROC_OID, PG_PROC_OID),
    ).fetchone()
    if hooks is None or int(str(hooks[0])) != 0:
        raise CatalogGuardFailed(
            f"database {printable_name(dbname)} has triggers or rules on pg_proc, which only "
            "a tampered catalog has: refusing to serve it"
        )
    for oid, nspname, proname, _probin in refused:
        # No ALTER FUNCTION changes a function's library; a superuser may update pg_proc.
        conn.execute(
            "UPDATE pg_catalog.pg_proc SET probin = %s WHERE oid = %s", (REFUSED_LIBRARY, oid)
        )
        result.refused_functions.append(
            f"{printable_name(f'{nspname}.{proname}')} (database {printable_name(dbname)})"
        )


def _refuse_added_system_objects(conn: psycopg.Connection[tuple[object, ...]], dbname: str) -> None:
    """Refuse functions and operators added to pg_catalog after initdb (outside extensions).

    pg_catalog is searched first by every session, so a function put there (or a built-in
    deleted and re-created, say `pg_is_in_recovery()` in PL/pgSQL running `COPY … TO
    PROGRAM`) runs in any session that calls that name, pgro's superuser sessions included.
    A C function there is left to the probin rule (old-style language handlers live there).
    The queries use no operator or function: those are what is being checked; rows are
    filtered here instead.
    """
    members = {
        (int(str(classid)), int(str(objid)))
        for classid, objid, deptype in conn.execute(
            "SELECT classid, objid, deptype FROM pg_catalog.pg_depend"
        ).fetchall()
        if deptype == "e"
    }
    added = [
        f"function {name}"
        for oid, name, namespace, lang in conn.execute(
            "SELECT oid, proname, pronamespace, prolang FROM pg_catalog.pg_proc"
        ).fetchall()
        if int(str(namespace)) == PG_CATALOG_NAMESPACE_OID
        and int(str(oid)) >= FIRST_NORMAL_OBJECT_ID
        and int(str(lang)) != C_LANGUAGE_OID
        and (PG_PROC_OID, int(str(oid))) not in members
    ]
    added += [
        f"operator {name}"
        for oid, name, namespace in conn.execute(
            "SELECT oid, oprname, oprnamespace FROM pg_catalog.pg_operator"
        ).fetchall()
        if int(str(namespace)) == PG_CATALOG_NAMESPACE_OID
        and int(str(oid)) >= FIRST_NORMAL_OBJECT_ID
        and (PG_OPERATOR_OID, int(str(oid))) not in members
    ]
    if added:
        shown = ", ".join(printable_name(str(a)) for a in sorted(added)[:10])
        raise CatalogGuardFailed(
            f"database {printable_name(dbname)} has {len(added)} functions or operators added "
            f"to the system schema pg_catalog ({shown}): they would run in place of built-ins "
            "in every session, pgro's included, so the snapshot is not served. If they are "
            "yours, move them to another schema on the source"
        )


def neutralise_catalog(conninfo_for: Callable[[str], str]) -> CatalogGuardResult:
    """Remove stored settings that load code, disable event triggers and make C functions
    with a library outside $libdir unloadable, in every database that accepts connections.

    `conninfo_for(dbname)` returns a libpq connection string for a **superuser** on the
    restored server (it is used with `session.connect`, whose startup options keep the
    stored settings from applying to these sessions). Idempotent. Raises
    `CatalogGuardFailed` (reason `UnsafeSnapshot`) if a database cannot be checked.
    """
    import psycopg

    result = CatalogGuardResult()
    current = "postgres"
    try:
        try:
            conn = _connect(conninfo_for("postgres"))
        except psycopg.OperationalError as exc:
            if "does not exist" not in str(exc):
                raise
            current = "template1"
            conn = _connect(conninfo_for("template1"))
        with conn:
            # First, before any query that resolves an operator or function by name.
            _refuse_added_system_objects(conn, current)
            _reset_stored_settings(conn, result)
            databases = sorted(
                str(name)
                for name, allowed in conn.execute(
                    "SELECT datname, datallowconn FROM pg_catalog.pg_database"
                ).fetchall()
                if allowed is True
            )
        for dbname in databases:
            current = dbname
            with _connect(conninfo_for(dbname)) as db:
                _refuse_added_system_objects(db, dbname)
                _disable_event_triggers(db, dbname, result)
                _refuse_foreign_libraries(db, dbname, result)
    except psycopg.Error as exc:
        raise CatalogGuardFailed(
            f"could not neutralise the restored catalog in database "
            f"{printable_name(current)}: {str(exc).strip()}"
        ) from exc
    return result
