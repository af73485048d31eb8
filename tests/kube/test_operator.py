"""`pgro operator` against a real kube-apiserver, etcd and kube-controller-manager.

The operator runs as a child process with the deploy/ ServiceAccount's RBAC, lists
snapshots with kopia from an S3 repository (moto), and the fake node runs its pods for
real: `pgro restore-job` restores onto the volume, the `setup` init container and
PostgreSQL 15 run on it, and the operator provisions users over SQL.
"""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Event as CoreEvent

from pgro.api.crds import crd_documents
from pgro.api.names import LABEL_READY_FOR_TRAFFIC, LABEL_REPLICA, LABEL_RESTORE
from pgro.api.notifications import LABEL_NOTIFICATION_SECRET, target_name
from pgro.api.secret import KopiaCredentials, S3Location
from pgro.kube.client import KubeApi
from tests.fixtures.manifests import replica_doc
from tests.fixtures.webhook import webhook_receiver
from tests.kube.controlplane import ControlPlane
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
    OperatorProcess,
    apply_deploy_rbac,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)

API = "pgro.bes.au/v1alpha1"


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[KubeApi]:
    client: Client = control_plane.client()
    # Installed before the operator applies them too: the controller-manager restarts so its
    # garbage collector knows the kinds at once (else it rediscovers them within 30 s).
    control_plane.install_crds(crd_documents())
    apply_deploy_rbac(client)
    yield KubeApi(client)


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane: ControlPlane, admin: KubeApi, scratch_root: Path) -> Path:
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    return control_plane.kubeconfig(scratch_root / "operator.kubeconfig", token=token)


@pytest.fixture(scope="module")
def operator(
    operator_kubeconfig: Path, scratch_root: Path, fake_node: Any
) -> Iterator[OperatorProcess]:
    workdir = scratch_root / "operator-1"
    workdir.mkdir(exist_ok=True)
    op = OperatorProcess(workdir, operator_kubeconfig, "op-1").start()
    # Live with zero replicas (the reference failed /livez when nothing was reconciled).
    wait_for(
        "the operator to be ready", lambda: op.http("/readyz")[0] == 200, 60, context=op.log_tail
    )
    assert op.http("/livez")[0] == 200
    yield op
    op.stop()


def _secret(ns: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _s3_secret(ns: str, name: str, creds: KopiaCredentials) -> dict[str, Any]:
    loc = creds.location
    assert isinstance(loc, S3Location)
    return _secret(
        ns,
        name,
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


def _replica(ns: str, name: str, secret: str | None, **spec: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "ephemeral": None,
        "schedule": "0 0 1 1 *",
        "scheduleJitter": "0s",
        "switchoverGracePeriod": "15s",
    }
    return replica_doc(name, secret or None, namespace=ns, **{**defaults, **spec})


def _restores(api: KubeApi, ns: str, replica: str) -> list[dict[str, Any]]:
    return api.list("PostgresPhysicalRestore", namespace=ns, labels={LABEL_REPLICA: replica}).items


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), None
    )


def _secret_value(api: KubeApi, ns: str, name: str, key: str) -> str:
    secret = api.get("Secret", ns, name)
    assert secret is not None, f"Secret {name} missing"
    return base64.b64decode(secret["data"][key]).decode()


def _active(api: KubeApi, ns: str, name: str) -> dict[str, Any] | None:
    replica = api.get("PostgresPhysicalReplica", ns, name)
    status = (replica or {}).get("status", {})
    if status.get("phase") != "Ready" or not status.get("currentRestore"):
        return None
    restore = api.get("PostgresPhysicalRestore", ns, status["currentRestore"])
    if (restore or {}).get("status", {}).get("phase") != "Active":
        return None
    return replica


def _pod_ip(api: KubeApi, ns: str, restore: str) -> str:
    pods = api.list("Pod", namespace=ns, labels={LABEL_RESTORE: restore}).items
    running = [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and "job-name" not in p["metadata"].get("labels", {})
    ]
    assert running, f"no running pod for {restore}"
    ip: str = running[0]["status"]["podIP"]
    return ip


def _diagnostics(op: OperatorProcess, node: Any) -> str:
    extra = ""
    describe = getattr(node, "describe", None)
    if callable(describe):
        extra = str(describe())
    return f"--- operator log ---\n{op.log_tail(60)}\n{extra}"


@pytest.fixture
def webhook() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """A local HTTP listener the operator process posts notifications to."""
    with webhook_receiver() as hook:
        yield hook


HOOK_PATH = "/hooks/T0000/B0000/URL-PATH-TOKEN-555"
URL_SECRETS = ("hookuser", "USERINFO-PASS-999", "T0000", "URL-PATH-TOKEN-555")
OTHER_TEAMS_PASSWORD = "OTHER-TEAM-DB-PASSWORD-4242"
HOOK_TOKEN = "hook-token-7a6b5c4d3e2f"


def test_first_restore_becomes_active_behind_the_stable_service(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: Any,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
    webhook: tuple[int, list[dict[str, str]]],
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    # Notifications: a secret URL (user information and a path token), a header from a
    # Secret labelled for notifications, and a header naming some other Secret of the
    # namespace, which the operator must not read for the replica's author.
    hook_port, received = webhook
    secret_url = f"http://hookuser:USERINFO-PASS-999@127.0.0.1:{hook_port}"
    hook_secret = _secret(ns, "hook", {"token": HOOK_TOKEN})
    hook_secret["metadata"]["labels"] = {LABEL_NOTIFICATION_SECRET: "true"}
    admin.create(hook_secret)
    admin.create(_secret(ns, "db-creds", {"password": OTHER_TEAMS_PASSWORD}))
    notifications: list[dict[str, Any]] = [
        {
            "target": "webhook",
            "url": f"{secret_url}{HOOK_PATH}",
            "headers": {"X-Token": {"secretKeyRef": {"name": "hook", "key": "token"}}},
        },
        {
            "target": "webhook",
            "url": f"http://127.0.0.1:{hook_port}/exfiltrate",
            "headers": {"X-Stolen": {"secretKeyRef": {"name": "db-creds", "key": "password"}}},
        },
    ]
    admin.create(
        _replica(ns, "orders", "kopia", extraUsers=["report_reader"], notifications=notifications)
    )

    replica = wait_for(
        "the first restore to become Active",
        lambda: _active(admin, ns, "orders"),
        240,
        context=lambda: _diagnostics(operator, fake_node),
    )
    status = replica["status"]
    restore_name = status["currentRestore"]
    assert restore_name.startswith("orders-")
    assert status["latestAvailableSnapshot"] == snapshot
    assert status["connectionInfo"] == {
        "host": f"orders.{ns}.svc.cluster.local",
        "port": 5432,
        "database": "postgres",
        "username": "analytics",
        "passwordSecret": "orders-creds",
    }
    assert (_condition(replica, "KopiaSecretValid") or {}).get("reason") == "SecretValid"
    assert (_condition(replica, "SnapshotAvailable") or {}).get("status") == "True"
    assert status.get("lastRestoreCompletedAt")

    restore = admin.get("PostgresPhysicalRestore", ns, restore_name)
    assert restore is not None
    assert restore["spec"]["snapshot"] == snapshot
    assert restore["status"]["postgresVersion"] == "15"
    assert restore["status"]["restoreJob"]["phase"] == "Succeeded"
    owner = restore["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "PostgresPhysicalReplica" and owner["controller"] is True

    service = admin.get("Service", ns, "orders")
    assert service is not None
    assert service["spec"]["selector"] == {
        LABEL_RESTORE: restore_name,
        LABEL_READY_FOR_TRAFFIC: "true",
    }
    for kind, name in (
        ("Deployment", restore_name),
        ("PersistentVolumeClaim", f"{restore_name}-data"),
        ("Service", restore_name),
    ):
        obj = admin.get(kind, ns, name)
        assert obj is not None, f"{kind} {name} missing"
        assert obj["metadata"]["ownerReferences"][0]["name"] == restore_name
    # The succeeded Job is cleaned up once read (the reference's behaviour).
    wait_for(
        "the restore Job to be deleted",
        lambda: admin.get("Job", ns, f"{restore_name}-restore") is None,
        60,
    )

    # The analytics user reaches the restored data, read-only; the extra user too.
    ip = _pod_ip(admin, ns, restore_name)
    password = _secret_value(admin, ns, "orders-creds", "password")
    assert len(password) == 32
    with psycopg.connect(
        host=ip, port=5432, user="analytics", password=password, dbname="myapp", connect_timeout=5
    ) as conn:
        rows = conn.execute("SELECT count(*) FROM public.test_data").fetchone()
        assert rows is not None and rows[0] > 0
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
    extra = _secret_value(admin, ns, "orders-user-report-reader-creds", "password")
    with psycopg.connect(
        host=ip, port=5432, user="report_reader", password=extra, dbname="myapp", connect_timeout=5
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=ip,
            port=5432,
            user="analytics",
            password="wrong" * 6,
            dbname="myapp",
            connect_timeout=5,
        ).close()

    # Read through core/v1: lightkube cannot decode events.k8s.io lists holding events the
    # controller-manager wrote (their eventTime is null).
    events = [e.to_dict() for e in admin.client.list(CoreEvent, namespace=ns)]
    ours = [
        e
        for e in events
        if e.get("involvedObject", {}).get("name") == "orders"
        and e["involvedObject"].get("kind") == "PostgresPhysicalReplica"
    ]
    reasons = {e.get("reason") for e in ours}
    assert {"RestoreStarted", "RestoreCompleted"} <= reasons, reasons
    assert all(e.get("reportingComponent") == "postgres-restore-operator" for e in ours)
    assert operator.metric("postgres_restore_switchovers_total") >= 1
    # Secrets never reach status, events or logs.
    secret_value = creds.secret_access_key or "unset"
    assert secret_value not in str(replica) + str(events) + operator.log_tail(10_000)
    assert password not in operator.log_tail(10_000)

    # Restored pods get no ServiceAccount token: they run what the snapshot holds.
    deployment = admin.get("Deployment", ns, restore_name)
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    # Notifications: the labelled Secret's header arrives at the full URL; the target whose
    # header names an unlabelled Secret is not sent, and both say why.
    statuses = wait_for(
        "the notification round",
        lambda: (
            (admin.get("PostgresPhysicalReplica", ns, "orders") or {})
            .get("status", {})
            .get("notifications")
        ),
        60,
        context=lambda: _diagnostics(operator, fake_node),
    )
    assert [(r["path"], r["x-token"]) for r in received] == [(HOOK_PATH, HOOK_TOKEN)]
    assert [s["name"] for s in statuses] == [
        target_name("POST", notifications[0]["url"]),
        target_name("POST", notifications[1]["url"]),
    ]
    assert [s["success"] for s in statuses] == [True, False]
    assert "kubectl label secret -n " + ns + " db-creds" in statuses[1]["lastError"]
    refused = [
        e
        for e in admin.client.list(CoreEvent, namespace=ns)
        if e.reason == "NotificationSecretRefused"
    ]
    assert refused and f"{ns}/db-creds" in (refused[0].message or "")
    _, metrics_body = operator.http("/metrics")
    everything = str(statuses) + str(refused) + metrics_body + operator.log_tail(10_000)
    assert OTHER_TEAMS_PASSWORD not in everything and HOOK_TOKEN not in everything
    for part in URL_SECRETS:
        assert part not in everything, part


def test_switchover_moves_the_service_and_sweeps_after_the_grace_period(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: Any,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(_replica(ns, "sales", "kopia", switchoverGracePeriod="20s"))
    first = wait_for(
        "the first restore",
        lambda: _active(admin, ns, "sales"),
        240,
        context=lambda: _diagnostics(operator, fake_node),
    )
    old = first["status"]["currentRestore"]
    replica_uid = first["metadata"]["uid"]

    # A restore made by hand goes through the same machinery (the reference's tests do this).
    admin.create(
        {
            "apiVersion": API,
            "kind": "PostgresPhysicalRestore",
            "metadata": {
                "name": "sales-manual",
                "namespace": ns,
                "labels": {LABEL_REPLICA: "sales"},
                "ownerReferences": [
                    {
                        "apiVersion": API,
                        "kind": "PostgresPhysicalReplica",
                        "name": "sales",
                        "uid": replica_uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {
                "replica": {"name": "sales"},
                "snapshot": snapshot,
                "snapshotSize": "50Mi",
                "storageSize": "1Gi",
            },
        }
    )

    def switched() -> dict[str, Any] | None:
        replica = _active(admin, ns, "sales")
        if replica and replica["status"]["currentRestore"] == "sales-manual":
            return replica
        return None

    replica = wait_for(
        "the switchover to sales-manual",
        switched,
        240,
        context=lambda: _diagnostics(operator, fake_node),
    )
    switched_at = time.monotonic()
    assert replica["status"]["previousRestore"] == old
    service = admin.get("Service", ns, "sales")
    assert service is not None
    assert service["spec"]["selector"][LABEL_RESTORE] == "sales-manual"
    # Within the grace period the old restore keeps serving its open sessions.
    old_restore = admin.get("PostgresPhysicalRestore", ns, old)
    assert old_restore is not None and old_restore["status"]["phase"] == "Active"

    wait_for(
        "the old restore to be swept",
        lambda: admin.get("PostgresPhysicalRestore", ns, old) is None,
        120,
        context=lambda: _diagnostics(operator, fake_node),
    )
    assert time.monotonic() - switched_at >= 10  # not before the grace period
    wait_for(
        "previousRestore to be cleared",
        lambda: (
            not (admin.get("PostgresPhysicalReplica", ns, "sales") or {})
            .get("status", {})
            .get("previousRestore")
        ),
        60,
    )
    # Its workload goes through owner references (the real garbage collector).
    wait_for(
        "the old Deployment and volume to go",
        lambda: (
            admin.get("Deployment", ns, old) is None
            and admin.get("PersistentVolumeClaim", ns, f"{old}-data") is None
        ),
        120,
    )


def test_ephemeral_replica_verifies_tears_down_and_does_not_loop(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: Any,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(_replica(ns, "verify", "kopia", ephemeral=True))
    seen_restores: set[str] = set()

    def torn_down() -> dict[str, Any] | None:
        seen_restores.update(r["metadata"]["name"] for r in _restores(admin, ns, "verify"))
        replica = admin.get("PostgresPhysicalReplica", ns, "verify") or {}
        status = replica.get("status", {})
        if status.get("verifiedSnapshotId") and not _restores(admin, ns, "verify"):
            return replica
        return None

    replica = wait_for(
        "verification and teardown",
        torn_down,
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    status = replica["status"]
    assert status["verifiedSnapshotId"] == snapshot
    assert "currentRestore" not in status and "previousRestore" not in status
    assert len(seen_restores) == 1
    (name,) = seen_restores
    wait_for(
        "the restore's workload to go",
        lambda: all(
            admin.get(kind, ns, n) is None
            for kind, n in (
                ("Deployment", name),
                ("PersistentVolumeClaim", f"{name}-data"),
                ("Job", f"{name}-restore"),
                ("Service", name),
            )
        ),
        120,
    )
    # Kept: the replica's own objects.
    assert admin.get("Service", ns, "verify") is not None
    assert admin.get("Secret", ns, "verify-creds") is not None
    # Several resyncs (every 3 s) later there is still no new restore of the same snapshot.
    time.sleep(12)
    assert _restores(admin, ns, "verify") == []
    after = admin.get("PostgresPhysicalReplica", ns, "verify") or {}
    assert after.get("status", {}).get("verifiedSnapshotId") == snapshot


def test_missing_and_invalid_secret_conditions(
    admin: KubeApi,
    operator: OperatorProcess,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, _ = s3_repo
    admin.create(_replica(ns, "nosecret", "absent"))

    def reason(name: str) -> str | None:
        """`status/reason/message` of KopiaSecretValid."""
        replica = admin.get("PostgresPhysicalReplica", ns, name) or {}
        cond = _condition(replica, "KopiaSecretValid")
        return f"{cond['status']}/{cond['reason']}/{cond['message']}" if cond else None

    def wait_reason(name: str, prefix: str) -> str:
        found: list[str] = wait_for(
            f"{name}: KopiaSecretValid {prefix}",
            lambda: [r] if (r := reason(name) or "").startswith(prefix) else None,
            60,
            context=operator.log_tail,
        )
        return found[0]

    got = wait_reason("nosecret", "False/SecretNotFound")
    assert "absent" in got

    admin.create(_secret(ns, "partial", {"bucket": "b", "repositoryPassword": "pw-secret-99"}))
    admin.create(_replica(ns, "badsecret", "partial"))
    got = wait_reason("badsecret", "False/SecretInvalid")
    assert got.endswith("invalid: missing key: region"), got
    assert "pw-secret-99" not in got
    assert _restores(admin, ns, "nosecret") == [] and _restores(admin, ns, "badsecret") == []

    # Fixing the Secret is picked up by the resync, without touching the replica.
    admin.create(_s3_secret(ns, "absent", creds))
    wait_reason("nosecret", "True/SecretValid")


def test_configmap_placement_and_image_reach_new_pods_live(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: Any,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, _ = s3_repo
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "postgres-restore-operator-config", "namespace": OPERATOR_NAMESPACE},
        "data": {
            "kopiaImage": "registry.example/pgro:custom",
            "nodeSelector": "disk=ssd,zone=a=b",
            "podAnnotations": "team=data",
            "tolerations": "dedicated=pgro:NoSchedule,spot:NoExecute",
        },
    }
    admin.create(config)
    try:
        # Watched live: no restart. Give the watch a moment, then restore.
        time.sleep(2)
        admin.create(_s3_secret(ns, "kopia", creds))
        admin.create(_replica(ns, "placed", "kopia", podAnnotations={"team": "replica-wins"}))

        def restore_job() -> list[dict[str, Any]] | None:
            for r in _restores(admin, ns, "placed"):
                job = admin.get("Job", ns, f"{r['metadata']['name']}-restore")
                if job is not None:
                    return [job]
            return None

        (job,) = wait_for("the restore Job", restore_job, 120, interval=0.2)
        job_pod = job["spec"]["template"]
        assert job_pod["spec"]["containers"][0]["image"] == "registry.example/pgro:custom"
        assert job_pod["spec"]["nodeSelector"] == {"disk": "ssd"}
        assert job_pod["metadata"]["annotations"]["team"] == "data"
        replica = wait_for(
            "a restore under the ConfigMap's placement",
            lambda: _active(admin, ns, "placed"),
            240,
            context=lambda: _diagnostics(operator, fake_node),
        )
        deployment = admin.get("Deployment", ns, replica["status"]["currentRestore"])
        assert deployment is not None
        pod = deployment["spec"]["template"]
        # `zone=a=b` is not a valid label value: skipped with a warning, not copied into
        # every pod (where the API server would refuse them all).
        assert pod["spec"]["nodeSelector"] == {"disk": "ssd"}
        assert "zone='a=b'" in operator.log_tail(2000)
        # The replica's own pod annotations win over the ConfigMap's.
        assert pod["metadata"]["annotations"]["team"] == "replica-wins"
        for toleration in (
            {"key": "dedicated", "operator": "Equal", "value": "pgro", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
        ):
            assert toleration in pod["spec"]["tolerations"]
    finally:
        admin.delete("ConfigMap", OPERATOR_NAMESPACE, "postgres-restore-operator-config")


def test_a_replica_deleted_mid_restore_gives_its_slot_back_at_once(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: Any,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    """With one slot, a replica removed while restoring (as a namespace deletion does: no
    pass ever sees it deleting) must not hold the slot for the queue's 10-minute grace."""
    ns = kube_namespace
    creds, _ = s3_repo
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "postgres-restore-operator-config", "namespace": OPERATOR_NAMESPACE},
        "data": {"maxConcurrentRestores": "1"},
    }
    admin.create(config)
    try:
        time.sleep(2)
        admin.create(_s3_secret(ns, "kopia", creds))
        admin.create(_replica(ns, "first", "kopia"))
        wait_for("first's restore", lambda: _restores(admin, ns, "first"), 60, interval=0.2)
        admin.create(_replica(ns, "second", "kopia"))
        wait_for(
            "second to queue behind first",
            lambda: (
                (admin.get("PostgresPhysicalReplica", ns, "second") or {})
                .get("status", {})
                .get("queuePosition")
            ),
            60,
            interval=0.2,
        )
        assert _restores(admin, ns, "second") == []
        for restore in _restores(admin, ns, "first"):
            admin.delete("PostgresPhysicalRestore", ns, restore["metadata"]["name"])
        admin.delete("PostgresPhysicalReplica", ns, "first")
        wait_for(
            "second to get the freed slot",
            lambda: _restores(admin, ns, "second"),
            45,  # well under the queue's 60 s healing pass and its 10-minute grace
            interval=0.2,
            context=lambda: _diagnostics(operator, fake_node),
        )
    finally:
        admin.delete("ConfigMap", OPERATOR_NAMESPACE, "postgres-restore-operator-config")


def test_restart_mid_restore_converges_and_a_standby_stays_passive(
    admin: KubeApi,
    operator: OperatorProcess,
    operator_kubeconfig: Path,
    fake_node: Any,
    kube_namespace: str,
    scratch_root: Path,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, _ = s3_repo
    workdir = scratch_root / "operator-2"
    workdir.mkdir(exist_ok=True)
    standby = OperatorProcess(workdir, operator_kubeconfig, "op-2").start()
    try:
        wait_for(
            "the standby to be ready",
            lambda: standby.http("/readyz")[0] == 200,
            60,
            context=standby.log_tail,
        )
        lease = admin.get("Lease", OPERATOR_NAMESPACE, "pgro-operator-leader")
        assert lease is not None and lease["spec"]["holderIdentity"] == "op-1"

        admin.create(_s3_secret(ns, "kopia", creds))
        admin.create(_replica(ns, "crashy", "kopia"))
        wait_for(
            "a restore Job",
            lambda: any(
                admin.get("Job", ns, f"{r['metadata']['name']}-restore")
                for r in _restores(admin, ns, "crashy")
            ),
            120,
            interval=0.2,
            context=lambda: _diagnostics(operator, fake_node),
        )
        # The standby has reconciled nothing while the leader works.
        assert standby.metric("postgres_restore_reconciliations_total", 'controller="replica"') == 0

        # The leader dies without releasing its lease; the standby takes over once it expires.
        operator.stop(signal.SIGKILL)
        wait_for(
            "the standby to lead",
            lambda: (
                (admin.get("Lease", OPERATOR_NAMESPACE, "pgro-operator-leader") or {})
                .get("spec", {})
                .get("holderIdentity")
                == "op-2"
            ),
            60,
            context=standby.log_tail,
        )
        wait_for(
            "the restore to finish under the new leader",
            lambda: _active(admin, ns, "crashy"),
            240,
            context=lambda: _diagnostics(standby, fake_node),
        )
        assert len(_restores(admin, ns, "crashy")) == 1  # no duplicate after the restart
        assert standby.metric("postgres_restore_reconciliations_total", 'controller="replica"') > 0
        # A clean shutdown (SIGTERM) exits 0 and hands the Lease back at once.
        assert standby.stop() == 0, standby.log_tail()
        lease = admin.get("Lease", OPERATOR_NAMESPACE, "pgro-operator-leader")
        assert lease is not None and not lease["spec"].get("holderIdentity")
    finally:
        # Leave a leader for later tests in the module: op-1 restarts as a standby/leader.
        standby.stop()
        operator.start()
        wait_for(
            "op-1 to be back",
            lambda: operator.http("/readyz")[0] == 200,
            60,
            context=operator.log_tail,
        )
