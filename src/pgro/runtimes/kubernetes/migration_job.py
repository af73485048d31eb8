"""The application migration in the operator (`migrateTo`, features §2.2 step 3.3): the
Job `<restore>-migrate` runs the target version's Tamanu image (`migrate`) against the
restore's own Service, logging in as the analytics user from `<replica>-creds`.

The shared step (`pgro.pipeline.app_migration.AppMigration`) decides; `KubeMigrator` is how
it starts and sees the Job. The Job is the only "started" marker: it has no TTL (a Job
deleted before its result was read would be started again) and goes with the restore, which
owns it.

How the Job is seen: it carries `pgro.bes.au/restore=<restore>`, so the operator's Jobs watch
holds it and its changes wake the restore. Its pod does not: the restore's Service selects
that label and would route the migrator's own connections to the migrator. The pod is read
from the API, once, for its log when the Job has ended.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from pgro.api.names import (
    LABEL_REPLICA,
    LABEL_RESTORE,
    POSTGRES_PORT,
    admin_creds_secret_name,
    migrate_job_name,
    replica_creds_secret_name,
)
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.app_migration import (
    ENV_HOST,
    ENV_NAME,
    ENV_PASSWORD,
    ENV_URL,
    ENV_USERNAME,
    LOG_TAIL_LINES,
    Run,
    scrub,
)
from pgro.core.observations import WorkState
from pgro.kube.client import KubeApi
from pgro.pipeline.app_migration import Migrator
from pgro.postgres.schema_migration import Conninfo
from pgro.runtimes.kubernetes.config import Placement, with_placement
from pgro.runtimes.kubernetes.observe import JOB_NAME, Meta, Observer, secret_value
from pgro.runtimes.kubernetes.provisioning import PodEndpoint
from pgro.runtimes.kubernetes.workloads import LABEL_MANAGED_BY, MANAGED_BY, object_metadata

log = logging.getLogger("pgro.operator")

# Where Tamanu's server images are published; the tag is `v<version>` (the reference's).
IMAGE_REPOSITORY: Final = "ghcr.io/beyondessential/tamanu-central"
CONTAINER: Final = "migrate"
ARGS: Final = ("migrate",)
# A failed migration is the finding: retrying spends the same hours to the same answer.
BACKOFF_LIMIT: Final = 0
# The reference's: an OOMKill would read as a migration that failed on its own.
RESOURCES: Final = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}


def migration_image(version: str) -> str:
    return f"{IMAGE_REPOSITORY}:v{version}"


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def migration_job(
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    *,
    version: str,
    database: str,
    placement: Placement,
) -> dict[str, Any]:
    """`<restore>-migrate`, as the reference's `build_migration_job`: the image's entrypoint
    takes the subcommand (no `command`), Tamanu reads its database from `CONFIG_SYNC_DB_*`,
    and versions that understand `DATABASE_URL` prefer it, so both are set."""
    creds = replica_creds_secret_name(replica.name)
    container = {
        "name": CONTAINER,
        "image": migration_image(version),
        "args": list(ARGS),
        "env": [
            # The per-restore Service: a switchover cannot repoint it at another database.
            {"name": ENV_HOST, "value": restore.name},
            _secret_env(ENV_USERNAME, creds, "username"),
            _secret_env(ENV_PASSWORD, creds, "password"),
            {"name": ENV_NAME, "value": database},
            # After the variables it references: kubelet expands `$(VAR)` only from entries
            # above it. The generated password is alphanumeric: no percent-encoding needed.
            {
                "name": ENV_URL,
                "value": f"postgresql://$({ENV_USERNAME}):$({ENV_PASSWORD})@{restore.name}:"
                f"{POSTGRES_PORT}/{database}",
            },
            {"name": "NODE_ENV", "value": "production"},
        ],
        "resources": {k: dict(v) for k, v in RESOURCES.items()},
        # The image's own user is kept (the reference sets none); it gains nothing more.
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    template = {
        # Not the restore label: the restore's Service selects it.
        "metadata": {"labels": {LABEL_REPLICA: replica.name, LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {
            "restartPolicy": "Never",
            # It talks to PostgreSQL only, never to the API server: no token.
            "automountServiceAccountToken": False,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
        },
    }
    labels = {
        LABEL_REPLICA: replica.name,
        LABEL_RESTORE: restore.name,
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_metadata(
            migrate_job_name(restore.name),
            restore.namespace,
            labels,
            restore.owner_reference(),
        ),
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "template": with_placement(template, placement),
        },
    }


def job_state(job: Mapping[str, Any]) -> WorkState:
    """RUNNING until the Job controller says Complete or Failed."""
    conditions = {
        c.get("type")
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }
    if "Complete" in conditions:
        return WorkState.SUCCEEDED
    if "Failed" in conditions:
        return WorkState.FAILED
    return WorkState.RUNNING


@dataclass(eq=False)
class KubeMigrator(Migrator):
    """The migration Job of one restore."""

    api: KubeApi
    observer: Observer
    replica: PostgresPhysicalReplica
    restore: PostgresPhysicalRestore
    placement: Placement
    _passwords: dict[str, str] = field(default_factory=dict, init=False)

    @property
    def name(self) -> str:
        return migrate_job_name(self.restore.name)

    @property
    def secrets(self) -> list[str]:
        """What no error of the step may show."""
        return list(self._passwords.values())

    def _password(self, secret: str) -> str:
        if secret not in self._passwords:
            self._passwords[secret] = secret_value(
                self.api, self.replica.namespace, secret, "password"
            )
        return self._passwords[secret]

    def conninfo_for(self) -> Conninfo:
        """The restore's pod as the operator's admin role, as every SQL step reaches it."""
        pod = self.observer.ready_pod(self.restore)
        if pod is None or pod.ip is None:
            raise RuntimeError(
                f"restore {self.restore.name} has no ready PostgreSQL pod to run its "
                "migrations against"
            )
        admin = self._password(admin_creds_secret_name(self.replica.name))
        return PodEndpoint(pod.ip, admin).conninfo

    def start(self, *, database: str) -> None:
        target = self.restore.spec.migrate_to
        if target is None:
            raise RuntimeError(f"restore {self.restore.name} has no migrateTo")
        job = migration_job(
            self.replica,
            self.restore,
            version=target.version,
            database=database,
            placement=self.placement,
        )
        if self.api.create_if_missing(job):
            log.info(
                "restore %s/%s: Job %s started (migrations of %s on database %s)",
                self.restore.namespace,
                self.restore.name,
                self.name,
                target.version,
                database,
            )

    def observe(self) -> Run:
        ns = self.restore.namespace
        job = self.observer.caches.jobs.get(ns, self.name)
        if job is None:
            # The cache can lag the Job just created: absent there is not "never started".
            job = self.api.get("Job", ns, self.name)
        if job is None:
            return Run(WorkState.NOT_STARTED)
        state = job_state(job)
        if state is WorkState.RUNNING:
            return Run(state)
        return Run(state, self._log_tail(job))

    def _log_tail(self, job: Mapping[str, Any]) -> str:
        """The end of the migrate container's output in the Job's newest pod, the analytics
        password masked; "" when it cannot be read (the pod gone, the node unreachable):
        the result comes from the database, the log only explains a failure."""
        ns = self.restore.namespace
        try:
            pods = self.api.list("Pod", namespace=ns, labels={JOB_NAME: self.name}).items
            uid = Meta.of(job).uid
            owned = [
                p
                for p in pods
                if any(
                    o.get("uid") == uid
                    for o in (p.get("metadata") or {}).get("ownerReferences") or []
                )
            ]
            if not owned:
                return ""
            newest = max(owned, key=lambda p: Meta.of(p).created)
            text = self.api.pod_log(Meta.of(newest).name, ns, CONTAINER, LOG_TAIL_LINES)
            password = self._password(replica_creds_secret_name(self.replica.name))
        except Exception as exc:
            log.info(
                "restore %s/%s: the log of Job %s is unreadable (%s)",
                ns,
                self.restore.name,
                self.name,
                type(exc).__name__,
            )
            return ""
        # Also as a URL carries it (DATABASE_URL), where a migrator may echo it bare.
        return scrub(text, [password, quote(password, safe="")])
