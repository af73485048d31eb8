from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pgro.core.queue import AdmissionQueue, Admitted, Queued, Slot, promoted_keys

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _admit(queue: AdmissionQueue, *keys: str) -> AdmissionQueue:
    for key in keys:
        queue, _ = queue.request(key, NOW)
    return queue


def test_default_limit_is_two() -> None:
    assert AdmissionQueue().limit == 2


def test_same_name_in_two_namespaces_takes_two_slots() -> None:
    queue = _admit(AdmissionQueue(limit=2), "ns1/canopy-replica", "ns2/canopy-replica")
    assert queue.holds("ns1/canopy-replica") and queue.holds("ns2/canopy-replica")
    _, admission = queue.request("ns3/canopy-replica", NOW)
    assert admission == Queued(1)


def test_request_dedups_and_positions_are_one_based_fifo() -> None:
    queue = _admit(AdmissionQueue(limit=1), "a/a")
    queue, first = queue.request("b/b", NOW)
    queue, second = queue.request("c/c", NOW)
    queue, again = queue.request("b/b", NOW + timedelta(seconds=30))
    assert (first, second, again) == (Queued(1), Queued(2), Queued(1))
    assert [w.key for w in queue.waiting] == ["b/b", "c/c"]
    assert queue.position("c/c") == 2 and queue.position("a/a") is None


def test_a_holder_is_admitted_even_when_full() -> None:
    queue = _admit(AdmissionQueue(limit=1), "a/a")
    queue, admission = queue.request("a/a", NOW)
    assert admission == Admitted()
    assert len(queue.slots) == 1


def test_release_promotes_the_head_and_the_promoted_replica_may_start() -> None:
    queue = _admit(AdmissionQueue(limit=1), "a/a", "b/b", "c/c")
    before = queue
    queue = queue.bind("a/a", "a-1", NOW).release("a/a", "a-1")
    assert [s.key for s in queue.slots] == ["b/b"]
    assert promoted_keys(before, queue) == ("b/b",)
    assert queue.position("c/c") == 1
    # The promoted replica is not blocked by its own slot (the reference's quirk).
    _, admission = queue.request("b/b", NOW)
    assert admission == Admitted()


def test_bind_is_idempotent_and_takes_a_slot_for_hand_made_restores() -> None:
    queue = AdmissionQueue(limit=1).bind("a/a", "a-1", NOW)
    assert queue.bind("a/a", "a-1", NOW) is queue
    queue = queue.bind("b/b", "manual", NOW)
    assert len(queue.slots) == 2  # above the limit: it runs regardless
    _, admission = queue.request("c/c", NOW)
    assert admission == Queued(1)


def test_release_ignores_a_slot_bound_to_another_restore() -> None:
    queue = AdmissionQueue().bind("a/a", "a-2", NOW)
    assert queue.release("a/a", "a-1") is queue
    assert queue.release("a/a", "a-2").slots == ()


def test_remove_clears_both_slot_and_waiting() -> None:
    queue = _admit(AdmissionQueue(limit=1), "a/a", "b/b")
    queue = queue.release("b/b")
    assert queue.waiting == ()
    queue = queue.release("a/a")
    assert queue.slots == ()


def test_withdraw_leaves_the_line_and_gives_back_reservations_only() -> None:
    queue = _admit(AdmissionQueue(limit=2), "a/a", "b/b", "c/c").bind("b/b", "b-1", NOW)
    queue = queue.withdraw("c/c").withdraw("a/a").withdraw("b/b")
    assert [s.key for s in queue.slots] == ["b/b"]
    assert queue.waiting == ()


def test_reconcile_drops_dead_slots_and_heals() -> None:
    old = NOW - timedelta(hours=1)
    queue = AdmissionQueue(
        limit=2,
        slots=(Slot("a/a", old, "a-1"), Slot("b/b", old, None), Slot("c/c", NOW, None)),
    )
    healed = queue.reconcile({"d/d": "d-1"}, NOW)
    # a: its restore is no longer restoring; b: a stale reservation; c: a fresh one.
    assert [(s.key, s.restore) for s in healed.slots] == [("c/c", None), ("d/d", "d-1")]


def test_reconcile_keeps_slots_with_restores_in_progress_and_promotes() -> None:
    queue = _admit(AdmissionQueue(limit=1), "a/a", "b/b").bind("a/a", "a-1", NOW)
    leaked = queue.reconcile({}, NOW + timedelta(hours=1))
    assert [s.key for s in leaked.slots] == ["b/b"]
    assert leaked.waiting == ()
    kept = queue.reconcile({"a/a": "a-1"}, NOW + timedelta(hours=1))
    assert [s.key for s in kept.slots] == ["a/a"]


def test_rebuild_from_observation_after_a_restart() -> None:
    queue = AdmissionQueue.rebuild(
        2,
        in_progress={"x/x": "x-1"},
        queue_positions={"c/c": 2, "b/b": 1, "z/z": 0, "x/x": 3},
        now=NOW,
    )
    # One free slot: the longest waiter (position 1) is promoted, the other keeps waiting.
    assert [(s.key, s.restore) for s in queue.slots] == [("x/x", "x-1"), ("b/b", None)]
    assert [w.key for w in queue.waiting] == ["c/c"]


def test_with_limit_promotes_when_raised() -> None:
    queue = _admit(AdmissionQueue(limit=1), "a/a", "b/b")
    assert queue.with_limit(1) is queue
    raised = queue.with_limit(3)
    assert {s.key for s in raised.slots} == {"a/a", "b/b"}
    assert raised.waiting == ()


def test_key_bound_to_finds_the_slot_of_a_restore_in_its_namespace_only() -> None:
    q = AdmissionQueue(limit=2).bind("a/orders", "orders-1", NOW).bind("b/orders", "orders-1", NOW)
    assert q.key_bound_to("a", "orders-1") == "a/orders"
    assert q.key_bound_to("b", "orders-1") == "b/orders"
    assert q.key_bound_to("c", "orders-1") is None
    assert q.key_bound_to("a", "orders-2") is None
