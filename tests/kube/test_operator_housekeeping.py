"""Operator housekeeping on the fake node (features.md §2.16, §2.17): a replica whose snapshot
is not PostgreSQL, so each restore Job fails at once (`pgro restore-job` exits 2 and the
pod failure policy fails the Job).

- The failed Job's `ttlSecondsAfterFinished` goes from 120 s to a day after the replica's
  first failure in a row, and to 10 minutes after the next one (the retry after the
  120 s backoff).
- The orphan pod sweep deletes the pods labelled with the replica that have no owner and no
  restore label, or a restore label naming no restore, and keeps a pod with an owner and a
  pod of a listed restore.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pgro.api.names import LABEL_REPLICA, LABEL_RESTORE
from pgro.api.secret import KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.kube.client import KubeApi
from pgro.runtimes.kubernetes.workloads import (
    FAILED_JOB_TTL_FIRST_S,
    FAILED_JOB_TTL_REPEAT_S,
    JOB_TTL_S,
)
from tests.conftest import s3_credentials
from tests.kube.node import FakeNode
from tests.kube.operator_proc import OperatorProcess, wait_for
from tests.kube.test_operator import _diagnostics, _replica, _restores, _s3_secret

pytestmark = pytest.mark.timeout(900)

BUCKET = "pgro-housekeeping-bucket"
HOST = "db-notpg"
# An image the fake node does not run: the pod stays Pending (ErrImagePull) until deleted.
IDLE_IMAGE = "example.invalid/idle:1"


@pytest.fixture(scope="module")
def notpg_s3(moto_s3: str, scratch_root: Path) -> KopiaCredentials:
    """An S3 repository holding one snapshot of a tree that is not a PostgreSQL cluster."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=f"http://{moto_s3}",
        region_name="us-east-1",
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
    ).create_bucket(Bucket=BUCKET)
    creds = s3_credentials(moto_s3, BUCKET)
    base = scratch_root / "kube-housekeeping"
    tree = base / "tree"
    tree.mkdir(parents=True)
    os.chmod(base, 0o711)
    (tree / "README").write_text("not a database\n")
    (tree / "notes").mkdir()
    (tree / "notes" / "a.txt").write_text("hello\n")
    kopia = KopiaRepository(creds, base / "kopia-state")
    kopia.create()
    try:
        kopia.snapshot_create(tree, tags={"kind": "notpg"}, override_source=f"postgres@{HOST}:/x")
    finally:
        kopia.close()
    return creds


def _failed_job(admin: KubeApi, ns: str, restore: str) -> dict[str, Any] | None:
    job = admin.get("Job", ns, f"{restore}-restore")
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
        return job
    return None


def _ttl(job: dict[str, Any] | None) -> int | None:
    return ((job or {}).get("spec") or {}).get("ttlSecondsAfterFinished")


def _pod(ns: str, name: str, labels: dict[str, str], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, **meta},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "idle", "image": IDLE_IMAGE}],
        },
    }


def _deleted(admin: KubeApi, ns: str, name: str) -> bool:
    pod = admin.get("Pod", ns, name)
    return pod is None or bool(pod["metadata"].get("deletionTimestamp"))


def test_failed_job_ttl_and_the_orphan_pod_sweep(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    notpg_s3: KopiaCredentials,
) -> None:
    ns = kube_namespace
    admin.create(_s3_secret(ns, "kopia", notpg_s3))
    admin.create(_replica(ns, "broken", "kopia", snapshotFilter={"hostPattern": HOST}))
    context = lambda: _diagnostics(operator, fake_node)  # noqa: E731

    def first_failed() -> tuple[str, dict[str, Any]] | None:
        for restore in _restores(admin, ns, "broken"):
            name = restore["metadata"]["name"]
            job = _failed_job(admin, ns, name)
            if job is not None and _ttl(job) != JOB_TTL_S:
                return name, job
        return None

    first, job = wait_for("the first restore Job to fail", first_failed, 240, context=context)
    # The replica had no failure before this one: the pod's log is kept for a day.
    assert _ttl(job) == FAILED_JOB_TTL_FIRST_S
    [failed] = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
    assert failed["status"] == "True"

    # -- the orphan pod sweep, while the failed restore is still listed (300 s) -----------
    owner = admin.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "pod-owner", "namespace": ns},
            "data": {},
        }
    )
    owner_ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "pod-owner",
        "uid": owner["metadata"]["uid"],
    }
    replica_label = {LABEL_REPLICA: "broken"}
    # The pods to keep first: once the orphans made after them are deleted, the pass that
    # deleted them saw these too (a watch delivers in order).
    admin.create(_pod(ns, "owned", replica_label, ownerReferences=[owner_ref]))
    admin.create(_pod(ns, "of-listed-restore", {**replica_label, LABEL_RESTORE: first}))
    admin.create(_pod(ns, "unrelated", {LABEL_RESTORE: "broken-19700101-000000"}))
    admin.create(_pod(ns, "no-restore-label", replica_label))
    admin.create(
        _pod(ns, "of-gone-restore", {**replica_label, LABEL_RESTORE: "broken-19700101-000000"})
    )
    wait_for(
        "the orphaned pods to be deleted",
        lambda: _deleted(admin, ns, "no-restore-label") and _deleted(admin, ns, "of-gone-restore"),
        60,
        context=context,
    )
    for kept in ("owned", "of-listed-restore", "unrelated"):
        assert not _deleted(admin, ns, kept), kept
    assert admin.get("PostgresPhysicalRestore", ns, first) is not None
    assert "deleted orphaned pod no-restore-label" in operator.log_tail(400)

    # -- the retry after the backoff fails too: its Job is kept 10 minutes ----------------
    def second_failed() -> dict[str, Any] | None:
        for restore in _restores(admin, ns, "broken"):
            name = restore["metadata"]["name"]
            if name == first:
                continue
            job = _failed_job(admin, ns, name)
            if job is not None and _ttl(job) != JOB_TTL_S:
                return job
        return None

    second = wait_for("the retried restore Job to fail", second_failed, 360, context=context)
    assert _ttl(second) == FAILED_JOB_TTL_REPEAT_S
    replica = admin.get("PostgresPhysicalReplica", ns, "broken") or {}
    assert replica["status"]["consecutiveRestoreFailures"] >= 2
