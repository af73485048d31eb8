"""The shared rule for steps that keep failing (issue 18, item 20): pure, clock passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.plan import CreateRestore, DeleteRestore, EnsureReplicaResources
from pgro.core.step_failures import (
    STEP_RETRY_MAX,
    StepFailures,
    error_shape,
    step_name,
    step_retry_delay,
)

STEP = ("replica team-a/analytics", "EnsureReplicaResources")
OTHER = ("restore team-a/analytics-1", "StartRestoreWork")
REPLICA = "team-a/analytics"


def test_the_delay_doubles_from_one_second_to_five_minutes() -> None:
    assert [step_retry_delay(n) for n in range(1, 12)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        300,
        300,
    ]
    assert step_retry_delay(0) == 1
    assert step_retry_delay(10_000) == 300
    assert step_retry_delay(10**9) == 300


@given(st.integers(min_value=0, max_value=10**6))
def test_the_delay_never_shrinks_and_stays_within_bounds(failures: int) -> None:
    assert 1 <= step_retry_delay(failures) <= STEP_RETRY_MAX
    assert step_retry_delay(failures) <= step_retry_delay(failures + 1)


def test_the_shape_masks_numbers_and_keeps_type_and_words() -> None:
    a = error_shape(RuntimeError("pgbouncer (pid 4242) exited on port 6432 at 12:00:01"))
    b = error_shape(RuntimeError("pgbouncer (pid 99) exited on port 6433 at 12:05:17"))
    assert a == b == "RuntimeError: pgbouncer (pid #) exited on port # at #:#:#"
    assert error_shape(OSError("pgbouncer (pid 1) exited on port 1 at 1:1:1")) != a
    assert error_shape(RuntimeError("pgbouncer (pid 1) was killed")) != a


def test_the_same_failure_is_reported_once_and_backs_off() -> None:
    failures = StepFailures()
    first = failures.failed(STEP, REPLICA, "E: used #", "used 1", now=100.0)
    assert first.report
    assert (first.record.failures, first.delay, first.record.retry_at) == (1, 1.0, 101.0)
    assert failures.backing_off(STEP, 100.5)
    assert not failures.backing_off(STEP, 101.0)
    assert not failures.backing_off(OTHER, 100.5)

    again = failures.failed(STEP, REPLICA, "E: used #", "used 2", now=101.0)
    assert not again.report
    assert (again.record.failures, again.delay, again.record.retry_at) == (2, 2.0, 103.0)
    # What the condition shows stays what was reported.
    assert again.record.message == "used 1" and again.record.reported_at == 100.0
    assert failures.retry_in(STEP[0], 101.5) == 1.5
    assert failures.retry_in(OTHER[0], 101.5) is None


def test_a_retry_time_already_past_does_not_requeue_at_once() -> None:
    """A step the plan did not reach this pass (another one stopped it earlier) keeps an
    old record; its passed time must not make the object due again at once, in a loop."""
    failures = StepFailures()
    listing = (STEP[0], "ListSnapshots")
    failures.failed(listing, REPLICA, "E", "listing", now=100.0)  # retry at 101
    failures.failed(STEP, REPLICA, "E", "step", now=102.0)  # retry at 103
    assert failures.retry_in(STEP[0], 102.0) == 1.0
    failures.succeeded(STEP)
    assert failures.retry_in(STEP[0], 102.0) is None


def test_a_changed_failure_is_reported_again_with_the_backoff_kept() -> None:
    failures = StepFailures()
    failures.failed(STEP, REPLICA, "E: used #", "used 1", now=0.0)
    failures.failed(STEP, REPLICA, "E: used #", "used 2", now=1.0)
    changed = failures.failed(STEP, REPLICA, "E: forbidden", "forbidden", now=3.0)
    assert changed.report
    assert changed.record.message == "forbidden" and changed.record.reported_at == 3.0
    # Still the third failure in a row: the error changing does not reset the backoff.
    assert (changed.record.failures, changed.delay) == (3, 4.0)


def test_success_clears_the_record_and_a_later_failure_starts_over() -> None:
    failures = StepFailures()
    failures.failed(STEP, REPLICA, "E", "m", now=0.0)
    failures.failed(STEP, REPLICA, "E", "m", now=1.0)
    gone = failures.succeeded(STEP)
    assert gone is not None and gone.failures == 2
    assert failures.succeeded(STEP) is None
    assert failures.failing(REPLICA) == []
    fresh = failures.failed(STEP, REPLICA, "E", "m", now=10.0)
    assert fresh.report and fresh.record.failures == 1 and fresh.delay == 1.0


def test_a_replica_shows_its_latest_reported_failure_first() -> None:
    failures = StepFailures()
    failures.failed(STEP, REPLICA, "E", "ensure", now=0.0)
    failures.failed(OTHER, REPLICA, "F", "start work", now=5.0)
    failures.failed(("replica team-b/x", "ListSnapshots"), "team-b/x", "G", "other", now=6.0)
    assert [f.message for f in failures.failing(REPLICA)] == ["start work", "ensure"]
    failures.forget(lambda key, _: key[0] == OTHER[0])
    assert [f.message for f in failures.failing(REPLICA)] == ["ensure"]
    failures.forget(lambda _, f: f.replica_key == REPLICA)
    assert failures.failing(REPLICA) == [] and len(failures) == 1


def test_a_plan_that_no_longer_holds_a_failing_step_settles_it() -> None:
    failures = StepFailures()
    failures.failed(STEP, REPLICA, "E", "ensure", now=0.0)
    failures.failed((STEP[0], "DeleteRestore"), REPLICA, "E", "delete", now=0.0)
    failures.failed(OTHER, REPLICA, "E", "start", now=0.0)
    settled = failures.settle(STEP[0], ["PatchReplicaStatus", "EnsureReplicaResources"])
    assert [key for key, _ in settled] == [(STEP[0], "DeleteRestore")]
    # Only that object's steps: the restore's plan is its own.
    assert sorted(f.message for f in failures.failing(REPLICA)) == ["ensure", "start"]


def test_steps_on_different_restores_are_counted_apart() -> None:
    assert step_name(DeleteRestore("orders-1")) == "DeleteRestore orders-1"
    assert step_name(DeleteRestore("orders-1")) != step_name(DeleteRestore("orders-2"))
    assert step_name(EnsureReplicaResources("analytics", (), None)) == "EnsureReplicaResources"
    new = PostgresPhysicalRestore.model_validate(
        {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalRestore",
            "metadata": {"name": "orders-20260304050607", "namespace": "team-a"},
            "spec": {
                "replica": {"name": "orders"},
                "snapshot": "k1",
                "snapshotSize": "1Gi",
                "storageSize": "2Gi",
            },
        }
    )
    # A restore to create is named anew each pass: its failures count under the type.
    assert step_name(CreateRestore(new)) == "CreateRestore"
