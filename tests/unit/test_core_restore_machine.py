"""Table-driven tests of the restore phase machine."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from pgro.api.conditions import Condition
from pgro.api.migration import MigrationResult
from pgro.api.phases import RestorePhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import (
    MigrationOutcome,
    RestoreObservation,
    RestoreWork,
    Server,
    ServerState,
    VersionDetection,
    WorkState,
)
from pgro.core.plan import (
    EmitEvent,
    PatchReplicaStatus,
    PatchRestoreStatus,
    ReportVerification,
    StartRestoreWork,
)
from pgro.core.queue import AdmissionQueue, Slot
from pgro.core.restore_machine import RestorePlan, counted_failure, decide_restore
from tests.scenarios.builders import GIB, NOW, replica, restore, stamp

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "t"}
KEY = "analytics/fiji"
MIB = 1024**2


def _decide(
    the_restore: PostgresPhysicalRestore,
    *,
    the_replica: PostgresPhysicalReplica | None = None,
    work: RestoreWork | None = None,
    server: Server | None = None,
    detection: VersionDetection | None = None,
    migration: MigrationOutcome | None = None,
    queue: AdmissionQueue | None = None,
    now: Any = NOW,
) -> RestorePlan:
    obs = RestoreObservation(
        restore=the_restore,
        replica=the_replica if the_replica is not None else replica(),
        work=work or RestoreWork.not_started(),
        server=server or Server(),
        version_detection=detection,
        migration=migration,
    )
    return decide_restore(obs, queue or AdmissionQueue(), now, lambda: "run-1")


def _kinds(plan: RestorePlan) -> list[str]:
    return [type(s).__name__ for s in plan.steps]


def _restore_patch(plan: RestorePlan) -> dict[str, Any]:
    patches = [s for s in plan.steps if isinstance(s, PatchRestoreStatus)]
    merged: dict[str, Any] = {}
    for patch in patches:
        merged.update(patch.patch)
    return merged


def test_new_restore_prepares_storage_and_starts_restoring() -> None:
    plan = _decide(restore("fiji-1"))
    assert _kinds(plan) == ["PrepareRestoreStorage", "PatchRestoreStatus"]
    assert _restore_patch(plan) == {
        "createdAt": stamp(NOW),
        "phase": "Restoring",
        "pvc": "fiji-1-data",
    }
    assert plan.queue.slot(KEY) == Slot(KEY, NOW, "fiji-1")


def test_restoring_starts_the_work() -> None:
    plan = _decide(restore("fiji-1", phase="Restoring", createdAt=stamp(NOW)))
    assert plan.steps == (StartRestoreWork("fiji-1", None),)
    assert plan.requeue_after == timedelta(seconds=15)


def test_canopy_run_id_is_persisted_before_the_work_starts() -> None:
    plan = _decide(
        restore("fiji-1", phase="Restoring"),
        the_replica=replica(kopiaSecretRef=None, canopySource=CANOPY),
    )
    assert _kinds(plan) == ["PatchRestoreStatus", "StartRestoreWork"]
    assert _restore_patch(plan) == {"runId": "run-1"}
    assert plan.steps[1] == StartRestoreWork("fiji-1", "run-1")
    again = _decide(
        restore("fiji-1", phase="Restoring", runId="run-1"),
        the_replica=replica(kopiaSecretRef=None, canopySource=CANOPY),
    )
    assert again.steps == (StartRestoreWork("fiji-1", "run-1"),)


def test_running_work_is_recorded_once() -> None:
    plan = _decide(restore("fiji-1", phase="Restoring"), work=RestoreWork.running())
    assert _restore_patch(plan) == {"restoreJob": {"name": "fiji-1-restore", "phase": "Running"}}
    settled = restore(
        "fiji-1", phase="Restoring", restoreJob={"name": "fiji-1-restore", "phase": "Running"}
    )
    assert _decide(settled, work=RestoreWork.running()).steps == ()


def test_finished_work_makes_the_restore_ready_then_cleans_up() -> None:
    plan = _decide(
        restore("fiji-1", phase="Restoring"),
        work=RestoreWork.succeeded(
            "16", NOW - timedelta(seconds=5), fixes={"reset_wal": False, "locale": True}
        ),
    )
    assert _kinds(plan) == ["PatchRestoreStatus", "CleanupRestoreWork"]
    assert _restore_patch(plan) == {
        "phase": "Ready",
        "restoredAt": stamp(NOW),
        "restoreJob": {
            "name": "fiji-1-restore",
            "phase": "Succeeded",
            "completedAt": stamp(NOW - timedelta(seconds=5)),
        },
        "postgresVersion": "16",
        "fixes": {"reset_wal": False, "locale": True},
    }


def test_failed_work_fails_the_restore_counts_once_and_reports() -> None:
    queue = AdmissionQueue(limit=1, slots=(Slot(KEY, NOW, "fiji-1"),))
    queue, _ = queue.request("other/x", NOW)
    the_replica = replica(
        {"consecutiveRestoreFailures": 2}, kopiaSecretRef=None, canopySource=CANOPY
    )
    plan = _decide(
        restore("fiji-1", phase="Restoring"),
        the_replica=the_replica,
        work=RestoreWork.failed("no PostgreSQL data directory"),
        queue=queue,
    )
    assert _kinds(plan) == [
        "PatchReplicaStatus",
        "PatchRestoreStatus",
        "EmitEvent",
        "ReportVerification",
    ]
    replica_patch = plan.steps[0]
    assert isinstance(replica_patch, PatchReplicaStatus)
    assert replica_patch.patch["consecutiveRestoreFailures"] == 3
    assert replica_patch.patch["nextScheduledRestore"] == stamp(NOW + timedelta(seconds=480))
    # The failure report is persisted in the same write as the failure count.
    [pending] = replica_patch.patch["pendingVerificationReports"]
    assert pending["restore"] == "fiji-1" and pending["outcome"] == "failure"
    assert "no PostgreSQL data directory" in pending["error"]
    assert pending["observedAt"] == stamp(NOW) and "attempts" in pending
    restore_patch = _restore_patch(plan)
    assert restore_patch["phase"] == "Failed"
    assert restore_patch["restoreJob"] == {"name": "fiji-1-restore", "phase": "Failed"}
    [failed] = [Condition.model_validate(c) for c in restore_patch["conditions"]]
    assert "no PostgreSQL data directory" in failed.message
    event = plan.steps[2]
    assert isinstance(event, EmitEvent) and event.reason == "RestoreFailed"
    assert event.note.startswith("Restore fiji-1 failed")
    report = plan.steps[3]
    assert isinstance(report, ReportVerification) and "no PostgreSQL" in report.reason
    # The slot went back and the next replica in line was promoted.
    assert [s.key for s in plan.queue.slots] == ["other/x"]
    assert plan.wake == ("other/x",)

    # Replayed after a crash before the restore was marked Failed: not counted again.
    conditions = replica_patch.patch["conditions"]
    counted = replica({"consecutiveRestoreFailures": 3, "conditions": conditions})
    assert counted_failure(counted.status) == "fiji-1"
    replay = _decide(
        restore("fiji-1", phase="Restoring"),
        the_replica=counted,
        work=RestoreWork.failed("no PostgreSQL data directory"),
    )
    assert "PatchReplicaStatus" not in _kinds(replay)
    assert _restore_patch(replay)["phase"] == "Failed"


def test_failed_restore_is_left_alone() -> None:
    plan = _decide(restore("fiji-1", phase="Failed"), work=RestoreWork.failed("x"))
    assert plan.steps == () and plan.requeue_after is None


@pytest.mark.parametrize(
    ("detection", "kinds", "patch"),
    [
        (None, ["DetectPostgresVersion"], {}),
        (VersionDetection(WorkState.RUNNING), ["DetectPostgresVersion"], {}),
        (
            VersionDetection(WorkState.SUCCEEDED, "15"),
            ["PatchRestoreStatus"],
            {"postgresVersion": "15"},
        ),
    ],
)
def test_missing_version_is_detected(
    detection: VersionDetection | None, kinds: list[str], patch: dict[str, Any]
) -> None:
    plan = _decide(restore("fiji-1", phase="Ready", restoredAt=stamp(NOW)), detection=detection)
    assert _kinds(plan) == kinds
    assert _restore_patch(plan) == patch


@pytest.mark.parametrize(
    "detection",
    [
        VersionDetection(WorkState.FAILED, reason="pod evicted"),
        VersionDetection(WorkState.SUCCEEDED),
    ],
)
def test_failed_version_detection_fails_the_restore(detection: VersionDetection) -> None:
    plan = _decide(restore("fiji-1", phase="Ready", restoredAt=stamp(NOW)), detection=detection)
    assert _restore_patch(plan)["phase"] == "Failed"


def test_ready_server_moves_to_switching_and_frees_the_slot() -> None:
    queue = AdmissionQueue(limit=1, slots=(Slot(KEY, NOW, "fiji-1"),))
    queue, _ = queue.request("other/x", NOW)
    plan = _decide(
        restore("fiji-1", phase="Ready", restoredAt=stamp(NOW), postgresVersion="16"),
        server=Server(ServerState.READY),
        queue=queue,
    )
    assert _kinds(plan) == ["EnsureServer", "PatchRestoreStatus"]
    assert _restore_patch(plan) == {"phase": "Switching", "deployment": "fiji-1"}
    assert plan.wake == ("other/x",)


@pytest.mark.parametrize(
    ("size", "explicit", "waited", "fails"),
    [
        (MIB, None, timedelta(seconds=1800), False),
        (MIB, None, timedelta(seconds=1801), True),
        (200 * GIB, None, timedelta(seconds=3500), False),
        (200 * GIB, None, timedelta(seconds=3601), True),
        (200 * GIB, "10m", timedelta(seconds=601), True),
    ],
)
def test_readiness_timeout_from_restored_at(
    size: int, explicit: str | None, waited: timedelta, fails: bool
) -> None:
    the_restore = restore(
        "fiji-1", phase="Ready", size=size, postgresVersion="16", restoredAt=stamp(NOW - waited)
    )
    plan = _decide(the_restore, the_replica=replica(deploymentReadyTimeout=explicit))
    patch = _restore_patch(plan)
    if fails:
        assert patch["phase"] == "Failed"
        [condition] = [Condition.model_validate(c) for c in patch["conditions"]]
        assert "did not become Ready within" in condition.message
    else:
        assert patch == {}
        assert plan.requeue_after is not None and plan.requeue_after <= timedelta(seconds=10)


def test_a_server_that_cannot_start_fails_at_once() -> None:
    plan = _decide(
        restore("fiji-1", phase="Ready", restoredAt=stamp(NOW), postgresVersion="16"),
        server=Server(ServerState.FAILED, "FATAL: could not map shared memory"),
    )
    assert _restore_patch(plan)["phase"] == "Failed"


def test_migrate_to_passes_through_migrating() -> None:
    migrating_spec = {"migrateTo": {"version": "2.1.0", "versionId": "v"}}
    base = restore("fiji-1", phase="Ready", restoredAt=stamp(NOW), postgresVersion="16")
    with_target = base.model_copy(
        update={
            "spec": base.spec.model_validate(
                {**base.spec.model_dump(by_alias=True), **migrating_spec}
            )
        }
    )
    plan = _decide(with_target, server=Server(ServerState.READY))
    assert _restore_patch(plan) == {"phase": "Migrating"}
    migrating = with_target.model_copy(
        update={"status": with_target.status.model_copy(update={"phase": RestorePhase.MIGRATING})}
    )
    waiting = _decide(migrating, server=Server(ServerState.READY))
    assert _kinds(waiting) == ["EnsureServer", "RunMigration"]
    # Its server not (yet, or again) ready: kept running, the migrator not looked at.
    starting = _decide(migrating, server=Server(ServerState.NOT_READY))
    assert _kinds(starting) == ["EnsureServer"]
    assert _restore_patch(starting) == {}
    stopped = _decide(migrating, server=Server(ServerState.FAILED, "the process exited"))
    assert _restore_patch(stopped)["phase"] == "Failed"
    assert "RunMigration" not in _kinds(stopped)
    # The runner recorded a result (here a failed migration: a finding, not a failure of
    # the restore): back to Ready, which moves on to Switching.
    result = {
        "totalElapsedSeconds": 3,
        "failedMigration": "002-add-column",
        "dataBytesBefore": 10,
        "dataBytesAfter": 12,
    }
    recorded = migrating.model_copy(
        update={
            "status": migrating.status.model_copy(
                update={"migration_result": MigrationResult.model_validate(result)}
            )
        }
    )
    done = _decide(recorded)
    assert _restore_patch(done) == {"phase": "Ready"}
    assert "RunMigration" not in _kinds(done)
    switching = _decide(
        recorded.model_copy(
            update={"status": recorded.status.model_copy(update={"phase": RestorePhase.READY})}
        ),
        server=Server(ServerState.READY),
    )
    assert _restore_patch(switching)["phase"] == "Switching"
    # Withdrawn mid-flight: a plain verify from here.
    withdrawn = _decide(migrating.model_copy(update={"spec": base.spec}))
    assert _restore_patch(withdrawn) == {"phase": "Ready"}
    # A runtime that cannot run migrations fails the restore (and frees its slot) instead
    # of leaving it in Migrating for good.
    unsupported = _decide(
        migrating, migration=MigrationOutcome.unsupported("pgro run has no --migrator")
    )
    patch = _restore_patch(unsupported)
    assert patch["phase"] == "Failed"
    [failed] = [Condition.model_validate(c) for c in patch["conditions"]]
    assert failed.message == "MigrationUnsupported: pgro run has no --migrator"
    assert "RunMigration" not in _kinds(unsupported)


@pytest.mark.parametrize(
    ("phase", "kinds"),
    [("Switching", ["EnsureServer"]), ("Active", ["EnsureServer", "MarkReadyForTraffic"])],
)
def test_serving_phases_reapply_the_server_without_writing(phase: str, kinds: list[str]) -> None:
    plan = _decide(restore("fiji-1", phase=phase, postgresVersion="16"))
    assert _kinds(plan) == kinds


def test_restore_deleted_while_restoring_gives_back_its_slot() -> None:
    queue = AdmissionQueue(limit=1, slots=(Slot(KEY, NOW, "fiji-1"),))
    plan = _decide(restore("fiji-1", phase="Restoring", deleting=True), queue=queue)
    assert plan.steps == ()
    assert plan.queue.slots == ()
