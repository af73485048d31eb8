"""`pgro operator` against a real control plane: a step the API server keeps refusing is
retried with backoff and reported once (issue 18, item 20).

A ResourceQuota leaves no room for another Secret, so the replica's first step
(`EnsureReplicaResources`, which creates `<replica>-creds`) is refused with 403 on every
try. Before, each pass logged an ERROR and tried again. No pods are needed: the plan stops
at that step.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client
from lightkube.models.core_v1 import ResourceQuotaSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ResourceQuota

from pgro.api.crds import crd_documents
from pgro.kube.client import KubeApi
from tests.kube.controlplane import ControlPlane
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
    OperatorProcess,
    apply_deploy_rbac,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

REPLICA = "quota-bound"


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[KubeApi]:
    client: Client = control_plane.client()
    api = KubeApi(client)
    # Created here rather than with `control_plane.install_crds`, which restarts the
    # controller-manager (for its garbage collector, not needed here) inside this fixture.
    for crd in crd_documents():
        api.create_if_missing(crd)

    def served() -> bool:
        try:
            api.list("PostgresPhysicalReplica")
            api.list("PostgresPhysicalRestore")
        except Exception:  # 404 until the new kinds are served
            return False
        return True

    wait_for("the CRDs to be served", served, 30)
    apply_deploy_rbac(client)
    yield api


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, admin: KubeApi, scratch_root: Path
) -> Iterator[OperatorProcess]:
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    kubeconfig = control_plane.kubeconfig(scratch_root / "steps.kubeconfig", token=token)
    workdir = scratch_root / "operator-steps"
    workdir.mkdir(exist_ok=True)
    op = OperatorProcess(workdir, kubeconfig, "op-steps").start()
    wait_for("the operator to be ready", lambda: op.http("/readyz")[0] == 200, 60)
    yield op
    op.stop()


def _steps_condition(admin: KubeApi, ns: str) -> dict[str, Any] | None:
    replica = admin.get("PostgresPhysicalReplica", ns, REPLICA) or {}
    conditions = replica.get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "StepsSucceeding"), None)


def _errors(op: OperatorProcess, ns: str) -> list[str]:
    found = []
    for line in op.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message = str(record.get("message", ""))
        if record.get("level") == "error" and f"{ns}/{REPLICA}" in message:
            found.append(message)
    return found


def test_a_refused_step_backs_off_is_logged_once_and_recovers(
    admin: KubeApi, operator: OperatorProcess, kube_namespace: str, kube_client: Client
) -> None:
    ns = kube_namespace
    data = {
        "bucket": "no-such-bucket",
        "region": "nowhere-1",
        "accessKeyId": "AKIA-STEP-FAILURES",
        "secretAccessKey": "secret-key-step-failures",
        "repositoryPassword": "password-step-failures",
    }
    admin.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "kopia", "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
    )
    kube_client.create(
        ResourceQuota(
            metadata=ObjectMeta(name="no-more-secrets", namespace=ns),
            spec=ResourceQuotaSpec(hard={"secrets": "1"}),
        )
    )
    # Until the quota controller has counted, the admission answer is another error.

    def counted() -> bool:
        status = kube_client.get(ResourceQuota, "no-more-secrets", namespace=ns).status
        return status is not None and bool(status.used)

    wait_for("the quota to be counted", counted, 60)
    admin.create(
        {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalReplica",
            "metadata": {"name": REPLICA, "namespace": ns},
            "spec": {"schedule": "0 0 1 1 *", "kopiaSecretRef": {"name": "kopia"}},
        }
    )
    first = wait_for("the failure", lambda: _errors(operator, ns), 60, context=operator.log_tail)
    assert "EnsureReplicaResources" in first[0] and "exceeded quota" in first[0]
    time.sleep(12)  # tries after 1, 2 and 4 s more; before, a pass every few seconds
    errors = _errors(operator, ns)
    assert len(errors) == 1, errors
    assert "backoff" in errors[0]
    events = admin.list("Event", namespace=ns).items
    notes = [e.get("note") or e.get("message") for e in events if e.get("reason") == "StepFailed"]
    assert len(notes) == 1, notes
    condition = _steps_condition(admin, ns)
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "StepFailing")
    assert "EnsureReplicaResources" in condition["message"]
    assert "exceeded quota" in condition["message"]
    assert "secret-key-step-failures" not in repr((errors, notes, condition))

    kube_client.delete(ResourceQuota, "no-more-secrets", namespace=ns)
    condition = wait_for(
        "StepsSucceeding=True",
        lambda: (c := _steps_condition(admin, ns)) and c["status"] == "True" and c,
        90,
        context=operator.log_tail,
    )
    assert condition["reason"] == "Recovered"
    assert admin.get("Secret", ns, f"{REPLICA}-creds") is not None
    assert len(_errors(operator, ns)) == 1
