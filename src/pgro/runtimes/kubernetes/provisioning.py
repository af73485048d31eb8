"""The restored server's roles and passwords, set over SQL once per PostgreSQL pod, on a
thread per restore; the restore is reconciled again when it is done (or in 10 s).

Before the roles, the server's repairs (issue 13, features.md §2.3, §2.4;
docs/locale-and-collation.md): what the pod's `setup` init container reported
(`scripts.SetupReport`: a locale rewritten in single-user mode, a WAL reset) is finished
over SQL here, because the restore Job's image has no PostgreSQL binaries and the operator
no volume: the counted post-start locale fallback, the quick reindex of the indexes on the
default collation and the collation-version refresh, the rebuilds after the catalog guard
(the full reindex after `pg_resetwal` runs later, once the server serves:
`core.full_reindex`). The restore is not READY for pgro until this is done,
so the stable Service never routes to a server whose quick reindex has not finished; what
was repaired goes to `status.fixes` before that.

A restore is provisioned again on the same data volume when its pod is recreated or the
operator restarted (what was provisioned is held in memory). That run keeps what the analytics
user owns (`provisioned_before`): by then it is what `migrateTo`'s hand-over gave it, or what
it or the persistent-schema copy made, never a restored role's objects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pgro.api.names import (
    LABEL_PERSISTENT_USER,
    LABEL_REPLICA,
    RESTORE_KIND,
    admin_creds_secret_name,
    extra_user_secret_name,
    replica_creds_secret_name,
)
from pgro.api.phases import RestorePhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import decode_secret_data
from pgro.api.users import PersistentUser
from pgro.core import full_reindex, redaction
from pgro.core.access import analytics_owned_schemas, effective_read_only
from pgro.core.plan import EmitEvent, EventType
from pgro.core.secrets import scrub
from pgro.kube.client import KubeApi
from pgro.pipeline.locale_repair import (
    LocaleRepair,
    detect_collations,
    refresh_collations,
)
from pgro.pipeline.switchover_users import (
    SwitchoverUsers,
    persistent_passwords_to_keep,
    provision_switchover_users,
)
from pgro.postgres import restore_info
from pgro.postgres.catalog_guard import neutralise_catalog
from pgro.postgres.collation_refresh import CollationMismatch
from pgro.postgres.login_hold import set_login
from pgro.postgres.repair import Repairs
from pgro.postgres.server import RESET_WAL_NOTE, make_conninfo
from pgro.postgres.users import RoleCredentials, generate_password, provision_users
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.observe import PodView, Requeue, secret_value
from pgro.runtimes.kubernetes.scripts import ADMIN_ROLE, SetupReport

log = logging.getLogger("pgro.operator")

# How long a restore's pod may take to answer SQL once its Deployment is Ready.
PROVISION_CONNECT_TIMEOUT_S: Final = 10
PROVISION_RETRY_S: Final = 10.0

# (namespace, Secret name, key) -> the value.
SecretValue = Callable[[str, str, str], str]
# A restore's status fixes to merge in, and events about its replica, from the repairs.
RecordRepairs = Callable[
    [PostgresPhysicalReplica, PostgresPhysicalRestore, Mapping[str, bool], Sequence[EmitEvent]],
    None,
]
# The Warning a collation-version mismatch left in place gets (as pgro verify's check).
COLLATION_MISMATCH_REASON: Final = "CollationVersionMismatch"


@dataclass(frozen=True)
class PodEndpoint:
    """A restore's PostgreSQL over TCP (as the operator's admin role)."""

    host: str
    password: str

    def conninfo(self, dbname: str, user: str = ADMIN_ROLE) -> str:
        return make_conninfo(
            host=self.host,
            port="5432",
            user=user,
            password=self.password,
            dbname=dbname,
            connect_timeout=str(PROVISION_CONNECT_TIMEOUT_S),
            sslmode="prefer",
        )


@dataclass(frozen=True)
class ServerRepairs:
    """What `repair_server` did: the fixes it found true (`status.fixes` keys), its notes
    and the collation-version mismatches left in place."""

    fixes: Mapping[str, bool]
    notes: tuple[str, ...] = ()
    remaining: tuple[CollationMismatch, ...] = ()

    def new_fixes(self, recorded: Mapping[str, bool] | None) -> dict[str, bool]:
        """The fixes the restore's status does not show yet (nothing: no status write)."""
        have = recorded or {}
        return {name: True for name, done in self.fixes.items() if done and not have.get(name)}

    def events(self, restore: str | None = None) -> list[EmitEvent]:
        """A Warning naming the collations and failed rebuilds, when a mismatch remains."""
        if not self.remaining:
            return []
        note = next((n for n in self.notes if "remain" in n), "")
        message = note or "collation version mismatch(es) remain: " + ", ".join(
            str(m) for m in self.remaining
        )
        return [EmitEvent(EventType.WARNING, COLLATION_MISMATCH_REASON, message[:1000], restore)]


def repair_server(
    conninfo_for: Callable[[str], str],
    setup: SetupReport | None,
    recorded: Mapping[str, bool] | None,
    say: Callable[[str], None],
) -> ServerRepairs:
    """The restored server's repairs over SQL, before its users are provisioned.

    - the counted post-start locale rewrite (and `pg_collation`'s default rows): always,
      it runs no user code; `fixes.locale` is the or of the setup's single-user count and
      this one;
    - after a rewrite, the quick reindex of the indexes on the default collation, unless
      `recorded` (the restore's `status.fixes`) shows it done on this volume before;
    - collation-version detection (one query per database) and, on a mismatch, the rebuilds
      then `REFRESH VERSION` (`fixes.collation_refresh`); what remains is returned;
    - after the setup's `pg_resetwal`, `fixes.reset_wal`: the full reindex it calls for
      runs once the server serves, without gating readiness (`core.full_reindex`).

    The rebuilds run user code (index expressions): the catalog guard runs first, once,
    and only when something is rebuilt. A sound snapshot costs the fallback's sessions and
    the detection queries."""
    report = setup or SetupReport()
    done = recorded or {}
    repairs = Repairs()
    guarded = False

    def guard() -> None:
        nonlocal guarded
        if not guarded:
            repairs.notes.extend(neutralise_catalog(conninfo_for).notes())
            guarded = True

    # The directory is only where the embedded pipeline builds locales; nothing is built here.
    locale = LocaleRepair(Path("/nonexistent"), single_user=report.needs_reindex)
    locale.after_start_rewrite(conninfo_for, repairs, say)
    if locale.rewritten:
        if done.get("reindex"):
            say("the quick reindex after the locale rewrite ran before on this volume")
        else:
            guard()
            locale.quick_reindex(conninfo_for, repairs, say)
    remaining: tuple[CollationMismatch, ...] = ()
    if detect_collations(conninfo_for):
        guard()
        remaining = refresh_collations(conninfo_for, repairs, say).remaining
    if report.reset_wal:
        # The full reindex it calls for runs once the server serves (`core.full_reindex`),
        # and runs index expressions: the guard runs now, before anyone reaches the server.
        guard()
        repairs.record("reset_wal", RESET_WAL_NOTE)
    fixes = {name: True for name, value in repairs.fixes.items() if value}
    return ServerRepairs(fixes, tuple(repairs.notes), remaining)


@dataclass(frozen=True)
class RepairRecorder:
    """Writes what `repair_server` did: `status.fixes` merged in (a merge patch keeps the
    restore Job's keys) and Warning events about the replica."""

    api: KubeApi
    # Observer.wrote: the next pass waits for the cache to show the patch.
    wrote: Callable[[Any, str, str, Mapping[str, Any]], None]
    emit: Callable[[Mapping[str, Any], EmitEvent], None]

    def __call__(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        fixes: Mapping[str, bool],
        events: Sequence[EmitEvent],
    ) -> None:
        if fixes:
            written = self.api.merge_patch(
                RESTORE_KIND,
                restore.namespace,
                restore.name,
                {"status": {"fixes": dict(fixes)}},
                status=True,
            )
            self.wrote("restore", _key(restore), replica.key, written)
        for event in events:
            self.emit(replica.to_wire(), event)


@dataclass(eq=False)
class Provisioner:
    secret_value: SecretValue
    requeue: Requeue
    # Where the server's repairs are recorded (None: logged only).
    record_repairs: RecordRepairs | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # restore key -> (restore uid, pod uid) provisioned: users are set once per pod
    # (a new pod of the Deployment serves a fresh copy of the restored data).
    _done: dict[str, tuple[str, str]] = field(default_factory=dict)
    # restore keys with a provisioning thread running.
    _running: set[str] = field(default_factory=set)

    def provisioned(self, restore: PostgresPhysicalRestore, pod_uid: str) -> bool:
        with self._lock:
            return self._done.get(_key(restore)) == (restore.metadata.uid or "", pod_uid)

    def forget(self, restore_key: str) -> None:
        with self._lock:
            self._done.pop(restore_key, None)

    def start(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore, pod: PodView
    ) -> None:
        """Provision the ready pod's users on a thread, unless done or running already."""
        key = _key(restore)
        if pod.ip is None or self.provisioned(restore, pod.meta.uid):
            return
        with self._lock:
            if key in self._running:
                return
            self._running.add(key)
        threading.Thread(
            target=self._provision,
            args=(replica, restore, pod.ip, pod.meta.uid, pod.setup_message),
            name=f"provision-{restore.name}",
            daemon=True,
        ).start()

    def _provision(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        host: str,
        pod_uid: str,
        setup_message: str = "",
    ) -> None:
        key = _key(restore)
        ns = replica.namespace
        passwords: list[str] = []
        try:
            admin_password = self.secret_value(
                ns, admin_creds_secret_name(replica.name), "password"
            )
            passwords.append(admin_password)
            analytics = RoleCredentials(
                replica.spec.analytics_username,
                self.secret_value(ns, replica_creds_secret_name(replica.name), "password"),
            )
            passwords.append(analytics.password)
            extras = []
            for user in replica.spec.extra_users:
                password = self.secret_value(
                    ns, extra_user_secret_name(replica.name, user.name), "password"
                )
                passwords.append(password)
                extras.append((user, RoleCredentials(user.name, password)))
            read_only = effective_read_only(replica, restore)
            endpoint = PodEndpoint(host, admin_password)
            # Before any login role is provisioned: the quick reindex gates READY.
            repaired = repair_server(
                endpoint.conninfo,
                SetupReport.parse(setup_message),
                restore.status.fixes,
                lambda text: log.info("restore %s: %s", key, text),
            )
            events = repaired.events(restore.name)
            for event in events:
                log.warning("restore %s: %s", key, event.note)
            new_fixes = repaired.new_fixes(restore.status.fixes)
            if self.record_repairs is not None and (new_fixes or events):
                self.record_repairs(replica, restore, new_fixes, events)
            if new_fixes:
                # The restore_info row below shows the repairs too (the object in hand predates
                # the status patch that recorded them).
                fixes = {**(restore.status.fixes or {}), **new_fixes}
                restore = restore.model_copy(
                    update={"status": restore.status.model_copy(update={"fixes": fixes})}
                )
            report = provision_users(
                endpoint.conninfo,
                analytics=analytics,
                extra_users=extras,
                read_only=read_only,
                # The persistent users' passwords are set at the switchover: a new pod of a
                # restore that served must keep them.
                other_managed_roles=[ADMIN_ROLE, *persistent_passwords_to_keep(replica, restore)],
                persistent_schemas=analytics_owned_schemas(replica, restore),
                keep_analytics_ownership=provisioned_before(restore),
            )
            if redaction.holds_logins(replica, restore):
                # The restore's own Service reaches it before the switchover: no user reads
                # it unredacted (the redaction step lets them in once the data is masked).
                set_login(endpoint.conninfo, redaction.held_roles(replica), login=False)
            # Before the pod counts as provisioned: clients can tell which restore they reach.
            notes = restore_info.record_restore(
                endpoint.conninfo(restore_info.DATABASE),
                restore_info.RestoreInfo.of(restore, reindex_pending=full_reindex.pending(restore)),
                analytics=analytics.username,
                analytics_may_write=not read_only,
            )
            with self._lock:
                self._done[key] = (restore.metadata.uid or "", pod_uid)
            log.info(
                "restore %s: users provisioned (%s, %d extra)",
                key,
                report.analytics.name,
                len(report.extra_users),
            )
            for note in [*report.catalog_notes, *notes]:
                log.warning("restore %s: %s", key, note)
        except Exception as exc:
            retry_in = PROVISION_RETRY_S
            log.warning(
                "restore %s: provisioning users failed, retrying in %.0fs: %s",
                key,
                retry_in,
                scrub(str(exc), passwords),
            )
        else:
            retry_in = 0.0
        finally:
            with self._lock:
                self._running.discard(key)
        self.requeue(key, retry_in)


# Phases a restore reaches only once its server was provisioned (the observer reports it
# ready only then).
_PROVISIONED_PHASES: Final = frozenset(
    {RestorePhase.MIGRATING, RestorePhase.SWITCHING, RestorePhase.ACTIVE}
)


def provisioned_before(restore: PostgresPhysicalRestore) -> bool:
    """Whether the restore's data was provisioned once already, read from its status (which
    survives a new pod and an operator restart): it moved past `Ready`, or it ran a
    migration (back in `Ready` once `migrationResult` is set). Only the first provisioning
    hands a restored analytics role's objects to the superuser; a later one would also take
    what the migration's hand-over gave the analytics user (features §2.2)."""
    status = restore.status
    return (
        status.phase in _PROVISIONED_PHASES
        or status.migration_job is not None
        or status.migration_result is not None
    )


def _key(restore: PostgresPhysicalRestore) -> str:
    return f"{restore.namespace}/{restore.name}"


# -- the switchover's ProvisionUsers step (features.md §2.5) ------------------------------


def ensure_persistent_user_secrets(api: KubeApi, replica: PostgresPhysicalReplica) -> list[str]:
    """Create each persistent user's Secret if missing (never rewritten: clients keep the
    password across switchovers), and delete the replica's persistent-user Secrets whose
    user left the spec. Returns the names of the Secrets deleted."""
    ns = replica.namespace
    users = replica.spec.persistent_users or ()
    for user in users:
        secret = workloads.persistent_user_secret(replica, user, generate_password())
        if api.create_if_missing(secret):
            log.info("%s: created Secret %s", replica.key, secret["metadata"]["name"])
    wanted = {workloads.persistent_user_label(u.name) for u in users}
    deleted = []
    for secret in api.list("Secret", namespace=ns, labels={LABEL_REPLICA: replica.name}).items:
        meta = secret.get("metadata") or {}
        label = (meta.get("labels") or {}).get(LABEL_PERSISTENT_USER)
        owners = {o.get("uid") for o in meta.get("ownerReferences") or []}
        # Only Secrets this replica owns: a look-alike someone labelled stays.
        if label is None or label in wanted or replica.metadata.uid not in owners:
            continue
        if api.delete("Secret", ns, meta["name"]):
            deleted.append(meta["name"])
            log.info("%s: deleted Secret %s (persistent user removed)", replica.key, meta["name"])
    return deleted


def persistent_user_credentials(
    api: KubeApi, replica: PostgresPhysicalReplica
) -> list[tuple[PersistentUser, RoleCredentials]]:
    """Each persistent user with the password of its Secret. A Secret that is not that
    user's (a `secretName` naming another Secret) is refused, never used."""
    ns = replica.namespace
    out = []
    for user in replica.spec.persistent_users or ():
        name = user.secret_name_for(replica.name)
        secret = api.get("Secret", ns, name)
        if secret is None:
            raise LookupError(
                f"Secret {ns}/{name} of persistent user {user.name} not found; the operator "
                "creates it on the replica's next change (annotate the replica)"
            )
        labels = (secret.get("metadata") or {}).get("labels") or {}
        data = decode_secret_data(secret)
        if (
            labels.get(LABEL_PERSISTENT_USER) != workloads.persistent_user_label(user.name)
            or data.get("username") != user.name.encode()
            or not data.get("password")
        ):
            raise LookupError(
                f"Secret {ns}/{name} is not persistent user {user.name}'s (its "
                f"{LABEL_PERSISTENT_USER} label, username or password differ): give the user "
                "a secretName of its own"
            )
        out.append((user, RoleCredentials(user.name, data["password"].decode())))
    return out


def provision_switching_restore(
    api: KubeApi,
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    host: str,
) -> SwitchoverUsers:
    """The ProvisionUsers step over SQL to the restore's ready pod at `host`, as the
    operator's admin role. Runs on the reconcile thread: every connection gives up after
    PROVISION_CONNECT_TIMEOUT_S. Raises with a message that names no password."""
    ns = replica.namespace
    passwords: list[str] = []

    def password(secret: str) -> str:
        value = secret_value(api, ns, secret, "password")
        passwords.append(value)
        return value

    try:
        admin = password(admin_creds_secret_name(replica.name))
        analytics = RoleCredentials(
            replica.spec.analytics_username, password(replica_creds_secret_name(replica.name))
        )
        extras = [
            RoleCredentials(u.name, password(extra_user_secret_name(replica.name, u.name)))
            for u in replica.spec.extra_users
        ]
        persistent = persistent_user_credentials(api, replica)
        passwords += [c.password for _, c in persistent]
        return provision_switchover_users(
            PodEndpoint(host, admin).conninfo,
            replica,
            restore,
            analytics=analytics,
            extra_users=extras,
            persistent_users=persistent,
            other_managed_roles=[ADMIN_ROLE],
        )
    except Exception as exc:
        raise RuntimeError(
            f"provisioning the login roles of {restore.name}: {scrub(str(exc), passwords)}"
        ) from None
