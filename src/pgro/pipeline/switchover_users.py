"""The ProvisionUsers step both runtimes run on the switching restore, right before the
stable endpoint moves to it (features.md §2.5 and §2.1 "Then re-apply"): the analytics and
extra users' grants again (the persistent-schema migration's dump carries no privileges, so
the objects it created have none), then the persistent users. Each runtime supplies the
connection and the passwords it keeps (credential files, Secrets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pgro.api.phases import RestorePhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.users import PersistentUser
from pgro.core.access import analytics_owned_schemas, effective_read_only
from pgro.core.plan import EmitEvent, EventType
from pgro.postgres import restore_info
from pgro.postgres.persistent_users import (
    IGNORED_EVENT,
    SCHEMA_MISSING_EVENT,
    PersistentUsersReport,
    provision_persistent_users,
)
from pgro.postgres.users import ProvisionReport, RoleCredentials, provision_users


@dataclass(frozen=True)
class SwitchoverUsers:
    """What the step did; holds no secret."""

    restore: str
    users: ProvisionReport
    persistent: PersistentUsersReport

    def events(self) -> list[EmitEvent]:
        """Warnings for what the spec asks and the restore cannot give."""
        out = []
        if self.persistent.missing:
            out.append(
                EmitEvent(
                    EventType.WARNING,
                    SCHEMA_MISSING_EVENT,
                    self.persistent.missing_note(),
                    related=self.restore,
                )
            )
        if self.persistent.ignored:
            out.append(
                EmitEvent(
                    EventType.WARNING,
                    IGNORED_EVENT,
                    self.persistent.ignored_note(),
                    related=self.restore,
                )
            )
        return out

    def summary(self) -> str:
        return f"{self.users.summary()}; {self.persistent.summary()}"


def persistent_role_names(
    replica: PostgresPhysicalReplica, bootstrap_superuser: str = "postgres"
) -> list[str]:
    """The persistent users' role names whose passwords every provisioning of the replica's
    restores must keep (`other_managed_roles`), never a reserved name: a persistent user
    called like the bootstrap superuser, analytics or an extra user must not keep that role's
    restored password."""
    spec = replica.spec
    reserved = {bootstrap_superuser, spec.analytics_username, *(u.name for u in spec.extra_users)}
    return [u.name for u in spec.persistent_users or () if u.name not in reserved]


def persistent_passwords_to_keep(
    replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
) -> list[str]:
    """At the provisioning of a restore's server (its start, or a restart): the persistent
    users whose passwords must survive it. Only once the restore has served: its switchover
    set them. Before, a restored role of that name must not keep its source password."""
    if restore.status.phase is not RestorePhase.ACTIVE:
        return []
    return persistent_role_names(replica)


def provision_switchover_users(
    conninfo_for: Callable[[str], str],
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    *,
    analytics: RoleCredentials,
    extra_users: Sequence[RoleCredentials],
    persistent_users: Sequence[tuple[PersistentUser, RoleCredentials]],
    bootstrap_superuser: str = "postgres",
    other_managed_roles: Sequence[str] = (),
) -> SwitchoverUsers:
    """Provision every login role of `restore` (running, reached by `conninfo_for(dbname)` as
    `bootstrap_superuser`). `extra_users` are the credentials of `replica.spec.extra_users`,
    by name; `other_managed_roles` are roles whose password the runtime keeps otherwise (the
    operator's admin role), as in provision_users. Raises
    pgro.postgres.users.ProvisioningFailed or pgro.postgres.restore_info.RestoreInfoFailed
    (their messages name no secret)."""
    by_name = {c.username: c for c in extra_users}
    extras = [(u, by_name[u.name]) for u in replica.spec.extra_users if u.name in by_name]
    reserved = [bootstrap_superuser, analytics.username, *(u.name for u, _ in extras)]
    wanted = {u.name for u, _ in persistent_users}
    read_only = effective_read_only(replica, restore)
    report = provision_users(
        conninfo_for,
        analytics=analytics,
        extra_users=extras,
        read_only=read_only,
        bootstrap_superuser=bootstrap_superuser,
        other_managed_roles=[
            *other_managed_roles,
            *(n for n in persistent_role_names(replica, bootstrap_superuser) if n in wanted),
        ],
        persistent_schemas=analytics_owned_schemas(replica, restore),
        # Reset when the server was provisioned: keep what the schema copy made as analytics.
        keep_analytics_ownership=True,
    )
    # A writing analytics user was just granted DML and CREATE on every schema, `_pgro`
    # included: put restore_info's privileges back as the server's provisioning left them.
    restore_info.reset_access(
        conninfo_for(restore_info.DATABASE),
        analytics=analytics.username,
        analytics_may_write=not read_only,
    )
    persistent = provision_persistent_users(
        conninfo_for,
        persistent_users,
        reserved=[*reserved, *other_managed_roles],
    )
    return SwitchoverUsers(restore.name, report, persistent)
