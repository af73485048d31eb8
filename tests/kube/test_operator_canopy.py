"""`pgro operator` with CANOPY_BASE_URL: the syncer, the broker and the restore sidecar.

The operator runs with the deploy/ RBAC plus deploy/canopy/rbac.yaml, talks to the stub
canopy, materialises its worklist entry as a Namespace, Secret and replica, lists the
snapshots through an in-process proxy, runs the restore Job with its `canopy-proxy`
native sidecar on the fake node (credentials from the operator's broker), reports the
verdict, tears the verify replica down and deletes the Namespace once canopy stops
listing it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube import Client

from pgro.api.crds import crd_documents
from pgro.api.secret import KopiaCredentials, S3Location
from pgro.kube.client import KubeApi
from pgro.postgres.server import free_port
from tests.fixtures.canopy_stub import (
    BACKUP_TYPE,
    GROUP_ID,
    MACHINE_ID,
    REPLICA_ID,
    SECRET_ACCESS_KEY,
    CanopyStub,
    Declaration,
    S3Target,
    StubCredentials,
    start_canopy_stub,
)
from tests.kube.controlplane import ControlPlane
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
    OperatorProcess,
    apply_deploy_rbac,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)

NAMESPACE = "int-test-15de9039"  # the reference's naming vector for the stub's entry
REPLICA = "canopy-replica"


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[KubeApi]:
    client: Client = control_plane.client()
    control_plane.install_crds(crd_documents())
    apply_deploy_rbac(client, "canopy/rbac.yaml")
    yield KubeApi(client)


@pytest.fixture(scope="module")
def stub(s3_repo: tuple[KopiaCredentials, str]) -> Iterator[CanopyStub]:
    creds, _ = s3_repo
    assert isinstance(creds.location, S3Location)
    with start_canopy_stub(
        declarations=[],
        s3=S3Target(bucket=creds.location.bucket, region=creds.location.region),
        credentials=StubCredentials(repo_password=creds.repository_password),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane,
    admin: KubeApi,
    scratch_root: Path,
    fake_node: Any,
    stub: CanopyStub,
    s3_repo: tuple[KopiaCredentials, str],
) -> Iterator[OperatorProcess]:
    creds, _ = s3_repo
    assert isinstance(creds.location, S3Location)
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    kubeconfig = control_plane.kubeconfig(scratch_root / "canopy.kubeconfig", token=token)
    workdir = scratch_root / "operator-canopy"
    workdir.mkdir(exist_ok=True)
    broker = free_port()
    op = OperatorProcess(workdir, kubeconfig, "op-canopy").start(
        env_extra={
            "CANOPY_BASE_URL": stub.url,
            "CANOPY_TAILNET_URL": "",
            "CANOPY_SOCKS5_PROXY": "",
            "PGRO_BROKER_LISTEN_ADDR": f"127.0.0.1:{broker}",
            "CANOPY_BROKER_BASE_URL": f"http://127.0.0.1:{broker}",
            "PGRO_S3_ENDPOINT": f"http://{creds.location.endpoint}",
            "CANOPY_RECONCILE_INTERVAL_SECS": "1",
            "CANOPY_REMOVAL_GRACE_SECS": "8",
        }
    )
    wait_for(
        "the operator to be ready", lambda: op.http("/readyz")[0] == 200, 60, context=op.log_tail
    )
    op.broker_url = f"http://127.0.0.1:{broker}"  # type: ignore[attr-defined]
    yield op
    op.stop()


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None
    )


def test_verify_entry_is_materialised_restored_reported_and_removed(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: Any,
    stub: CanopyStub,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    _, snapshot = s3_repo
    stub.add_declaration(Declaration(snapshot_id=snapshot, intent="verify"))

    def context() -> str:
        return operator.log_tail(60)

    ns = wait_for(
        "the Namespace", lambda: admin.get("Namespace", None, NAMESPACE), 60, context=context
    )
    labels = ns["metadata"]["labels"]
    assert labels["pgro.bes.au/managed-by"] == "pgro-canopy"
    assert labels["pgro.bes.au/declaration-id"] == REPLICA_ID
    secret = wait_for(
        "the canopy-creds Secret",
        lambda: admin.get("Secret", NAMESPACE, f"{REPLICA}-canopy-creds"),
        60,
        context=context,
    )
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["accessKeyId"] == "PROXY_DUMMY_ACCESS_KEY"
    assert SECRET_ACCESS_KEY not in data.values()

    seen: set[str] = set()

    def verified() -> dict[str, Any] | None:
        seen.update(
            r["metadata"]["name"]
            for r in admin.list("PostgresPhysicalRestore", namespace=NAMESPACE).items
        )
        replica = admin.get("PostgresPhysicalReplica", NAMESPACE, REPLICA) or {}
        status = replica.get("status", {})
        if status.get("verifiedSnapshotId") == snapshot and stub.reports():
            return replica
        return None

    replica = wait_for("verified and reported", verified, 400, context=context)
    assert replica["spec"]["ephemeral"] is True
    assert replica["status"]["canopyDesiredSnapshotId"] == snapshot
    secret_ok = _condition(replica, "KopiaSecretValid")
    assert secret_ok is not None and secret_ok["reason"] == "CanopySourced"
    assert len(seen) == 1
    [report] = stub.reports()
    body = report.body
    assert (body["replica_id"], body["group"], body["server_id"]) == (
        REPLICA_ID,
        GROUP_ID,
        MACHINE_ID,
    )
    assert (body["type"], body["intent"], body["outcome"]) == (BACKUP_TYPE, "verify", "success")
    assert body["replica_healthy"] is True and body["snapshot_id"] == snapshot
    assert body["health_details"]["sizes"]["myapp"] > 0
    # The restore Job's repairs, carried by its termination message into the status.
    fixes = body["health_details"]["fixes"]
    assert {"reset_wal", "synthesized_config"} <= set(fixes)
    assert all(isinstance(v, bool) for v in fixes.values())
    statuses = {c["name"]: c["status"] for c in body["health_details"]["checks"]}
    # The server's health checks, then the data-check Job's (a verify replica's default
    # depth; the fixture keeps no checksums: "not checked", never a failure).
    assert statuses["connect"] == statuses["primary"] == "pass"
    assert statuses["btree"] == "pass" and statuses["checksums"] == "not_checked"
    assert set(statuses.values()) <= {"pass", "not_checked"}
    # The restore's sidecar fetched its credentials from the operator's broker, under the
    # run id the report carries, and its final traffic totals made it into the report.
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=body["run_id"]) >= 1
    assert body.get("s3_received_payload_bytes", 0) > 0
    # Anyone else who reaches the broker gets nothing (issue 18 item 9): no token, no answer.
    broker = operator.broker_url  # type: ignore[attr-defined]
    denied = httpx.post(
        f"{broker}/internal/restore-creds",
        json={"group": GROUP_ID, "type": BACKUP_TYPE, "run_id": body["run_id"]},
        timeout=10,
    )
    assert denied.status_code == 401 and "repo_password" not in denied.text

    # `once`: canopy stops listing the entry; after the grace the Namespace goes.
    assert stub.worklist() == []
    wait_for(
        "the Namespace deleted",
        lambda: (
            (n := admin.get("Namespace", None, NAMESPACE)) is None
            or n.get("metadata", {}).get("deletionTimestamp")
        ),
        120,
        context=context,
    )
    assert len(stub.reports()) == 1
