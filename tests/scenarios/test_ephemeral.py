"""The reference's ephemeral.rs and the seed change (verify replicas), in simulated time."""

from __future__ import annotations

from datetime import timedelta

from pgro.api.conditions import get_condition
from pgro.api.phases import ReplicaPhase
from pgro.core.plan import DeleteRestore, PatchReplicaStatus, VerificationOutcome
from tests.scenarios.world import T0, World, replica_doc, snapshot

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "tamanu-postgres"}


def test_legacy_verify_replica_tears_down_and_does_not_restore_again() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("verify", schedule="0 * * * *", ephemeral=True))

    world.run_for(timedelta(minutes=5))

    replica = world.replica(key)
    assert world.restores == {}
    assert replica.status.verified_snapshot_id == "k-first"
    assert replica.status.current_restore is None
    assert replica.status.previous_restore is None
    assert replica.status.phase is ReplicaPhase.PENDING
    assert len(world.created) == 1
    assert "RestoreCompleted" in world.event_reasons(key)
    listings_before = len(world.listing_calls)

    world.run_for(timedelta(hours=48))

    assert len(world.created) == 1
    # The schedule did fire every hour: each fire listed, found the snapshot covered.
    assert len(world.listing_calls) - listings_before == 48
    assert world.replica(key).status.verified_snapshot_id == "k-first"

    world.add_snapshot(snapshot("k-second", T0 + timedelta(hours=48, minutes=10)))
    world.run_for(timedelta(hours=3))

    assert [name for _, _, name in world.created][1:] != []
    assert len(world.created) == 2
    assert world.restores == {}
    replica = world.replica(key)
    assert replica.status.verified_snapshot_id == "k-second"
    assert replica.status.current_restore is None
    assert world.violations == []


def test_teardown_records_the_marker_before_deleting() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("verify", ephemeral=True))
    ordering: list[str] = []

    def spy(step: object) -> bool:
        if isinstance(step, PatchReplicaStatus) and "verifiedSnapshotId" in step.patch:
            ordering.append("marker")
            assert step.patch["currentRestore"] is None
        if isinstance(step, DeleteRestore):
            ordering.append("delete")
        return False

    world.fail_step = spy
    world.run_for(timedelta(minutes=5))
    assert ordering == ["marker", "delete"]
    assert world.replica(key).status.verified_snapshot_id == "k1"


def test_a_failed_delete_after_the_marker_converges_without_a_new_restore() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("verify", ephemeral=True))
    failing = {"deletes": 3}

    def crash_on_delete(step: object) -> bool:
        if isinstance(step, DeleteRestore) and failing["deletes"] > 0:
            failing["deletes"] -= 1
            return True
        return False

    world.fail_step = crash_on_delete
    world.run_for(timedelta(minutes=10))

    assert failing["deletes"] == 0
    assert world.restores == {}
    assert len(world.created) == 1
    assert world.replica(key).status.verified_snapshot_id == "k1"
    assert world.violations == []


def test_teardown_waits_for_a_restore_being_deleted() -> None:
    world = World(deletion_delay=timedelta(minutes=2))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("verify", ephemeral=True))

    world.run_for(timedelta(seconds=100))
    [restore] = world.all_restores()
    assert restore.metadata.is_deleting
    # Still there with a deletionTimestamp: it counts as serving, nothing re-fires.
    assert world.replica(key).status.phase is ReplicaPhase.READY
    world.run_for(timedelta(minutes=5))
    assert world.restores == {}
    assert len(world.created) == 1
    assert world.replica(key).status.phase is ReplicaPhase.PENDING


def test_canopy_verify_replica_restores_only_a_different_desired_snapshot() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=2)))
    world.add_snapshot(snapshot("k-second", T0 - timedelta(hours=1)))
    key = world.add_replica(
        replica_doc(
            "canopy-replica",
            namespace="canopy-verify-1",
            kopiaSecretRef=None,
            canopySource=CANOPY,
            schedule="H * * * *",
            scheduleJitter="10m",
            ephemeral=True,
        )
    )
    world.set_status(key, canopyDesiredSnapshotId="k-first")

    world.run_for(timedelta(minutes=5))

    replica = world.replica(key)
    assert world.restores == {}
    assert replica.status.verified_snapshot_id == "k-first"
    assert replica.status.current_restore is None
    # The newest snapshot is not the desired one: canopy picks by id.
    assert [r.outcome for r in world.reports] == [VerificationOutcome.SUCCESS]
    secret = get_condition(replica.status.conditions, "KopiaSecretValid")
    assert secret is not None and secret.reason == "CanopySourced"
    # The success report was persisted with the switchover, before the teardown, and
    # stays in status until a runtime delivers it (the world delivers nothing).
    [pending] = replica.status.pending_verification_reports
    assert (pending.snapshot_id, pending.outcome) == ("k-first", "success")
    assert pending.run_id is not None and pending.restore in world.created_for(key)

    world.run_for(timedelta(hours=48))
    assert len(world.created) == 1

    world.set_status(key, canopyDesiredSnapshotId="k-second")
    world.run_for(timedelta(minutes=5))
    assert len(world.created) == 2
    assert world.restores == {}
    assert world.replica(key).status.verified_snapshot_id == "k-second"
    assert len(world.reports) == 2
    pending_runs = [r.snapshot_id for r in world.replica(key).status.pending_verification_reports]
    assert pending_runs == ["k-first", "k-second"]
    assert world.violations == []


def test_canopy_desired_snapshot_not_listed_yet() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=2)))
    key = world.add_replica(
        replica_doc(
            "canopy-replica",
            kopiaSecretRef=None,
            canopySource=CANOPY,
            schedule="H * * * *",
            ephemeral=True,
        )
    )
    world.set_status(key, canopyDesiredSnapshotId="k-future")

    world.run_for(timedelta(minutes=3))
    condition = get_condition(world.replica(key).status.conditions, "SnapshotAvailable")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "CanopyDesiredSnapshotMissing")
    assert "k-future" in condition.message
    assert world.restores == {}

    world.add_snapshot(snapshot("k-future", T0))
    world.run_for(timedelta(minutes=10))
    assert [name for _, _, name in world.created] != []
    assert world.replica(key).status.verified_snapshot_id == "k-future"


def test_non_ephemeral_replica_keeps_serving() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("analytics"))
    world.run_for(timedelta(hours=1))
    replica = world.replica(key)
    assert replica.status.verified_snapshot_id is None
    assert replica.status.current_restore in world.restores
