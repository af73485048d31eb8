"""Login roles of a restored cluster: the analytics user and `extraUsers`.

Run against every restore once its server is up, connected as the bootstrap superuser over
the private socket (reference restore-pipeline.md §4.3 steps 14 and 18-19, §4.6, §4.8, §9
items 14 and 17). What each role may do is documented in docs/roles.md.

1. **Restored passwords are neutralised**: every login role from the source cluster except
   the bootstrap superuser and the roles pgro manages loses its password, so source-cluster
   accounts cannot log in over TCP.
2. **Every managed role is reset to a fixed state** even when the snapshot had a role of
   that name: attributes (never SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS),
   memberships, per-role settings, password, and in every connectable database the objects
   it owned (reassigned to the bootstrap superuser) and every privilege granted to it.
3. **The analytics user** then gets, when read-only, `pg_read_all_data` (PostgreSQL ≥ 14)
   or USAGE and SELECT on every application schema, table and sequence (≤ 13); when the
   replica must write (`readOnly: false`, persistent schemas, redaction, migrations), DML on
   every application table and sequence, CREATE and TEMP on each database, CREATE on each
   application schema and ownership of the persistent schemas. In both cases EXECUTE on the
   application functions that run as their caller. Never SUPERUSER.
4. **extraUsers** get the reference's current semantics: non-superuser LOGIN roles with no
   memberships, read-only sessions, and in every connectable database `CONNECT` plus
   `USAGE`/`SELECT` (and default privileges) on the schemas they list, after `PUBLIC` has
   lost access to every non-system schema.
5. **Read-only holds at the server, not per session**: `PUBLIC` loses every write path a
   session could use after `SET default_transaction_read_only = off` (CREATE and TEMP on
   each database, CREATE on schemas, write grants on tables and sequences, EXECUTE on
   SECURITY DEFINER functions, on large-object writers and on restricted built-ins a
   snapshot re-granted, SET on parameters). The role setting `default_transaction_read_only
   = on` stays as a convenience only.

Every write runs after `SET default_transaction_read_only = off`: the restored server may be
read-only by default. pgro's sessions start with the safe settings of pgro.postgres.session,
so nothing the restore names is loaded into them. Identifiers are quoted with
`psycopg.sql.Identifier`; passwords are hashed to a SCRAM verifier on the client (so the plain
text never reaches the server, its logs or `pg_stat_statements`) and sent with
`psycopg.sql.Literal`. Reports and exceptions name roles and databases, never passwords.
Running it again on the same cluster converges to the same state.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pgro.api.users import ExtraUser
from pgro.core.secrets import Scrubber
from pgro.postgres.catalog_guard import CatalogGuardFailed, neutralise_catalog

if TYPE_CHECKING:
    # Imported where used, as in pgro.postgres.health: psycopg is slow to import.
    import psycopg
    from psycopg import sql

PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 32
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "pgro-users"
MAINTENANCE_DATABASES = ("postgres", "template1")
READ_ALL_DATA_ROLE = "pg_read_all_data"

# Schemas that are the server's own: catalogs, TOAST and temporary schemas.
_USER_SCHEMA = "n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'"
# Routines per GRANT statement when handing PUBLIC's EXECUTE to the analytics user.
_GRANT_BATCH = 500
# pg_default_acl.defaclobjtype -> the object kind in ALTER DEFAULT PRIVILEGES.
_DEFAULT_ACL_KINDS = {
    "r": "TABLES",
    "S": "SEQUENCES",
    "f": "FUNCTIONS",
    "T": "TYPES",
    "n": "SCHEMAS",
}

# Large-object functions that create or change data. PUBLIC may execute them by default;
# lo_import/lo_export (server files) are restricted by default and never granted.
LARGE_OBJECT_WRITERS = (
    "lo_creat",
    "lo_create",
    "lo_from_bytea",
    "lo_put",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
    "lo_unlink",
)
LARGE_OBJECT_SERVER_FILES = ("lo_import", "lo_export")
# Relation privileges that change data or definitions (`MAINTAIN` from 17): all but SELECT.
# On a sequence USAGE and UPDATE both allow nextval.
_WRITE_PRIVILEGES = frozenset(
    {"INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN", "USAGE"}
)
# What the write-capable analytics user may do to application tables and sequences. Not
# TRIGGER (a trigger would run as whoever writes next, pgro's superuser included) and not
# REFERENCES; not on views or foreign tables (a write through a view is checked as the
# view's owner, possibly a superuser).
_TABLE_WRITE = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE"
_SEQUENCE_WRITE = "USAGE, SELECT, UPDATE"
# C symbols that reach server files, programs, other sessions or pages on disk whatever name
# a function was given: the restricted built-ins and the contrib functions their extensions
# revoke from PUBLIC. A snapshot can bind them to a function in an application schema; such
# a function is never handed out.
_RESTRICTED_SYMBOLS = (
    r"^(pg_read_|pg_ls_|pg_stat_file|be_lo_|lo_import|lo_export|pg_file_|pg_logdir_ls"
    r"|pg_logfile_rotate|pg_rotate_logfile|pg_reload_conf|pg_promote|pg_signal_backend"
    r"|pg_terminate_backend|pg_cancel_backend|pg_create_restore_point|pg_switch_wal"
    r"|pg_switch_xlog|pg_(start|stop)_backup|pg_backup_|pg_replication_|pg_drop_replication"
    r"|pg_create_(logical|physical)_replication|pg_import_system_collations|pg_stat_reset"
    r"|pg_stat_statements_reset|pg_truncate_visibility_map|heap_force_|pg_wal_replay_"
    r"|pg_log_backend_memory_contexts)"
)
# The built-ins (their `internal` symbols) initdb restricts by ACL alone: server files,
# backups, configuration, WAL replay, replication origins. PUBLIC never executes them on a
# fresh cluster (PostgreSQL 13's replication-origin functions check for a superuser
# themselves), so PUBLIC loses them even when a snapshot cleared their ACL in pg_proc.
_RESTRICTED_BUILTINS = (
    r"^(be_lo_import|be_lo_export|pg_read_file_v2|pg_read_file_all|pg_read_file_off_len"
    r"|pg_read_binary_file|pg_ls_|pg_stat_file|pg_reload_conf$|pg_rotate_logfile_v2"
    r"|pg_promote|pg_backup_start$|pg_backup_stop|pg_start_backup|pg_stop_backup"
    r"|pg_create_restore_point|pg_switch_wal|pg_wal_replay_|pg_stat_reset"
    r"|show_all_file_settings|pg_hba_file_rules|pg_ident_file_mappings|pg_current_logfile"
    r"|pg_log_backend_memory_contexts|pg_replication_origin_|pg_config$"
    r"|pg_get_shmem_allocations|pg_get_backend_memory_contexts)"
)
# Functions that run as their caller in a language that cannot reach outside the database:
# trusted languages (sql, plpgsql, …); C from the server's own library directory (extensions
# such as PostGIS, pgcrypto) and `internal` aliases of built-ins PUBLIC may call, both except
# the restricted symbols. Untrusted languages (plpython3u; C from any other path, such as a
# module shipped inside the restored data directory) run whatever the snapshot wrote, so
# they are never handed out.
_CALLER_ROUTINE = (
    "NOT p.prosecdef AND (l.lanpltrusted "
    r"OR (l.lanname = 'c' AND p.probin ~ '^\$libdir/[^/]+$' "
    f"AND p.prosrc !~ '{_RESTRICTED_SYMBOLS}') "
    f"OR (l.lanname = 'internal' AND p.prosrc !~ '{_RESTRICTED_SYMBOLS}' "
    "AND EXISTS (SELECT 1 FROM pg_proc b WHERE b.pronamespace = 'pg_catalog'::regnamespace "
    "AND b.prolang = p.prolang AND b.prosrc = p.prosrc AND b.proacl IS NULL)))"
)

RoleAction = Literal["created", "reset"]
# pg_read_all_data: read-only, PostgreSQL ≥ 14. select_grants: read-only on ≤ 13 (USAGE and
# SELECT on application schemas). read_write: DML, CREATE and the persistent schemas.
AnalyticsPrivilege = Literal["pg_read_all_data", "select_grants", "read_write"]


def analytics_privilege(read_only: bool, server_version_num: int) -> AnalyticsPrivilege:
    """How the analytics user reads or writes; never a superuser."""
    if not read_only:
        return "read_write"
    return "pg_read_all_data" if server_version_num >= 140000 else "select_grants"


def generate_password() -> str:
    """32 characters from [A-Za-z0-9], from the `secrets` generator (reference §4.7)."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


@dataclass(frozen=True)
class RoleCredentials:
    username: str
    password: str = field(repr=False)


class ProvisioningFailed(Exception):
    """Provisioning the login roles failed. `reason` is a CamelCase condition reason; the
    message names the role and/or database and the cause, never a password."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        role: str | None = None,
        database: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.role = role
        self.database = database


@dataclass(frozen=True)
class SchemaGrants:
    """What one extra user was given in one database."""

    database: str
    granted: tuple[str, ...]  # listed schemas present here: USAGE, SELECT, default privileges
    skipped: tuple[str, ...]  # listed schemas absent from this database

    def as_dict(self) -> dict[str, object]:
        return {
            "database": self.database,
            "granted": list(self.granted),
            "skipped": list(self.skipped),
        }


@dataclass
class AnalyticsOutcome:
    name: str
    action: RoleAction
    privilege: AnalyticsPrivilege
    read_only_sessions: bool
    memberships_revoked: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "action": self.action,
            "privilege": self.privilege,
            "read_only_sessions": self.read_only_sessions,
            "memberships_revoked": list(self.memberships_revoked),
        }


@dataclass
class ExtraUserOutcome:
    name: str
    action: RoleAction
    schemas: tuple[str, ...]  # as listed in the spec (empty for a bare name)
    memberships_revoked: list[str] = field(default_factory=list)
    grants: list[SchemaGrants] = field(default_factory=list)

    @property
    def schemas_missing(self) -> list[str]:
        """Listed schemas present in no database: worth a warning in status and logs."""
        found = {s for g in self.grants for s in g.granted}
        return [s for s in self.schemas if s not in found]

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "action": self.action,
            "schemas": list(self.schemas),
            "schemas_missing": self.schemas_missing,
            "memberships_revoked": list(self.memberships_revoked),
            "grants": [g.as_dict() for g in self.grants],
        }


@dataclass
class ProvisionReport:
    """What provisioning did, for status and logs. Holds no secret."""

    server_version_num: int
    analytics: AnalyticsOutcome
    extra_users: list[ExtraUserOutcome] = field(default_factory=list)
    passwords_neutralised: list[str] = field(default_factory=list)
    ignored_extra_users: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    # What the catalog guard neutralised first (names only), pgro.postgres.catalog_guard.
    catalog_notes: list[str] = field(default_factory=list)

    def extra_user(self, name: str) -> ExtraUserOutcome:
        return next(u for u in self.extra_users if u.name == name)

    def as_dict(self) -> dict[str, object]:
        return {
            "server_version_num": self.server_version_num,
            "analytics": self.analytics.as_dict(),
            "extra_users": [u.as_dict() for u in self.extra_users],
            "passwords_neutralised": list(self.passwords_neutralised),
            "ignored_extra_users": list(self.ignored_extra_users),
            "databases": list(self.databases),
            "catalog_notes": list(self.catalog_notes),
        }

    def summary(self) -> str:
        a = self.analytics
        parts = [
            f"analytics user {a.name} {a.action} ({a.privilege}"
            + (", read-only sessions)" if a.read_only_sessions else ")"),
            f"{len(self.extra_users)} extra users",
            f"{len(self.passwords_neutralised)} restored passwords removed",
            f"grants in {len(self.databases)} databases",
        ]
        missing = [
            f"{u.name}: {', '.join(u.schemas_missing)}"
            for u in self.extra_users
            if u.schemas_missing
        ]
        if missing:
            parts.append("schemas not found (" + "; ".join(missing) + ")")
        parts.extend(self.catalog_notes)
        return "; ".join(parts)


def _describe(exc: Exception, scrub: Scrubber) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return scrub(f"{text} (SQLSTATE {sqlstate})" if sqlstate else text)


@contextmanager
def _step(
    scrub: Scrubber,
    reason: str,
    what: str,
    *,
    role: str | None = None,
    database: str | None = None,
) -> Iterator[None]:
    """Turn a psycopg error into ProvisioningFailed naming `what`, with secrets scrubbed."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise ProvisioningFailed(
            reason, f"{what}: {_describe(exc, scrub)}", role=role, database=database
        ) from None


@dataclass(frozen=True)
class _ManagedUser:
    spec: ExtraUser
    credentials: RoleCredentials

    @property
    def name(self) -> str:
        return self.credentials.username

    @property
    def schemas(self) -> tuple[str, ...]:
        return tuple(self.spec.schemas or ())


def _plan_users(
    analytics: RoleCredentials,
    extra_users: Sequence[tuple[ExtraUser, RoleCredentials]],
    bootstrap_superuser: str,
) -> tuple[list[_ManagedUser], list[str]]:
    """Validate the input: the managed users to provision, and the names ignored."""

    def invalid(message: str, role: str | None = None) -> ProvisioningFailed:
        return ProvisioningFailed("InvalidUsers", message, role=role)

    if not analytics.username.strip() or analytics.username != analytics.username.strip():
        raise invalid(f"invalid analytics username {analytics.username!r}")
    if not analytics.password:
        raise invalid("the analytics user has an empty password", analytics.username)
    if analytics.username == bootstrap_superuser:
        raise invalid(
            f"the analytics user {analytics.username!r} is the cluster's bootstrap superuser; "
            "choose another analyticsUsername",
            analytics.username,
        )
    kept: list[_ManagedUser] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for spec, creds in extra_users:
        name = spec.name.strip()
        if not name:
            continue
        if name == analytics.username or name in seen:
            ignored.append(name)
            continue
        if creds.username != name:
            raise invalid(
                f"extra user {name!r} was given the credentials of {creds.username!r}", name
            )
        if name == bootstrap_superuser:
            raise invalid(
                f"extra user {name!r} is the cluster's bootstrap superuser and cannot be "
                "provisioned as a read-only user",
                name,
            )
        if not creds.password:
            raise invalid(f"extra user {name!r} has an empty password", name)
        seen.add(name)
        kept.append(_ManagedUser(spec, creds))
    return kept, ignored


def _connect(
    conninfo_for: Callable[[str], str], dbname: str, scrub: Scrubber
) -> psycopg.Connection[tuple[object, ...]]:
    """A superuser session in `dbname` that may write whatever the server's default, with
    pgro.postgres.session's safe settings in force from its start."""
    from pgro.postgres.session import connect

    with _step(scrub, "ConnectionFailed", f"cannot connect to database {dbname}", database=dbname):
        conn = connect(
            conninfo_for(dbname),
            application_name=APPLICATION_NAME,
            connect_timeout=CONNECT_TIMEOUT_S,
        )
    try:
        with _step(scrub, "ConnectionFailed", f"cannot prepare a session in {dbname}"):
            # §9 item 14: a read-only restore rejects writes unless the session opts out.
            conn.execute("SET default_transaction_read_only = off")
            # Restored per-role or per-database settings must not cut our statements short,
            # and regprocedure output must be schema-qualified.
            conn.execute("SET statement_timeout = 0")
            conn.execute("SET lock_timeout = 0")
            conn.execute("SET search_path = pg_catalog")
            row = conn.execute("SELECT current_user, current_setting('is_superuser')").fetchone()
        if row is None or row[1] != "on":
            raise ProvisioningFailed(
                "NotSuperuser",
                f"the provisioning session in {dbname} runs as {row[0] if row else '?'}, "
                "which is not a superuser",
                database=dbname,
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _maintenance_connection(
    conninfo_for: Callable[[str], str], scrub: Scrubber
) -> psycopg.Connection[tuple[object, ...]]:
    last: ProvisioningFailed | None = None
    for dbname in MAINTENANCE_DATABASES:
        try:
            return _connect(conninfo_for, dbname, scrub)
        except ProvisioningFailed as exc:
            last = exc
            if exc.reason != "ConnectionFailed" or "does not exist" not in exc.message:
                break
    assert last is not None
    raise last


def _rows(
    conn: psycopg.Connection[tuple[object, ...]],
    query: str | sql.Composed,
    params: Sequence[object] | None = None,
) -> list[tuple[str, ...]]:
    return [
        tuple("" if v is None else str(v) for v in row)
        for row in conn.execute(query, params).fetchall()
    ]


def _neutralise_passwords(
    conn: psycopg.Connection[tuple[object, ...]], keep: Sequence[str], scrub: Scrubber
) -> list[str]:
    """`PASSWORD NULL` for every other login role that has one (§4.3 step 14, §9 item 17).
    Unlike the reference, a failure here fails provisioning: a source account left able to
    log in is not a state to serve."""
    from psycopg import sql

    with _step(scrub, "PasswordNeutralisationFailed", "cannot list restored login roles"):
        names = [
            r[0]
            for r in _rows(
                conn,
                "SELECT rolname FROM pg_authid WHERE rolcanlogin AND rolpassword IS NOT NULL "
                "AND rolname <> ALL(%s) ORDER BY rolname",
                [list(keep)],
            )
        ]
    for name in names:
        with _step(
            scrub,
            "PasswordNeutralisationFailed",
            f"cannot remove the restored password of role {name}",
            role=name,
        ):
            conn.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD NULL").format(sql.Identifier(name)))
    return names


def _reset_role(
    conn: psycopg.Connection[tuple[object, ...]],
    creds: RoleCredentials,
    *,
    read_only_sessions: bool,
    grant_roles: Sequence[str],
    server_version_num: int,
    scrub: Scrubber,
) -> tuple[RoleAction, list[str]]:
    """Create or reset a managed login role to exactly the given state.

    Returns whether it was created, and the memberships it had (now revoked)."""
    from psycopg import sql

    name = creds.username
    role = sql.Identifier(name)

    def step(what: str) -> AbstractContextManager[None]:
        return _step(scrub, "RoleProvisioningFailed", f"{what} role {name}", role=name)

    with step("cannot look up"):
        exists = bool(_rows(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", [name]))
    algorithm = b"scram-sha-256" if server_version_num >= 100000 else b"md5"
    with step("cannot hash the password of"):
        verifier = conn.pgconn.encrypt_password(
            creds.password.encode(), name.encode(), algorithm
        ).decode()
    scrub.add(verifier)
    # Never a superuser, whatever the replica: a superuser has COPY … TO PROGRAM, a shell as
    # the account every restore runs as.
    attributes = sql.SQL(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT "
        "CONNECTION LIMIT -1 VALID UNTIL 'infinity' PASSWORD {}"
    ).format(sql.Literal(verifier))
    verb = "ALTER" if exists else "CREATE"
    with step("cannot create" if not exists else "cannot reset the attributes of"):
        conn.execute(sql.SQL(verb + " ROLE {} WITH {}").format(role, attributes))

    with step("cannot revoke the memberships of"):
        memberships = _rows(
            conn,
            "SELECT r.rolname, coalesce(g.rolname, '') FROM pg_auth_members m "
            "JOIN pg_roles r ON r.oid = m.roleid LEFT JOIN pg_roles g ON g.oid = m.grantor "
            "WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = %s) "
            "ORDER BY r.rolname, g.rolname",
            [name],
        )
        for granted, grantor in memberships:
            if server_version_num >= 160000 and grantor:
                # From 16 a membership is one grant per grantor, and a plain REVOKE only
                # removes the current user's (or the bootstrap superuser's).
                conn.execute(
                    sql.SQL("REVOKE {} FROM {} GRANTED BY {} CASCADE").format(
                        sql.Identifier(granted), role, sql.Identifier(grantor)
                    )
                )
            else:
                conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), role))
        left = _rows(
            conn,
            "SELECT m.roleid::regrole::text FROM pg_auth_members m "
            "WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = %s)",
            [name],
        )
    if left:
        raise ProvisioningFailed(
            "RoleProvisioningFailed",
            f"role {name} is still a member of {', '.join(r[0] for r in left)} after revoking "
            "its memberships",
            role=name,
        )

    with step("cannot reset the settings of"):
        conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(role))
        for (dbname,) in _rows(
            conn,
            "SELECT d.datname FROM pg_db_role_setting s "
            "JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE s.setrole = (SELECT oid FROM pg_roles WHERE rolname = %s) ORDER BY 1",
            [name],
        ):
            conn.execute(
                sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(
                    role, sql.Identifier(dbname)
                )
            )
    with step("cannot grant privileges to"):
        for granted in grant_roles:
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(granted), role))
        if read_only_sessions:
            conn.execute(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role)
            )
    return ("reset" if exists else "created"), [m[0] for m in memberships]


def _connectable_databases(
    conn: psycopg.Connection[tuple[object, ...]], scrub: Scrubber
) -> list[str]:
    with _step(scrub, "GrantProvisioningFailed", "cannot list the databases"):
        return [
            r[0]
            for r in _rows(
                conn,
                # datconnlimit -2 marks a database left invalid by an interrupted DROP.
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                "AND datconnlimit <> -2 ORDER BY datname",
            )
        ]


def _revoke_public_parameter_privileges(
    conn: psycopg.Connection[tuple[object, ...]], server_version_num: int
) -> list[str]:
    """PostgreSQL ≥ 15 stores `GRANT SET ON PARAMETER`: a snapshot granting PUBLIC SET on
    `session_preload_libraries` would let any role load a library. Nothing is granted on
    parameters by default, so PUBLIC loses every such grant."""
    from psycopg import sql

    if server_version_num < 150000:
        return []
    names = [
        r[0]
        for r in _rows(
            conn,
            "SELECT p.parname FROM pg_parameter_acl p WHERE EXISTS (SELECT 1 FROM "
            "aclexplode(p.paracl) a WHERE a.grantee = 0) ORDER BY 1",
        )
    ]
    for name in names:
        conn.execute(sql.SQL("REVOKE ALL ON PARAMETER {} FROM PUBLIC").format(sql.Identifier(name)))
    return names


def _close_template_databases(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """PUBLIC may connect to `template1` by default, where it could create temporary
    tables, large objects and (up to 14) tables in `public`. Provisioning grants in the
    databases clients use, not in templates, so clients lose CONNECT on the templates."""
    from psycopg import sql

    names = [
        r[0]
        for r in _rows(
            conn,
            "SELECT d.datname FROM pg_database d WHERE d.datistemplate AND EXISTS (SELECT 1 "
            "FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a "
            "WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT') ORDER BY 1",
        )
    ]
    for name in names:
        conn.execute(
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name))
        )
    return names


def reset_statements(roles: Sequence[str]) -> list[sql.Composed]:
    """In one database: the roles own nothing (their objects go to the bootstrap superuser,
    who runs this) and hold no privilege granted to them by name, here or on shared objects
    (databases, parameters). Memberships are handled by _reset_role."""
    from psycopg import sql

    statements: list[sql.Composed] = []
    for name in roles:
        role = sql.Identifier(name)
        statements.append(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
        statements.append(sql.SQL("DROP OWNED BY {}").format(role))
    return statements


def reset_in_databases(
    conninfo_for: Callable[[str], str],
    databases: Sequence[str],
    roles: Sequence[str],
    scrub: Scrubber,
    whose: str,
) -> None:
    """reset_statements for `roles` in each database, one transaction each. `whose` names
    the roles in the error ("the login roles")."""
    for dbname in databases:
        with (
            _connect(conninfo_for, dbname, scrub) as db,
            _step(
                scrub,
                "GrantProvisioningFailed",
                f"cannot reset the objects and privileges of {whose} in database {dbname}",
                database=dbname,
            ),
            db.transaction(),
        ):
            for statement in reset_statements(roles):
                db.execute(statement)


@dataclass(frozen=True)
class DatabaseCatalog:
    """What one database holds that its grants depend on (read from its catalogs)."""

    name: str
    schema_owner: dict[str, str]  # application schema -> who creates tables there
    writable_tables: tuple[str, ...] = ()  # application tables (relkind r, p), regclass text
    caller_routines: tuple[str, ...] = ()  # application routines that run as their caller
    # Relations anywhere with write privileges granted to PUBLIC: (regclass, is sequence,
    # privileges).
    public_relation_writes: tuple[tuple[str, bool, tuple[str, ...]], ...] = ()
    # Routines anywhere PUBLIC must not execute: SECURITY DEFINER, large-object writers,
    # built-ins whose restricted default a snapshot re-granted to PUBLIC.
    public_routine_revokes: tuple[str, ...] = ()
    large_object_writers: tuple[str, ...] = ()  # pg_catalog signatures present here

    @property
    def schemas(self) -> list[str]:
        return list(self.schema_owner)


def _read_catalog(conn: psycopg.Connection[tuple[object, ...]], dbname: str) -> DatabaseCatalog:
    # The schema owner is who creates tables there later; for a schema owned by the
    # pg_database_owner pseudo-role (public, from 15) that is the database's owner.
    schema_owner = {
        row[0]: row[1]
        for row in _rows(
            conn,
            "SELECT n.nspname, CASE WHEN o.rolname = 'pg_database_owner' "
            "THEN (SELECT r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
            "WHERE d.datname = current_database()) ELSE o.rolname END "
            "FROM pg_namespace n JOIN pg_roles o ON o.oid = n.nspowner "
            f"WHERE {_USER_SCHEMA} ORDER BY n.nspname",
        )
    }
    tables = tuple(
        r[0]
        for r in _rows(
            conn,
            "SELECT c.oid::regclass::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p') ORDER BY 1",
        )
    )
    routines = tuple(
        r[0]
        for r in _rows(
            conn,
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "JOIN pg_language l ON l.oid = p.prolang "
            f"WHERE {_USER_SCHEMA} AND {_CALLER_ROUTINE} ORDER BY 1",
        )
    )
    relation_writes: list[tuple[str, bool, tuple[str, ...]]] = []
    for relation, kind, privileges in _rows(
        conn,
        # Table-level and column-level grants; revoking at table level removes both.
        # pg_settings' UPDATE for PUBLIC is set_config(), a session setting.
        "SELECT c.oid::regclass::text, c.relkind::text, "
        "string_agg(DISTINCT a.privilege_type, ',' ORDER BY a.privilege_type) "
        "FROM pg_class c CROSS JOIN LATERAL (SELECT privilege_type FROM "
        "aclexplode(c.relacl) WHERE grantee = 0 UNION ALL SELECT x.privilege_type FROM "
        "pg_attribute t, aclexplode(t.attacl) x WHERE t.attrelid = c.oid AND x.grantee = 0) a "
        "WHERE a.privilege_type <> 'SELECT' AND c.oid <> 'pg_catalog.pg_settings'::regclass "
        "GROUP BY c.oid, c.relkind ORDER BY 1",
    ):
        kept = tuple(p for p in privileges.split(",") if p in _WRITE_PRIVILEGES)
        if kept:
            relation_writes.append((relation, kind == "S", kept))
    revokes = tuple(
        r[0]
        for r in _rows(
            conn,
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "WHERE EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, "
            "acldefault('f', p.proowner))) a WHERE a.grantee = 0 "
            "AND a.privilege_type = 'EXECUTE') AND (p.prosecdef "
            "OR (p.pronamespace = 'pg_catalog'::regnamespace AND (p.proname = ANY(%s) "
            # A built-in with an explicit ACL is one initdb restricted (none of them lists
            # PUBLIC on a fresh cluster): PUBLIC in it is the snapshot's doing.
            "OR p.proacl IS NOT NULL OR (p.prolang = "
            "(SELECT oid FROM pg_language WHERE lanname = 'internal') "
            f"AND p.prosrc ~ '{_RESTRICTED_BUILTINS}')))) ORDER BY 1",
            [[*LARGE_OBJECT_WRITERS, *LARGE_OBJECT_SERVER_FILES]],
        )
    )
    writers = tuple(
        r[0]
        for r in _rows(
            conn,
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY(%s) "
            "ORDER BY 1",
            [list(LARGE_OBJECT_WRITERS)],
        )
    )
    return DatabaseCatalog(
        name=dbname,
        schema_owner=schema_owner,
        writable_tables=tables,
        caller_routines=routines,
        public_relation_writes=tuple(relation_writes),
        public_routine_revokes=revokes,
        large_object_writers=writers,
    )


def _batches(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _GRANT_BATCH):
        yield items[start : start + _GRANT_BATCH]


def public_lockdown_statements(
    catalog: DatabaseCatalog, *, extra_users: Sequence[str], server_version_num: int
) -> list[sql.Composed]:
    """Close every write path PUBLIC has in one database, so that a session that turns
    `default_transaction_read_only` off still cannot write; and take the application
    schemas away from PUBLIC and the extra users (§4.8)."""
    from psycopg import sql

    routine = sql.SQL("ROUTINE" if server_version_num >= 110000 else "FUNCTION")
    routines = sql.SQL("ROUTINES" if server_version_num >= 110000 else "FUNCTIONS")
    statements: list[sql.Composed] = [
        # No new schemas, extensions or temporary tables (CONNECT stays as it was).
        sql.SQL("REVOKE CREATE, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(catalog.name)
        )
    ]
    if catalog.schema_owner:
        schemas = sql.SQL(", ").join([sql.Identifier(s) for s in catalog.schemas])
        grantees = sql.SQL(", ").join(
            [sql.SQL("PUBLIC"), *(sql.Identifier(n) for n in extra_users)]
        )
        # CREATE in `public` (PUBLIC's by default up to 14) goes with the rest.
        statements.append(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(schemas, grantees))
        for kind in (sql.SQL("TABLES"), sql.SQL("SEQUENCES"), routines):
            statements.append(
                sql.SQL("REVOKE ALL ON ALL {} IN SCHEMA {} FROM {}").format(kind, schemas, grantees)
            )
    for relation, is_sequence, privileges in catalog.public_relation_writes:
        statements.append(
            sql.SQL("REVOKE {} ON {} {} FROM PUBLIC").format(
                sql.SQL(", ").join([sql.SQL(p) for p in privileges if p in _WRITE_PRIVILEGES]),
                sql.SQL("SEQUENCE" if is_sequence else "TABLE"),
                # regclass output is produced and quoted by the server.
                sql.SQL(relation),
            )
        )
    for batch in _batches(catalog.public_routine_revokes):
        statements.append(
            sql.SQL("REVOKE EXECUTE ON {} {} FROM PUBLIC").format(
                routine, sql.SQL(", ").join([sql.SQL(s) for s in batch])
            )
        )
    return statements


def analytics_grant_statements(
    catalog: DatabaseCatalog,
    *,
    analytics: str,
    privilege: AnalyticsPrivilege,
    persistent_schemas: Sequence[str],
    server_version_num: int,
) -> list[sql.Composed]:
    """The analytics user's privileges in one database, after reset_statements."""
    from psycopg import sql

    who = sql.Identifier(analytics)
    routine = sql.SQL("ROUTINE" if server_version_num >= 110000 else "FUNCTION")
    database = sql.Identifier(catalog.name)
    schemas = sql.SQL(", ").join([sql.Identifier(s) for s in catalog.schemas])
    statements: list[sql.Composed] = []
    if privilege == "read_write":
        statements.append(
            sql.SQL("GRANT CONNECT, CREATE, TEMPORARY ON DATABASE {} TO {}").format(database, who)
        )
    else:
        statements.append(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, who))
    if catalog.schema_owner and privilege != "pg_read_all_data":
        statements.append(
            sql.SQL("GRANT USAGE{} ON SCHEMA {} TO {}").format(
                sql.SQL(", CREATE" if privilege == "read_write" else ""), schemas, who
            )
        )
        # Views, materialized views and foreign tables are read; only tables are written.
        statements.append(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(schemas, who)
        )
        statements.append(
            sql.SQL("GRANT {} ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
                sql.SQL(_SEQUENCE_WRITE if privilege == "read_write" else "SELECT"),
                schemas,
                who,
            )
        )
    if privilege == "read_write":
        for batch in _batches(catalog.writable_tables):
            statements.append(
                sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                    sql.SQL(_TABLE_WRITE), sql.SQL(", ").join([sql.SQL(t) for t in batch]), who
                )
            )
        for batch in _batches(catalog.large_object_writers):
            statements.append(
                sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
                    sql.SQL(", ").join([sql.SQL(s) for s in batch]), who
                )
            )
        for name in persistent_schemas:
            if name in catalog.schema_owner:
                # Dropping and re-creating it (the persistent-schema migration) needs
                # ownership; dropping a schema drops what is in it whoever owns that.
                statements.append(
                    sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(name), who)
                )
    # Application and extension functions (PostGIS, pgcrypto, …) that run as the caller:
    # they can do nothing the caller could not. SECURITY DEFINER ones are never handed out.
    for batch in _batches(catalog.caller_routines):
        statements.append(
            sql.SQL("GRANT EXECUTE ON {} {} TO {}").format(
                routine, sql.SQL(", ").join([sql.SQL(s) for s in batch]), who
            )
        )
    return statements


def _apply_database_grants(
    conn: psycopg.Connection[tuple[object, ...]],
    catalog: DatabaseCatalog,
    *,
    analytics: str,
    privilege: AnalyticsPrivilege,
    persistent_schemas: Sequence[str],
    users: Sequence[_ManagedUser],
    server_version_num: int,
) -> dict[str, SchemaGrants]:
    """One database's privileges, in the caller's transaction. Returns grants per user."""
    from psycopg import sql

    user_names = [u.name for u in users]
    for statement in public_lockdown_statements(
        catalog, extra_users=user_names, server_version_num=server_version_num
    ):
        conn.execute(statement)
    if users:
        extra = sql.SQL(", ").join([sql.Identifier(n) for n in user_names])
        for owner, nspname, objtype in _rows(
            conn,
            "SELECT r.rolname, coalesce(n.nspname, ''), d.defaclobjtype::text "
            "FROM pg_default_acl d JOIN pg_roles r ON r.oid = d.defaclrole "
            "LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace "
            "WHERE EXISTS (SELECT 1 FROM aclexplode(d.defaclacl) a "
            "JOIN pg_roles g ON g.oid = a.grantee WHERE g.rolname = ANY(%s)) "
            "ORDER BY 1, 2, 3",
            [user_names],
        ):
            acl_kind = _DEFAULT_ACL_KINDS.get(objtype)
            if acl_kind is None:
                continue  # a kind this server knows and we do not: leave it
            in_schema = (
                sql.SQL(" IN SCHEMA {}").format(sql.Identifier(nspname)) if nspname else sql.SQL("")
            )
            conn.execute(
                sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}{} REVOKE ALL ON {} FROM {}").format(
                    sql.Identifier(owner),
                    in_schema,
                    sql.SQL(acl_kind),
                    extra,
                )
            )
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(catalog.name), extra
            )
        )
    for statement in analytics_grant_statements(
        catalog,
        analytics=analytics,
        privilege=privilege,
        persistent_schemas=persistent_schemas,
        server_version_num=server_version_num,
    ):
        conn.execute(statement)

    result: dict[str, SchemaGrants] = {}
    for user in users:
        who = sql.Identifier(user.name)
        granted = [s for s in user.schemas if s in catalog.schema_owner]
        for name in granted:
            schema = sql.Identifier(name)
            owner_id = sql.Identifier(catalog.schema_owner[name])
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, who))
            for kind in (sql.SQL("TABLES"), sql.SQL("SEQUENCES")):
                conn.execute(
                    sql.SQL("GRANT SELECT ON ALL {} IN SCHEMA {} TO {}").format(kind, schema, who)
                )
                conn.execute(
                    sql.SQL(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON {} TO {}"
                    ).format(owner_id, schema, kind, who)
                )
        result[user.name] = SchemaGrants(
            database=catalog.name,
            granted=tuple(granted),
            skipped=tuple(s for s in user.schemas if s not in catalog.schema_owner),
        )
    return result


def provision_users(
    conninfo_for: Callable[[str], str],
    *,
    analytics: RoleCredentials,
    extra_users: Sequence[tuple[ExtraUser, RoleCredentials]],
    read_only: bool,
    bootstrap_superuser: str = "postgres",
    other_managed_roles: Sequence[str] = (),
    persistent_schemas: Sequence[str] = (),
    keep_analytics_ownership: bool = False,
) -> ProvisionReport:
    """Provision the login roles of a running restore; idempotent.

    `keep_analytics_ownership` is for a second run on the same server (the ProvisionUsers
    step before its switchover): the analytics user was reset when the server was
    provisioned, so what it owns since is what pgro's persistent-schema copy created as it
    (the persistent data), which a reset would hand to the superuser. The other roles are
    reset as always (one added to the spec since may be a restored role owning objects).

    `conninfo_for(dbname)` is a libpq conninfo for the bootstrap superuser in that database
    (normally the private socket, `trust`). `read_only` is the replica's effective read-only
    (pgro.core.access.effective_read_only). `persistent_schemas` (spec.persistentSchemas) are
    handed to a write-capable analytics user to own. `other_managed_roles` are login roles
    pgro provisions elsewhere (persistentUsers) whose passwords must survive a re-run, e.g.
    when the grants are re-applied after the persistent-schema migration. Raises
    ProvisioningFailed.
    """
    scrub = Scrubber([analytics.password, *(c.password for _, c in extra_users)])
    users, ignored = _plan_users(analytics, extra_users, bootstrap_superuser)
    managed = [analytics.username, *(u.name for u in users)]

    # Before any other session: stored settings, event triggers and C functions the
    # snapshot's catalog names must not run on provisioning's DDL or on the users' sessions.
    try:
        guard = neutralise_catalog(conninfo_for)
    except CatalogGuardFailed as error:
        raise ProvisioningFailed(error.reason, scrub(str(error))) from None

    with _maintenance_connection(conninfo_for, scrub) as conn:
        version = conn.info.server_version
        privilege = analytics_privilege(read_only, version)
        with (
            _step(scrub, "RoleProvisioningFailed", "cannot provision the login roles"),
            conn.transaction(),
        ):
            # The bootstrap superuser loses its restored password too (the reference keeps
            # it): pgro reaches it over the private socket, and the source's superuser
            # password must not open the restored copy over TCP.
            neutralised = _neutralise_passwords(conn, [*managed, *other_managed_roles], scrub)
            action, revoked = _reset_role(
                conn,
                analytics,
                read_only_sessions=read_only,
                grant_roles=[READ_ALL_DATA_ROLE] if privilege == "pg_read_all_data" else [],
                server_version_num=version,
                scrub=scrub,
            )
            outcome = AnalyticsOutcome(
                name=analytics.username,
                action=action,
                privilege=privilege,
                read_only_sessions=read_only,
                memberships_revoked=revoked,
            )
            outcomes = []
            for user in users:
                action, revoked = _reset_role(
                    conn,
                    user.credentials,
                    read_only_sessions=True,
                    grant_roles=[],
                    server_version_num=version,
                    scrub=scrub,
                )
                outcomes.append(
                    ExtraUserOutcome(user.name, action, user.schemas, memberships_revoked=revoked)
                )
            _revoke_public_parameter_privileges(conn, version)
            _close_template_databases(conn)
        databases = _connectable_databases(conn, scrub)

    # Every database is reset before any is granted: DROP OWNED also revokes privileges on
    # shared objects (CONNECT on the other databases).
    reset = [r for r in managed if not (keep_analytics_ownership and r == analytics.username)]
    reset_in_databases(conninfo_for, databases, reset, scrub, "the login roles")

    for dbname in databases:
        with (
            _connect(conninfo_for, dbname, scrub) as db,
            _step(
                scrub,
                "GrantProvisioningFailed",
                f"cannot apply the user grants in database {dbname}",
                database=dbname,
            ),
            db.transaction(),
        ):
            grants = _apply_database_grants(
                db,
                _read_catalog(db, dbname),
                analytics=analytics.username,
                privilege=privilege,
                persistent_schemas=persistent_schemas,
                users=users,
                server_version_num=version,
            )
        for out in outcomes:
            out.grants.append(grants[out.name])

    return ProvisionReport(
        server_version_num=version,
        analytics=outcome,
        extra_users=outcomes,
        passwords_neutralised=neutralised,
        ignored_extra_users=ignored,
        databases=databases,
        catalog_notes=guard.notes(),
    )
