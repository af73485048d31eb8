"""The Kubernetes objects the operator creates: pure builders, api models in, wire-form
dicts out. Names, labels and owners follow the reference's.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pgro.api.names import (
    COMPONENT_EXTRA_USER_CREDS,
    COMPONENT_KOPIA_CACHE,
    JOB_TYPE_VERSION_DETECT,
    LABEL_COMPONENT,
    LABEL_JOB_TYPE,
    LABEL_PERSISTENT_USER,
    LABEL_PROXY_SIDECAR,
    LABEL_READY_FOR_TRAFFIC,
    LABEL_REPLICA,
    LABEL_RESTORE,
    LABEL_TRUE,
    POSTGRES_PORT,
    admin_creds_secret_name,
    canopy_creds_secret_name,
    data_check_job_name,
    extra_user_secret_name,
    kopia_cache_pvc_name,
    replica_creds_secret_name,
    restore_data_pvc_name,
    restore_job_name,
    version_detect_job_name,
)
from pgro.api.quantity import format_quantity, parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.users import PersistentUser
from pgro.core.access import effective_read_only
from pgro.core.pod_sizing import (
    kopia_cache_caps,
    kopia_cache_size,
    postgres_resources,
    restore_job_resources,
    shm_size_mib,
)
from pgro.core.verify_depth import replica_depth
from pgro.kopia.cache import JOB_CACHE_SUBDIR
from pgro.pipeline import data_check_job as check_job
from pgro.pipeline.data_checks import default_budget_s
from pgro.pipeline.job import CANOPY_IGNORED_KEYS, SECRET_ENV
from pgro.postgres.config import forced_arguments, forced_settings
from pgro.runtimes.kubernetes.config import OperatorConfig, Placement, with_placement
from pgro.runtimes.kubernetes.scripts import (
    ADMIN_ROLE,
    LOCALES_ENV,
    SETUP_CONTAINER,
    TERMINATION_LOG_ENV,
    setup_script,
)

LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "pgro"
COMPONENT_ADMIN_CREDS: Final = "admin-creds"

# The postgres uid/gid of the official image, so restored files belong to the server.
POSTGRES_UID: Final = 999

DATA_MOUNT: Final = "/pgdata"
# A symlink the restore Job leaves at the volume root, pointing at the located PGDATA.
PGDATA: Final = "/pgdata/pgdata"
KOPIA_MOUNT: Final = "/tmp/kopia"  # noqa: S108 - a volume mount point inside the pod
TERMINATION_LOG: Final = "/dev/termination-log"

RESTORE_CONTAINER: Final = "restore"
RESTORE_COMMAND: Final = ("pgro", "restore-job")
# `pgro restore-job` exits 2 for failures a retry cannot fix (wrong password, no such
# snapshot, not PostgreSQL).
RESTORE_EXIT_PERMANENT: Final = 2
RESTORE_BACKOFF_LIMIT: Final = 3
RESTORE_DEADLINE_S: Final = 7200
# Canopy restores get twice as long (reference canopy-protocol §5.4).
CANOPY_RESTORE_DEADLINE_S: Final = 14400
JOB_TTL_S: Final = 120
# A failed restore Job's TTL, patched when it fails so its pod's log can be read (reference
# restore-pipeline §1.2): a day after a replica's first failure in a row, 10 minutes after
# the later ones (the same failure again, most likely).
FAILED_JOB_TTL_FIRST_S: Final = 86400
FAILED_JOB_TTL_REPEAT_S: Final = 600
KOPIA_PARALLEL: Final = "2"

SETUP_RESOURCES: Final = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "500m", "memory": "256Mi"},
}
PG_ISREADY: Final = ("pg_isready", "-U", "postgres", "-d", "postgres")
# Where the `setup` init container may build private locales when a database names one the
# image lacks (features.md §2.3): an emptyDir of the pod, never the image's /usr/lib/locale.
# The 22 aliases and image locales take about 16 MiB.
LOCALES_VOLUME: Final = "locales"
LOCALES_MOUNT: Final = "/pgro-locales"
LOCALES_SIZE_LIMIT: Final = "128Mi"
PROGRESS_DEADLINE_S: Final = 3600


# The canopy variant (reference canopy-protocol §5.3/§5.4): a native sidecar running
# `pgro canopy-proxy`, which re-signs kopia's S3 requests with credentials from the
# operator's broker, so kopia only ever holds the restore's own proxy keys.
CANOPY_PROXY_CONTAINER: Final = "canopy-proxy"
CANOPY_PROXY_COMMAND: Final = ("pgro", "canopy-proxy")
CANOPY_PROXY_RESOURCES: Final = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"cpu": "500m", "memory": "256Mi"},
}
PROXY_SHARED_VOLUME: Final = "proxy-shared"
PROXY_SHARED_MOUNT: Final = "/var/run/pgro"
PROXY_PORT_FILE: Final = f"{PROXY_SHARED_MOUNT}/proxy-port"
# Where the proxy listens and kopia connects. The two containers share the pod's network
# namespace, so any loopback address works, and only a loopback one is safe: the proxy
# signs for anyone who reaches it. IPv4 loopback rather than the reference's `[::1]`:
# 127.0.0.1 exists in every pod, while ::1 is missing where IPv6 is disabled on the node.
# (The test harness runs a pod's processes on the host, where 127.0.0.1 is shared by all
# fake pods; each proxy takes an ephemeral port and tells its own pod through the port
# file, so pods do not meet. A pod IP would work there but is not loopback in a cluster.)
PROXY_LISTEN_HOST: Final = "127.0.0.1"
CANOPY_STATS_PATH: Final = "/api/v1/canopy-stats"
CANOPY_PROGRESS_PATH: Final = "/api/v1/canopy-progress"
# Also not from the canopy-creds Secret: kopia's S3 keys are the restore's own (from the
# `<restore>-canopy-proxy` Secret: the sidecar refuses any other signature).
CANOPY_IGNORED_SECRET_KEYS: Final = CANOPY_IGNORED_KEYS | {"accessKeyId", "secretAccessKey"}
# The `<restore>-canopy-proxy` Secret the operator writes for each canopy restore: the
# restore's broker token (sidecar only) and the key pair kopia signs with (both).
PROXY_SECRET_TOKEN: Final = "brokerToken"  # noqa: S105 - a key name
PROXY_SECRET_ACCESS_KEY_ID: Final = "accessKeyId"  # noqa: S105 - a key name
PROXY_SECRET_SECRET_ACCESS_KEY: Final = "secretAccessKey"  # noqa: S105 - a key name
PROXY_SECRET_KEYS: Final = (
    PROXY_SECRET_TOKEN,
    PROXY_SECRET_ACCESS_KEY_ID,
    PROXY_SECRET_SECRET_ACCESS_KEY,
)


def canopy_proxy_secret_name(restore_name: str) -> str:
    return f"{restore_name}-canopy-proxy"


@dataclass(frozen=True)
class CanopyJobSettings:
    """What a canopy restore Job's sidecar needs of the operator: the broker's and the
    callbacks' base URLs, and an upstream S3 URL other than AWS's (docs/canopy.md)."""

    broker_url: str
    callback_base_url: str
    s3_endpoint: str | None = None


def postgres_image(postgres_version: str) -> str:
    return f"postgres:{postgres_version}"


def kopia_secret_name(replica: PostgresPhysicalReplica) -> str:
    """The Secret the restore Job reads: `kopiaSecretRef`, or on the canopy path the one
    the canopy syncer writes."""
    ref = replica.spec.kopia_secret_ref
    return ref.name if ref is not None else canopy_creds_secret_name(replica.name)


def stable_service_selector(restore_name: str) -> dict[str, str]:
    """The stable Service's selector at switchover. The restore name is the real gate;
    the ready label stays because a merge patch cannot drop a selector key."""
    return {LABEL_RESTORE: restore_name, LABEL_READY_FOR_TRAFFIC: LABEL_TRUE}


def pod_ready_for_traffic_patch() -> dict[str, Any]:
    """Merge patch re-stamping the label on a running postgres pod (a replaced pod may
    lack it)."""
    return {"metadata": {"labels": {LABEL_READY_FOR_TRAFFIC: LABEL_TRUE}}}


# ---------------------------------------------------------------------------- helpers


# A Kubernetes label value (at most 63 characters).
_LABEL_VALUE: Final = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _replica_labels(replica: str) -> dict[str, str]:
    return {LABEL_REPLICA: replica, LABEL_MANAGED_BY: MANAGED_BY}


def _restore_labels(restore: PostgresPhysicalRestore) -> dict[str, str]:
    return {
        LABEL_REPLICA: restore.replica_name,
        LABEL_RESTORE: restore.name,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def object_metadata(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    owner: Mapping[str, Any] | None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Metadata of an object the operator creates; `owner`'s deletion deletes it."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _replica_metadata(
    replica: PostgresPhysicalReplica,
    name: str,
    component: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An object of the replica's, owned by it (it outlives each restore)."""
    labels = _replica_labels(replica.name)
    if component:
        labels[LABEL_COMPONENT] = component
    return object_metadata(name, replica.namespace, labels, replica.owner_reference(), annotations)


def _restore_metadata(restore: PostgresPhysicalRestore, name: str) -> dict[str, Any]:
    """An object of the restore's, owned by it (deleted with it)."""
    return object_metadata(
        name, restore.namespace, _restore_labels(restore), restore.owner_reference()
    )


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _secret(metadata: dict[str, Any], username: str, password: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": {"username": _b64(username), "password": _b64(password)},
    }


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _pvc_volume(name: str, claim: str) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim}}


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsUser": POSTGRES_UID,
        "runAsGroup": POSTGRES_UID,
        "fsGroup": POSTGRES_UID,
        # Without it the kubelet re-chowns every file of a multi-terabyte volume on each
        # pod start; the volume root already has the right group after the first mount.
        "fsGroupChangePolicy": "OnRootMismatch",
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pvc(metadata: dict[str, Any], storage_class: str | None, storage: str | int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(storage)}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": spec,
    }


def _service_ports() -> list[dict[str, Any]]:
    return [
        {"name": "postgres", "port": POSTGRES_PORT, "targetPort": POSTGRES_PORT, "protocol": "TCP"}
    ]


def _exec_probe(initial_delay: int, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "exec": {"command": list(PG_ISREADY)},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


# ---------------------------------------------------------------------------- Secrets


def credentials_secret(replica: PostgresPhysicalReplica, password: str) -> dict[str, Any]:
    """`<replica>-creds`: the analytics user's login, created once and never rotated."""
    return _secret(
        _replica_metadata(replica, replica_creds_secret_name(replica.name)),
        replica.spec.analytics_username,
        password,
    )


def extra_user_secret(
    replica: PostgresPhysicalReplica, username: str, password: str
) -> dict[str, Any]:
    """`<replica>-user-<slug>-creds`; `username` keeps the unslugged role name."""
    return _secret(
        _replica_metadata(
            replica, extra_user_secret_name(replica.name, username), COMPONENT_EXTRA_USER_CREDS
        ),
        username,
        password,
    )


def persistent_user_label(username: str) -> str:
    """The `pgro.bes.au/persistent-user` label value naming a role: the name itself when it
    is a valid label value, else a readable slug and a hash of it."""
    if len(username) <= 63 and _LABEL_VALUE.fullmatch(username):
        return username
    digest = hashlib.sha256(username.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]", "-", username)[:40].strip("-_.")
    return f"{slug}-{digest}" if slug else digest


def persistent_user_secret(
    replica: PostgresPhysicalReplica, user: PersistentUser, password: str
) -> dict[str, Any]:
    """`secretName` or `<replica>-user-<slug>` (features.md §2.5): a persistent user's
    login, created once and never rewritten, so clients keep it across switchovers."""
    metadata = _replica_metadata(replica, user.secret_name_for(replica.name))
    metadata["labels"][LABEL_PERSISTENT_USER] = persistent_user_label(user.name)
    return _secret(metadata, user.name, password)


def admin_secret(replica: PostgresPhysicalReplica, password: str) -> dict[str, Any]:
    """`<replica>-admin-creds` (pgro only): the password the `setup` init container gives
    the `postgres` superuser, so the operator can provision users over SQL."""
    return _secret(
        _replica_metadata(replica, admin_creds_secret_name(replica.name), COMPONENT_ADMIN_CREDS),
        ADMIN_ROLE,
        password,
    )


# ---------------------------------------------------------------------------- Services


def stable_service(replica: PostgresPhysicalReplica) -> dict[str, Any]:
    """`<replica>`: created without a selector, so it routes nowhere until the first
    switchover patches in `stable_service_selector`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _replica_metadata(
            replica, replica.name, annotations=replica.spec.service_annotations
        ),
        "spec": {"type": "ClusterIP", "ports": _service_ports()},
    }


def restore_service(restore: PostgresPhysicalRestore) -> dict[str, Any]:
    """`<restore>`: this restore's server, whatever the stable Service points at."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _restore_metadata(restore, restore.name),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_RESTORE: restore.name},
            "ports": _service_ports(),
        },
    }


# ---------------------------------------------------------------------------- volumes


def data_pvc(replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore) -> dict[str, Any]:
    """`<restore>-data`, sized when the restore was created (`spec.storageSize`)."""
    return _pvc(
        _restore_metadata(restore, restore_data_pvc_name(restore.name)),
        replica.spec.storage_class,
        restore.spec.storage_size,
    )


def kopia_cache_pvc(replica: PostgresPhysicalReplica, snapshot_size: str | int) -> dict[str, Any]:
    """`<replica>-kopia-cache`, owned by the replica so it outlives each restore."""
    return _pvc(
        _replica_metadata(replica, kopia_cache_pvc_name(replica.name), COMPONENT_KOPIA_CACHE),
        replica.spec.storage_class,
        format_quantity(kopia_cache_size(snapshot_size)),
    )


# ---------------------------------------------------------------------------- restore Job


def _restore_env(
    replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
) -> list[dict[str, Any]]:
    caps = kopia_cache_caps(restore.spec.snapshot_size)
    env = [
        _env("SNAPSHOT_ID", restore.spec.snapshot),
        _env("SNAPSHOT_SIZE", str(parse_quantity(restore.spec.snapshot_size))),
        _env("SNAPSHOT_TIME", restore.spec.snapshot_time or ""),
        _env("PGRO_DATA_ROOT", DATA_MOUNT),
        _env("PGRO_KOPIA_DIR", KOPIA_MOUNT),
        # The kept metadata caches, per repository location, on the kopia-cache volume
        # (`pgro.kopia.cache`); the Job's other kopia state stays throwaway.
        _env("PGRO_KOPIA_CACHE_ROOT", f"{KOPIA_MOUNT}/{JOB_CACHE_SUBDIR}"),
        _env("PGRO_READ_ONLY", "true" if effective_read_only(replica, restore) else "false"),
        _env("PGRO_TERMINATION_LOG", TERMINATION_LOG),
        _env("KOPIA_CONTENT_CACHE_MB", str(caps.content_mb)),
        _env("KOPIA_METADATA_CACHE_MB", str(caps.metadata_mb)),
        # Kopia otherwise sizes its worker pool from the node's CPUs, not the CPU limit.
        _env("KOPIA_PARALLEL", KOPIA_PARALLEL),
    ]
    depth = replica_depth(replica).depth
    if depth != "quick":
        # Left on the volume for the pod's setup, which runs pg_checksums: set here, once,
        # so an annotation changed later never alters (and rolls) a serving pod's template.
        env.append(_env("PGRO_VERIFY_DEPTH", depth))
    if replica.spec.postgres_extra_config:
        # Written into postgresql.conf by the restore Job, after the source's settings.
        env.append(_env("PGRO_EXTRA_CONFIG", replica.spec.postgres_extra_config))
    secret = kopia_secret_name(replica)
    canopy = replica.spec.canopy_source is not None
    # Only the repository password is needed by every repository; `pgro restore-job` says
    # which other one is missing.
    env.extend(
        _secret_env(var, secret, key, optional=key != "repositoryPassword")
        for var, key in SECRET_ENV.items()
        if not (canopy and key in CANOPY_IGNORED_SECRET_KEYS)
    )
    if canopy:
        # `pgro restore-job` waits for the sidecar's port file, then points kopia at it.
        proxy_secret = canopy_proxy_secret_name(restore.name)
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", proxy_secret, PROXY_SECRET_ACCESS_KEY_ID),
            _secret_env("AWS_SECRET_ACCESS_KEY", proxy_secret, PROXY_SECRET_SECRET_ACCESS_KEY),
            _env("PGRO_CANOPY_PROXY_PORT_FILE", PROXY_PORT_FILE),
            _env("PGRO_CANOPY_PROXY_HOST", PROXY_LISTEN_HOST),
        ]
    return env


def failed_restore_job_ttl(failures_before: int) -> int:
    """`ttlSecondsAfterFinished` for a restore Job that failed when its replica had
    `failures_before` failed restores in a row (this one not counted)."""
    return FAILED_JOB_TTL_FIRST_S if failures_before <= 0 else FAILED_JOB_TTL_REPEAT_S


def job_ttl_patch(ttl_s: int) -> dict[str, Any]:
    """The merge patch setting a Job's `ttlSecondsAfterFinished` (a mutable field)."""
    return {"spec": {"ttlSecondsAfterFinished": ttl_s}}


def _callback_url(base: str, path: str, restore: PostgresPhysicalRestore) -> str:
    return f"{base.rstrip('/')}{path}/{restore.namespace}/{restore_job_name(restore.name)}"


def _canopy_proxy_container(
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    config: OperatorConfig,
    canopy: CanopyJobSettings,
) -> dict[str, Any]:
    """The `canopy-proxy` native sidecar (an init container with `restartPolicy: Always`):
    started before the restore container and SIGTERMed once it has exited, when it posts
    the final traffic totals to the stats callback."""
    source = replica.spec.canopy_source
    assert source is not None
    env = [
        _env("PGRO_BROKER_URL", canopy.broker_url),
        _env("PGRO_GROUP", source.group),
        _env("PGRO_TYPE", source.type),
        _secret_env("PGRO_REGION", kopia_secret_name(replica), "region"),
    ]
    if canopy.s3_endpoint:
        env.append(_env("PGRO_S3_ENDPOINT", canopy.s3_endpoint))
    run_id = restore.status.run_id
    if run_id:
        # Progress samples are per run: without a run id the sidecar samples nothing.
        env += [
            _env("PGRO_RUN_ID", run_id),
            _env(
                "PGRO_PROGRESS_CALLBACK_URL",
                _callback_url(canopy.callback_base_url, CANOPY_PROGRESS_PATH, restore),
            ),
        ]
    env += [
        _env(
            "PGRO_STATS_CALLBACK_URL",
            _callback_url(canopy.callback_base_url, CANOPY_STATS_PATH, restore),
        ),
        _env("PGRO_PROXY_PORT_FILE", PROXY_PORT_FILE),
        _env("PGRO_PROXY_LISTEN_HOST", PROXY_LISTEN_HOST),
    ]
    # Out of the pod spec (anyone who may read Jobs would see it): from the restore's Secret.
    proxy_secret = canopy_proxy_secret_name(restore.name)
    env += [
        _secret_env("PGRO_BROKER_TOKEN", proxy_secret, PROXY_SECRET_TOKEN),
        _secret_env("PGRO_PROXY_ACCESS_KEY_ID", proxy_secret, PROXY_SECRET_ACCESS_KEY_ID),
        _secret_env("PGRO_PROXY_SECRET_ACCESS_KEY", proxy_secret, PROXY_SECRET_SECRET_ACCESS_KEY),
    ]
    return {
        "name": CANOPY_PROXY_CONTAINER,
        "image": config.restore_image,
        "command": list(CANOPY_PROXY_COMMAND),
        "restartPolicy": "Always",
        "env": env,
        "resources": {k: dict(v) for k, v in CANOPY_PROXY_RESOURCES.items()},
        "volumeMounts": [{"name": PROXY_SHARED_VOLUME, "mountPath": PROXY_SHARED_MOUNT}],
        "securityContext": _container_security_context(),
    }


def restore_job(
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    config: OperatorConfig,
    placement: Placement | None = None,
    *,
    canopy: CanopyJobSettings | None = None,
) -> dict[str, Any]:
    """`<restore>-restore`: runs `pgro restore-job` onto the data volume. A canopy replica's
    needs `canopy` (ValueError without it): the `canopy-proxy` sidecar, the in-memory
    `proxy-shared` volume, the `proxy-sidecar` pod label and a 4 h deadline."""
    is_canopy = replica.spec.canopy_source is not None
    if is_canopy and canopy is None:
        raise ValueError(
            f"replica {replica.namespace}/{replica.name} reads from canopy (spec.canopySource): "
            "its restore Job needs CanopyJobSettings (the credential broker and callback URLs "
            "for the canopy-proxy sidecar)"
        )
    container: dict[str, Any] = {
        "name": RESTORE_CONTAINER,
        "image": config.restore_image,
        "command": list(RESTORE_COMMAND),
        "env": _restore_env(replica, restore),
        "resources": restore_job_resources(restore.spec.snapshot_size),
        "volumeMounts": [
            {"name": "pgdata", "mountPath": DATA_MOUNT},
            {"name": "kopia-cache", "mountPath": KOPIA_MOUNT},
        ],
        "securityContext": _container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    pod_labels = _restore_labels(restore)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 30,
        # The pod handles an untrusted snapshot and never calls the API server: no token.
        "automountServiceAccountToken": False,
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": [
            _pvc_volume("pgdata", restore_data_pvc_name(restore.name)),
            _pvc_volume("kopia-cache", kopia_cache_pvc_name(replica.name)),
        ],
    }
    if canopy is not None and is_canopy:
        container["volumeMounts"].append(
            {"name": PROXY_SHARED_VOLUME, "mountPath": PROXY_SHARED_MOUNT}
        )
        pod_spec["initContainers"] = [_canopy_proxy_container(replica, restore, config, canopy)]
        pod_spec["volumes"].append({"name": PROXY_SHARED_VOLUME, "emptyDir": {"medium": "Memory"}})
        # The broker's NetworkPolicy admits pods with this label (reference §5.2).
        pod_labels[LABEL_PROXY_SIDECAR] = LABEL_TRUE
    template = {"metadata": {"labels": pod_labels}, "spec": pod_spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _restore_metadata(restore, restore_job_name(restore.name)),
        "spec": {
            "backoffLimit": RESTORE_BACKOFF_LIMIT,
            "activeDeadlineSeconds": CANOPY_RESTORE_DEADLINE_S if is_canopy else RESTORE_DEADLINE_S,
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "podFailurePolicy": {
                "rules": [
                    # A failure that will repeat fails the Job at once, not after 3 retries.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": RESTORE_CONTAINER,
                            "operator": "In",
                            "values": [RESTORE_EXIT_PERMANENT],
                        },
                    },
                    # An evicted or preempted pod is not the restore's fault.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": with_placement(template, placement or config.placement),
        },
    }


# ---------------------------------------------------------------------------- version-detect Job

VERSION_DETECT_CONTAINER: Final = "version-detect"
VERSION_DETECT_COMMAND: Final = ("pgro", "detect-version")
VERSION_DETECT_BACKOFF_LIMIT: Final = 2
VERSION_DETECT_DEADLINE_S: Final = 120
# The reference's alpine script needed 16Mi; this runs the Python interpreter.
VERSION_DETECT_RESOURCES: Final = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"cpu": "500m", "memory": "256Mi"},
}


def version_detect_job(
    restore: PostgresPhysicalRestore, config: OperatorConfig, placement: Placement | None = None
) -> dict[str, Any]:
    """`<restore>-version-detect`: runs `pgro detect-version` on the data volume when the
    restore Job's termination message was lost (reference restore-pipeline §3.6). It reads
    the volume as the restore Job left it and re-creates its `pgdata` link."""
    container: dict[str, Any] = {
        "name": VERSION_DETECT_CONTAINER,
        "image": config.restore_image,
        "command": list(VERSION_DETECT_COMMAND),
        "env": [
            _env("PGRO_DATA_ROOT", DATA_MOUNT),
            _env("PGRO_TERMINATION_LOG", TERMINATION_LOG),
        ],
        "resources": {k: dict(v) for k, v in VERSION_DETECT_RESOURCES.items()},
        "volumeMounts": [{"name": "pgdata", "mountPath": DATA_MOUNT}],
        "securityContext": _container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    labels = {**_restore_labels(restore), LABEL_JOB_TYPE: JOB_TYPE_VERSION_DETECT}
    template = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            # It reads a snapshot's content and never calls the API server: no token.
            "automountServiceAccountToken": False,
            "securityContext": _pod_security_context(),
            "containers": [container],
            "volumes": [_pvc_volume("pgdata", restore_data_pvc_name(restore.name))],
        },
    }
    metadata = _restore_metadata(restore, version_detect_job_name(restore.name))
    metadata["labels"] = labels
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": VERSION_DETECT_BACKOFF_LIMIT,
            "activeDeadlineSeconds": VERSION_DETECT_DEADLINE_S,
            # The operator leaves a finished Job to this (its result is in the restore's
            # status by then); owned by the restore, it also goes with it.
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "template": with_placement(template, placement or config.placement),
        },
    }


DATA_CHECK_CONTAINER: Final = "data-check"
DATA_CHECK_COMMAND: Final = ("pgro", "check-data")
# It sends SQL and reads verdicts; the server's own CPUs do the checking.
DATA_CHECK_RESOURCES: Final = {
    "requests": {"cpu": "50m", "memory": "128Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
# Sessions checking relations in parallel on the restored server.
DATA_CHECK_WORKERS: Final = 2
# One retry: a connection lost to a pod restart is worth another go; damage is not (the
# run ends with a verdict then, exit 0).
DATA_CHECK_BACKOFF_LIMIT: Final = 1


def data_check_job(
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    config: OperatorConfig,
    depth: str,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """`<restore>-data-check`: runs `pgro check-data` (the operator's image) against the
    restore's own Service as the admin role, at `depth`, within the same budget as the
    server's readiness. No TTL: its verdict is read from the termination message, and it
    goes with the restore, which owns it (a Job deleted before that would run again).

    The Job carries the restore label, so its changes wake the restore; its pod does not:
    the restore's Service selects that label."""
    budget = default_budget_s(int(parse_quantity(restore.spec.snapshot_size)))
    container: dict[str, Any] = {
        "name": DATA_CHECK_CONTAINER,
        "image": config.restore_image,
        "command": list(DATA_CHECK_COMMAND),
        "env": [
            # The per-restore Service: a switchover cannot repoint it at another database.
            _env(check_job.ENV_HOST, restore.name),
            _env(check_job.ENV_PORT, str(POSTGRES_PORT)),
            _env(check_job.ENV_USER, ADMIN_ROLE),
            _secret_env(check_job.ENV_PASSWORD, admin_creds_secret_name(replica.name), "password"),
            _env(check_job.ENV_DEPTH, depth),
            _env(check_job.ENV_BUDGET, str(int(budget))),
            _env(check_job.ENV_WORKERS, str(DATA_CHECK_WORKERS)),
            _env("PGRO_TERMINATION_LOG", TERMINATION_LOG),
        ],
        "resources": {k: dict(v) for k, v in DATA_CHECK_RESOURCES.items()},
        "securityContext": _container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    template = {
        "metadata": {"labels": {**_replica_labels(replica.name), LABEL_JOB_TYPE: "data-check"}},
        "spec": {
            "restartPolicy": "Never",
            # It talks to PostgreSQL only, never to the API server: no token.
            "automountServiceAccountToken": False,
            "securityContext": _pod_security_context(),
            "containers": [container],
        },
    }
    metadata = _restore_metadata(restore, data_check_job_name(restore.name))
    metadata["labels"][LABEL_JOB_TYPE] = "data-check"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": DATA_CHECK_BACKOFF_LIMIT,
            # The checks stop themselves at the budget; this is for a hung session.
            "activeDeadlineSeconds": int(budget) + 600,
            "template": with_placement(template, placement or config.placement),
        },
    }


# ---------------------------------------------------------------------------- Deployment


def made_by_pgro(deployment: Mapping[str, Any]) -> bool:
    """Whether a live restore Deployment is one pgro applied: pgro's carry
    `app.kubernetes.io/managed-by: pgro`; the reference operator's carry only the replica and
    restore labels. (The field manager cannot tell them apart: both apply as
    `postgres-restore-operator`.)"""
    labels = (deployment.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(LABEL_MANAGED_BY) == MANAGED_BY)


def _without_preload(settings: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in settings.items() if k != "shared_preload_libraries"}


def postgres_deployment(
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    config: OperatorConfig,
    placement: Placement | None,
    postgres_version: str,
) -> dict[str, Any]:
    """`<restore>`: the restored server, `postgres:<version>` on the data volume.

    The restore Job already repaired PGDATA, so the only init step is `setup`, which
    rewrites a database's locale the image lacks or orders differently (building private
    locales into the `locales` emptyDir only when one is missing), sets the superuser
    password, resets WAL if recovery cannot start, and says what it repaired in its
    termination message. The readiness probe is `pg_isready` alone: the quick reindex
    after a locale rewrite gates pgro's own READY (provisioning), which the stable Service
    waits for (docs/locale-and-collation.md). `placement` defaults to the config's.
    """
    spec = replica.spec
    image = postgres_image(postgres_version)
    resources = postgres_resources(spec, restore.spec.snapshot_size)
    shm_mib, shared_buffers_mb = shm_size_mib(resources, spec.shm_size_floor)
    setup = {
        "name": SETUP_CONTAINER,
        "image": image,
        "command": ["/bin/sh", "-c", setup_script()],
        "env": [
            _env("PGDATA", PGDATA),
            _env("PGRO_DATA_ROOT", DATA_MOUNT),
            _secret_env("PGRO_ADMIN_PASSWORD", admin_creds_secret_name(replica.name), "password"),
            _env(LOCALES_ENV, LOCALES_MOUNT),
            _env(TERMINATION_LOG_ENV, TERMINATION_LOG),
        ],
        "resources": {k: dict(v) for k, v in SETUP_RESOURCES.items()},
        # No /dev/shm here: single-user mode needs little, and the memory-backed volume
        # would count against this container's small limit.
        "volumeMounts": [
            {"name": "pgdata", "mountPath": DATA_MOUNT},
            {"name": LOCALES_VOLUME, "mountPath": LOCALES_MOUNT},
        ],
        "securityContext": _container_security_context(),
        # What it repaired (`scripts.SetupReport`), read by the operator's provisioning.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    postgres: dict[str, Any] = {
        "name": "postgres",
        "image": image,
        "command": ["postgres"],
        "args": [
            "-D",
            PGDATA,
            # Command-line settings beat every config file: nothing the snapshot's files say
            # can load a library or run a program. shared_preload_libraries is the one left
            # to postgresql.conf: the restore Job rewrote it to bare names this image
            # installs (includes disabled, postgresql.auto.conf cleared), and the forced
            # dynamic_library_path finds bare names only in the image's $libdir. Forcing it
            # empty would drop pg_stat_statements and friends the source preloaded.
            *forced_arguments(_without_preload(forced_settings(postgres_version, PGDATA))),
            "-c",
            "listen_addresses=*",
            "-c",
            f"port={POSTGRES_PORT}",
            "-c",
            f"shared_buffers={shared_buffers_mb}MB",
            # PGRO_LOG_LEVEL, validated by the operator (`config.parse_postgres_log_level`).
            *(
                ["-c", f"log_min_messages={config.postgres_log_level}"]
                if config.postgres_log_level
                else []
            ),
        ],
        "env": [_env("PGDATA", PGDATA)],
        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "pgdata", "mountPath": DATA_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108,
        ],
        "readinessProbe": _exec_probe(5, 5, 3, 6),
        "livenessProbe": _exec_probe(30, 10, 3, 3),
        "securityContext": _container_security_context(),
    }
    if resources is not None:
        postgres["resources"] = resources
    pod_spec: dict[str, Any] = {
        # The restored server runs the backup's content and never calls the API server.
        "automountServiceAccountToken": False,
        "securityContext": _pod_security_context(),
    }
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    pod_spec |= {
        "initContainers": [setup],
        "containers": [postgres],
        "volumes": [
            _pvc_volume("pgdata", restore_data_pvc_name(restore.name)),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_mib}Mi"}},
            # On the node's disk (in memory it would count against setup's small limit).
            {"name": LOCALES_VOLUME, "emptyDir": {"sizeLimit": LOCALES_SIZE_LIMIT}},
        ],
    }
    pod_meta: dict[str, Any] = {
        "labels": {**_restore_labels(restore), LABEL_READY_FOR_TRAFFIC: LABEL_TRUE}
    }
    if spec.pod_annotations:
        pod_meta["annotations"] = dict(spec.pod_annotations)
    template = with_placement(
        {"metadata": pod_meta, "spec": pod_spec}, placement or config.placement
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _restore_metadata(restore, restore.name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {LABEL_RESTORE: restore.name}},
            # The data volume is ReadWriteOnce: the old pod must be gone first.
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
            "template": template,
        },
    }
