"""The operator's version-detect fallback (features.md §2.11) against an in-memory API.

A restore is Ready but its restore Job reported no PostgreSQL version (an evicted pod lost
its termination message). A real `Operator` passes over it; the test plays the Job
controller and the watches by putting the Job and its pod in the informer caches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pgro.kube.client import KubeApi
from pgro.runtimes.kubernetes.observe import DETECT_FAILED, DETECT_NO_VERSION
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from tests.fixtures.kube_api import Clock, MemoryApi, b64
from tests.fixtures.manifests import replica_doc, restore_doc

NS = "team-a"
REPLICA = "analytics"
RESTORE = f"{REPLICA}-20260304050607"
KEY = f"{NS}/{RESTORE}"
DETECT_JOB = f"{RESTORE}-version-detect"


@pytest.fixture
def world() -> Iterator[tuple[Operator, MemoryApi]]:
    api = MemoryApi()
    replica = replica_doc(
        REPLICA, namespace=NS, metadata={"uid": "u-1", "generation": 1}, ephemeral=None
    )
    api.objects[("PostgresPhysicalReplica", NS, REPLICA)] = replica
    api.objects[("Secret", NS, "kopia")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kopia", "namespace": NS},
        "data": {"repositoryPassword": b64("pw"), "filesystemPath": b64("/nonexistent")},
    }
    restore = restore_doc(
        RESTORE,
        REPLICA,
        namespace=NS,
        metadata={"uid": "r-1"},
        status={
            "phase": "Ready",
            "pvc": f"{RESTORE}-data",
            "restoredAt": "2026-03-04T05:06:07Z",
            "restoreJob": {"name": f"{RESTORE}-restore", "phase": "Succeeded"},
        },
    )
    api.objects[("PostgresPhysicalRestore", NS, RESTORE)] = restore
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="pgro:test"),
        clock=Clock(),
    )
    op.replicas._put((NS, REPLICA), replica)
    op.restores._put((NS, RESTORE), restore)
    try:
        yield op, api
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def job(name: str, condition: str | None = None, **extra: Any) -> dict[str, Any]:
    status = {"conditions": [{"type": condition, "status": "True", **extra}]} if condition else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": {"pgro.bes.au/restore": RESTORE}},
        "status": status,
    }


def pod(job_name: str, n: int, phase: str, message: str = "") -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 0 if phase == "Succeeded" else 1}
    if message:
        terminated["message"] = message
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-{n}",
            "namespace": NS,
            "creationTimestamp": f"2026-03-04T05:07:0{n}Z",
            "labels": {"pgro.bes.au/restore": RESTORE, "job-name": job_name},
        },
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "version-detect", "state": {"terminated": terminated}}],
        },
    }


def status(api: MemoryApi) -> dict[str, Any]:
    result: dict[str, Any] = api.objects[("PostgresPhysicalRestore", NS, RESTORE)]["status"]
    return result


def started(op: Operator, api: MemoryApi) -> dict[str, Any]:
    """A pass creates the version-detect Job; the watch shows it."""
    op.shell.reconcile_restore(KEY)
    assert f"POST Job {DETECT_JOB}" in api.calls
    created = api.objects[("Job", NS, DETECT_JOB)]
    op.jobs._put((NS, DETECT_JOB), created)
    return created


def test_a_lost_version_is_read_by_a_version_detect_job(
    world: tuple[Operator, MemoryApi],
) -> None:
    op, api = world
    created = started(op, api)
    meta, spec = created["metadata"], created["spec"]
    assert meta["labels"] == {
        "pgro.bes.au/replica": REPLICA,
        "pgro.bes.au/restore": RESTORE,
        "pgro.bes.au/job-type": "version-detect",
        "app.kubernetes.io/managed-by": "pgro",
    }
    assert meta["ownerReferences"][0]["uid"] == "r-1"
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (2, 120)
    assert spec["ttlSecondsAfterFinished"] == 120
    pod_spec = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"]["pgro.bes.au/job-type"] == "version-detect"
    assert pod_spec["securityContext"]["runAsUser"] == 999
    assert pod_spec["automountServiceAccountToken"] is False
    [container] = pod_spec["containers"]
    assert (container["image"], container["command"]) == ("pgro:test", ["pgro", "detect-version"])
    assert container["volumeMounts"] == [{"name": "pgdata", "mountPath": "/pgdata"}]
    assert pod_spec["volumes"] == [
        {"name": "pgdata", "persistentVolumeClaim": {"claimName": f"{RESTORE}-data"}}
    ]

    # Running, then Complete before its pod shows in the cache: nothing is decided yet.
    api.calls.clear()
    op.shell.reconcile_restore(KEY)
    assert not [c for c in api.calls if c.startswith("POST Job")]
    op.jobs._put((NS, DETECT_JOB), job(DETECT_JOB, "Complete"))
    op.shell.reconcile_restore(KEY)
    assert status(api)["phase"] == "Ready" and not status(api).get("postgresVersion")

    op.pods._put((NS, f"{DETECT_JOB}-1"), pod(DETECT_JOB, 1, "Succeeded", "15"))
    op.shell.reconcile_restore(KEY)
    assert status(api)["postgresVersion"] == "15"
    # And the server is started on it.
    op.shell.reconcile_restore(KEY)
    deployment = api.objects[("Deployment", NS, RESTORE)]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:15"


def test_a_restore_job_still_cached_without_a_version_is_no_failure(
    world: tuple[Operator, MemoryApi],
) -> None:
    """The restore Job's deletion has not reached the watch yet: its empty message is the
    reason to detect, not a verdict."""
    op, api = world
    restore_job = f"{RESTORE}-restore"
    op.jobs._put((NS, restore_job), job(restore_job, "Complete"))
    op.pods._put((NS, f"{restore_job}-1"), pod(restore_job, 1, "Succeeded"))
    started(op, api)
    assert status(api)["phase"] == "Ready"


def test_a_job_that_reports_no_version_fails_the_restore(
    world: tuple[Operator, MemoryApi],
) -> None:
    op, api = world
    started(op, api)
    op.jobs._put((NS, DETECT_JOB), job(DETECT_JOB, "Complete"))
    op.pods._put((NS, f"{DETECT_JOB}-1"), pod(DETECT_JOB, 1, "Succeeded"))
    op.shell.reconcile_restore(KEY)
    assert status(api)["phase"] == "Failed"
    assert DETECT_NO_VERSION in json.dumps(status(api))


def test_a_job_that_failed_after_its_retries_fails_the_restore_saying_why(
    world: tuple[Operator, MemoryApi],
) -> None:
    op, api = world
    started(op, api)
    op.jobs._put(
        (NS, DETECT_JOB), job(DETECT_JOB, "Failed", reason="BackoffLimitExceeded", message="x")
    )
    why = "error: NotPostgres: no PostgreSQL data directory on the data volume /pgdata"
    for n in (1, 2, 3):
        op.pods._put((NS, f"{DETECT_JOB}-{n}"), pod(DETECT_JOB, n, "Failed", why))
    op.shell.reconcile_restore(KEY)
    assert status(api)["phase"] == "Failed"
    text = json.dumps(status(api))
    assert DETECT_FAILED in text and "NotPostgres: no PostgreSQL data directory" in text
