"""The operator's housekeeping decisions (runtimes/kubernetes/housekeeping.py): which pods the
orphan sweep deletes (features.md §2.16) and a failed restore Job's TTL (§2.17). The API
side of both is tested against a control plane in tests/kube/test_operator_housekeeping.py."""

from __future__ import annotations

from typing import Any

import pytest

from pgro.api.names import LABEL_REPLICA, LABEL_RESTORE
from pgro.core import reasons
from pgro.core.observations import RestoreObservation, RestoreWork, WorkState
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.housekeeping import failures_before, orphan_pods
from tests.fixtures.manifests import replica, restore


def _pod(name: str, restore: str | None = None, **meta: Any) -> dict[str, Any]:
    labels = {LABEL_REPLICA: "r"} | ({LABEL_RESTORE: restore} if restore else {})
    return {"metadata": {"name": name, "labels": labels, **meta}}


OWNER = [{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "u1"}]


def test_orphan_pods_are_ownerless_and_of_no_listed_restore() -> None:
    pods = [
        _pod("no-restore-label"),
        _pod("of-a-gone-restore", "r-old"),
        _pod("of-a-listed-restore", "r-now"),
        _pod("owned-no-label", ownerReferences=OWNER),
        _pod("owned-of-a-gone-restore", "r-old", ownerReferences=OWNER),
        _pod("being-deleted", deletionTimestamp="2026-12-04T20:00:00Z"),
        # An empty list is no owner (what a client that clears the field leaves).
        _pod("empty-owner-list", "r-old", ownerReferences=[]),
    ]
    assert orphan_pods(pods, {"r-now"}) == [
        "no-restore-label",
        "of-a-gone-restore",
        "empty-owner-list",
    ]
    assert orphan_pods(pods, {"r-now", "r-old"}) == ["no-restore-label"]
    assert orphan_pods([], {"r-now"}) == []


@pytest.mark.parametrize(("before", "ttl"), [(0, 86400), (1, 600), (7, 600), (-1, 86400)])
def test_failed_restore_job_ttl(before: int, ttl: int) -> None:
    assert workloads.failed_restore_job_ttl(before) == ttl
    assert workloads.job_ttl_patch(ttl) == {"spec": {"ttlSecondsAfterFinished": ttl}}
    # Only a Job still at the default TTL is patched, so the two must differ from it.
    assert ttl != workloads.JOB_TTL_S


def _marker(restore_name: str) -> dict[str, Any]:
    return {
        "type": reasons.LAST_RESTORE_FAILED,
        "status": "True",
        "reason": reasons.RESTORE_FAILED,
        "message": f"Restore {restore_name} failed: restore failed: NotPostgres: ...",
        "lastTransitionTime": "2026-12-04T20:00:00Z",
    }


def _failed(failures: int, marker_for: str | None) -> RestoreObservation:
    status: dict[str, Any] = {"consecutiveRestoreFailures": failures}
    if marker_for is not None:
        status["conditions"] = [_marker(marker_for)]
    return RestoreObservation(
        restore=restore("r-now"),
        replica=replica(status=status),
        work=RestoreWork(WorkState.FAILED, "r-now-restore", reason="NotPostgres: no PG_VERSION"),
    )


def test_failures_before_this_one() -> None:
    # Seen before the core counted this failure: the counter is the count before it.
    assert failures_before(_failed(0, None)) == 0
    assert failures_before(_failed(2, "r-old")) == 2
    # Seen again after the core counted it (the marker names this restore): less this one.
    assert failures_before(_failed(1, "r-now")) == 0
    assert failures_before(_failed(3, "r-now")) == 2
    # So the TTL is the same whichever pass patches it.
    assert workloads.failed_restore_job_ttl(failures_before(_failed(0, None))) == 86400
    assert workloads.failed_restore_job_ttl(failures_before(_failed(1, "r-now"))) == 86400
    assert workloads.failed_restore_job_ttl(failures_before(_failed(2, "r-now"))) == 600
    # The replica gone: nothing counted.
    gone = RestoreObservation(restore=restore("r-now"), replica=None)
    assert failures_before(gone) == 0
