"""switchover.rs, ttls.rs, consecutive_failures.rs and the queue, in simulated time."""

from __future__ import annotations

from datetime import timedelta

from pgro.api.conditions import get_condition
from pgro.api.phases import ReplicaPhase, RestorePhase
from pgro.core.plan import PatchRestoreStatus, Step, SwitchoverStep
from tests.scenarios.world import T0, World, replica_doc, snapshot


def test_second_restore_and_switchover_with_grace_period() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("switch", switchoverGracePeriod="120s"))
    world.run_for(timedelta(minutes=5))
    first = world.replica(key).status.current_restore
    assert first is not None and world.service[key] == first

    world.create_restore_by_hand(key, "switch-second", "k1")
    world.run_for(timedelta(seconds=95))

    replica = world.replica(key)
    assert replica.status.phase is ReplicaPhase.READY
    assert replica.status.current_restore == "switch-second"
    assert replica.status.previous_restore == first
    assert world.service[key] == "switch-second"
    assert world.outgoing == [first]
    second = world.restore("switch-second")
    assert second.status.phase is RestorePhase.ACTIVE
    assert second.status.activated_at is not None and second.status.restored_at is not None
    # The old restore still exists (and answers) until the grace period has passed.
    assert world.restore(first).status.phase is RestorePhase.ACTIVE
    switched_at = replica.status.last_restore_completed_at
    assert switched_at is not None

    world.run_until(switched_at + timedelta(seconds=120))
    assert first in world.restores

    world.run_for(timedelta(seconds=15))
    assert first not in world.restores
    replica = world.replica(key)
    assert replica.status.previous_restore is None
    assert replica.status.current_restore == "switch-second"
    deleted_at = {name: when for when, name in world.deleted}[first]
    assert deleted_at - switched_at > timedelta(seconds=120)
    assert world.violations == []


def test_scheduled_refresh_switches_to_the_newer_snapshot() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("refresh", schedule="0 */6 * * *"))
    world.run_for(timedelta(hours=1))
    world.add_snapshot(snapshot("k2", T0 + timedelta(hours=2)))

    world.run_for(timedelta(hours=6))

    replica = world.replica(key)
    serving = world.restore(replica.status.current_restore or "")
    assert serving.spec.snapshot == "k2"
    assert [r.spec.snapshot for r in world.all_restores()] == ["k2"]
    assert len(world.created) == 2
    # 06:00, 12:00: two scheduled fires; the second found k2 already covered.
    assert replica.status.latest_available_snapshot == "k2"
    assert world.violations == []


def test_minimum_ttl_prevents_premature_restore() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("ttl", schedule="* * * * *", minimumTtl="24h"))
    world.run_for(timedelta(minutes=5))
    current = world.replica(key).status.current_restore
    world.add_snapshot(snapshot("k2", T0 + timedelta(minutes=10)))
    listings = len(world.listing_calls)

    world.run_for(timedelta(hours=23))

    replica = world.replica(key)
    assert len(world.created) == 1
    assert replica.status.current_restore == current
    assert replica.status.phase is ReplicaPhase.READY
    assert len(world.listing_calls) == listings
    # SkippedByTtl still advances the schedule: it stays in the near future.
    next_at = replica.status.next_scheduled_restore
    assert next_at is not None and next_at - world.now <= timedelta(minutes=1)

    world.run_for(timedelta(hours=2))
    assert len(world.created) == 2
    serving = world.restore(world.replica(key).status.current_restore or "")
    assert serving.spec.snapshot == "k2"


def test_consecutive_failures_back_off_and_reset_on_success() -> None:
    world = World()
    world.add_snapshot(snapshot("k-files", T0 - timedelta(hours=1), postgres=False), bad=True)
    key = world.add_replica(replica_doc("failing", schedule="* * * * *"))

    world.run_for(timedelta(hours=3, minutes=30))

    replica = world.replica(key)
    assert replica.status.phase is not ReplicaPhase.RESTORING
    failure_times = [t for t, _ in world.failures]
    creation_times = [t for t, _, _ in world.created]
    gaps = [
        (created - failed).total_seconds()
        for failed, created in zip(failure_times, creation_times[1:], strict=False)
    ]
    assert len(gaps) >= 6
    assert gaps == [120, 240, 480, 960, 1920] + [3600] * (len(gaps) - 5)
    assert replica.status.consecutive_restore_failures == len(failure_times)
    marker = get_condition(replica.status.conditions, "LastRestoreFailed")
    assert marker is not None and marker.status == "True"
    # Never suspended: keeps retrying hourly, and Failed restores do not pile up.
    assert get_condition(replica.status.conditions, "RestoreSchedulingSuspended") is None
    assert (
        all(r.status.phase is RestorePhase.FAILED for r in world.all_restores())
        and len(world.restores) <= 1
    )

    world.add_snapshot(snapshot("k-good", T0 + timedelta(hours=3, minutes=31)))
    world.run_for(timedelta(hours=1, minutes=5))
    replica = world.replica(key)
    assert replica.status.consecutive_restore_failures == 0
    assert replica.status.phase is ReplicaPhase.READY
    marker = get_condition(replica.status.conditions, "LastRestoreFailed")
    assert marker is not None and (marker.status, marker.reason) == ("False", "RestoreSucceeded")

    # The next failure starts the sequence again at 120 s.
    world.add_snapshot(snapshot("k-bad-2", T0 + timedelta(hours=4, minutes=40)), bad=True)
    failures = len(world.failures)
    world.run_for(timedelta(minutes=2, seconds=30))
    assert len(world.failures) == failures + 1
    assert world.replica(key).status.consecutive_restore_failures == 1
    next_at = world.replica(key).status.next_scheduled_restore
    assert next_at == world.failures[-1][0] + timedelta(seconds=120)


def test_a_crash_between_counting_and_failing_never_double_counts() -> None:
    world = World()
    world.add_snapshot(snapshot("k-files", T0 - timedelta(hours=1), postgres=False), bad=True)
    key = world.add_replica(replica_doc("crashy", schedule="0 0 1 1 *"))
    crashes = {"left": 2}

    def crash_before_failed(step: Step) -> bool:
        if (
            isinstance(step, PatchRestoreStatus)
            and step.patch.get("phase") == "Failed"
            and crashes["left"] > 0
        ):
            crashes["left"] -= 1
            return True
        return False

    world.fail_step = crash_before_failed
    world.run_for(timedelta(seconds=150))

    assert crashes["left"] == 0
    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.FAILED
    assert world.replica(key).status.consecutive_restore_failures == 1


def test_queue_admits_at_most_the_limit_in_fifo_order() -> None:
    world = World(limit=2, work_duration=timedelta(minutes=10))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    keys = [world.add_replica(replica_doc(f"r{i}", namespace=f"ns{i}")) for i in range(5)]

    world.run_for(timedelta(seconds=30))
    positions = {k: world.replica(k).status.queue_position for k in keys}
    assert sorted(p for p in positions.values() if p) == [1, 2, 3]
    assert len(world.created) == 2

    world.run_for(timedelta(hours=2))
    assert world.in_progress_peak <= 2
    assert len(world.created) == 5
    order = [k for _, k, _ in world.created]
    queued_order = sorted((p, k) for k, p in positions.items() if p)
    assert order[2:] == [k for _, k in queued_order]
    for key in keys:
        replica = world.replica(key)
        assert replica.status.phase is ReplicaPhase.READY
        assert replica.status.queue_position == 0
    assert world.queue.slots == () and world.queue.waiting == ()


def test_queue_is_rebuilt_from_observed_restores_after_a_restart() -> None:
    world = World(limit=1, work_duration=timedelta(minutes=10))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    keys = [world.add_replica(replica_doc("canopy-replica", namespace=f"ns{i}")) for i in range(3)]
    world.run_for(timedelta(minutes=2))
    assert len(world.created) == 1

    world.restart()
    assert world.queue.slots[0].restore == world.created[0][2]
    assert [w.key for w in world.queue.waiting] == [
        k for k in keys if world.replica(k).status.queue_position
    ]
    world.run_for(timedelta(minutes=3))
    assert len(world.created) == 1

    world.run_for(timedelta(hours=1))
    assert world.in_progress_peak <= 1
    assert len(world.created) == 3
    assert world.violations == []


def test_a_slot_leaked_by_a_deleted_restoring_restore_heals() -> None:
    world = World(limit=1, work_duration=timedelta(hours=1))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    first = world.add_replica(replica_doc("a", namespace="one"))
    second = world.add_replica(replica_doc("b", namespace="two"))
    world.run_for(timedelta(minutes=1))
    [(_, owner, name)] = world.created
    world.delete_restore_by_hand(name)
    world.run_for(timedelta(minutes=2))
    # The owner is replaced at once (never restored): the slot went with its restore.
    other = second if owner == first else first
    assert len(world.created) == 2
    world.run_for(timedelta(hours=3))
    assert world.replica(other).status.phase is ReplicaPhase.READY
    assert world.replica(owner).status.phase is ReplicaPhase.READY


def test_persistent_schema_migration_holds_the_switchover() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("keep", persistentSchemas=["reports"]))
    world.run_for(timedelta(minutes=5))
    assert world.switchover_steps == []  # the first restore has nothing to carry over
    world.create_restore_by_hand(key, "keep-second", "k1")
    world.run_for(timedelta(minutes=5))

    assert world.restore("keep-second").status.phase is RestorePhase.SWITCHING
    step = world.switchover_steps[-1]
    assert step.kind is SwitchoverStep.SCHEMA_MIGRATION
    assert step.schemas == ("reports",)
    assert step.budget == timedelta(seconds=4320)

    assert world.provisioned == []  # nothing moves while the migration holds
    world.set_status(
        key, schemaMigrationPhase="complete", persistentSchemasMissing=["gone_upstream"]
    )
    world.run_for(timedelta(minutes=2))
    replica = world.replica(key)
    assert replica.status.current_restore == "keep-second"
    # The roles got their grants on the carried objects before the endpoint moved.
    assert world.provisioned == ["keep-second"]
    assert replica.status.schema_migration_phase is None  # cleared by the sweep
    assert replica.status.persistent_schemas_missing == ["gone_upstream"]  # kept by it
