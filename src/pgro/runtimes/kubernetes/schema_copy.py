"""The persistent-schema copy in the operator (features §2.1): the copy program
(`pgro.pipeline.schema_transfer.SCRIPT`) in a Job `<replica>-schema-migration` on
`postgres:<major>`, reaching both restores' pods over TCP as the operator's admin role.

The step runs on a reconcile thread: starting the Job and reading its state never wait for
the copy. The result comes back in the pod's termination message (the image has no pgro to
call back with).

How the Job is seen: the operator's Jobs watch selects on the restore label, so the Job
carries `pgro.bes.au/restore=<switching restore>` (its changes also wake the replica). Its
pod does not: the restore's own Service selects that label and would route clients to the
copy's pod. The pod is read from the API, once, when the Job has finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pgro.api.names import (
    COMPONENT_SCHEMA_MIGRATION,
    LABEL_COMPONENT,
    LABEL_REPLICA,
    LABEL_RESTORE,
    POSTGRES_PORT,
    admin_creds_secret_name,
    schema_migration_job_name,
)
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.timestamp import parse_rfc3339
from pgro.core.observations import WorkState
from pgro.core.schema_migration import Transfer
from pgro.kube.client import KubeApi
from pgro.pipeline.schema_migration import Copy
from pgro.pipeline.schema_transfer import SCRIPT, copy_environment, read_result, schema_arguments
from pgro.postgres.schema_migration import Conninfo
from pgro.postgres.server import make_conninfo
from pgro.runtimes.kubernetes.config import Placement, with_placement
from pgro.runtimes.kubernetes.observe import JOB_NAME, Meta, Observer, secret_value
from pgro.runtimes.kubernetes.provisioning import PROVISION_CONNECT_TIMEOUT_S, PodEndpoint
from pgro.runtimes.kubernetes.scripts import ADMIN_ROLE
from pgro.runtimes.kubernetes.workloads import (
    LABEL_MANAGED_BY,
    MANAGED_BY,
    POSTGRES_UID,
    TERMINATION_LOG,
    object_metadata,
    postgres_image,
)

log = logging.getLogger("pgro.operator")

CONTAINER: Final = "migrate"  # the reference's container name
WORK_VOLUME: Final = "work"
# The copy's error output is written here (an emptyDir): the image's own directories are
# not the copy's.
WORK_MOUNT: Final = "/pgro-copy"
# A failed copy is retried by the next pass with a new Job, never by the Job controller.
BACKOFF_LIMIT: Final = 0
TTL_S: Final = 300
GRACE_S: Final = 10
# The reference's requests and limits.
RESOURCES: Final = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
NO_RESULT: Final = "the schema-migration Job failed without a result"
# How long `start` waits for a Job (and its pod) left by an earlier attempt to be gone.
GONE_WAIT_S: Final = 60.0
_POLL_S: Final = 0.5


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsUser": POSTGRES_UID,
        "runAsGroup": POSTGRES_UID,
        # The emptyDir is the account's to write the copy's error output in.
        "fsGroup": POSTGRES_UID,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def copy_conninfo(host: str, dbname: str) -> str:
    """A restore's server as the copy reaches it: the pod IP, not its Service (the test
    node cannot route Services, and the pod IP is what the operator itself connects to),
    as the admin role, without a password (the Job has it as `PGPASSWORD`)."""
    return make_conninfo(
        host=host,
        port=str(POSTGRES_PORT),
        user=ADMIN_ROLE,
        dbname=dbname,
        connect_timeout=str(PROVISION_CONNECT_TIMEOUT_S),
        sslmode="prefer",
    )


def copy_job(
    replica: PostgresPhysicalReplica,
    target: str,
    *,
    image: str,
    source: str,
    target_conninfo: str,
    owner: str,
    schemas: Sequence[str],
    placement: Placement,
) -> dict[str, Any]:
    """`<replica>-schema-migration`: the copy program from `source` into `target_conninfo`
    (conninfos without a password), owned by the replica."""
    pod_labels = {
        LABEL_REPLICA: replica.name,
        LABEL_COMPONENT: COMPONENT_SCHEMA_MIGRATION,
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    env = copy_environment(
        source=source,
        target=target_conninfo,
        owner=owner,
        work=WORK_MOUNT,
        result=TERMINATION_LOG,
    )
    container = {
        "name": CONTAINER,
        "image": image,
        "command": ["sh", "-c", SCRIPT, "sh", *schema_arguments(schemas)],
        "env": [
            *({"name": k, "value": v} for k, v in env.items()),
            {
                "name": "PGPASSWORD",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": admin_creds_secret_name(replica.name),
                        "key": "password",
                    }
                },
            },
        ],
        "resources": {k: dict(v) for k, v in RESOURCES.items()},
        "volumeMounts": [{"name": WORK_VOLUME, "mountPath": WORK_MOUNT}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    template = {
        "metadata": {"labels": dict(pod_labels)},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": GRACE_S,
            # It reads what users wrote into the serving restore and never calls the API.
            "automountServiceAccountToken": False,
            "securityContext": _pod_security_context(),
            "containers": [container],
            "volumes": [{"name": WORK_VOLUME, "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_metadata(
            schema_migration_job_name(replica.name),
            replica.namespace,
            {**pod_labels, LABEL_RESTORE: target},
            replica.owner_reference(),
        ),
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "ttlSecondsAfterFinished": TTL_S,
            "template": with_placement(template, placement),
        },
    }


def copy_image(versions: Sequence[str]) -> str:
    """`postgres:<major>` of the newest of the two servers: pg_dump must be at least the
    source's major, and pg_restore reads what an equal or older pg_dump wrote."""
    return postgres_image(max(versions, key=_version_key))


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def transfer_of(job: Mapping[str, Any], message: str) -> Transfer:
    """The copy as its Job (conditions, creationTimestamp) and its pod's termination
    message say."""
    created = Meta.of(job).created
    started_at = parse_rfc3339(created) if created else None
    conditions = {
        c.get("type")
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }
    if "Complete" in conditions:
        found = read_result(message)
        return Transfer(found.state, started_at, found.result, found.failure)
    if "Failed" in conditions:
        failure = read_result(message).failure if message.strip() else None
        return Transfer(WorkState.FAILED, started_at, failure=failure or NO_RESULT)
    return Transfer(WorkState.RUNNING, started_at=started_at)


@dataclass(eq=False)
class KubeCopy(Copy):
    """The copy between the replica's serving restore `source` and switching `target`."""

    api: KubeApi
    observer: Observer
    replica: PostgresPhysicalReplica
    source: str
    target: str
    placement: Placement
    _password: str | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        return schema_migration_job_name(self.replica.name)

    @property
    def secrets(self) -> list[str]:
        """What no error of the step may show."""
        return [self._password] if self._password else []

    def _admin_password(self) -> str:
        if self._password is None:
            self._password = secret_value(
                self.api,
                self.replica.namespace,
                admin_creds_secret_name(self.replica.name),
                "password",
            )
        return self._password

    def _server(self, name: str) -> tuple[PostgresPhysicalRestore, str]:
        restore = self.observer.restore(self.replica.namespace, name)
        pod = self.observer.ready_pod(restore) if restore is not None else None
        if restore is None or pod is None or pod.ip is None:
            raise RuntimeError(
                f"restore {name} has no ready PostgreSQL pod to copy persistent schemas with"
            )
        return restore, pod.ip

    def conninfo_for(self, restore: str) -> Conninfo:
        _, ip = self._server(restore)
        return PodEndpoint(ip, self._admin_password()).conninfo

    def start(self, *, source_db: str, target_db: str, owner: str, schemas: Sequence[str]) -> str:
        self._remove_earlier()
        source, source_ip = self._server(self.source)
        target, target_ip = self._server(self.target)
        versions = [
            v for v in (source.status.postgres_version, target.status.postgres_version) if v
        ]
        if not versions:
            raise RuntimeError(f"restore {self.target} has no PostgreSQL version yet")
        job = copy_job(
            self.replica,
            self.target,
            image=copy_image(versions),
            source=copy_conninfo(source_ip, source_db),
            target_conninfo=copy_conninfo(target_ip, target_db),
            owner=owner,
            schemas=schemas,
            placement=self.placement,
        )
        self.api.create(job)
        log.info(
            "%s: Job %s started (persistent schemas %s from %s to %s)",
            self.replica.key,
            self.name,
            ", ".join(schemas),
            self.source,
            self.target,
        )
        return self.name

    def observe(self) -> Transfer:
        ns = self.replica.namespace
        job = self.observer.caches.jobs.get(ns, self.name)
        if job is not None and transfer_of(job, "").state is WorkState.RUNNING:
            return transfer_of(job, "")
        # What ends the copy is read from the API: the cache can lag the Job just created
        # (absent is not vanished), and can still show the finished Job an earlier attempt
        # left under the same name.
        job = self.api.get("Job", ns, self.name)
        if job is None:
            return Transfer.absent()
        transfer = transfer_of(job, "")
        if transfer.state is WorkState.RUNNING:
            return transfer
        return transfer_of(job, self._message(job))

    def _message(self, job: Mapping[str, Any]) -> str:
        """The termination message of the Job's newest pod that has one."""
        uid = Meta.of(job).uid
        pods = [
            p
            for p in self._pods()
            if any(
                o.get("uid") == uid for o in (p.get("metadata") or {}).get("ownerReferences") or []
            )
        ]
        pods.sort(key=lambda p: Meta.of(p).created, reverse=True)
        for pod in pods:
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated") or {}
                if terminated.get("message"):
                    return str(terminated["message"])
        return ""

    def _pods(self) -> list[dict[str, Any]]:
        return self.api.list(
            "Pod", namespace=self.replica.namespace, labels={JOB_NAME: self.name}
        ).items

    def discard(self) -> None:
        # Background: the Job goes at once, the garbage collector takes its pod.
        if self.api.delete("Job", self.replica.namespace, self.name):
            log.info("%s: Job %s deleted", self.replica.key, self.name)

    def _remove_earlier(self) -> None:
        """Delete a Job an earlier attempt left, and its pod, and wait until both are
        gone: the name must be free, and the old copy must not write into the schemas
        this attempt restores into."""
        ns = self.replica.namespace
        self.discard()
        deadline = time.monotonic() + GONE_WAIT_S
        while True:
            pods = self._pods()
            if self.api.get("Job", ns, self.name) is None and not pods:
                return
            for pod in pods:
                if not (pod.get("metadata") or {}).get("deletionTimestamp"):
                    self.api.delete("Pod", ns, Meta.of(pod).name)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Job {self.name} of an earlier attempt is still being deleted; "
                    "the copy starts once it is gone"
                )
            time.sleep(_POLL_S)
