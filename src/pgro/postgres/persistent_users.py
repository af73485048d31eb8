"""`spec.persistentUsers`: read-only login roles whose passwords survive switchovers.

Provisioned on every switchover, right before the stable endpoint moves to the new restore
(features.md §2.5, reference `persistent_users.rs`), after pgro.postgres.users.provision_users
has run on the same server with these names in `other_managed_roles` (so password
neutralisation spares them, and its catalog guard has already neutralised what the snapshot's
catalog could run on our DDL). In one superuser session per database, each session starting
with `SET default_transaction_read_only = off`:

1. every persistent user is created, or reset when the snapshot or an earlier run left a role
   of that name: `LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION
   NOBYPASSRLS`, a SCRAM verifier computed on the client, no memberships (a source role of the
   same name may be a superuser or a member of `pg_write_all_data`), no per-role settings but
   `default_transaction_read_only = on` and the `search_path` asked for;
2. in every connectable database the role owns nothing and holds no privilege granted to it
   by name (what a source role of that name had goes to the bootstrap superuser, or away);
3. in the main database (pgro.postgres.databases): `CONNECT`, and per read schema present
   there `USAGE`, `SELECT` on its tables and sequences, and default privileges `FOR ROLE` its
   owner (taken from `pg_namespace`), so tables the owner creates later are readable. Absent
   schemas are skipped and reported as `user/schema` for a `PersistentUserSchemaMissing`
   warning.

Running it again converges to the same state. Reports and exceptions name roles, schemas and
databases, never a password.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pgro.api.users import PersistentUser
from pgro.core.secrets import Scrubber
from pgro.postgres.databases import main_database_or_maintenance
from pgro.postgres.users import (
    ProvisioningFailed,
    RoleAction,
    RoleCredentials,
    _connect,
    _connectable_databases,
    _maintenance_connection,
    _reset_role,
    _rows,
    _step,
    reset_in_databases,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

# Warning event reasons the runtimes emit from a report.
SCHEMA_MISSING_EVENT: Final = "PersistentUserSchemaMissing"
IGNORED_EVENT: Final = "PersistentUserIgnored"


@dataclass(frozen=True)
class PersistentUserOutcome:
    name: str
    action: RoleAction
    schemas_granted: tuple[str, ...]
    schemas_missing: tuple[str, ...]
    memberships_revoked: tuple[str, ...] = ()


@dataclass(frozen=True)
class PersistentUsersReport:
    """What provisioning did, for events and logs. Holds no secret."""

    database: str | None  # the main database; None when there was nobody to provision
    users: tuple[PersistentUserOutcome, ...] = ()
    ignored: tuple[str, ...] = ()  # names pgro provisions otherwise (see plan_persistent_users)

    @property
    def missing(self) -> list[str]:
        """`user/schema` for every read schema absent from the main database."""
        return [f"{u.name}/{s}" for u in self.users for s in u.schemas_missing]

    def missing_note(self) -> str:
        return (
            f"read schemas not found in database {self.database}, skipped: "
            f"{', '.join(self.missing)}"
        )

    def ignored_note(self) -> str:
        return (
            f"persistent users {', '.join(self.ignored)} not provisioned: the name is the "
            "bootstrap superuser, the analytics user or an extra user; rename the persistent "
            "user"
        )

    def summary(self) -> str:
        granted = sum(len(u.schemas_granted) for u in self.users)
        parts = [f"{len(self.users)} persistent users in {self.database}, {granted} schema grants"]
        if self.missing:
            parts.append(self.missing_note())
        return "; ".join(parts)


def plan_persistent_users(
    users: Sequence[tuple[PersistentUser, RoleCredentials]],
    *,
    reserved: Sequence[str],
) -> tuple[list[tuple[PersistentUser, RoleCredentials]], list[str]]:
    """The users to provision, and the names ignored: repeats, and names in `reserved` (the
    bootstrap superuser, the analytics and extra users, which another provisioning owns: a
    second owner would reset the role to its own state). Raises ProvisioningFailed for
    credentials that do not fit."""
    kept: list[tuple[PersistentUser, RoleCredentials]] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for user, creds in users:
        if user.name in reserved or user.name in seen:
            if user.name not in ignored:
                ignored.append(user.name)
            continue
        if creds.username != user.name:
            raise ProvisioningFailed(
                "InvalidUsers",
                f"persistent user {user.name!r} was given the credentials of {creds.username!r}",
                role=user.name,
            )
        if not creds.password:
            raise ProvisioningFailed(
                "InvalidUsers",
                f"persistent user {user.name!r} has an empty password",
                role=user.name,
            )
        seen.add(user.name)
        kept.append((user, creds))
    return kept, ignored


def role_statements(user: PersistentUser) -> list[sql.Composed]:
    """After users._reset_role: what differs for a persistent user (NOINHERIT: privileges of
    a role it might be made a member of are never its own) and its `search_path`."""
    from psycopg import sql

    role = sql.Identifier(user.name)
    statements = [sql.SQL("ALTER ROLE {} WITH NOINHERIT").format(role)]
    if user.search_path:
        statements.append(
            sql.SQL("ALTER ROLE {} SET search_path = {}").format(
                role, sql.SQL(", ").join([sql.Identifier(s) for s in user.search_path])
            )
        )
    return statements


def grant_statements(
    user: PersistentUser, database: str, schema_owner: Mapping[str, str]
) -> tuple[list[sql.Composed], tuple[str, ...], tuple[str, ...]]:
    """The user's grants in the main database: statements, schemas granted, schemas missing.

    `schema_owner` maps each schema of the database to the role that creates tables there
    (its owner; the database owner for a `pg_database_owner` schema)."""
    from psycopg import sql

    who = sql.Identifier(user.name)
    statements = [
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), who)
    ]
    granted: list[str] = []
    missing: list[str] = []
    for name in dict.fromkeys(user.read_schemas):
        owner = schema_owner.get(name)
        if owner is None:
            missing.append(name)
            continue
        granted.append(name)
        schema, owner_id = sql.Identifier(name), sql.Identifier(owner)
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, who),
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(schema, who),
            sql.SQL("GRANT SELECT, USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(schema, who),
            # FOR ROLE names the owner: default privileges are per creating role, and the
            # session runs as the bootstrap superuser, who creates nothing there.
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}"
            ).format(owner_id, schema, who),
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} "
                "GRANT SELECT, USAGE ON SEQUENCES TO {}"
            ).format(owner_id, schema, who),
        ]
    return statements, tuple(granted), tuple(missing)


def _schema_owners(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, str]:
    return {
        row[0]: row[1]
        for row in _rows(
            conn,
            "SELECT n.nspname, CASE WHEN o.rolname = 'pg_database_owner' "
            "THEN (SELECT r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
            "WHERE d.datname = current_database()) ELSE o.rolname END "
            "FROM pg_namespace n JOIN pg_roles o ON o.oid = n.nspowner "
            "WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'",
        )
    }


def provision_persistent_users(
    conninfo_for: Callable[[str], str],
    users: Sequence[tuple[PersistentUser, RoleCredentials]],
    *,
    reserved: Sequence[str] = ("postgres",),
) -> PersistentUsersReport:
    """Provision the persistent users on a running restore; idempotent.

    `conninfo_for(dbname)` is a libpq conninfo for the bootstrap superuser in that database.
    `reserved` are the role names provisioned otherwise (the bootstrap superuser, the
    analytics and extra users): a persistent user of such a name is ignored and reported.
    Raises ProvisioningFailed."""
    scrub = Scrubber(c.password for _, c in users)
    kept, ignored = plan_persistent_users(users, reserved=reserved)
    if not kept:
        return PersistentUsersReport(None, ignored=tuple(ignored))
    names = [u.name for u, _ in kept]
    revoked: dict[str, list[str]] = {}
    actions: dict[str, RoleAction] = {}

    with _maintenance_connection(conninfo_for, scrub) as conn:
        version = conn.info.server_version
        with _step(scrub, "GrantProvisioningFailed", "cannot find the main database"):
            database = main_database_or_maintenance(conn)
        with (
            _step(scrub, "RoleProvisioningFailed", "cannot provision the persistent users"),
            conn.transaction(),
        ):
            for user, creds in kept:
                actions[user.name], revoked[user.name] = _reset_role(
                    conn,
                    creds,
                    read_only_sessions=True,
                    grant_roles=[],
                    server_version_num=version,
                    scrub=scrub,
                )
                for statement in role_statements(user):
                    conn.execute(statement)
        databases = _connectable_databases(conn, scrub)

    # Every database is reset before the main one is granted: DROP OWNED also revokes
    # privileges on shared objects (CONNECT on the main database).
    reset_in_databases(conninfo_for, databases, names, scrub, "the persistent users")

    outcomes = []
    with (
        _connect(conninfo_for, database, scrub) as db,
        _step(
            scrub,
            "GrantProvisioningFailed",
            f"cannot grant the persistent users' schemas in database {database}",
            database=database,
        ),
        db.transaction(),
    ):
        owners = _schema_owners(db)
        for user, _ in kept:
            statements, granted, missing = grant_statements(user, database, owners)
            for statement in statements:
                db.execute(statement)
            outcomes.append(
                PersistentUserOutcome(
                    user.name,
                    actions[user.name],
                    granted,
                    missing,
                    tuple(revoked[user.name]),
                )
            )
    return PersistentUsersReport(database, tuple(outcomes), tuple(ignored))
