"""The operator backs a failing step off and reports it once per change (issue 18, item 20).

Before, `Operator._apply` logged at ERROR on every pass and retried the step on every pass;
passes come every second when a plan's wake-up time has already passed. A real `Operator`
runs here against a small in-memory API (no cluster needed): its informer cache is the
API's own store, so a status patch is seen by the next pass at once, and its clock is
moved by hand, so the backoff is checked without waiting for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, cast

import pytest

from pgro.kube.client import KubeApi
from pgro.reconciler.workqueue import WorkQueue
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions, WorkKey
from tests.fixtures.kube_api import Clock, MemoryApi, b64

NS = "team-a"
REPLICA = "analytics"
KEY: WorkKey = ("replica", f"{NS}/{REPLICA}")
QUOTA = "exceeded quota: team-a (used {n} of 10 secrets)"


class FailingApi(MemoryApi):
    """Creating what the replica owns fails with `error` (None: it works); deleting a
    restore fails with `delete_error`. Events are kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.attempts = 0
        self.error: str | None = QUOTA
        self.deletes = 0
        self.delete_error: str | None = None

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if obj["kind"] != "Event":
            return super().create(obj)
        self.events.append(dict(obj))
        return dict(obj)

    def create_if_missing(self, obj: Mapping[str, Any]) -> bool:
        self.attempts += 1
        if self.error is not None:
            raise RuntimeError(self.error.format(n=self.attempts))
        return super().create_if_missing(obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        if kind == "PostgresPhysicalRestore":
            self.deletes += 1
            if self.delete_error is not None:
                raise RuntimeError(self.delete_error.format(n=self.deletes))
        return super().delete(kind, namespace, name)

    def steps_condition(self) -> dict[str, Any] | None:
        replica = self.objects[("PostgresPhysicalReplica", NS, REPLICA)]
        conditions = replica.get("status", {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "StepsSucceeding"), None)

    def step_failed_events(self) -> list[str]:
        return [e["note"] for e in self.events if e["reason"] == "StepFailed"]


@pytest.fixture
def world() -> Iterator[tuple[Operator, FailingApi, Clock]]:
    api = FailingApi()
    replica = {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalReplica",
        "metadata": {"name": REPLICA, "namespace": NS, "uid": "u-1", "generation": 1},
        "spec": {"schedule": "0 3 * * *", "kopiaSecretRef": {"name": "kopia"}},
    }
    api.objects[("PostgresPhysicalReplica", NS, REPLICA)] = replica
    api.objects[("Secret", NS, "kopia")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kopia", "namespace": NS},
        "data": {"repositoryPassword": b64("pw"), "filesystemPath": b64("/nonexistent")},
    }
    clock = Clock()
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="img"),
        clock=clock,
    )
    op.replicas._put((NS, REPLICA), replica)  # the informer, synced at once
    try:
        yield op, api, clock
    finally:
        op.notifier.shutdown()


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgro.reconciler" and r.levelno >= logging.ERROR
    ]


def reconcile(op: Operator) -> None:
    """One pass of the replica, as a worker makes it: the key is taken off the queue."""
    op.queue = WorkQueue()
    op.shell.reconcile_replica(f"{NS}/{REPLICA}")


def requeued_in(op: Operator) -> float:
    """Seconds until the operator's next pass of the replica."""
    return op.queue._due[KEY] - time.monotonic()


def test_a_step_failing_every_second_is_tried_with_backoff_and_logged_once(
    world: tuple[Operator, FailingApi, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    op, api, clock = world
    caplog.set_level(logging.DEBUG, logger="pgro.reconciler")

    reconcile(op)
    assert api.attempts == 1
    # The next pass is the retry, 1 s away (the schedule's wake-up is hours away).
    assert 0 < requeued_in(op) <= 1.0

    # A pass every second for a minute (watch events, a wake-up time already passed).
    retried_at = []
    for second in range(1, 61):
        clock.advance(1)
        before = api.attempts
        reconcile(op)
        if api.attempts > before:
            retried_at.append(second)
            # The object comes back when the doubled backoff ends, not a second later.
            assert requeued_in(op) > 1.5
    # Backoff 1, 2, 4, 8, 16, 32 s after each failure (before: tried on all 61 passes).
    assert retried_at == [1, 3, 7, 15, 31]
    # The same failure with other numbers in it is logged once (before: 61 ERROR lines).
    [line] = errors(caplog)
    assert "EnsureReplicaResources for replica team-a/analytics failed" in line
    assert "exceeded quota" in line and "backoff" in line
    # One Warning event, and the condition says which step fails and why.
    [note] = api.step_failed_events()
    assert "EnsureReplicaResources for replica team-a/analytics failed" in note
    condition = api.steps_condition()
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "StepFailing")
    assert "EnsureReplicaResources for replica team-a/analytics failed" in condition["message"]
    assert "(used 1 of 10 secrets)" in condition["message"]


def test_a_changed_failure_is_reported_again_and_recovery_shows(
    world: tuple[Operator, FailingApi, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    op, api, clock = world
    caplog.set_level(logging.INFO, logger="pgro.reconciler")
    reconcile(op)
    assert len(errors(caplog)) == 1

    api.error = 'secrets is forbidden: User "system:serviceaccount:pgro" cannot create'
    clock.advance(1)
    reconcile(op)
    assert len(errors(caplog)) == 2
    assert "forbidden" in errors(caplog)[-1]
    assert len(api.step_failed_events()) == 2
    condition = api.steps_condition()
    assert condition is not None and "forbidden" in condition["message"]

    api.error = None
    clock.advance(2)
    reconcile(op)
    assert len(errors(caplog)) == 2
    condition = api.steps_condition()
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("True", "Recovered")
    assert "EnsureReplicaResources for replica team-a/analytics succeeded" in condition["message"]
    assert any("succeeded after 2 failures" in r.getMessage() for r in caplog.records)
    # Working again, it is tried on the next pass, whenever that comes.
    attempts = api.attempts
    clock.advance(0.1)
    op.effects._ensured.clear()
    reconcile(op)
    assert api.attempts > attempts


def test_a_failing_step_leaves_no_secret_in_log_event_or_condition(
    world: tuple[Operator, FailingApi, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    op, api, _ = world
    caplog.set_level(logging.DEBUG, logger="pgro.reconciler")
    api.error = "rejected: repository password pw-is-not-this-one and pw"
    api.objects[("Secret", NS, "kopia")]["data"]["repositoryPassword"] = b64("pw-is-not-this-one")
    reconcile(op)
    [line] = errors(caplog)
    condition = api.steps_condition()
    assert condition is not None
    for text in (line, api.step_failed_events()[0], condition["message"]):
        assert "rejected" in text
        assert "pw-is-not-this-one" not in text


def test_a_delete_failing_after_its_wake_up_time_is_not_retried_every_second(
    world: tuple[Operator, FailingApi, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    """The review's case: a step failing behind a wake-up time already passed. A Failed
    restore is due for deletion (its 300 s are over) and the delete keeps failing; before,
    every pass (every few seconds, and on every watch event) deleted again and logged an
    ERROR each time."""
    op, api, clock = world
    caplog.set_level(logging.DEBUG, logger="pgro.reconciler")
    api.error = None
    api.delete_error = "admission webhook denied the request (attempt {n})"
    failed = {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalRestore",
        "metadata": {
            "name": f"{REPLICA}-1",
            "namespace": NS,
            "uid": "r-1",
            "creationTimestamp": "2026-03-04T04:00:00Z",
        },
        "spec": {
            "replica": {"name": REPLICA},
            "snapshot": "k1a2b3c4",
            "snapshotSize": "1Gi",
            "storageSize": "2Gi",
        },
        "status": {"phase": "Failed", "createdAt": "2026-03-04T04:00:00Z"},
    }
    api.objects[("PostgresPhysicalRestore", NS, f"{REPLICA}-1")] = failed
    op.restores._put((NS, f"{REPLICA}-1"), failed)

    reconcile(op)
    assert api.deletes == 1
    assert 0 < requeued_in(op) <= 1.0
    tried_at = []
    for second in range(1, 61):
        clock.advance(1)
        before = api.deletes
        reconcile(op)
        if api.deletes > before:
            tried_at.append(second)
    assert tried_at == [1, 3, 7, 15, 31]
    assert requeued_in(op) > 1.5
    [line] = errors(caplog)
    assert "DeleteRestore analytics-1 for replica team-a/analytics failed" in line
    assert "admission webhook denied" in line
    condition = api.steps_condition()
    assert condition is not None and condition["reason"] == "StepFailing"
    assert "DeleteRestore" in condition["message"]

    api.delete_error = None
    clock.advance(64)
    reconcile(op)
    assert ("PostgresPhysicalRestore", NS, f"{REPLICA}-1") not in api.objects
    condition = api.steps_condition()
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("True", "Recovered")
    assert len(errors(caplog)) == 1
