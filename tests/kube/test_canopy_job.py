"""A canopy restore Job, run for real on the fake node without the operator.

The Job is the one `workloads.restore_job(..., canopy=...)` builds: its `canopy-proxy`
native sidecar (`pgro canopy-proxy`) gets credentials from a `CredentialBroker` in front
of the stub canopy (with the restore's token from its `<restore>-canopy-proxy` Secret),
and `pgro restore-job` restores through it with the key pair of that Secret. The S3 side
is a moto of this module's own with IAM authentication on: it refuses kopia's keys and
accepts only the STS credentials the stub hands out, so the restore succeeds only if the
sidecar re-signed every request. The test plays the operator's other part: the stats
and progress callbacks.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from lightkube import Client, codecs
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod, Secret

from pgro.api.names import canopy_creds_secret_name, restore_job_name
from pgro.api.secret import KopiaCredentials, S3Location
from pgro.canopy.broker import CredentialBroker, serve
from pgro.canopy.client import CanopyClient
from pgro.canopy.materialise import (
    PROXY_DUMMY_ACCESS_KEY,
    PROXY_DUMMY_SECRET_KEY,
    canopy_creds_secret_data,
)
from pgro.canopy.tokens import BrokerTokens, new_key
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.server import free_port
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.canopy import proxy_secret
from pgro.runtimes.kubernetes.config import OperatorConfig
from tests.fixtures import manifests
from tests.fixtures.authed_moto import authed_moto
from tests.fixtures.canopy_stub import (
    BACKUP_TYPE,
    BUCKET,
    GROUP_ID,
    REGION,
    CanopyStub,
    StubCredentials,
)
from tests.fixtures.waiting import wait_for
from tests.kube.node import FakeNode

pytestmark = pytest.mark.timeout(300)

REPLICA = "canopy-replica"
RESTORE = "canopy-replica-20260701-000000"
JOB = restore_job_name(RESTORE)
FAR = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)
CONFIG = OperatorConfig(max_concurrent_restores=1, restore_image="example.org/pgro:dev")


# -- S3: moto that checks signatures ---------------------------------------------------------


@dataclass(frozen=True)
class CanopyS3:
    endpoint: str  # http://127.0.0.1:<port>
    credentials: dict[str, str]  # STS credentials moto minted (credential_process names)
    snapshot_id: str
    repo_password: str

    def secrets(self) -> list[str]:
        return [self.credentials[k] for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")]


@pytest.fixture(scope="module")
def canopy_s3(
    s3_repo: tuple[KopiaCredentials, str], moto_s3: str, scratch_root: Path
) -> Iterator[CanopyS3]:
    """A moto holding a copy of the `s3_repo` repository in the stub's bucket, with IAM
    authentication on (tests/fixtures/authed_moto.py)."""
    creds, snapshot_id = s3_repo
    assert isinstance(creds.location, S3Location)
    with authed_moto(
        moto_s3, creds.location.bucket, [BUCKET], scratch_root / "moto-canopy-job.log"
    ) as s3:
        dummy = {
            "region_name": REGION,
            "aws_access_key_id": PROXY_DUMMY_ACCESS_KEY,
            "aws_secret_access_key": PROXY_DUMMY_SECRET_KEY,
        }
        with pytest.raises(ClientError):  # the control: kopia's keys alone get nowhere
            boto3.client("s3", endpoint_url=s3.endpoint, **dummy).list_objects_v2(Bucket=BUCKET)
        [minted] = s3.minted
        yield CanopyS3(s3.endpoint, minted, snapshot_id, creds.repository_password)


# -- the operator's side: broker and callbacks ---------------------------------------------


class Callbacks:
    """The operator's `/api/v1/canopy-stats|progress/{ns}/{job}` handlers: record, 204."""

    def __init__(self) -> None:
        self.posts: dict[str, list[Any]] = defaultdict(list)
        self._lock = threading.Lock()
        callbacks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with callbacks._lock:
                    callbacks.posts[self.path].append(json.loads(raw or b"null"))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def received(self, path: str) -> list[Any]:
        with self._lock:
            return list(self.posts[path])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Operator:
    """What the operator would be for this Job: broker, callbacks, the stub behind them."""

    stub: CanopyStub
    s3: CanopyS3
    broker_url: str
    callbacks: Callbacks
    tokens: BrokerTokens

    def settings(self) -> workloads.CanopyJobSettings:
        return workloads.CanopyJobSettings(
            broker_url=self.broker_url,
            callback_base_url=self.callbacks.url,
            s3_endpoint=self.s3.endpoint,
        )


@pytest.fixture
def operator_side(canopy_stub: CanopyStub, canopy_s3: CanopyS3) -> Iterator[Operator]:
    stub = canopy_stub
    stub.configure(require_advertised=False)  # the worklist without a capabilities post
    c = canopy_s3.credentials
    stub.set_credentials(
        StubCredentials(
            access_key_id=c["AccessKeyId"],
            secret_access_key=c["SecretAccessKey"],
            session_token=c["SessionToken"],
            repo_password=canopy_s3.repo_password,
            expiration=FAR,
        )
    )
    broker = CredentialBroker(CanopyClient(stub.url))
    port = free_port()
    tokens = BrokerTokens(new_key())
    server = serve(broker, "127.0.0.1", port, tokens=tokens)
    callbacks = Callbacks()
    try:
        yield Operator(stub, canopy_s3, f"http://127.0.0.1:{port}", callbacks, tokens)
    finally:
        server.shutdown()
        server.server_close()
        callbacks.close()


# -- the Job --------------------------------------------------------------------------------


def _unowned(obj: dict[str, Any]) -> dict[str, Any]:
    """No restore object exists here: an owner reference to one would have the garbage
    collector delete the object at once."""
    obj["metadata"].pop("ownerReferences", None)
    return obj


def _start_restore(
    client: Client, ns: str, op: Operator, *, refused: bool = False
) -> tuple[str, dict[str, Any]]:
    """What the syncer and the operator do before the Job runs: the canopy-creds Secret
    (worklist entry + password from canopy, as the syncer writes it), the volumes, the Job.
    `refused`: canopy refuses credentials from then on (403), and the Job gets no retries
    (those are the Job controller's business: one pod shows the failure). Returns the run
    id and the Job as created."""
    with CanopyClient(op.stub.url) as canopy:
        [entry] = canopy.worklist().entries
        password = canopy.restore_credentials(entry.group_id, entry.type).repo_password
    data = canopy_creds_secret_data(entry, password.get_secret_value())
    client.create(
        codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": canopy_creds_secret_name(REPLICA), "namespace": ns},
                "type": "Opaque",
                "stringData": data,
            }
        )
    )
    if refused:
        op.stub.fail("restore-credentials", 403)
    run_id = str(uuid.uuid4())
    canopy_source = {"group": GROUP_ID, "type": BACKUP_TYPE}
    replica = manifests.replica(
        REPLICA,
        None,
        namespace=ns,
        ephemeral=None,
        schedule="H * * * *",
        canopySource=canopy_source,
    )
    restore = manifests.restore(
        RESTORE,
        REPLICA,
        namespace=ns,
        snapshot=op.s3.snapshot_id,
        snapshotSize="64Mi",
        storageSize="1Gi",
        status={"phase": "Restoring", "runId": run_id},
    )
    for pvc in (
        workloads.data_pvc(replica, restore),
        workloads.kopia_cache_pvc(replica, restore.spec.snapshot_size),
    ):
        client.create(codecs.from_dict(_unowned(pvc)))
    # What OperatorCanopy.job_settings writes first: the restore's token and kopia's keys.
    client.create(codecs.from_dict(proxy_secret(op.tokens, replica, restore, owner=None)))
    job = _unowned(workloads.restore_job(replica, restore, CONFIG, canopy=op.settings()))
    if refused:
        job["spec"]["backoffLimit"] = 0
    client.create(codecs.from_dict(job))
    return run_id, job


def _job_state(client: Client, ns: str) -> dict[str, str]:
    status = client.get(Job, JOB, namespace=ns).to_dict().get("status") or {}
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def _pod(client: Client, ns: str) -> dict[str, Any]:
    pods = [p.to_dict() for p in client.list(Pod, namespace=ns, labels={"job-name": JOB})]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def _terminated(pod: dict[str, Any], statuses: str, name: str) -> dict[str, Any]:
    [status] = [s for s in pod["status"][statuses] if s["name"] == name]
    assert "terminated" in status["state"], status
    term: dict[str, Any] = status["state"]["terminated"]
    return term


def test_canopy_restore_job_restores_through_the_sidecar(
    kube_client: Client,
    kube_namespace: str,
    fake_node: FakeNode,
    operator_side: Operator,
    binaries: PostgresBinaries,
) -> None:
    ns, op = kube_namespace, operator_side
    run_id, job = _start_restore(kube_client, ns, op)

    def done() -> bool:
        state = _job_state(kube_client, ns)
        assert state.get("Failed") != "True", fake_node.describe()
        return state.get("Complete") == "True"

    wait_for("the canopy restore Job to complete", done, 240, fake_node.describe)

    pod = _pod(kube_client, ns)
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["labels"]["pgro.bes.au/proxy-sidecar"] == "true"
    restore = _terminated(pod, "containerStatuses", "restore")
    assert restore["exitCode"] == 0
    assert restore["message"].splitlines()[0] == binaries.major
    # The sidecar was stopped after the restore container, and exited cleanly on SIGTERM.
    sidecar = _terminated(pod, "initContainerStatuses", "canopy-proxy")
    assert sidecar["exitCode"] == 0, fake_node.logs(pod["metadata"]["name"], ns)
    assert sidecar["finishedAt"] >= restore["finishedAt"]
    data = fake_node.pvc_path(ns, f"{RESTORE}-data")
    assert (data / ".postgres-version").read_text().strip() == binaries.major
    assert (data / "pgdata" / "PG_VERSION").is_file()

    # One issuance for the run: the broker and the sidecar cached it for every request.
    assert op.stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=run_id) == 1
    [stats] = op.callbacks.received(f"/api/v1/canopy-stats/{ns}/{JOB}")
    assert set(stats) == {
        "sent_raw_bytes",
        "sent_payload_bytes",
        "received_raw_bytes",
        "received_payload_bytes",
    }
    assert stats["received_payload_bytes"] > 1_000_000  # the snapshot came through the proxy
    assert stats["received_raw_bytes"] > stats["received_payload_bytes"]
    for sample in op.callbacks.received(f"/api/v1/canopy-progress/{ns}/{JOB}"):
        assert sample["run_id"] == run_id  # none before the sidecar's 30 s interval

    # The real credentials stayed with the sidecar: not in the pod spec, not in the Secret
    # kopia reads, not in any container's output.
    [restore_spec] = pod["spec"]["containers"]
    env = {e["name"]: e for e in restore_spec["env"]}
    # kopia signs with the restore's own key pair, which the sidecar checks.
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": workloads.canopy_proxy_secret_name(RESTORE),
        "key": "secretAccessKey",
    }
    assert "PGRO_BROKER_TOKEN" not in env
    secret = kube_client.get(Secret, canopy_creds_secret_name(REPLICA), namespace=ns)
    keys = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
    assert keys["accessKeyId"] == PROXY_DUMMY_ACCESS_KEY
    assert keys["secretAccessKey"] == PROXY_DUMMY_SECRET_KEY
    logs = fake_node.logs(pod["metadata"]["name"], ns, tail=10_000)
    assert "canopy proxy listening" in logs
    exposed = json.dumps(pod) + json.dumps(keys) + logs
    for value in op.s3.secrets():
        assert value not in exposed
    assert "Signature=" not in logs
    assert job["spec"]["template"]["spec"]["initContainers"][0]["name"] == "canopy-proxy"


def test_canopy_refusal_fails_the_job_with_a_secret_free_message(
    kube_client: Client,
    kube_namespace: str,
    fake_node: FakeNode,
    operator_side: Operator,
) -> None:
    ns, op = kube_namespace, operator_side
    run_id, _ = _start_restore(kube_client, ns, op, refused=True)

    wait_for(
        "the Job to fail",
        lambda: _job_state(kube_client, ns).get("Failed") == "True",
        180,
        fake_node.describe,
    )
    pod = _pod(kube_client, ns)
    assert pod["status"]["phase"] == "Failed"
    restore = _terminated(pod, "containerStatuses", "restore")
    # Retryable (canopy may come back), so the pod failure policy did not fail it at once.
    assert restore["exitCode"] == 1
    message = restore["message"]
    assert message.startswith("error: CanopyCredentialsUnavailable: "), message
    assert "credential broker answered 502" in message, message
    for value in [*op.s3.secrets(), op.s3.repo_password]:
        assert value not in message
    assert op.stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=run_id) == 0
    refused = [r for r in op.stub.requests("restore-credentials") if r.status == 403]
    assert refused, "the broker never asked canopy"
    # The sidecar still stopped cleanly and reported its (small) totals.
    assert len(op.callbacks.received(f"/api/v1/canopy-stats/{ns}/{JOB}")) == 1
    logs = fake_node.logs(pod["metadata"]["name"], ns, tail=10_000)
    for value in [*op.s3.secrets(), op.s3.repo_password]:
        assert value not in logs
