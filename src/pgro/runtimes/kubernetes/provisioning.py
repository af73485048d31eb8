"""The restored server's roles and passwords, set over SQL once per PostgreSQL pod, on a
thread per restore; the restore is reconciled again when it is done (or in 10 s).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pgro.api.names import (
    admin_creds_secret_name,
    extra_user_secret_name,
    replica_creds_secret_name,
)
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.access import analytics_owned_schemas, effective_read_only
from pgro.core.secrets import scrub
from pgro.postgres import restore_info
from pgro.postgres.server import make_conninfo
from pgro.postgres.users import RoleCredentials, provision_users
from pgro.runtimes.kubernetes.observe import PodView, Requeue
from pgro.runtimes.kubernetes.scripts import ADMIN_ROLE

log = logging.getLogger("pgro.operator")

# How long a restore's pod may take to answer SQL once its Deployment is Ready.
PROVISION_CONNECT_TIMEOUT_S: Final = 10
PROVISION_RETRY_S: Final = 10.0

# (namespace, Secret name, key) -> the value.
SecretValue = Callable[[str, str, str], str]


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


@dataclass(eq=False)
class Provisioner:
    secret_value: SecretValue
    requeue: Requeue
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
            args=(replica, restore, pod.ip, pod.meta.uid),
            name=f"provision-{restore.name}",
            daemon=True,
        ).start()

    def _provision(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        host: str,
        pod_uid: str,
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
            report = provision_users(
                endpoint.conninfo,
                analytics=analytics,
                extra_users=extras,
                read_only=read_only,
                other_managed_roles=[ADMIN_ROLE],
                persistent_schemas=analytics_owned_schemas(replica, restore),
            )
            # Before the pod counts as provisioned: clients can tell which restore they reach.
            notes = restore_info.record_restore(
                endpoint.conninfo(restore_info.DATABASE),
                restore_info.RestoreInfo.of(restore),
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


def _key(restore: PostgresPhysicalRestore) -> str:
    return f"{restore.namespace}/{restore.name}"
