"""The reference's lifecycle.rs and error_paths.rs, in simulated time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from pgro.api.conditions import get_condition
from pgro.api.phases import JobPhase, ReplicaPhase, RestorePhase
from pgro.core.observations import SecretCheck
from tests.scenarios.world import T0, World, replica_doc, snapshot


def test_full_restore_lifecycle() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("lifecycle"))

    world.run_for(timedelta(minutes=10))

    replica = world.replica(key)
    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.ACTIVE
    assert replica.status.phase is ReplicaPhase.READY
    assert replica.status.current_restore == restore.name
    assert restore.name.startswith("lifecycle-20260301-")
    assert replica.status.service_name == "lifecycle"
    assert replica.status.last_restore_completed_at is not None
    info = replica.status.connection_info
    assert info is not None
    assert (info.host, info.port, info.database, info.username, info.password_secret) == (
        "lifecycle.default.svc.cluster.local",
        5432,
        "postgres",
        "analytics",
        "lifecycle-creds",
    )
    assert restore.status.postgres_version == "16"
    assert restore.status.restored_at is not None
    assert restore.status.activated_at is not None
    assert restore.status.pvc == f"{restore.name}-data"
    assert restore.status.deployment == restore.name
    assert restore.status.restore_job is not None
    assert restore.status.restore_job.phase is JobPhase.SUCCEEDED
    assert restore.spec.storage_size == str(int(1024**3 * 1.1) + 1)
    assert world.service[key] == restore.name
    assert world.event_reasons(key) == ["RestoreStarted", "RestoreCompleted"]
    assert world.violations == []


def test_steady_state_writes_nothing() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("quiet", schedule="0 0 1 1 *"))
    world.run_for(timedelta(minutes=10))
    patches = len(world.replica_patches)
    restore_patches = world.restore_patches

    world.run_for(timedelta(days=2))

    assert len(world.replica_patches) == patches
    assert world.restore_patches == restore_patches
    assert world.replica(key).status.phase is ReplicaPhase.READY


def test_replica_is_restoring_while_its_restore_runs() -> None:
    world = World(work_duration=timedelta(minutes=30))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("slow"))
    world.run_for(timedelta(minutes=5))
    assert world.replica(key).status.phase is ReplicaPhase.RESTORING
    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.RESTORING
    assert restore.status.restore_job is not None
    assert restore.status.restore_job.phase is JobPhase.RUNNING


@pytest.mark.parametrize(
    ("check", "reason", "text"),
    [
        (SecretCheck.invalid("missing key: bucket"), "SecretInvalid", "missing key"),
        (SecretCheck.not_found('secrets "x" not found'), "SecretNotFound", "not found"),
    ],
)
def test_unusable_kopia_secret(check: SecretCheck, reason: str, text: str) -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("bad-secret"), secret=check)

    world.run_for(timedelta(minutes=10))

    condition = get_condition(world.replica(key).status.conditions, "KopiaSecretValid")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", reason)
    assert text in condition.message
    assert world.restores == {}
    assert world.listing_calls == []


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            {"canopySource": {"group": "00000000-0000-4000-8000-000000000000", "type": "t"}},
            "SecretRefAndCanopySource",
        ),
        ({"kopiaSecretRef": None}, "NoCredentialSource"),
    ],
)
def test_credential_sources_must_be_exactly_one(spec: dict[str, Any], reason: str) -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("creds", **spec))

    world.run_for(timedelta(minutes=10))

    condition = get_condition(world.replica(key).status.conditions, "KopiaSecretValid")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", reason)
    assert world.restores == {}
    assert world.listing_calls == []


def test_restore_fails_for_non_postgres_data() -> None:
    world = World()
    world.add_snapshot(snapshot("k-files", T0 - timedelta(hours=1), postgres=False), bad=True)
    key = world.add_replica(replica_doc("not-pg"))

    world.run_for(timedelta(seconds=90))

    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.FAILED
    assert restore.status.restore_job is not None
    assert restore.status.restore_job.phase is JobPhase.FAILED
    assert restore.status.postgres_version is None
    failed = get_condition(restore.status.conditions, "Failed")
    assert failed is not None and "PG_VERSION" in failed.message
    replica = world.replica(key)
    assert replica.status.consecutive_restore_failures == 1
    assert replica.status.phase is ReplicaPhase.PENDING
    assert "RestoreFailed" in world.event_reasons(key)
    # Failed restores go 300 s after their creation.
    world.run_for(timedelta(seconds=250))
    assert restore.name not in world.restores


def test_failed_listing_is_retried_on_a_backoff_not_blocked_for_a_day() -> None:
    world = World()
    world.listing_error = "repository not found in bucket 'nonexistent'"
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("wrong-bucket"))

    world.run_for(timedelta(seconds=150))

    replica = world.replica(key)
    secret = get_condition(replica.status.conditions, "KopiaSecretValid")
    assert secret is not None and secret.status == "True"
    available = get_condition(replica.status.conditions, "SnapshotAvailable")
    assert available is not None
    assert (available.status, available.reason) == ("False", "ListingFailed")
    assert "nonexistent" in available.message
    assert world.restores == {}
    assert replica.status.phase is ReplicaPhase.PENDING
    attempts = [t - T0 for t, _ in world.listing_calls]
    assert attempts == [timedelta(0), timedelta(seconds=30), timedelta(seconds=90)]

    world.run_for(timedelta(hours=2))
    gaps = [
        b - a for (a, _), (b, _) in zip(world.listing_calls, world.listing_calls[1:], strict=False)
    ]
    assert max(gaps) == timedelta(minutes=15)

    world.listing_error = None
    world.run_for(timedelta(minutes=20))
    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.ACTIVE
    available = get_condition(world.replica(key).status.conditions, "SnapshotAvailable")
    assert available is not None and available.reason == "SnapshotFound"


def test_no_matching_snapshot_sets_condition_and_looks_again() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1), host="other-host"))
    key = world.add_replica(replica_doc("filtered", snapshotFilter={"hostPattern": "prod-*"}))

    world.run_for(timedelta(minutes=12))

    available = get_condition(world.replica(key).status.conditions, "SnapshotAvailable")
    assert available is not None
    assert (available.status, available.reason) == ("False", "NoMatchingSnapshots")
    assert world.restores == {}
    # Looked again every relist interval, not at every pass.
    assert len(world.listing_calls) == 3

    world.add_snapshot(snapshot("k2", T0, host="prod-db"))
    world.run_for(timedelta(minutes=10))
    assert [r.spec.snapshot for r in world.all_restores()] == ["k2"]


def test_invalid_cron_sets_condition_without_a_restore_storm() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("bad-cron", schedule="61 * * * *"))

    world.run_for(timedelta(hours=6))

    replica = world.replica(key)
    condition = get_condition(replica.status.conditions, "ScheduleValid")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "InvalidSchedule")
    assert "'61 * * * *'" in condition.message
    assert "minute" in condition.message
    # The first restore still happens (never restored); nothing fires after it.
    assert len(world.created) == 1
    assert len(world.listing_calls) == 1
    assert replica.status.next_scheduled_restore is None


def test_storage_limit_blocks_creation_with_a_condition() -> None:
    world = World()
    world.add_snapshot(snapshot("k-huge", T0 - timedelta(hours=1), size=500 * 1024**3))
    key = world.add_replica(replica_doc("too-big", storageSizeMaximum="100Gi"))

    world.run_for(timedelta(minutes=10))

    condition = get_condition(world.replica(key).status.conditions, "RestoreCreationBlocked")
    assert condition is not None
    assert (condition.status, condition.reason) == ("True", "StorageLimitExceeded")
    assert "exceeds storageSizeMaximum (100Gi)" in condition.message
    assert world.restores == {}
    assert "RestoreCreationBlocked" in world.event_reasons(key)
