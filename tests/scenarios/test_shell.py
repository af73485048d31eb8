"""The reconciler shell's own duties, seen through the simulated world it drives.

The world implements only the effects; backoff of failing steps, their one report per
change, the `StepsSucceeding` condition and the restore metrics are the shell's, and so
the same for `pgro run` and the operator.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

from pgro.api.phases import RestorePhase
from pgro.core.plan import UNSUPPORTED_SWITCHOVER_EVENT, DeleteRestore, PointServiceAt, Step
from pgro.core.step_failures import EVENT_STEP_FAILED, STEPS_CONDITION
from tests.scenarios.world import T0, World, replica_doc, snapshot


def _value(world: World, name: str) -> float:
    value = world.shell.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def _steps_condition(world: World, key: str) -> tuple[str, str] | None:
    for c in world.replica(key).status.conditions:
        if c.type == STEPS_CONDITION:
            return (c.status, c.reason)
    return None


def test_a_failing_step_is_retried_with_backoff_and_reported_once() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("verify", ephemeral=True))
    attempts: list[datetime] = []

    def failing_delete(step: Step) -> bool:
        if isinstance(step, DeleteRestore):
            attempts.append(world.now)
            return len(attempts) <= 5
        return False

    world.fail_step = failing_delete
    # Restore (60 s), server ready (30 s), verdict, then the teardown's delete fails 5 times.
    world.run_for(timedelta(minutes=5))
    assert len(attempts) == 6  # the sixth worked
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert world.event_reasons(key).count(EVENT_STEP_FAILED) == 1
    shown = [
        (c["status"], c["reason"])
        for _, k, patch in world.replica_patches
        if k == key
        for c in patch.get("conditions") or []
        if c["type"] == STEPS_CONDITION
    ]
    assert shown == [("False", "StepFailing"), ("True", "Recovered")]
    assert _steps_condition(world, key) == ("True", "Recovered")
    assert world.restores == {}


def test_a_step_failing_on_every_pass_does_not_run_the_rest_of_its_plan() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("analytics"))
    world.fail_step = lambda step: isinstance(step, PointServiceAt)
    world.run_for(timedelta(minutes=10))
    [restore] = world.all_restores()
    # The switchover never happened, so nothing after it did either.
    assert key not in world.service
    assert world.replica(key).status.current_restore is None
    assert restore.status.phase is RestorePhase.SWITCHING
    assert _value(world, "postgres_restore_switchovers_total") == 0


def test_the_restore_metrics_count_each_fact_once() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    world.add_snapshot(snapshot("bad", T0 - timedelta(hours=2)), bad=True)
    good = world.add_replica(replica_doc("analytics"))
    world.run_for(timedelta(minutes=10))
    assert world.replica(good).status.current_restore is not None
    assert _value(world, "postgres_restore_started_total") == 1
    assert _value(world, "postgres_restore_completed_total") == 1
    assert _value(world, "postgres_restore_switchovers_total") == 1
    assert _value(world, "postgres_restore_failed_total") == 0

    broken = world.add_replica(
        replica_doc("broken", namespace="other", snapshotFilter={"tags": {"tag:kind": "none"}})
    )
    world.create_restore_by_hand(broken, "broken-1", "bad")
    world.run_for(timedelta(minutes=5))
    assert world.restore("broken-1").status.phase is RestorePhase.FAILED
    assert _value(world, "postgres_restore_failed_total") == 1
    assert _value(world, "postgres_restore_completed_total") == 1


def test_an_unsupported_switchover_step_is_reported_once_per_restore() -> None:
    """Issue 12: before, a `SwitchoverStepUnsupported` warning on every pass of a held restore."""
    world = World()
    world.supported_switchover_steps = frozenset()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(
        replica_doc("analytics", redaction={"manifestUrl": "https://m.test/m.json"})
    )
    world.run_for(timedelta(minutes=30))
    [restore] = world.all_restores()
    assert (
        restore.status.phase is RestorePhase.SWITCHING
    )  # held: an unredacted restore never serves
    assert world.event_reasons(key).count(UNSUPPORTED_SWITCHOVER_EVENT) == 1
    phase = world.replica(key).status.redaction_phase
    assert phase is not None and str(phase).startswith("failed: redaction is not supported")
    phase_patches = [p for _, k, p in world.replica_patches if k == key and "redactionPhase" in p]
    assert len(phase_patches) == 1
