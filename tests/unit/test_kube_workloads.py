"""The Kubernetes objects built for a replica and its restores, field by field against the
reference (restore-pipeline.md §2-4, §7, §8.6; replica-lifecycle.md §1.3), and each one
loaded into lightkube's typed Kubernetes models to catch misspelled fields."""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
from typing import Any

import pytest
from lightkube import codecs

from pgro.runtimes.kubernetes import workloads as wl
from pgro.runtimes.kubernetes.config import OperatorConfig, Placement, Toleration
from pgro.runtimes.kubernetes.scripts import setup_script
from tests.fixtures import manifests

NS = "analytics"
IMAGE = "ghcr.io/beyondessential/pgro:1.2.3"
CONFIG = OperatorConfig(max_concurrent_restores=2, restore_image=IMAGE)
RESTORE = "fiji-20260301-120000"
GIB = 1024**3

REPLICA_OWNER = {
    "apiVersion": "pgro.bes.au/v1alpha1",
    "kind": "PostgresPhysicalReplica",
    "name": "fiji",
    "uid": "replica-uid",
    "controller": True,
    "blockOwnerDeletion": True,
}
RESTORE_OWNER = {
    "apiVersion": "pgro.bes.au/v1alpha1",
    "kind": "PostgresPhysicalRestore",
    "name": RESTORE,
    "uid": "restore-uid",
    "controller": True,
    "blockOwnerDeletion": True,
}
REPLICA_LABELS = {"pgro.bes.au/replica": "fiji", "app.kubernetes.io/managed-by": "pgro"}
RESTORE_LABELS = {**REPLICA_LABELS, "pgro.bes.au/restore": RESTORE}


replica = functools.partial(
    manifests.replica,
    "fiji",
    namespace=NS,
    metadata={"uid": "replica-uid"},
    schedule="0 3 * * *",
    ephemeral=None,
)
restore = functools.partial(
    manifests.restore,
    RESTORE,
    "fiji",
    namespace=NS,
    metadata={"uid": "restore-uid"},
    snapshotSize="100Gi",
    snapshotTime="2026-03-01T03:00:00.123456Z",
    storageSize="110Gi",
)


def assert_kubernetes_valid(obj: dict[str, Any]) -> None:
    """lightkube loads it into the typed model and writes back exactly the same content:
    a misspelled or misplaced field would be dropped and show up as a difference."""
    typed = codecs.from_dict(obj)
    assert typed.to_dict() == obj  # type: ignore[no-untyped-call]


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in container["env"]:
        assert entry["name"] not in out, f"duplicate env {entry['name']}"
        out[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return out


def secret_ref(name: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "key": key}
    if optional:
        ref["optional"] = True
    return {"secretKeyRef": ref}


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


# ---------------------------------------------------------------------- Secrets


def test_credentials_secret() -> None:
    secret = wl.credentials_secret(replica(analyticsUsername="reader"), "Pw0rdABC")
    assert secret["apiVersion"] == "v1"
    assert secret["kind"] == "Secret"
    assert secret["type"] == "Opaque"
    assert secret["metadata"] == {
        "name": "fiji-creds",
        "namespace": NS,
        "labels": REPLICA_LABELS,
        "ownerReferences": [REPLICA_OWNER],
    }
    assert decoded(secret) == {"username": "reader", "password": "Pw0rdABC"}
    assert "stringData" not in secret
    assert_kubernetes_valid(secret)


def test_credentials_secret_default_username() -> None:
    assert decoded(wl.credentials_secret(replica(), "x"))["username"] == "analytics"


def test_extra_user_secret() -> None:
    secret = wl.extra_user_secret(replica(), "Report_Writer", "abc")
    assert secret["metadata"]["name"] == "fiji-user-report-writer-creds"
    assert secret["metadata"]["labels"] == {
        **REPLICA_LABELS,
        "pgro.bes.au/component": "extra-user-creds",
    }
    assert secret["metadata"]["ownerReferences"] == [REPLICA_OWNER]
    assert decoded(secret) == {"username": "Report_Writer", "password": "abc"}
    assert_kubernetes_valid(secret)


def test_admin_secret() -> None:
    secret = wl.admin_secret(replica(), "AdminPw1")
    assert secret["metadata"]["name"] == "fiji-admin-creds"
    assert secret["metadata"]["labels"] == {
        **REPLICA_LABELS,
        "pgro.bes.au/component": "admin-creds",
    }
    assert secret["metadata"]["ownerReferences"] == [REPLICA_OWNER]
    assert decoded(secret) == {"username": "postgres", "password": "AdminPw1"}
    assert_kubernetes_valid(secret)


# ---------------------------------------------------------------------- Services


def test_stable_service_has_no_selector() -> None:
    svc = wl.stable_service(replica())
    assert svc["metadata"] == {
        "name": "fiji",
        "namespace": NS,
        "labels": REPLICA_LABELS,
        "ownerReferences": [REPLICA_OWNER],
    }
    assert svc["spec"] == {
        "type": "ClusterIP",
        "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432, "protocol": "TCP"}],
    }
    assert_kubernetes_valid(svc)


def test_stable_service_annotations() -> None:
    annotations = {"tailscale.com/expose": "true", "tailscale.com/hostname": "fiji-db"}
    svc = wl.stable_service(replica(serviceAnnotations=annotations))
    assert svc["metadata"]["annotations"] == annotations
    assert_kubernetes_valid(svc)


def test_stable_service_selector() -> None:
    assert wl.stable_service_selector(RESTORE) == {
        "pgro.bes.au/restore": RESTORE,
        "pgro.bes.au/ready-for-traffic": "true",
    }


def test_restore_service() -> None:
    svc = wl.restore_service(restore())
    assert svc["metadata"] == {
        "name": RESTORE,
        "namespace": NS,
        "labels": RESTORE_LABELS,
        "ownerReferences": [RESTORE_OWNER],
    }
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": {"pgro.bes.au/restore": RESTORE},
        "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432, "protocol": "TCP"}],
    }
    assert_kubernetes_valid(svc)


def test_ready_for_traffic_patch() -> None:
    assert wl.pod_ready_for_traffic_patch() == {
        "metadata": {"labels": {"pgro.bes.au/ready-for-traffic": "true"}}
    }


# ---------------------------------------------------------------------- PVCs


def test_data_pvc() -> None:
    pvc = wl.data_pvc(replica(storageClass="fast"), restore())
    assert pvc["apiVersion"] == "v1"
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"] == {
        "name": f"{RESTORE}-data",
        "namespace": NS,
        "labels": RESTORE_LABELS,
        "ownerReferences": [RESTORE_OWNER],
    }
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast",
        "resources": {"requests": {"storage": "110Gi"}},
    }
    assert_kubernetes_valid(pvc)


def test_data_pvc_without_storage_class_uses_cluster_default() -> None:
    pvc = wl.data_pvc(replica(), restore(storageSize=5368709120))
    assert "storageClassName" not in pvc["spec"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5368709120"
    assert_kubernetes_valid(pvc)


@pytest.mark.parametrize(("snapshot", "size"), [("10Gi", "10Gi"), ("100Gi", "20Gi")])
def test_kopia_cache_pvc(snapshot: str, size: str) -> None:
    pvc = wl.kopia_cache_pvc(replica(storageClass="fast"), snapshot)
    assert pvc["metadata"] == {
        "name": "fiji-kopia-cache",
        "namespace": NS,
        "labels": {**REPLICA_LABELS, "pgro.bes.au/component": "kopia-cache"},
        "ownerReferences": [REPLICA_OWNER],
    }
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast",
        "resources": {"requests": {"storage": size}},
    }
    assert_kubernetes_valid(pvc)


# ---------------------------------------------------------------------- restore Job


def test_restore_job_object() -> None:
    job = wl.restore_job(replica(), restore(), CONFIG)
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    assert job["metadata"] == {
        "name": f"{RESTORE}-restore",
        "namespace": NS,
        "labels": RESTORE_LABELS,
        "ownerReferences": [RESTORE_OWNER],
    }
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    assert spec["activeDeadlineSeconds"] == 7200
    assert spec["ttlSecondsAfterFinished"] == 120
    assert spec["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "restore", "operator": "In", "values": [2]},
    }
    assert spec["podFailurePolicy"]["rules"][1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget"}],
    }
    assert spec["template"]["metadata"] == {"labels": RESTORE_LABELS}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["securityContext"] == {
        "runAsUser": 999,
        "runAsGroup": 999,
        "fsGroup": 999,
        "fsGroupChangePolicy": "OnRootMismatch",
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["volumes"] == [
        {"name": "pgdata", "persistentVolumeClaim": {"claimName": f"{RESTORE}-data"}},
        {"name": "kopia-cache", "persistentVolumeClaim": {"claimName": "fiji-kopia-cache"}},
    ]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    [container] = pod["containers"]
    assert container["name"] == "restore"
    assert container["image"] == IMAGE
    assert container["command"] == ["pgro", "restore-job"]
    assert "args" not in container
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "10240Mi"},
    }
    assert container["volumeMounts"] == [
        {"name": "pgdata", "mountPath": "/pgdata"},
        {"name": "kopia-cache", "mountPath": "/tmp/kopia"},
    ]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"
    assert_kubernetes_valid(job)


def test_restore_job_env() -> None:
    job = wl.restore_job(replica(), restore(), CONFIG)
    env = env_map(job["spec"]["template"]["spec"]["containers"][0])
    assert env == {
        "SNAPSHOT_ID": "k0123abcd",
        "SNAPSHOT_SIZE": str(100 * GIB),
        "SNAPSHOT_TIME": "2026-03-01T03:00:00.123456Z",
        "PGRO_DATA_ROOT": "/pgdata",
        "PGRO_KOPIA_DIR": "/tmp/kopia",
        "PGRO_KOPIA_CACHE_ROOT": "/tmp/kopia/cache",
        "PGRO_READ_ONLY": "true",
        "PGRO_TERMINATION_LOG": "/dev/termination-log",
        "KOPIA_CONTENT_CACHE_MB": "14336",
        "KOPIA_METADATA_CACHE_MB": "512",
        "KOPIA_PARALLEL": "2",
        "KOPIA_BUCKET": secret_ref("kopia", "bucket", optional=True),
        "KOPIA_REGION": secret_ref("kopia", "region", optional=True),
        "AWS_ACCESS_KEY_ID": secret_ref("kopia", "accessKeyId", optional=True),
        "AWS_SECRET_ACCESS_KEY": secret_ref("kopia", "secretAccessKey", optional=True),
        "KOPIA_PASSWORD": secret_ref("kopia", "repositoryPassword"),
        "KOPIA_ENDPOINT": secret_ref("kopia", "endpoint", optional=True),
        "KOPIA_DISABLE_TLS": secret_ref("kopia", "disableTls", optional=True),
        "KOPIA_FILESYSTEM_PATH": secret_ref("kopia", "filesystemPath", optional=True),
        "KOPIA_PREFIX": secret_ref("kopia", "prefix", optional=True),
    }


def test_restore_job_env_matches_what_restore_job_reads() -> None:
    """Every Secret variable the Job sets is one `pgro restore-job` maps back to a key."""
    from pgro.pipeline.restore_job import SECRET_ENV

    job = wl.restore_job(replica(), restore(), CONFIG)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in env if "valueFrom" in e
    }
    assert from_secret == dict(SECRET_ENV)


def test_restore_job_unknown_snapshot_time_is_empty() -> None:
    r = restore()
    r.spec.snapshot_time = None
    env = env_map(wl.restore_job(replica(), r, CONFIG)["spec"]["template"]["spec"]["containers"][0])
    assert env["SNAPSHOT_TIME"] == ""


def test_restore_job_extra_config_passed_to_restore_job() -> None:
    extra = "work_mem = '64MB'\nmax_connections = 200\n"
    job = wl.restore_job(replica(postgresExtraConfig=extra), restore(), CONFIG)
    assert env_map(job["spec"]["template"]["spec"]["containers"][0])["PGRO_EXTRA_CONFIG"] == extra
    assert_kubernetes_valid(job)


def test_restore_job_canopy_path_reads_canopy_secret() -> None:
    rep = replica(kopiaSecretRef=None, canopySource={"group": "g", "type": "t"})
    env = env_map(
        wl.restore_job(
            rep, restore(), CONFIG, canopy=wl.CanopyJobSettings("http://broker", "http://cb")
        )["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["KOPIA_PASSWORD"] == secret_ref("fiji-canopy-creds", "repositoryPassword")


@pytest.mark.parametrize(
    ("replica_spec", "restore_spec", "expected"),
    [
        ({}, {}, "true"),
        ({"readOnly": False}, {}, "false"),
        ({"persistentSchemas": ["reporting"]}, {}, "false"),
        ({"persistentSchemas": []}, {}, "true"),
        # Redaction's superuser session writes on its own: the restore stays read-only.
        ({"redaction": {"manifestUrl": "https://example.com/m.json"}}, {}, "true"),
        ({}, {"migrateTo": {"version": "2.5.0", "versionId": "v-1"}}, "false"),
    ],
)
def test_restore_job_effective_read_only(
    replica_spec: dict[str, Any], restore_spec: dict[str, Any], expected: str
) -> None:
    job = wl.restore_job(replica(**replica_spec), restore(**restore_spec), CONFIG)
    assert env_map(job["spec"]["template"]["spec"]["containers"][0])["PGRO_READ_ONLY"] == expected


PLACEMENT = Placement(
    node_selector={"bes.node.purpose": "workload"},
    pod_annotations={"karpenter.sh/do-not-disrupt": "true"},
    tolerations=(Toleration(key="dedicated", operator="Equal", value="db", effect="NoSchedule"),),
)


def test_restore_job_placement() -> None:
    job = wl.restore_job(replica(), restore(), CONFIG, PLACEMENT)
    template = job["spec"]["template"]
    assert template["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}
    assert template["metadata"]["labels"] == RESTORE_LABELS
    assert template["spec"]["nodeSelector"] == {"bes.node.purpose": "workload"}
    assert template["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}
    ]
    assert_kubernetes_valid(job)


def test_restore_job_placement_defaults_to_config() -> None:
    config = OperatorConfig(max_concurrent_restores=2, restore_image=IMAGE, placement=PLACEMENT)
    assert wl.restore_job(replica(), restore(), config) == wl.restore_job(
        replica(), restore(), CONFIG, PLACEMENT
    )


# ---------------------------------------------------------------------- Deployment


def deployment(**kwargs: Any) -> dict[str, Any]:
    placement = kwargs.pop("placement", None)
    snapshot_size = kwargs.pop("snapshotSize", "100Gi")
    return wl.postgres_deployment(
        replica(**kwargs), restore(snapshotSize=snapshot_size), CONFIG, placement, "15"
    )


def containers(dep: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = dep["spec"]["template"]["spec"]
    [setup] = pod["initContainers"]
    [postgres] = pod["containers"]
    return setup, postgres


def test_deployment_object() -> None:
    dep = deployment()
    assert dep["apiVersion"] == "apps/v1"
    assert dep["kind"] == "Deployment"
    assert dep["metadata"] == {
        "name": RESTORE,
        "namespace": NS,
        "labels": RESTORE_LABELS,
        "ownerReferences": [RESTORE_OWNER],
    }
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"] == {"matchLabels": {"pgro.bes.au/restore": RESTORE}}
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["progressDeadlineSeconds"] == 3600
    assert spec["template"]["metadata"] == {
        "labels": {**RESTORE_LABELS, "pgro.bes.au/ready-for-traffic": "true"}
    }
    pod = spec["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsUser": 999,
        "runAsGroup": 999,
        "fsGroup": 999,
        "fsGroupChangePolicy": "OnRootMismatch",
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "affinity" not in pod
    assert "tolerations" not in pod
    assert "nodeSelector" not in pod
    # No resources: shm from the assumed 1Gi request (§4.4 table, first row).
    assert pod["volumes"] == [
        {"name": "pgdata", "persistentVolumeClaim": {"claimName": f"{RESTORE}-data"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "369Mi"}},
        {"name": "locales", "emptyDir": {"sizeLimit": "128Mi"}},
    ]
    # The selector must match the template, or the API server rejects the Deployment.
    for key, value in spec["selector"]["matchLabels"].items():
        assert spec["template"]["metadata"]["labels"][key] == value
    assert_kubernetes_valid(dep)


def test_deployment_setup_container() -> None:
    setup, _ = containers(deployment())
    assert setup["name"] == "setup"
    assert setup["image"] == "postgres:15"
    assert setup["command"] == ["/bin/sh", "-c", setup_script()]
    assert env_map(setup) == {
        "PGDATA": "/pgdata/pgdata",
        "PGRO_DATA_ROOT": "/pgdata",
        "PGRO_ADMIN_PASSWORD": secret_ref("fiji-admin-creds", "password"),
        "PGRO_LOCALES": "/pgro-locales",
        "PGRO_TERMINATION_LOG": "/dev/termination-log",
    }
    assert setup["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    # Never /dev/shm in the init container.
    assert setup["volumeMounts"] == [
        {"name": "pgdata", "mountPath": "/pgdata"},
        {"name": "locales", "mountPath": "/pgro-locales"},
    ]
    assert setup["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_deployment_postgres_container() -> None:
    _, postgres = containers(deployment())
    assert postgres["name"] == "postgres"
    assert postgres["image"] == "postgres:15"
    assert postgres["command"] == ["postgres"]
    args = postgres["args"]
    assert args[:2] == ["-D", "/pgdata/pgdata"]
    assert args[-6:] == [
        "-c",
        "listen_addresses=*",
        "-c",
        "port=5432",
        "-c",
        "shared_buffers=258MB",
    ]
    # Between them, the settings no snapshot config may override (issue 18 item 3).
    forced = dict(a.split("=", 1) for a in args[3:-6:2])
    assert args[2:-6:2] == ["-c"] * len(forced)
    # Left to the restore Job's validated postgresql.conf (bare names the image installs).
    assert "shared_preload_libraries" not in forced
    assert forced["session_preload_libraries"] == ""
    assert forced["jit_provider"] == "llvmjit"
    assert forced["dynamic_library_path"] == "$libdir"
    assert forced["hba_file"] == "/pgdata/pgdata/pg_hba.conf"
    assert forced["archive_library"] == ""
    assert env_map(postgres) == {"PGDATA": "/pgdata/pgdata"}
    assert postgres["ports"] == [{"name": "postgres", "containerPort": 5432, "protocol": "TCP"}]
    assert postgres["volumeMounts"] == [
        {"name": "pgdata", "mountPath": "/pgdata"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    assert "resources" not in postgres
    probe_command = ["pg_isready", "-U", "postgres", "-d", "postgres"]
    assert postgres["readinessProbe"] == {
        "exec": {"command": probe_command},
        "initialDelaySeconds": 5,
        "periodSeconds": 5,
        "timeoutSeconds": 3,
        "failureThreshold": 6,
    }
    assert postgres["livenessProbe"] == {
        "exec": {"command": probe_command},
        "initialDelaySeconds": 30,
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    }


def test_deployment_does_not_pass_extra_config_to_postgres() -> None:
    _, postgres = containers(deployment(postgresExtraConfig="work_mem = '1GB'"))
    assert not any("work_mem" in arg for arg in postgres["args"])


@pytest.mark.parametrize(
    ("resources", "shm", "shared_buffers"),
    [
        ({"requests": {"memory": "2Gi"}}, "738Mi", "516MB"),
        ({"requests": {"memory": "2Gi"}, "limits": {"memory": "4Gi"}}, "1024Mi", "716MB"),
    ],
)
def test_deployment_explicit_resources_size_shm(
    resources: dict[str, Any], shm: str, shared_buffers: str
) -> None:
    dep = deployment(resources=resources)
    _, postgres = containers(dep)
    assert postgres["resources"] == resources
    assert postgres["args"][-1] == f"shared_buffers={shared_buffers}"
    assert dep["spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] == shm
    assert_kubernetes_valid(dep)


def test_deployment_resources_from_floor() -> None:
    floor = {"requests": {"cpu": "500m"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    dep = deployment(resourcesFloor=floor, snapshotSize="100Gi")
    _, postgres = containers(dep)
    assert postgres["resources"] == {
        "requests": {"cpu": "500m", "memory": "10240Mi"},
        "limits": {"cpu": "2", "memory": "10240Mi"},
    }
    # request = limit = 10Gi: shm is 36 %.
    assert postgres["args"][-1] == "shared_buffers=2580MB"
    assert dep["spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] == "3687Mi"
    assert_kubernetes_valid(dep)


def test_deployment_shm_floor() -> None:
    dep = deployment(shmSizeFloor="1Gi")
    _, postgres = containers(dep)
    assert dep["spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] == "1024Mi"
    assert postgres["args"][-1] == "shared_buffers=715MB"


AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}
            ]
        }
    }
}


def test_deployment_spec_placement_and_operator_placement() -> None:
    dep = deployment(
        podAnnotations={"karpenter.sh/do-not-disrupt": "false", "team": "data"},
        affinity=AFFINITY,
        tolerations=[
            {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"},
            {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5},
        ],
        placement=Placement(
            node_selector={"bes.node.purpose": "workload"},
            pod_annotations={"karpenter.sh/do-not-disrupt": "true", "extra": "1"},
            tolerations=(
                Toleration(key="dedicated", operator="Equal", value="db", effect="NoSchedule"),
                Toleration(key="spot", operator="Exists", effect="NoExecute"),
            ),
        ),
    )
    template = dep["spec"]["template"]
    # The replica's own annotations win; placement fills gaps.
    assert template["metadata"]["annotations"] == {
        "karpenter.sh/do-not-disrupt": "false",
        "team": "data",
        "extra": "1",
    }
    pod = template["spec"]
    assert pod["affinity"] == AFFINITY
    assert pod["nodeSelector"] == {"bes.node.purpose": "workload"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"},
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5},
        {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
    ]
    assert_kubernetes_valid(dep)


def test_deployment_placement_defaults_to_config() -> None:
    config = OperatorConfig(max_concurrent_restores=2, restore_image=IMAGE, placement=PLACEMENT)
    built = wl.postgres_deployment(replica(), restore(), config, None, "16")
    assert built["spec"]["template"]["spec"]["nodeSelector"] == {"bes.node.purpose": "workload"}
    assert containers(built)[1]["image"] == "postgres:16"


def test_restored_pods_get_no_service_account_token() -> None:
    """Restore Jobs and restored servers run what a snapshot holds and never call the API
    server: the namespace's ServiceAccount token must not be mounted into them (a
    `pg_read_server_files` or `COPY … TO PROGRAM` in the restored server would read it)."""
    canopy_replica = replica(kopiaSecretRef=None, canopySource={"group": "g", "type": "t"})
    pods = {
        "restore Job": wl.restore_job(replica(), restore(), CONFIG),
        "restore Job (placed)": wl.restore_job(replica(), restore(), CONFIG, PLACEMENT),
        "restore Job (canopy)": wl.restore_job(
            canopy_replica,
            restore(),
            CONFIG,
            canopy=wl.CanopyJobSettings("http://broker", "http://cb"),
        ),
        "postgres Deployment": deployment(),
        "postgres Deployment (placed)": deployment(
            placement=PLACEMENT, affinity={"nodeAffinity": {}}, tolerations=[{"key": "x"}]
        ),
    }
    for what, obj in pods.items():
        pod = obj["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, what
        assert_kubernetes_valid(obj)


def test_builders_do_not_share_mutable_state() -> None:
    first = deployment()
    containers(first)[0]["resources"]["limits"]["cpu"] = "9"
    assert containers(deployment())[0]["resources"]["limits"]["cpu"] == "500m"


# ---------------------------------------------------------------------- setup script


def test_setup_script_parses_as_posix_sh() -> None:
    script = setup_script()
    subprocess.run(["sh", "-n", "-c", script], check=True)
    dash = shutil.which("dash")
    if dash is not None:
        subprocess.run([dash, "-n", "-c", script], check=True)


def test_setup_script_uses_paths_from_the_environment_only() -> None:
    script = setup_script()
    assert "/pgdata" not in script
    assert '"$PGDATA"' in script
    assert '"$PGRO_DATA_ROOT/fix-reset-wal"' in script
    assert "set -eu" in script.splitlines()[0]
    assert "set -x" not in script.replace("`set -x`", "")


def test_setup_script_carries_the_wal_signatures_and_the_never_reset_list() -> None:
    """Known WAL signatures reset at once, other failures as the last resort, and the
    failures a reset cannot fix never (tests/integration/test_wal_reset_last_resort.py)."""
    script = setup_script()
    for signature in (
        "WAL ends before end of online backup",
        "invalid record length at",
        "database system was interrupted while in recovery",
        "could not locate required checkpoint record",
        "could not locate a valid checkpoint record",
        "database files are incompatible with server",
        "Permission denied",
    ):
        assert f"-e '{signature}'" in script
    assert 'pg_resetwal -f "$PGDATA"' in script


def test_setup_script_refuses_non_alphanumeric_password(tmp_path: Any) -> None:
    for bad in ("", "abc'; DROP ROLE x; --", "pass word", "pässword"):
        proc = subprocess.run(
            ["sh", "-c", setup_script()],
            env={
                "PATH": "/usr/bin:/bin",
                "PGDATA": str(tmp_path / "nowhere"),
                "PGRO_DATA_ROOT": str(tmp_path),
                "PGRO_ADMIN_PASSWORD": bad,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 1, bad
        assert "letters and digits" in proc.stderr
        if bad:
            assert bad not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].__setitem__("replicass", 1),
        lambda d: containers(d)[1].__setitem__("volumeMount", []),
        lambda d: d["spec"]["template"]["spec"]["volumes"][1]["emptyDir"].__setitem__("size", 1),
    ],
)
def test_kubernetes_check_catches_misspelled_fields(mutate: Any) -> None:
    dep = deployment()
    mutate(dep)
    with pytest.raises(AssertionError):
        assert_kubernetes_valid(dep)
