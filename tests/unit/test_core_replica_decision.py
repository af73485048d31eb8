"""Table-driven tests of the replica decision: triggers, conditions, reasons, events."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from pgro.api.conditions import Condition
from pgro.api.migration import MigrateTo
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import SecretCheck, SnapshotListing, record_listing_failure
from pgro.core.plan import (
    CreateRestore,
    DeleteRestore,
    EmitEvent,
    EnsureReplicaResources,
    ListSnapshots,
    MarkOutgoing,
    PatchReplicaStatus,
    PatchRestoreStatus,
    PointServiceAt,
    ProvisionUsers,
    ReportVerification,
    RunSwitchoverStep,
    Step,
    SwitchoverStep,
)
from pgro.core.queue import AdmissionQueue, Slot
from pgro.core.replica_decision import ReplicaPlan
from pgro.core.restore_set import is_covered
from pgro.core.schedule import ScheduleDecision
from pgro.core.triggers import evaluate_triggers
from tests.scenarios.builders import (
    GIB,
    NOW,
    decide,
    listing,
    replica,
    restore,
    settled_status,
    snap,
    stamp,
)

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "t"}


def _patch(plan: ReplicaPlan) -> dict[str, Any]:
    patches = plan.status_patches
    assert len(patches) <= 1
    return dict(patches[0].patch) if patches else {}


def _condition(plan: ReplicaPlan, type: str) -> Condition | None:
    conditions = _patch(plan).get("conditions")
    if conditions is None:
        return None
    found = [Condition.model_validate(c) for c in conditions if c["type"] == type]
    return found[0] if found else None


def _kinds(plan: ReplicaPlan) -> list[str]:
    return [type(s).__name__ for s in plan.steps]


def _events(plan: ReplicaPlan) -> list[str]:
    return [s.reason for s in plan.steps if isinstance(s, EmitEvent)]


# Triggers ---------------------------------------------------------------------------


def _triggers(**overrides: Any) -> tuple[bool, bool, bool, ScheduleDecision]:
    args: dict[str, Any] = {
        "now": NOW,
        "serving_snapshot": None,
        "has_serving": False,
        "current_restore": None,
        "last_restore_completed_at": None,
        "verified_snapshot_id": None,
        "canopy": False,
        "canopy_desired_snapshot_id": None,
        "minimum_ttl": None,
        "next_scheduled_restore": NOW + timedelta(hours=1),
        "schedule_valid": True,
        "backoff_pending": False,
    }
    args.update(overrides)
    t = evaluate_triggers(**args)
    return (t.never_restored, t.active_restore_deleted, t.canopy_desired_changed, t.schedule)


NOT_DUE = ScheduleDecision.NOT_DUE
LAST = NOW - timedelta(hours=2)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, (True, False, False, NOT_DUE)),
        ({"backoff_pending": True}, (False, False, False, NOT_DUE)),
        ({"has_serving": True, "serving_snapshot": "k1"}, (False, False, False, NOT_DUE)),
        ({"last_restore_completed_at": LAST}, (False, False, False, NOT_DUE)),
        (
            {"last_restore_completed_at": LAST, "current_restore": "gone"},
            (False, True, False, NOT_DUE),
        ),
        (
            {"last_restore_completed_at": LAST, "current_restore": "gone", "backoff_pending": True},
            (False, False, False, NOT_DUE),
        ),
        # Canopy: the serving snapshot, else the verified one, is the effective current.
        (
            {
                "canopy": True,
                "has_serving": True,
                "serving_snapshot": "k1",
                "canopy_desired_snapshot_id": "k2",
            },
            (False, False, True, NOT_DUE),
        ),
        (
            {
                "canopy": True,
                "has_serving": True,
                "serving_snapshot": "k2",
                "canopy_desired_snapshot_id": "k2",
            },
            (False, False, False, NOT_DUE),
        ),
        (
            {
                "canopy": True,
                "last_restore_completed_at": LAST,
                "verified_snapshot_id": "k2",
                "canopy_desired_snapshot_id": "k2",
            },
            (False, False, False, NOT_DUE),
        ),
        (
            {
                "canopy": True,
                "last_restore_completed_at": LAST,
                "verified_snapshot_id": "k1",
                "canopy_desired_snapshot_id": "k2",
            },
            (False, False, True, NOT_DUE),
        ),
        (
            {
                "canopy": True,
                "last_restore_completed_at": LAST,
                "verified_snapshot_id": "k1",
                "canopy_desired_snapshot_id": "k2",
                "minimum_ttl": timedelta(hours=3),
            },
            (False, False, False, NOT_DUE),
        ),
        (
            {
                "canopy": True,
                "last_restore_completed_at": LAST,
                "verified_snapshot_id": "k1",
                "canopy_desired_snapshot_id": "k2",
                "backoff_pending": True,
            },
            (False, False, False, NOT_DUE),
        ),
        (
            {"canopy": True, "last_restore_completed_at": LAST},
            (False, False, False, NOT_DUE),
        ),
        (
            {
                "canopy": False,
                "last_restore_completed_at": LAST,
                "canopy_desired_snapshot_id": "k2",
            },
            (False, False, False, NOT_DUE),
        ),
        (
            {"last_restore_completed_at": LAST, "next_scheduled_restore": NOW},
            (False, False, False, ScheduleDecision.TRIGGER),
        ),
        (
            {
                "last_restore_completed_at": LAST,
                "next_scheduled_restore": NOW,
                "minimum_ttl": timedelta(hours=3),
            },
            (False, False, False, ScheduleDecision.SKIPPED_BY_TTL),
        ),
        (
            {
                "last_restore_completed_at": LAST,
                "next_scheduled_restore": None,
                "schedule_valid": False,
            },
            (False, False, False, NOT_DUE),
        ),
    ],
)
def test_triggers(
    overrides: dict[str, Any], expected: tuple[bool, bool, bool, ScheduleDecision]
) -> None:
    assert _triggers(**overrides) == expected


@pytest.mark.parametrize(
    ("restores", "verified", "covered"),
    [
        ([], "k1", True),
        ([], "k0", False),
        ([restore("r", "k1", "Pending")], None, True),
        ([restore("r", "k1", "Restoring")], None, True),
        ([restore("r", "k1", "Migrating")], None, True),
        ([restore("r", "k1", "Ready")], None, True),
        ([restore("r", "k1", "Switching")], None, True),
        ([restore("r", "k1", "Active")], None, True),
        ([restore("r", "k1", "Failed")], None, False),
        ([restore("r", "k1")], None, True),
        ([restore("r", "k2", "Active")], None, False),
    ],
)
def test_covered(
    restores: list[PostgresPhysicalRestore], verified: str | None, covered: bool
) -> None:
    assert is_covered("k1", restores, verified) is covered


# Credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "secret", "status", "reason", "fragment"),
    [
        ({}, SecretCheck.valid(), "True", "SecretValid", "All required keys present"),
        (
            {},
            SecretCheck.not_found("404"),
            "False",
            "SecretNotFound",
            "Secret kopia not found: 404",
        ),
        (
            {},
            SecretCheck.invalid("missing key: bucket"),
            "False",
            "SecretInvalid",
            "Kopia secret kopia invalid: missing key: bucket",
        ),
        ({"canopySource": CANOPY}, None, "False", "SecretRefAndCanopySource", "mutually exclusive"),
        ({"kopiaSecretRef": None}, None, "False", "NoCredentialSource", "must be set"),
        ({"kopiaSecretRef": None, "canopySource": CANOPY}, None, "True", "CanopySourced", "canopy"),
        (
            {"kopiaSecretRef": None, "canopySource": CANOPY},
            SecretCheck.invalid("canopy refused credentials (403): no declaration covers it"),
            "False",
            "CanopyCredentialsRefused",
            "no declaration covers it",
        ),
    ],
)
def test_kopia_secret_valid(
    spec: dict[str, Any], secret: SecretCheck | None, status: str, reason: str, fragment: str
) -> None:
    plan = decide(replica(**spec), secret=secret)
    condition = _condition(plan, "KopiaSecretValid")
    assert condition is not None
    assert (condition.status, condition.reason) == (status, reason)
    assert fragment in condition.message
    if status == "False":
        assert not any(isinstance(s, ListSnapshots | EnsureReplicaResources) for s in plan.steps)
        assert plan.requeue_after == timedelta(seconds=60)


def test_unchecked_secret_waits_without_acting() -> None:
    plan = decide_without_secret()
    condition = _condition(plan, "KopiaSecretValid")
    assert condition is not None and (condition.status, condition.reason) == (
        "Unknown",
        "SecretNotChecked",
    )
    assert not any(isinstance(s, ListSnapshots) for s in plan.steps)


def decide_without_secret() -> ReplicaPlan:
    from pgro.core.observations import ReplicaObservation
    from pgro.core.replica_decision import decide_replica

    return decide_replica(
        ReplicaObservation(replica=replica(), restores=[], secret=None),
        AdmissionQueue(),
        NOW,
        lambda: 0.5,
    )


# A new replica ----------------------------------------------------------------------


def test_first_pass_writes_identity_schedule_and_asks_for_a_listing() -> None:
    plan = decide(replica())
    patch = _patch(plan)
    assert patch["serviceName"] == "fiji"
    assert patch["connectionInfo"] == {
        "host": "fiji.analytics.svc.cluster.local",
        "port": 5432,
        "database": "postgres",
        "username": "analytics",
        "passwordSecret": "fiji-creds",
    }
    assert patch["nextScheduledRestore"] == "2026-03-01T18:00:00Z"
    assert len(patch["scheduleInputHash"]) == 16
    assert patch["phase"] == "Pending"
    assert _kinds(plan) == ["EnsureReplicaResources", "ListSnapshots", "PatchReplicaStatus"]
    schedule = _condition(plan, "ScheduleValid")
    assert schedule is not None and schedule.status == "True"
    assert plan.triggers is not None and plan.triggers.names == ("never-restored",)


def test_fresh_listing_creates_the_restore() -> None:
    status = settled_status()
    plan = decide(
        replica(status, storageSizeOverride="50Gi", migrateTo={"version": "2.1", "versionId": "x"}),
        the_listing=listing(
            snap("k1", NOW - timedelta(hours=2)),
            snap("k2", NOW - timedelta(hours=1), size=120 * GIB),
        ),
    )
    [create] = [s for s in plan.steps if isinstance(s, CreateRestore)]
    made = create.restore
    assert made.name == "fiji-20260301-120000"
    assert made.metadata.labels == {"pgro.bes.au/replica": "fiji"}
    assert made.metadata.owner_references is not None
    assert made.metadata.owner_references[0]["kind"] == "PostgresPhysicalReplica"
    assert made.spec.snapshot == "k2"
    assert made.spec.snapshot_size == 120 * GIB
    assert made.spec.storage_size == "132Gi"
    assert made.spec.snapshot_time == stamp(NOW - timedelta(hours=1))
    assert made.spec.migrate_to is not None and made.spec.migrate_to.version == "2.1"
    assert _events(plan) == ["RestoreStarted"]
    patch = _patch(plan)
    assert patch["latestAvailableSnapshot"] == "k2"
    assert patch["phase"] == "Restoring"
    available = _condition(plan, "SnapshotAvailable")
    assert available is not None and available.reason == "SnapshotFound"
    assert available.message == f"Snapshot k2 available ({120 * GIB} bytes)"
    blocked = _condition(plan, "RestoreCreationBlocked")
    assert blocked is not None and (blocked.status, blocked.reason) == ("False", "Healthy")
    # The restore is created before the status says so.
    kinds = _kinds(plan)
    assert kinds.index("CreateRestore") < kinds.index("PatchReplicaStatus")
    assert plan.queue.slot("analytics/fiji") == Slot("analytics/fiji", NOW, made.name)


def test_stale_listing_is_refreshed_first() -> None:
    plan = decide(
        replica(settled_status()),
        the_listing=listing(snap("k1", NOW), at=NOW - timedelta(minutes=6)),
    )
    assert any(isinstance(s, ListSnapshots) for s in plan.steps)
    assert not any(isinstance(s, CreateRestore) for s in plan.steps)


def test_covered_snapshot_is_not_restored_and_the_slot_is_not_taken() -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(LAST),
                verifiedSnapshotId="k1",
                nextScheduledRestore=stamp(NOW),
            )
        ),
        the_listing=listing(snap("k1", NOW - timedelta(hours=1))),
    )
    assert not any(isinstance(s, CreateRestore) for s in plan.steps)
    assert plan.queue == AdmissionQueue()
    # The schedule was used, so it advances.
    assert _patch(plan)["nextScheduledRestore"] == "2026-03-01T18:00:00Z"


@pytest.mark.parametrize(
    ("spec", "status", "the_listing", "reason"),
    [
        ({}, {}, listing(snap("k1", NOW, host="dev")), "NoMatchingSnapshots"),
        (
            {"kopiaSecretRef": None, "canopySource": CANOPY},
            {"canopyDesiredSnapshotId": "k9"},
            listing(snap("k1", NOW)),
            "CanopyDesiredSnapshotMissing",
        ),
        (
            {},
            {},
            record_listing_failure(None, "connection refused", NOW),
            "ListingFailed",
        ),
    ],
)
def test_snapshot_available_false(
    spec: dict[str, Any], status: dict[str, Any], the_listing: SnapshotListing, reason: str
) -> None:
    plan = decide(
        replica(settled_status(**status), snapshotFilter={"hostPattern": "prod*"}, **spec),
        the_listing=the_listing,
    )
    condition = _condition(plan, "SnapshotAvailable")
    assert condition is not None and (condition.status, condition.reason) == ("False", reason)
    assert not any(isinstance(s, CreateRestore) for s in plan.steps)
    assert plan.requeue_after is not None and plan.requeue_after <= timedelta(minutes=5)


def test_a_failed_listing_is_retried_after_its_backoff() -> None:
    failed = record_listing_failure(
        record_listing_failure(None, "timeout", NOW - timedelta(seconds=61)),
        "timeout",
        NOW - timedelta(seconds=59),
    )
    early = decide(replica(settled_status()), the_listing=failed)
    assert not any(isinstance(s, ListSnapshots) for s in early.steps)
    assert early.requeue_after == timedelta(seconds=1)
    late = decide(replica(settled_status()), the_listing=failed, now=NOW + timedelta(seconds=1))
    assert any(isinstance(s, ListSnapshots) for s in late.steps)


def test_guardrail_refuses_a_fourth_live_restore() -> None:
    restores = [
        restore("fiji-a", "k1", "Active", activatedAt=stamp(NOW)),
        restore("fiji-b", "k2", "Active", activatedAt=stamp(NOW)),
        restore("fiji-c", "k3", "Active", activatedAt=stamp(NOW)),
        restore("fiji-d", "k4", "Failed", createdAt=stamp(NOW)),
    ]
    plan = decide(
        replica(
            settled_status(
                currentRestore="fiji-c",
                lastRestoreCompletedAt=stamp(NOW),
                nextScheduledRestore=stamp(NOW),
            )
        ),
        restores,
        the_listing=listing(snap("k5", NOW)),
    )
    blocked = _condition(plan, "RestoreCreationBlocked")
    assert blocked is not None and (blocked.status, blocked.reason) == ("True", "TooManyRestores")
    assert "3 live restores" in blocked.message and "[fiji-a, fiji-b, fiji-c]" in blocked.message
    assert _events(plan) == ["RestoreCreationBlocked"]
    assert not any(isinstance(s, CreateRestore) for s in plan.steps)


def test_storage_limit_blocks_with_a_condition() -> None:
    plan = decide(
        replica(settled_status(), storageSizeMaximum="100Gi"),
        the_listing=listing(snap("k1", NOW, size=500 * GIB)),
    )
    blocked = _condition(plan, "RestoreCreationBlocked")
    assert blocked is not None and blocked.reason == "StorageLimitExceeded"
    assert _events(plan) == ["RestoreCreationBlocked"]


def test_full_queue_waits_with_a_position_and_keeps_the_schedule_due() -> None:
    full = AdmissionQueue(limit=1, slots=(Slot("other/one", NOW, "one-1"),))
    plan = decide(
        replica(
            settled_status(lastRestoreCompletedAt=stamp(LAST), nextScheduledRestore=stamp(NOW))
        ),
        [restore("fiji-old", "k0", "Active")],
        the_listing=listing(snap("k1", NOW)),
        queue=full,
    )
    patch = _patch(plan)
    assert patch["queuePosition"] == 1
    assert "nextScheduledRestore" not in patch
    assert not any(isinstance(s, CreateRestore) for s in plan.steps)
    assert plan.requeue_after == timedelta(seconds=30)


# Switchover, teardown, sweep, cleanup -----------------------------------------------


def test_switchover_order_and_status() -> None:
    restores = [
        restore("fiji-old", "k1", "Active", activatedAt=stamp(LAST)),
        restore("fiji-new", "k2", "Switching"),
    ]
    status = settled_status(
        currentRestore="fiji-old",
        lastRestoreCompletedAt=stamp(LAST),
        consecutiveRestoreFailures=2,
        conditions=[
            {
                "type": "RestoreSchedulingSuspended",
                "status": "True",
                "reason": "ConsecutiveFailures",
                "message": "",
                "lastTransitionTime": stamp(LAST),
            },
        ],
    )
    plan = decide(
        replica(
            status,
            kopiaSecretRef=None,
            canopySource=CANOPY,
            notifications=[{"target": "webhook", "url": "https://example.test/hook"}],
        ),
        restores,
    )
    assert _kinds(plan) == [
        "EnsureReplicaResources",
        "PointServiceAt",
        "PatchRestoreStatus",
        "PatchReplicaStatus",
        "MarkOutgoing",
        "EmitEvent",
        "SendNotifications",
        "ReportVerification",
    ]
    point = plan.steps[1]
    assert isinstance(point, PointServiceAt) and point.restore == "fiji-new"
    restore_patch = plan.steps[2]
    assert isinstance(restore_patch, PatchRestoreStatus)
    assert dict(restore_patch.patch) == {"phase": "Active", "activatedAt": stamp(NOW)}
    patch = _patch(plan)
    assert patch["phase"] == "Ready"
    assert patch["currentRestore"] == "fiji-new"
    assert patch["previousRestore"] == "fiji-old"
    assert patch["lastRestoreCompletedAt"] == stamp(NOW)
    assert patch["consecutiveRestoreFailures"] == 0
    suspended = _condition(plan, "RestoreSchedulingSuspended")
    assert suspended is not None and (suspended.status, suspended.reason) == (
        "False",
        "RestoreSucceeded",
    )
    outgoing = plan.steps[4]
    assert isinstance(outgoing, MarkOutgoing) and outgoing.restore == "fiji-old"
    assert _events(plan) == ["RestoreCompleted"]
    assert isinstance(plan.steps[-1], ReportVerification)


MIGRATED = {"totalElapsedSeconds": 3, "dataBytesBefore": 1, "dataBytesAfter": 2}


def _with_builder(switching: PostgresPhysicalRestore) -> PostgresPhysicalRestore:
    spec = switching.spec.model_copy(
        update={
            "builder_image": "builder:1",
            "migrate_to": MigrateTo(version="2.1", version_id="v"),
        }
    )
    return switching.model_copy(update={"spec": spec})


@pytest.mark.parametrize(
    ("spec", "status", "restore_status", "kind"),
    [
        ({"redaction": {"manifestUrl": "https://m.test/m.json"}}, {}, {}, SwitchoverStep.REDACTION),
        (
            {"redaction": {"manifestUrl": "https://m.test/m.json"}},
            {"redactionPhase": "failed: manifest 404"},
            {},
            SwitchoverStep.REDACTION,
        ),
        ({"persistentSchemas": ["reports"]}, {}, {}, SwitchoverStep.SCHEMA_MIGRATION),
        (
            {"persistentSchemas": ["reports"]},
            {"schemaMigrationPhase": "active"},
            {},
            SwitchoverStep.SCHEMA_MIGRATION,
        ),
        (
            {"builderImage": "builder:1"},
            {},
            {"migrationResult": MIGRATED},
            SwitchoverStep.SCHEMA_BUILD,
        ),
    ],
)
def test_pre_switchover_steps_hold_the_switchover(
    spec: dict[str, Any],
    status: dict[str, Any],
    restore_status: dict[str, Any],
    kind: SwitchoverStep,
) -> None:
    switching = restore("fiji-new", "k2", "Switching", **restore_status)
    if "builderImage" in spec:
        switching = _with_builder(switching)
    plan = decide(
        replica(settled_status(currentRestore="fiji-old", **status), **spec),
        [restore("fiji-old", "k1", "Active"), switching],
    )
    steps = [s for s in plan.steps if isinstance(s, RunSwitchoverStep)]
    assert [s.kind for s in steps] == [kind]
    assert not any(isinstance(s, PointServiceAt) for s in plan.steps)


@pytest.mark.parametrize(
    ("spec", "status"),
    [
        (
            {"redaction": {"manifestUrl": "https://m.test/m.json"}},
            {"redactionPhase": "partial", "redactionRestore": "fiji-new"},
        ),
        (
            {"redaction": {"manifestUrl": "https://m.test/m.json"}},
            {"redactionPhase": "complete", "redactionRestore": "fiji-new"},
        ),
        ({"persistentSchemas": ["reports"]}, {"schemaMigrationPhase": "timeout-skipped"}),
        ({"persistentSchemas": []}, {}),
    ],
)
def test_settled_pre_switchover_steps_let_it_through(
    spec: dict[str, Any], status: dict[str, Any]
) -> None:
    plan = decide(
        replica(settled_status(currentRestore="fiji-old", **status), **spec),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Switching")],
    )
    assert any(isinstance(s, PointServiceAt) for s in plan.steps)


@pytest.mark.parametrize(
    "status",
    [
        {"redactionPhase": "complete"},  # written by the reference: for no restore in particular
        {"redactionPhase": "complete", "redactionRestore": "fiji-old"},  # the previous restore's
        {"redactionPhase": "active", "redactionRestore": "fiji-new"},
        {"redactionPhase": "failed: manifest 404", "redactionRestore": "fiji-new"},
    ],
)
def test_only_a_redaction_done_for_the_switching_restore_lets_it_through(
    status: dict[str, Any],
) -> None:
    """An unredacted restore never serves: a `complete` left by an earlier restore (before
    the cleanup cleared it) must not move the endpoint to a new, unredacted one."""
    plan = decide(
        replica(
            settled_status(currentRestore="fiji-old", **status),
            redaction={"manifestUrl": "https://m.test/m.json"},
        ),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Switching")],
    )
    assert not any(isinstance(s, PointServiceAt) for s in plan.steps)
    [step] = [s for s in plan.steps if isinstance(s, RunSwitchoverStep)]
    assert (step.kind, step.restore) == (SwitchoverStep.REDACTION, "fiji-new")


@pytest.mark.parametrize("phase", ["complete", "partial"])
def test_the_switchover_report_of_a_redacted_restore_names_the_redaction(phase: str) -> None:
    plan = decide(
        replica(
            settled_status(
                currentRestore="fiji-old",
                redactionPhase=phase,
                redactionRestore="fiji-new",
                redactionVersion="1.0.3",
                redactionColumnsApplied=6,
            ),
            redaction={"manifestUrl": "https://m.test/m.json"},
            canopySource=CANOPY,
            kopiaSecretRef=None,
        ),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Switching")],
    )
    [report] = _patch(plan)["pendingVerificationReports"]
    assert report["restore"] == "fiji-new"
    assert report["redaction"] == {
        "outcome": phase,
        "manifestVersion": "1.0.3",
        "columnsMasked": 6,
    }


@pytest.mark.parametrize("migrated", [False, True])
def test_a_builder_image_without_a_migration_result_builds_nothing(migrated: bool) -> None:
    """Features §2.13: the build runs on the migrated schema. Before, `builderImage` alone held
    the switchover forever (the reference builds nothing without `migrateTo`)."""
    switching = restore("fiji-new", "k2", "Switching")
    spec = switching.spec.model_copy(update={"builder_image": "builder:1"})
    if migrated:  # migrateTo set, its result not recorded yet: still nothing to build
        spec = spec.model_copy(update={"migrate_to": MigrateTo(version="2.1", version_id="v")})
    switching = switching.model_copy(update={"spec": spec})
    plan = decide(
        replica(settled_status(currentRestore="fiji-old")),
        [restore("fiji-old", "k1", "Active"), switching],
    )
    assert not [s for s in plan.steps if isinstance(s, RunSwitchoverStep)]
    assert any(isinstance(s, PointServiceAt) for s in plan.steps)


@pytest.mark.parametrize(
    ("spec", "status", "provisions"),
    [
        ({}, {}, False),
        ({"persistentUsers": [{"name": "reader", "readSchemas": ["public"]}]}, {}, True),
        ({"persistentSchemas": ["reports"]}, {"schemaMigrationPhase": "complete"}, True),
        ({"persistentSchemas": ["reports"]}, {"schemaMigrationPhase": "partial"}, True),
        ({"persistentSchemas": ["reports"]}, {"schemaMigrationPhase": "timeout-skipped"}, False),
    ],
)
def test_users_are_provisioned_again_right_before_the_service_moves(
    spec: dict[str, Any], status: dict[str, Any], provisions: bool
) -> None:
    """Persistent users on every switchover, and grants on what the schema migration carried
    (its dump has no privileges), before `PointServiceAt` so a failure holds the switchover."""
    plan = decide(
        replica(settled_status(currentRestore="fiji-old", **status), **spec),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Switching")],
    )
    kinds = _kinds(plan)
    assert ("ProvisionUsers" in kinds) is provisions
    if provisions:
        assert kinds.index("ProvisionUsers") == kinds.index("PointServiceAt") - 1
        step = plan.steps[kinds.index("ProvisionUsers")]
        assert isinstance(step, ProvisionUsers) and step.restore == "fiji-new"


def test_first_restore_needs_no_schema_migration() -> None:
    plan = decide(
        replica(settled_status(), persistentSchemas=["reports"]),
        [restore("fiji-new", "k2", "Switching")],
    )
    assert any(isinstance(s, PointServiceAt) for s in plan.steps)
    assert "schemaMigrationPhase" not in _patch(plan)


def test_ephemeral_teardown_marks_then_deletes() -> None:
    plan = decide(
        replica(
            settled_status(
                currentRestore="fiji-a", previousRestore="fiji-z", lastRestoreCompletedAt=stamp(NOW)
            ),
            ephemeral=True,
        ),
        [restore("fiji-a", "k7", "Active", activatedAt=stamp(NOW))],
    )
    kinds = _kinds(plan)
    assert kinds[:3] == ["EnsureReplicaResources", "PatchReplicaStatus", "DeleteRestore"]
    assert _patch(plan) == {
        "verifiedSnapshotId": "k7",
        "currentRestore": None,
        "previousRestore": None,
    }
    assert _events(plan) == ["RestoreVerified"]


def test_ephemeral_restore_being_deleted_is_left_alone() -> None:
    plan = decide(
        replica(
            settled_status(
                verifiedSnapshotId="k7", lastRestoreCompletedAt=stamp(NOW), phase="Ready"
            ),
            ephemeral=True,
        ),
        [restore("fiji-a", "k7", "Active", deleting=True)],
    )
    assert not any(isinstance(s, DeleteRestore) for s in plan.steps)
    assert plan.status_patches == ()


def test_non_ephemeral_replica_keeps_its_active_restore() -> None:
    plan = decide(
        replica(settled_status(currentRestore="fiji-a", lastRestoreCompletedAt=stamp(LAST))),
        [restore("fiji-a", "k7", "Active")],
    )
    assert not any(isinstance(s, DeleteRestore) for s in plan.steps)


@pytest.mark.parametrize(
    ("since_switch", "deleted"),
    [(timedelta(minutes=5), []), (timedelta(minutes=5, seconds=1), ["fiji-old", "fiji-older"])],
)
def test_sweep_after_the_grace_period(since_switch: timedelta, deleted: list[str]) -> None:
    restores = [
        restore("fiji-older", "k0", "Active"),
        restore("fiji-old", "k1", "Active"),
        restore("fiji-new", "k2", "Active"),
        restore("fiji-going", "k3", "Active", deleting=True),
    ]
    status = settled_status(
        currentRestore="fiji-new",
        previousRestore="fiji-old",
        lastRestoreCompletedAt=stamp(NOW - since_switch),
        schemaMigrationPhase="complete",
        phase="Ready",
    )
    plan = decide(replica(status, persistentSchemas=["reports"]), restores)
    assert sorted(s.restore for s in plan.steps if isinstance(s, DeleteRestore)) == deleted
    patch = _patch(plan)
    if deleted:
        assert patch["previousRestore"] is None and patch["schemaMigrationPhase"] is None
        kinds = _kinds(plan)
        assert kinds.index("DeleteRestore") < kinds.index("PatchReplicaStatus")
    else:
        assert patch == {}
        assert plan.requeue_after == timedelta(seconds=1)


@pytest.mark.parametrize(
    ("redacted", "kept"),
    [
        ("fiji-new", True),  # describes the serving restore: a `partial` stays visible
        ("fiji-old", False),  # left from the previous cycle
    ],
)
def test_the_sweep_keeps_the_serving_restores_redaction(redacted: str, kept: bool) -> None:
    status = settled_status(
        currentRestore="fiji-new",
        previousRestore="fiji-old",
        lastRestoreCompletedAt=stamp(NOW - timedelta(hours=1)),
        redactionPhase="partial",
        redactionRestore=redacted,
        redactionVersion="1.0.0",
        redactionColumnsApplied=5,
        phase="Ready",
    )
    plan = decide(
        replica(status, redaction={"manifestUrl": "https://m.test/m.json"}),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Active")],
    )
    assert [s.restore for s in plan.steps if isinstance(s, DeleteRestore)] == ["fiji-old"]
    patch = _patch(plan)
    if kept:
        assert "redactionPhase" not in patch and "redactionRestore" not in patch
    else:
        assert patch["redactionPhase"] is None and patch["redactionRestore"] is None


@pytest.mark.parametrize(("held_by", "sweeps"), [("fiji-next", False), ("fiji-gone", True)])
def test_a_running_redaction_holds_the_sweep_only_while_its_restore_exists(
    held_by: str, sweeps: bool
) -> None:
    status = settled_status(
        currentRestore="fiji-new",
        previousRestore="fiji-old",
        lastRestoreCompletedAt=stamp(NOW - timedelta(hours=1)),
        redactionPhase="active",
        redactionRestore=held_by,
        phase="Ready",
    )
    plan = decide(
        replica(status, redaction={"manifestUrl": "https://m.test/m.json"}),
        [
            restore("fiji-old", "k1", "Active"),
            restore("fiji-new", "k2", "Active"),
            restore("fiji-next", "k3", "Ready"),
        ],
    )
    deleted = [s.restore for s in plan.steps if isinstance(s, DeleteRestore)]
    assert deleted == (["fiji-old"] if sweeps else [])


def test_sweep_waits_for_a_running_migration() -> None:
    status = settled_status(
        currentRestore="fiji-new",
        lastRestoreCompletedAt=stamp(LAST),
        schemaMigrationPhase="active",
    )
    plan = decide(
        replica(status, persistentSchemas=["reports"]),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Active")],
    )
    assert not any(isinstance(s, DeleteRestore) for s in plan.steps)


def test_sweep_never_touches_the_current_restore_when_it_is_not_active() -> None:
    status = settled_status(currentRestore="fiji-missing", lastRestoreCompletedAt=stamp(LAST))
    plan = decide(replica(status), [restore("fiji-old", "k1", "Active")])
    assert not any(isinstance(s, DeleteRestore) for s in plan.steps)


@pytest.mark.parametrize(
    ("age", "deleted"),
    [(timedelta(seconds=300), False), (timedelta(seconds=301), True)],
)
def test_failed_restores_are_deleted_300_s_after_creation(age: timedelta, deleted: bool) -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(LAST), currentRestore="fiji-a", phase="Ready"
            )
        ),
        [
            restore("fiji-a", "k1", "Active"),
            restore("fiji-f", "k2", "Failed", createdAt=stamp(NOW - age)),
        ],
    )
    deletes = [s for s in plan.steps if isinstance(s, DeleteRestore)]
    assert deletes == ([DeleteRestore("fiji-f", pods_first=True)] if deleted else [])
    if not deleted:
        assert plan.requeue_after == timedelta(seconds=1)


def test_legacy_suspension_condition_is_cleared() -> None:
    conditions = settled_status()["conditions"] + [
        {
            "type": "RestoreSchedulingSuspended",
            "status": "True",
            "reason": "ConsecutiveFailures",
            "message": "suspended",
            "lastTransitionTime": stamp(LAST),
        },
    ]
    plan = decide(
        replica(
            settled_status(
                conditions=conditions,
                lastRestoreCompletedAt=stamp(LAST),
                currentRestore="fiji-a",
                phase="Ready",
            )
        ),
        [restore("fiji-a", "k1", "Active")],
    )
    condition = _condition(plan, "RestoreSchedulingSuspended")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "SuspensionRemoved")


# Schedule, phases, steady state ---------------------------------------------------


def test_steady_state_produces_no_status_patch() -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(LAST), currentRestore="fiji-a", phase="Ready"
            )
        ),
        [restore("fiji-a", "k1", "Active")],
    )
    assert plan.status_patches == ()
    assert _kinds(plan) == ["EnsureReplicaResources"]
    assert plan.requeue_after == timedelta(minutes=5)


def test_in_progress_restore_sets_restoring() -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(LAST), currentRestore="fiji-a", phase="Ready"
            )
        ),
        [restore("fiji-a", "k1", "Active"), restore("fiji-b", "k2", "Restoring")],
    )
    assert _patch(plan) == {"phase": "Restoring"}
    assert plan.requeue_after == timedelta(seconds=30)


def test_changed_schedule_recomputes_the_next_time() -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(LAST), currentRestore="fiji-a", phase="Ready"
            ),
            schedule="30 13 * * *",
        ),
        [restore("fiji-a", "k1", "Active")],
    )
    patch = _patch(plan)
    assert patch["nextScheduledRestore"] == "2026-03-01T13:30:00Z"
    assert patch["scheduleInputHash"] != settled_status()["scheduleInputHash"]


def test_jitter_is_drawn_from_the_injected_source() -> None:
    base = replica(settled_status(nextScheduledRestore=None), scheduleJitter="10m")
    early = _patch(decide(base, draw=0.0))["nextScheduledRestore"]
    late = _patch(decide(base, draw=0.999))["nextScheduledRestore"]
    assert (early, late) == ("2026-03-01T17:55:00Z", "2026-03-01T18:04:59Z")


def test_invalid_schedule_condition_and_no_scheduled_time() -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(LAST), currentRestore="fiji-a", phase="Ready"
            ),
            schedule="0 */6 * *",
        ),
        [restore("fiji-a", "k1", "Active")],
    )
    condition = _condition(plan, "ScheduleValid")
    assert condition is not None and (condition.status, condition.reason) == (
        "False",
        "InvalidSchedule",
    )
    assert "'0 */6 * *'" in condition.message and "4 fields" in condition.message
    assert _patch(plan)["nextScheduledRestore"] is None
    assert not any(isinstance(s, ListSnapshots) for s in plan.steps)


def test_minimum_ttl_skip_advances_the_schedule() -> None:
    plan = decide(
        replica(
            settled_status(
                lastRestoreCompletedAt=stamp(NOW - timedelta(hours=1)),
                currentRestore="fiji-a",
                phase="Ready",
                nextScheduledRestore=stamp(NOW),
            ),
            minimumTtl="1d",
        ),
        [restore("fiji-a", "k1", "Active")],
    )
    assert _patch(plan) == {"nextScheduledRestore": "2026-03-01T18:00:00Z"}
    assert not any(isinstance(s, ListSnapshots) for s in plan.steps)


def test_backoff_keeps_a_never_restored_replica_waiting() -> None:
    plan = decide(
        replica(
            settled_status(
                consecutiveRestoreFailures=2,
                nextScheduledRestore=stamp(NOW + timedelta(seconds=100)),
            )
        ),
    )
    assert not any(isinstance(s, ListSnapshots) for s in plan.steps)
    assert plan.requeue_after == timedelta(seconds=100)


def test_deleting_replica_gives_back_its_slot() -> None:
    doc = replica().model_dump(mode="json", by_alias=True)
    doc["metadata"]["deletionTimestamp"] = stamp(NOW)
    from pgro.api.replica import PostgresPhysicalReplica

    queue = AdmissionQueue(limit=1, slots=(Slot("analytics/fiji", NOW, "fiji-1"),))
    queue, _ = queue.request("other/x", NOW)
    plan = decide(PostgresPhysicalReplica.model_validate(doc), queue=queue)
    assert plan.steps == ()
    assert [s.key for s in plan.queue.slots] == ["other/x"]
    assert plan.wake == ("other/x",)


def test_endpoint_override_for_embedded_runtime() -> None:
    from pgro.core.observations import Endpoint, ReplicaObservation
    from pgro.core.replica_decision import decide_replica

    plan = decide_replica(
        ReplicaObservation(
            replica(), [], SecretCheck.valid(), endpoint=Endpoint("127.0.0.1", 55432)
        ),
        AdmissionQueue(),
        NOW,
        lambda: 0.5,
    )
    info = _patch(plan)["connectionInfo"]
    assert (info["host"], info["port"]) == ("127.0.0.1", 55432)


def test_status_patch_uses_wire_names_and_step_types() -> None:
    plan = decide(replica())
    steps: list[Step] = list(plan.steps)
    assert isinstance(steps[-1], PatchReplicaStatus)
    assert all(key[0].islower() and "_" not in key for key in steps[-1].patch)
