"""The Kubernetes test harness itself: a real control plane, and a fake node whose pods run for
real, acted on by the real Job, Deployment/ReplicaSet, EndpointSlice, PV and garbage-collector
controllers."""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import psycopg
import pytest
from lightkube import ApiError, Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.authentication_v1 import SelfSubjectReview
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import (
    ConfigMap,
    Namespace,
    PersistentVolume,
    PersistentVolumeClaim,
    Pod,
    Secret,
    Service,
    ServiceAccount,
)

from tests.fixtures.waiting import wait_for
from tests.kube.controlplane import ControlPlane
from tests.kube.node import FakeNode, PathMap, expand

pytestmark = pytest.mark.timeout(300)

R = TypeVar("R")


def obj(cls: type[R], data: dict[str, Any]) -> R:
    """A typed resource from a plain manifest (lightkube's from_dict is typed loosely)."""
    return cast(R, cls.from_dict(data))  # type: ignore[attr-defined]


def _secret(ns: str, name: str, data: dict[str, str]) -> Secret:
    return obj(
        Secret,
        {
            "metadata": {"name": name, "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )


def _pvc(ns: str, name: str) -> PersistentVolumeClaim:
    return obj(
        PersistentVolumeClaim,
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


def _pods(client: Client, ns: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in client.list(Pod, namespace=ns, labels=labels)]  # type: ignore[arg-type]


def test_control_plane_serves_and_authenticates_service_accounts(
    control_plane: ControlPlane, kube_client: Client, kube_namespace: str
) -> None:
    ctx = ssl.create_default_context(cafile=str(control_plane.ca_file))
    with httpx.Client(verify=ctx) as h:
        ready = h.get(
            f"{control_plane.server}/readyz",
            headers={"Authorization": f"Bearer {control_plane.admin_token}"},
        )
        anonymous = h.get(f"{control_plane.server}/api/v1/namespaces")
    assert ready.status_code == 200, ready.text
    assert anonymous.status_code in (401, 403)

    ns = kube_client.get(Namespace, kube_namespace)
    assert ns.status is not None and ns.status.phase == "Active"

    kube_client.create(
        obj(ServiceAccount, {"metadata": {"name": "robot"}}), namespace=kube_namespace
    )
    token = control_plane.service_account_token(kube_namespace, "robot", expiration_seconds=600)
    with control_plane.client(token) as robot:
        review = robot.create(obj(SelfSubjectReview, {})).to_dict()
        username = review["status"]["userInfo"]["username"]
        assert username == f"system:serviceaccount:{kube_namespace}:robot"
        with pytest.raises(ApiError) as denied:
            list(robot.list(Secret, namespace=kube_namespace))
    assert denied.value.status.code == 403
    assert f"system:serviceaccount:{kube_namespace}:robot" in (denied.value.status.message or "")

    # The kubeconfig file says the same as the in-process config.
    path = control_plane.kubeconfig(control_plane.workdir / "robot.kubeconfig", token=token)
    assert token in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"


def test_job_completes_with_secret_env_pvc_and_termination_message(
    kube_client: Client, kube_namespace: str, fake_node: FakeNode
) -> None:
    ns = kube_namespace
    kube_client.create(_secret(ns, "creds", {"password": "s3cret"}))
    kube_client.create(_pvc(ns, "data"))
    script = (
        'set -e; test "$PASSWORD" = s3cret; test -z "${OPTIONAL+x}"; '
        'echo "$POD_NAME $POD_NAMESPACE" > /data/who; id -un > /data/user; '
        'pg_config --version > $(DATA)/version; printf 15 > "$TERM_FILE"'
    )
    job = obj(
        Job,
        {
            "metadata": {"name": "probe-version", "namespace": ns},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "securityContext": {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
                        "volumes": [
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}
                        ],
                        "containers": [
                            {
                                "name": "probe",
                                "image": "postgres:15",
                                "command": ["/bin/sh", "-c", script],
                                "env": [
                                    {"name": "DATA", "value": "/data"},
                                    {"name": "TERM_FILE", "value": "/dev/termination-log"},
                                    {
                                        "name": "PASSWORD",
                                        "valueFrom": {
                                            "secretKeyRef": {"name": "creds", "key": "password"}
                                        },
                                    },
                                    {
                                        "name": "OPTIONAL",
                                        "valueFrom": {
                                            "secretKeyRef": {
                                                "name": "creds",
                                                "key": "nope",
                                                "optional": True,
                                            }
                                        },
                                    },
                                    {
                                        "name": "POD_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                    },
                                    {
                                        "name": "POD_NAMESPACE",
                                        "valueFrom": {
                                            "fieldRef": {"fieldPath": "metadata.namespace"}
                                        },
                                    },
                                ],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            }
                        ],
                    }
                },
            },
        },
    )
    kube_client.create(job)

    def complete() -> bool:
        status = kube_client.get(Job, "probe-version", namespace=ns).to_dict().get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
        assert conds.get("Failed") != "True", f"{status}\n{fake_node.describe()}"
        return conds.get("Complete") == "True" and status.get("succeeded") == 1

    wait_for("the Job controller to mark the Job Complete", complete, 60, fake_node.describe)

    (pod,) = _pods(kube_client, ns, {"job-name": "probe-version"})
    assert pod["spec"]["nodeName"] == "pgro-test-node"
    assert pod["status"]["phase"] == "Succeeded"
    (cs,) = pod["status"]["containerStatuses"]
    assert cs["state"]["terminated"]["exitCode"] == 0
    assert cs["state"]["terminated"]["reason"] == "Completed"
    assert cs["state"]["terminated"]["message"] == "15"

    data = fake_node.pvc_path(ns, "data")
    name = pod["metadata"]["name"]
    assert (data / "who").read_text().split() == [name, ns]
    assert (data / "user").read_text().strip() == "postgres"
    assert (data / "version").read_text().startswith("PostgreSQL 15")
    assert data.stat().st_gid == fake_node.postgres_gid  # fsGroup

    # The real PV controller bound the claim to the volume the node provisioned.
    pvc = kube_client.get(PersistentVolumeClaim, "data", namespace=ns)
    assert pvc.status is not None and pvc.status.phase == "Bound"


def test_pods_that_cannot_start_wait_with_kubelets_reasons(
    kube_client: Client, kube_namespace: str, fake_node: FakeNode
) -> None:
    ns = kube_namespace

    def pod(name: str, image: str, env: list[dict[str, Any]]) -> Pod:
        return obj(
            Pod,
            {
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "c", "image": image, "command": ["/bin/true"], "env": env}
                    ],
                },
            },
        )

    missing = {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}
    kube_client.create(pod("no-secret", "postgres:15", [missing]))
    kube_client.create(pod("old-major", "postgres:11", []))
    kube_client.create(pod("other-image", "alpine:3", []))

    def waiting(name: str) -> dict[str, Any] | None:
        p = kube_client.get(Pod, name, namespace=ns).to_dict()
        statuses = (p.get("status") or {}).get("containerStatuses") or []
        w = statuses[0]["state"].get("waiting") if statuses else None
        if w and w.get("reason") not in (None, "ContainerCreating"):
            assert p["status"]["phase"] == "Pending"
            return dict(w)
        return None

    w = wait_for("CreateContainerConfigError", lambda: waiting("no-secret"), 30, fake_node.describe)
    assert w == {"reason": "CreateContainerConfigError", "message": 'secret "absent" not found'}
    w = wait_for("ErrImagePull (postgres:11)", lambda: waiting("old-major"), 30)
    assert w["reason"] == "ErrImagePull" and "PostgreSQL 11 is not installed" in w["message"]
    w = wait_for("ErrImagePull (alpine)", lambda: waiting("other-image"), 30)
    assert w["reason"] == "ErrImagePull" and "alpine:3" in w["message"]

    # Once the Secret exists the container starts, runs and the pod succeeds.
    kube_client.create(_secret(ns, "absent", {"k": "v"}))
    wait_for(
        "the pod to succeed once its Secret exists",
        lambda: (
            kube_client.get(Pod, "no-secret", namespace=ns).to_dict()["status"]["phase"]
            == "Succeeded"
        ),
        30,
        fake_node.describe,
    )


INIT_SCRIPT = """set -e
if [ ! -f "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" --auth-local=trust --auth-host=scram-sha-256 --no-locale -E UTF8 >/dev/null
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
# a socket-only temporary server, as a setup container would run one
pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
psql -v ON_ERROR_STOP=1 -d postgres -c "ALTER ROLE postgres PASSWORD '$PASSWORD'"
pg_ctl -D "$PGDATA" -m fast -w stop
"""


def _postgres_deployment(
    ns: str, name: str, volume: dict[str, Any], owner: dict[str, Any] | None = None
) -> Deployment:
    labels = {"app": name}
    env = [
        {"name": "PGDATA", "value": "/pgdata/data"},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "pg", "key": "password"}}},
    ]
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if owner:
        meta["ownerReferences"] = [owner]
    return obj(
        Deployment,
        {
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
                        "terminationGracePeriodSeconds": 10,
                        "volumes": [{"name": "pgdata", **volume}],
                        "initContainers": [
                            {
                                "name": "setup",
                                "image": "postgres:15",
                                "command": ["/bin/sh", "-c", INIT_SCRIPT],
                                "env": env,
                                "volumeMounts": [{"name": "pgdata", "mountPath": "/pgdata"}],
                            }
                        ],
                        "containers": [
                            {
                                "name": "postgres",
                                "image": "postgres:15",
                                "command": ["postgres", "-D", "$(PGDATA)"],
                                "args": ["-c", "listen_addresses=*", "-c", "port=5432"],
                                "env": env,
                                "ports": [{"name": "postgres", "containerPort": 5432}],
                                "volumeMounts": [{"name": "pgdata", "mountPath": "/pgdata"}],
                                "readinessProbe": {
                                    "exec": {"command": ["pg_isready", "-U", "postgres"]},
                                    "initialDelaySeconds": 5,
                                    "periodSeconds": 5,
                                },
                            }
                        ],
                    },
                },
            },
        },
    )


def _ready_replicas(client: Client, ns: str, name: str) -> bool:
    status = client.get(Deployment, name, namespace=ns).status
    return status is not None and status.readyReplicas == 1


def test_deployment_runs_postgres_to_ready_and_serves_sql(
    kube_client: Client, kube_namespace: str, fake_node: FakeNode
) -> None:
    ns = kube_namespace
    kube_client.create(_secret(ns, "pg", {"password": "pg-s3cret"}))
    kube_client.create(_pvc(ns, "pgdata"))
    volume = {"persistentVolumeClaim": {"claimName": "pgdata"}}
    kube_client.create(_postgres_deployment(ns, "db", volume))
    kube_client.create(
        obj(
            Service,
            {
                "metadata": {"name": "db", "namespace": ns},
                "spec": {
                    "selector": {"app": "db"},
                    "ports": [{"name": "pg", "port": 15432, "targetPort": "postgres"}],
                },
            },
        )
    )

    wait_for(
        "Deployment readyReplicas == 1",
        lambda: _ready_replicas(kube_client, ns, "db"),
        60,
        fake_node.describe,
    )
    (pod,) = _pods(kube_client, ns, {"app": "db"})
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.0.") and ip != "127.0.0.1"
    conds = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conds == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
        "PodScheduled": "True",
    }
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0

    with psycopg.connect(
        host=ip,
        port=5432,
        user="postgres",
        password="pg-s3cret",
        dbname="postgres",
        connect_timeout=5,
    ) as conn:
        row = conn.execute(
            "SELECT 1, current_setting('listen_addresses'), current_setting('data_directory')"
        ).fetchone()
    assert row == (1, ip, str(fake_node.pvc_path(ns, "pgdata") / "data"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=ip, port=5432, user="postgres", password="wrong", connect_timeout=5)

    # What the Service's ClusterIP would forward to (named targetPort resolved).
    assert fake_node.service_endpoints(ns, "db") == [(ip, 5432)]


def test_deleting_the_owner_cascades_and_stops_postgres(
    kube_client: Client, kube_namespace: str, fake_node: FakeNode
) -> None:
    ns = kube_namespace
    kube_client.create(_secret(ns, "pg", {"password": "pw"}))
    owner = kube_client.create(obj(ConfigMap, {"metadata": {"name": "owner", "namespace": ns}}))
    assert owner.metadata is not None
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    kube_client.create(_postgres_deployment(ns, "owned", {"emptyDir": {}}, owner=ref))
    wait_for(
        "the owned Deployment to be ready",
        lambda: _ready_replicas(kube_client, ns, "owned"),
        60,
        fake_node.describe,
    )
    (pod,) = _pods(kube_client, ns, {"app": "owned"})
    pod_dir = fake_node.pod_dir(ns, pod["metadata"]["name"])
    assert pod_dir is not None
    pid = int((pod_dir / "pgdata" / "data" / "postmaster.pid").read_text().split()[0])
    assert Path(f"/proc/{pid}").exists()

    kube_client.delete(ConfigMap, "owner", namespace=ns)

    def gone() -> bool:
        try:
            kube_client.get(Deployment, "owned", namespace=ns)
            return False
        except ApiError as e:
            assert e.status.code == 404
        return not _pods(kube_client, ns, {"app": "owned"})

    wait_for(
        "the garbage collector to remove the Deployment and its pod", gone, 60, fake_node.describe
    )
    assert not Path(f"/proc/{pid}").exists(), "postgres still runs after its pod was deleted"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=pod["status"]["podIP"], port=5432, user="postgres", connect_timeout=2)
    assert not (pod_dir / "pgdata").exists()  # emptyDir removed with the pod
    assert "database system is shut down" in fake_node.logs(pod["metadata"]["name"], ns)
    assert os.path.exists(pod_dir / "postgres.log")


def _job_conditions(client: Client, ns: str, name: str) -> dict[str, str]:
    status = client.get(Job, name, namespace=ns).to_dict().get("status") or {}
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def test_pgro_commands_run_the_checkout_beside_a_native_sidecar(
    kube_client: Client, kube_namespace: str, fake_node: FakeNode
) -> None:
    ns = kube_namespace
    spec = {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 999, "fsGroup": 999},
        "initContainers": [
            # A native sidecar: it must not keep the Job from completing.
            {
                "name": "proxy",
                "image": "postgres:15",
                "restartPolicy": "Always",
                "command": ["sleep", "600"],
            }
        ],
        "containers": [
            {"name": "main", "image": "example.org/pgro:dev", "command": ["pgro", "--version"]}
        ],
    }
    kube_client.create(
        obj(
            Job,
            {
                "metadata": {"name": "cli", "namespace": ns},
                "spec": {"backoffLimit": 0, "template": {"spec": spec}},
            },
        )
    )
    wait_for(
        "the Job to complete",
        lambda: _job_conditions(kube_client, ns, "cli").get("Complete") == "True",
        60,
        fake_node.describe,
    )
    (pod,) = _pods(kube_client, ns, {"job-name": "cli"})
    assert pod["status"]["phase"] == "Succeeded"
    (sidecar,) = pod["status"]["initContainerStatuses"]
    assert "terminated" in sidecar["state"], sidecar
    assert "pgro, version" in fake_node.logs(pod["metadata"]["name"], ns)
    assert f"pod {ns}/{pod['metadata']['name']} phase=Succeeded" in fake_node.describe()


def test_failures_restarts_and_volume_reclaim(
    kube_client: Client, kube_namespace: str, fake_node: FakeNode
) -> None:
    ns = kube_namespace
    # An init container that fails with restartPolicy Never fails the pod, and the Job
    # controller fails the Job (backoffLimit 0).
    failing = {
        "restartPolicy": "Never",
        "initContainers": [
            {"name": "init", "image": "postgres:15", "command": ["/bin/sh", "-c", "exit 3"]}
        ],
        "containers": [{"name": "main", "image": "postgres:15", "command": ["true"]}],
    }
    kube_client.create(
        obj(
            Job,
            {
                "metadata": {"name": "broken", "namespace": ns},
                "spec": {"backoffLimit": 0, "template": {"spec": failing}},
            },
        )
    )
    # A container that keeps exiting under restartPolicy Always is restarted, counted.
    kube_client.create(_pvc(ns, "runs"))
    kube_client.create(
        obj(
            Pod,
            {
                "metadata": {"name": "flappy", "namespace": ns},
                "spec": {
                    "securityContext": {"runAsUser": 999, "fsGroup": 999},
                    "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "runs"}}],
                    "containers": [
                        {
                            "name": "c",
                            "image": "postgres:15",
                            "command": ["/bin/sh", "-c", "echo run >> /runs/log; exit 1"],
                            "volumeMounts": [{"name": "v", "mountPath": "/runs"}],
                        }
                    ],
                },
            },
        )
    )

    wait_for(
        "the Job controller to fail the Job",
        lambda: _job_conditions(kube_client, ns, "broken").get("Failed") == "True",
        60,
        fake_node.describe,
    )
    (pod,) = _pods(kube_client, ns, {"job-name": "broken"})
    assert pod["status"]["phase"] == "Failed"
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 3
    assert init["state"]["terminated"]["reason"] == "Error"
    (main,) = pod["status"]["containerStatuses"]
    assert "running" not in main["state"] and "terminated" not in main["state"]

    def restarted() -> dict[str, Any] | None:
        (cs,) = kube_client.get(Pod, "flappy", namespace=ns).to_dict()["status"][
            "containerStatuses"
        ]
        return dict(cs) if cs["restartCount"] >= 2 else None

    cs = wait_for("two restarts", restarted, 30, fake_node.describe)
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    data = fake_node.pvc_path(ns, "runs")
    assert (data / "log").read_text().count("run") >= 3

    # Deleting the claim (once no pod uses it) releases the provisioned volume: the PV and
    # its directory go (reclaim policy Delete).
    pv_name = kube_client.get(PersistentVolumeClaim, "runs", namespace=ns).spec.volumeName  # type: ignore[union-attr]
    assert pv_name
    kube_client.delete(Pod, "flappy", namespace=ns)
    kube_client.delete(PersistentVolumeClaim, "runs", namespace=ns)

    def reclaimed() -> bool:
        try:
            kube_client.get(PersistentVolume, pv_name)
            return False
        except ApiError as e:
            assert e.status.code == 404
        return not data.exists()

    wait_for("the released volume to be deleted", reclaimed, 30, fake_node.describe)


def test_container_paths_map_at_path_boundaries_and_expand_like_kubelet() -> None:
    paths = PathMap(
        {
            "/pgdata": "/host/pvc",
            "/pgdata/sub": "/host/other",
            "/tmp/kopia": "/host/cache",
            "/dev/termination-log": "/host/term",
        }
    )
    assert paths.rewrite("/pgdata") == "/host/pvc"
    assert paths.rewrite("--dir=/pgdata/pgdata") == "--dir=/host/pvc/pgdata"
    assert paths.rewrite("/pgdata/sub/x") == "/host/other/x"  # the longest mountPath wins
    assert (
        paths.rewrite('ls "/tmp/kopia/cache"; echo 15 > /dev/termination-log')
        == 'ls "/host/cache/cache"; echo 15 > /host/term'
    )
    for untouched in ("/var/lib/pgdata", "/pgdata2", "s3://bucket/tmp/kopia", "/tmp/kopiax"):
        assert paths.rewrite(untouched) == untouched

    env = {"PGDATA": "/host/pvc/pgdata"}
    assert expand("-D $(PGDATA)", env) == "-D /host/pvc/pgdata"
    assert expand("$$(PGDATA) $(UNSET) $PGDATA", env) == "$(PGDATA) $(UNSET) $PGDATA"
