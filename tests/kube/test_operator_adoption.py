"""Taking over a running reference install (issue 17 item 4,
docs/migrating-from-the-reference.md).

- deploy/ applies over the reference's own install manifest with the kubectl a user runs:
  the operator Deployment keeps the reference's (immutable) selector, and what the reference
  had that pgro's does not (its `controller` and `tailscale` containers, the broker port) is
  gone afterwards.
- The reference's ClusterRole, left bound to the ServiceAccount both operators use, is one
  warning at start naming the permissions it gives and the fix.
- A restore the reference operator left serving is adopted as it is: objects shaped as the
  reference makes them (replica and restore with the reference's status, the restore's
  Deployment, Services, PVC and Secrets; a real PostgreSQL 15 serving on the fake node) meet a
  freshly started `pgro operator`, which takes the replica over without re-applying the
  serving Deployment, so its pod is neither replaced nor restarted.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client, codecs
from lightkube.resources.apps_v1 import ReplicaSet
from lightkube.resources.rbac_authorization_v1 import ClusterRole, ClusterRoleBinding

from pgro.api.names import LABEL_READY_FOR_TRAFFIC, LABEL_REPLICA, LABEL_RESTORE
from pgro.api.secret import KopiaCredentials, S3Location
from pgro.kube.client import KubeApi
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import find_binaries
from pgro.postgres.initdb import init_cluster
from tests.kube.controlplane import ControlPlane
from tests.kube.node import FakeNode
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    REPO_ROOT,
    SERVICE_ACCOUNT,
    OperatorProcess,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

API = "pgro.bes.au/v1alpha1"
REPLICA = "legacy"
RESTORE = "legacy-20261201-030000"
COMPONENT = "app.kubernetes.io/component"

# ------------------------------------------------------------ deploy/ over the reference's


def _reference_install(ns: str) -> list[dict[str, Any]]:
    """The operator objects of the reference's install manifest (`operator.yaml` at its
    repository root) that deploy/operator.yaml replaces by name: the ConfigMap, the metrics
    Service and the Deployment, with their selectors, ports and containers as it ships them
    (env, probes and resources shortened)."""
    labels = {"app.kubernetes.io/name": "postgres-restore-operator", COMPONENT: "controller"}
    meta = {"name": "postgres-restore-operator", "namespace": ns}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {**meta, "name": "postgres-restore-operator-config"},
            "data": {"maxConcurrentRestores": "1", "nodeSelector": "bes.node.purpose=workload"},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                **meta,
                "labels": dict(labels),
                "annotations": {
                    "prometheus.io/port": "8080",
                    "prometheus.io/scheme": "http",
                    "prometheus.io/scrape": "true",
                },
            },
            "spec": {
                "ports": [
                    {"name": "http", "port": 8080, "targetPort": "http"},
                    {"name": "broker", "port": 9091, "targetPort": "broker"},
                ],
                "selector": dict(labels),
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**meta, "labels": dict(labels)},
            "spec": {
                "replicas": 0,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {
                        "labels": dict(labels),
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": "8080",
                        },
                    },
                    "spec": {
                        "serviceAccountName": "postgres-restore-operator",
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65534,
                            "runAsGroup": 65534,
                            "fsGroup": 65534,
                        },
                        "containers": [
                            {
                                "name": "controller",
                                "image": "ghcr.io/beyondessential/postgres-restore-operator:latest",
                                "env": [
                                    {"name": "METRICS_ADDR", "value": "[::]:8080"},
                                    {"name": "OPERATOR_SERVICE_NAME", "value": "x"},
                                ],
                                "ports": [
                                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                    {"name": "broker", "containerPort": 9091, "protocol": "TCP"},
                                ],
                                "volumeMounts": [
                                    {"name": "tailscale-socket", "mountPath": "/var/run/tailscale"}
                                ],
                            },
                            {
                                "name": "tailscale",
                                "image": "ghcr.io/tailscale/tailscale:v1.98.8",
                                "volumeMounts": [
                                    {"name": "tailscale-socket", "mountPath": "/var/run/tailscale"}
                                ],
                            },
                        ],
                        "volumes": [{"name": "tailscale-socket", "emptyDir": {}}],
                    },
                },
            },
        },
    ]


def _pgro_install(ns: str) -> list[dict[str, Any]]:
    """deploy/operator.yaml as shipped, moved to `ns` (and scaled to no pods, like the
    reference's here: the fake node runs neither image)."""
    docs = [
        d for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "operator.yaml").read_text()) if d
    ]
    for doc in docs:
        doc["metadata"]["namespace"] = ns
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 0
    return docs


def _kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_deploy_applies_over_the_reference_install(
    control_plane: ControlPlane, admin: KubeApi, kube_namespace: str, tmp_path: Path
) -> None:
    kubeconfig = control_plane.kubeconfig(tmp_path / "kubeconfig")
    reference = tmp_path / "reference.yaml"
    reference.write_text(yaml.safe_dump_all(_reference_install(kube_namespace)))
    ours = tmp_path / "operator.yaml"
    ours.write_text(yaml.safe_dump_all(_pgro_install(kube_namespace)))
    # The reference is installed with a plain (client-side) `kubectl apply -f operator.yaml`.
    installed = _kubectl(kubeconfig, "apply", "-f", str(reference))
    assert installed.returncode == 0, installed.stderr
    # pgro's documented command (docs/migrating-from-the-reference.md), server-side, over
    # it. Before the selector matched the reference's, the API server refused it:
    # `spec.selector: ... field is immutable`.
    applied = _kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(ours))
    assert applied.returncode == 0, applied.stderr

    dep = admin.get("Deployment", kube_namespace, "postgres-restore-operator")
    assert dep is not None
    shipped = next(d for d in _pgro_install(kube_namespace) if d["kind"] == "Deployment")
    assert dep["spec"]["selector"] == shipped["spec"]["selector"]
    pod = dep["spec"]["template"]["spec"]
    # kubectl hands the client-side apply's fields over to the server-side apply, so what
    # deploy/ leaves out is removed: the reference's containers would otherwise run beside
    # pgro's (two operators reconciling the same replicas).
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    svc = admin.get("Service", kube_namespace, "postgres-restore-operator")
    assert svc is not None
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # The ConfigMap is deploy/'s: keys the reference's manifest set are gone, which is why
    # the guide says to carry them into deploy/operator.yaml first.
    config = admin.get("ConfigMap", kube_namespace, "postgres-restore-operator-config")
    assert config is not None
    shipped_config = next(d for d in _pgro_install(kube_namespace) if d["kind"] == "ConfigMap")
    assert config["data"] == shipped_config["data"]


# ------------------------------------------------------- a serving reference restore


def _secret(ns: str, name: str, data: dict[str, str], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, **meta},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _owner(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": kind,
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _reference_deployment(ns: str, owner: dict[str, Any], ready_label: bool) -> dict[str, Any]:
    """`<restore>` as the reference builds it (`build_deployment`). `ready_label`: its newest
    revisions put `pgro.bes.au/ready-for-traffic: "true"` in the pod template; older ones
    carried only the replica and restore labels there, and their switchover stamped the
    label on the running pod. The init container's script is cut down to its first step;
    the rest only concerns how the reference provisioned its users."""
    labels = {LABEL_REPLICA: REPLICA, LABEL_RESTORE: RESTORE}
    pod_labels = {**labels, LABEL_READY_FOR_TRAFFIC: "true"} if ready_label else dict(labels)
    pg_isready = {"exec": {"command": ["pg_isready", "-U", "postgres", "-d", "postgres"]}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": RESTORE,
            "namespace": ns,
            "labels": dict(labels),
            "ownerReferences": [owner],
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {LABEL_RESTORE: RESTORE}},
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": 3600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "securityContext": {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
                    "initContainers": [
                        {
                            "name": "setup-auth",
                            "image": "postgres:15-alpine",
                            "command": ["/bin/sh", "-c"],
                            "args": ['set -e\nPGDATA=/pgdata/pgdata\nchmod 0750 "$PGDATA"\n'],
                            "env": [
                                {"name": "ANALYTICS_USERNAME", "value": "analytics"},
                                {
                                    "name": "ANALYTICS_PASSWORD",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": f"{REPLICA}-creds",
                                            "key": "password",
                                        }
                                    },
                                },
                                {"name": "READ_ONLY", "value": "true"},
                            ],
                            "volumeMounts": [{"name": "pgdata", "mountPath": "/pgdata"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "postgres",
                            "image": "postgres:15",
                            "args": ["postgres", "-D", "/pgdata/pgdata"],
                            "env": [
                                {"name": "PGDATA", "value": "/pgdata/pgdata"},
                                {"name": "POSTGRES_HOST_AUTH_METHOD", "value": "scram-sha-256"},
                            ],
                            "ports": [
                                {"name": "postgres", "containerPort": 5432, "protocol": "TCP"}
                            ],
                            "volumeMounts": [{"name": "pgdata", "mountPath": "/pgdata"}],
                            "readinessProbe": {
                                **pg_isready,
                                "initialDelaySeconds": 5,
                                "periodSeconds": 5,
                                "timeoutSeconds": 3,
                                "failureThreshold": 6,
                            },
                            "livenessProbe": {
                                **pg_isready,
                                "initialDelaySeconds": 30,
                                "periodSeconds": 10,
                                "timeoutSeconds": 3,
                                "failureThreshold": 3,
                            },
                        }
                    ],
                    "volumes": [
                        {
                            "name": "pgdata",
                            "persistentVolumeClaim": {
                                "claimName": f"{RESTORE}-data",
                                "readOnly": False,
                            },
                        }
                    ],
                },
            },
        },
    }


def _service(ns: str, name: str, selector: dict[str, str] | None, owner: dict[str, Any]) -> Any:
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432, "protocol": "TCP"}],
    }
    if selector is not None:
        spec["selector"] = selector
    labels = {LABEL_REPLICA: REPLICA}
    if name == RESTORE:
        labels[LABEL_RESTORE] = RESTORE
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
        "spec": spec,
    }


def _server_pods(api: KubeApi, ns: str) -> list[dict[str, Any]]:
    pods = api.list("Pod", namespace=ns, labels={LABEL_RESTORE: RESTORE}).items
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _serving_pod(api: KubeApi, ns: str) -> dict[str, Any] | None:
    pods = _server_pods(api, ns)
    if len(pods) != 1:
        return None
    pod = pods[0]
    ready = any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )
    return pod if ready else None


@pytest.fixture
def operator_later(
    control_plane: ControlPlane, admin: KubeApi, scratch_root: Path, fake_node: FakeNode
) -> Iterator[list[OperatorProcess]]:
    """Started by the test once the reference's objects exist (first start over them)."""
    started: list[OperatorProcess] = []
    yield started
    for op in started:
        op.stop()


@pytest.mark.parametrize("ready_label", [False, True], ids=["older", "newest"])
def test_a_serving_reference_restore_is_adopted_without_a_restart(
    ready_label: bool,
    control_plane: ControlPlane,
    admin: KubeApi,
    fake_node: FakeNode,
    kube_namespace: str,
    scratch_root: Path,
    account: RunAccount,
    s3_repo: tuple[KopiaCredentials, str],
    operator_later: list[OperatorProcess],
    kube_client: Client,
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    loc = creds.location
    assert isinstance(loc, S3Location)
    admin.create(
        _secret(
            ns,
            "kopia",
            {
                "bucket": loc.bucket,
                "region": loc.region,
                "accessKeyId": creds.access_key_id or "",
                "secretAccessKey": creds.secret_access_key or "",
                "repositoryPassword": creds.repository_password,
                "endpoint": loc.endpoint or "",
                "disableTls": "true",
            },
        )
    )
    replica = admin.create(
        {
            "apiVersion": API,
            "kind": "PostgresPhysicalReplica",
            "metadata": {"name": REPLICA, "namespace": ns},
            "spec": {
                "kopiaSecretRef": {"name": "kopia"},
                "schedule": "0 3 1 1 *",
                "scheduleJitter": "0s",
            },
        }
    )
    restore = admin.create(
        {
            "apiVersion": API,
            "kind": "PostgresPhysicalRestore",
            "metadata": {
                "name": RESTORE,
                "namespace": ns,
                "labels": {LABEL_REPLICA: REPLICA},
                "ownerReferences": [_owner("PostgresPhysicalReplica", replica)],
            },
            "spec": {
                "replica": {"name": REPLICA},
                "snapshot": snapshot,
                "snapshotSize": "64Mi",
                "storageSize": "1Gi",
            },
        }
    )
    restore_owner = _owner("PostgresPhysicalRestore", restore)
    replica_owner = _owner("PostgresPhysicalReplica", replica)
    creds_secret = _secret(
        ns,
        f"{REPLICA}-creds",
        {"username": "analytics", "password": "reference-made-password"},
        labels={LABEL_REPLICA: REPLICA},
        ownerReferences=[replica_owner],
    )
    admin.create(creds_secret)

    # The restored data: what the reference's restore Job left on the volume.
    claim = f"{RESTORE}-data"
    fake_node._make_pvc_dir(fake_node.pvc_path(ns, claim))
    init_cluster(find_binaries("15", account), fake_node.pvc_path(ns, claim) / "pgdata", account)
    admin.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": claim,
                "namespace": ns,
                "labels": {LABEL_REPLICA: REPLICA, LABEL_RESTORE: RESTORE},
                "ownerReferences": [restore_owner],
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    )
    # The reference server-side-applies the Deployment under the same field manager pgro
    # uses, so only the labels tell them apart.
    admin.apply(_reference_deployment(ns, restore_owner, ready_label))
    admin.create(_service(ns, RESTORE, {LABEL_RESTORE: RESTORE}, restore_owner))
    stable = {LABEL_RESTORE: RESTORE, LABEL_READY_FOR_TRAFFIC: "true"}
    admin.create(_service(ns, REPLICA, stable, replica_owner))

    pod = wait_for(
        "the reference's server to serve",
        lambda: _serving_pod(admin, ns),
        120,
        context=fake_node.describe,
    )
    # The probe that pgro's pass over the Active restore ran: the pod lacks the
    # ready-for-traffic label (older template: its switchover labelled the pod then, and
    # this one replaced it since; newest template: taken off here), so the stable Service
    # selects nothing until pgro's MarkReadyForTraffic re-stamps it.
    if ready_label:
        admin.merge_patch(
            "Pod",
            ns,
            pod["metadata"]["name"],
            {"metadata": {"labels": {LABEL_READY_FOR_TRAFFIC: None}}},
        )
    else:
        assert LABEL_READY_FOR_TRAFFIC not in pod["metadata"]["labels"]
    status_time = "2026-12-01T03:10:00Z"
    admin.merge_patch(
        "PostgresPhysicalRestore",
        ns,
        RESTORE,
        {
            "status": {
                "phase": "Active",
                "restoreJob": {
                    "name": f"{RESTORE}-restore",
                    "phase": "Succeeded",
                    "completedAt": "2026-12-01T03:05:00Z",
                },
                "deployment": RESTORE,
                "pvc": claim,
                "postgresVersion": "15",
                "createdAt": "2026-12-01T03:00:00Z",
                "restoredAt": "2026-12-01T03:05:00Z",
                "activatedAt": status_time,
            }
        },
        status=True,
    )
    admin.merge_patch(
        "PostgresPhysicalReplica",
        ns,
        REPLICA,
        {
            "status": {
                "phase": "Ready",
                "currentRestore": RESTORE,
                "serviceName": REPLICA,
                "lastRestoreCompletedAt": status_time,
                "nextScheduledRestore": "2027-01-01T03:00:00Z",
                "latestAvailableSnapshot": snapshot,
                "consecutiveRestoreFailures": 0,
                "connectionInfo": {
                    "host": f"{REPLICA}.{ns}.svc.cluster.local",
                    "port": 5432,
                    "database": "postgres",
                    "username": "analytics",
                    "passwordSecret": f"{REPLICA}-creds",
                },
            }
        },
        status=True,
    )
    before = admin.get("Deployment", ns, RESTORE)
    assert before is not None

    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    shape = "newest" if ready_label else "older"
    workdir = scratch_root / f"operator-adoption-{shape}"
    workdir.mkdir(exist_ok=True)
    kubeconfig = control_plane.kubeconfig(workdir / "kubeconfig", token=token)
    op = OperatorProcess(workdir, kubeconfig, f"op-adoption-{shape}").start()
    operator_later.append(op)

    # MarkReadyForTraffic follows EnsureServer in the same pass of the Active restore: once
    # the pod carries the label again, pgro has already decided about the Deployment.
    def relabelled() -> dict[str, Any] | None:
        current = admin.get("Pod", ns, pod["metadata"]["name"])
        if current is None or current["metadata"].get("deletionTimestamp"):
            # What re-applying pgro's own definition did: a new template, a new pod.
            raise AssertionError("the serving pod is being replaced")
        labels = (current or {}).get("metadata", {}).get("labels") or {}
        return current if labels.get(LABEL_READY_FOR_TRAFFIC) == "true" else None

    relabelled_pod = wait_for(
        "pgro to re-stamp ready-for-traffic", relabelled, 90, context=op.log_tail
    )

    # The replica is pgro's now: the reference's status above carried no conditions; pgro
    # writes its credential check (and keeps the rest).
    def taken_over() -> dict[str, Any] | None:
        obj = admin.get("PostgresPhysicalReplica", ns, REPLICA) or {}
        types = {c["type"] for c in (obj.get("status") or {}).get("conditions") or []}
        return obj if "KopiaSecretValid" in types else None

    replica_now = wait_for("pgro to take the replica over", taken_over, 60, context=op.log_tail)
    assert replica_now["status"]["phase"] == "Ready"
    assert replica_now["status"]["currentRestore"] == RESTORE
    restore_now = admin.get("PostgresPhysicalRestore", ns, RESTORE)
    assert restore_now is not None
    assert restore_now["status"]["phase"] == "Active"

    # The serving Deployment as the reference left it: same generation, same template.
    after = admin.get("Deployment", ns, RESTORE)
    assert after is not None
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"]["template"] == before["spec"]["template"]
    assert "app.kubernetes.io/managed-by" not in after["metadata"].get("labels", {})
    # The same pod, never restarted.
    pods = _server_pods(admin, ns)
    assert [p["metadata"]["uid"] for p in pods] == [pod["metadata"]["uid"]]
    statuses = relabelled_pod["status"]["containerStatuses"]
    assert [(s["name"], s["restartCount"]) for s in statuses] == [("postgres", 0)]
    replica_sets = list(kube_client.list(ReplicaSet, namespace=ns))
    assert len(replica_sets) == 1
    # The stable Service selects it again.
    svc = admin.get("Service", ns, REPLICA)
    assert svc is not None
    assert svc["spec"]["selector"].items() <= relabelled_pod["metadata"]["labels"].items()
    # pgro's own Secret for provisioning later restores exists; the reference's is untouched.
    assert admin.get("Secret", ns, f"{REPLICA}-admin-creds") is not None
    kept = admin.get("Secret", ns, f"{REPLICA}-creds")
    assert kept is not None
    assert kept["data"] == creds_secret["data"]
    assert op.alive()
    # deploy/'s RBAC alone: nothing to warn about.
    assert "which pgro never needs" not in op.log_tail(400)


# ------------------------------------------------ the reference's ClusterRole left bound


def test_a_reference_cluster_role_left_bound_is_warned_about_at_start(
    control_plane: ControlPlane,
    admin: KubeApi,
    kube_client: Client,
    scratch_root: Path,
    operator_later: list[OperatorProcess],
) -> None:
    everything = ["get", "list", "watch", "create", "update", "patch", "delete"]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "postgres-restore-operator"},
        # Three of the reference's rules, as its operator.yaml grants them.
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": everything},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": everything},
            {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "postgres-restore-operator"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "postgres-restore-operator",
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": OPERATOR_NAMESPACE}
        ],
    }
    kube_client.create(codecs.from_dict(role))
    kube_client.create(codecs.from_dict(binding))
    try:
        token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
        workdir = scratch_root / "operator-reference-rbac"
        workdir.mkdir(exist_ok=True)
        kubeconfig = control_plane.kubeconfig(workdir / "kubeconfig", token=token)
        op = OperatorProcess(workdir, kubeconfig, "op-reference-rbac").start()
        operator_later.append(op)
        line = wait_for(
            "the warning about the reference's ClusterRole",
            lambda: next(
                (x for x in op.log_tail(200).splitlines() if "which pgro never needs" in x),
                None,
            ),
            60,
            context=op.log_tail,
        )
        assert '"level": "warning"' in line
        for held in ("update secrets", "delete deployments (apps)", "create pods/portforward"):
            assert held in line
        assert "kubectl delete clusterrolebinding postgres-restore-operator" in line
        assert op.alive()
    finally:
        kube_client.delete(ClusterRoleBinding, "postgres-restore-operator")
        kube_client.delete(ClusterRole, "postgres-restore-operator")
