"""Prompt triggers: which listing serves a canopy offer, and how a missing snapshot is
looked for again (issue 11, build point 4)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from pgro.api.conditions import Condition
from pgro.core.observations import (
    SnapshotListing,
    record_listing_failure,
    record_listing_success,
)
from pgro.core.plan import CreateRestore, ListSnapshots
from pgro.core.replica_decision import ReplicaPlan, missing_relist_delay
from pgro.core.settings import DEFAULT_SETTINGS
from tests.scenarios.builders import NOW, decide, listing, replica, settled_status, snap, stamp

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "t"}
A = snap("k-a", NOW - timedelta(hours=3))
B = snap("k-b", NOW - timedelta(minutes=1))


def _canopy_replica(desired: str = "k-b", **status: Any) -> Any:
    """An ephemeral canopy replica that verified A; canopy now wants `desired`."""
    return replica(
        settled_status(
            lastRestoreCompletedAt=stamp(NOW - timedelta(hours=2)),
            verifiedSnapshotId="k-a",
            canopyDesiredSnapshotId=desired,
            **status,
        ),
        kopiaSecretRef=None,
        canopySource=CANOPY,
        ephemeral=True,
    )


def _listings(plan: ReplicaPlan) -> list[ListSnapshots]:
    return [s for s in plan.steps if isinstance(s, ListSnapshots)]


def _created(plan: ReplicaPlan) -> list[str]:
    return [s.restore.spec.snapshot for s in plan.steps if isinstance(s, CreateRestore)]


def _available(plan: ReplicaPlan) -> Condition | None:
    for patch in plan.status_patches:
        for c in patch.patch.get("conditions", []):
            if c["type"] == "SnapshotAvailable":
                return Condition.model_validate(c)
    return None


def _taken_for(wanted: str, at: datetime, misses: int) -> SnapshotListing:
    """The listing after `misses` listings in a row, taken for `wanted`, lacked it."""
    result: SnapshotListing | None = None
    for i in range(misses):
        result = record_listing_success([A], at - timedelta(seconds=misses - 1 - i), result, wanted)
    assert result is not None and result.missing_streak == misses
    return result


# The listing record ---------------------------------------------------------------------


def test_the_missing_streak_counts_listings_for_the_same_snapshot_only() -> None:
    first = record_listing_success([A], NOW, wanted="k-b")
    assert (first.wanted, first.missing_streak) == ("k-b", 1)
    second = record_listing_success([A], NOW, first, "k-b")
    assert second.missing_streak == 2
    # Canopy changed its mind: a new snapshot starts a new streak.
    other = record_listing_success([A], NOW, second, "k-c")
    assert (other.wanted, other.missing_streak) == ("k-c", 1)
    found = record_listing_success([A, B], NOW, second, "k-b")
    assert (found.wanted, found.missing_streak) == ("k-b", 0)
    # Not taken for any snapshot (the old call): no streak, nothing wanted.
    plain = record_listing_success([A], NOW, second)
    assert (plain.wanted, plain.missing_streak) == (None, 0)
    assert plain.holds("k-a") and not plain.holds("k-b")


def test_a_failed_listing_keeps_the_missing_streak() -> None:
    missing = record_listing_success([A], NOW, wanted="k-b")
    failed = record_listing_failure(missing, "connection refused", NOW)
    assert (failed.wanted, failed.missing_streak, failed.consecutive_failures) == ("k-b", 1, 1)
    assert not failed.holds("k-b")
    again = record_listing_success([A], NOW, failed, "k-b")
    assert again.missing_streak == 2


def test_relist_delay_doubles_from_5_s_to_the_relist_interval() -> None:
    cap = DEFAULT_SETTINGS.relist_interval
    delays = [missing_relist_delay(n, cap).total_seconds() for n in range(0, 10)]
    assert delays == [5, 5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert missing_relist_delay(10_000, cap) == cap


# Which listing serves a canopy offer ----------------------------------------------------


def test_an_offer_newer_than_the_listing_lists_at_once() -> None:
    """The issue's case: B offered 30 s after the listing that found A. Before, that
    listing served for 300 s, did not hold B, and the restore waited up to 5 minutes."""
    old = record_listing_success([A], NOW - timedelta(seconds=30), wanted="k-a")
    plan = decide(_canopy_replica(), the_listing=old)
    assert [s.wanted for s in _listings(plan)] == ["k-b"]
    assert _created(plan) == []
    assert _available(plan) is None  # nothing is claimed missing from a listing that predates it
    assert plan.requeue_after == timedelta(seconds=5)


def test_a_listing_without_wanted_lists_at_once_too() -> None:
    plan = decide(_canopy_replica(), the_listing=listing(A, at=NOW - timedelta(seconds=30)))
    assert [s.wanted for s in _listings(plan)] == ["k-b"]


def test_a_listing_that_holds_the_desired_snapshot_serves_whatever_its_age() -> None:
    old = listing(A, B, at=NOW - timedelta(hours=1))
    plan = decide(_canopy_replica(), the_listing=old)
    assert _listings(plan) == []
    assert _created(plan) == ["k-b"]


def test_the_listing_taken_for_the_offer_creates_the_restore() -> None:
    taken = record_listing_success([A, B], NOW, wanted="k-b")
    plan = decide(_canopy_replica(), the_listing=taken)
    assert _created(plan) == ["k-b"]


@pytest.mark.parametrize(
    ("misses", "delay"),
    [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (12, 300)],
)
def test_still_missing_is_looked_for_again_on_a_doubling_backoff(misses: int, delay: int) -> None:
    taken = _taken_for("k-b", NOW, misses)
    plan = decide(_canopy_replica(), the_listing=taken)
    assert _listings(plan) == [] and _created(plan) == []
    assert plan.requeue_after == timedelta(seconds=delay)
    condition = _available(plan)
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "CanopyDesiredSnapshotMissing")
    again = stamp(NOW + timedelta(seconds=delay))
    assert "k-b" in condition.message and f"listing again at {again}" in condition.message

    due = decide(_canopy_replica(), the_listing=taken, now=NOW + timedelta(seconds=delay))
    assert [s.wanted for s in _listings(due)] == ["k-b"]
    early = decide(_canopy_replica(), the_listing=taken, now=NOW + timedelta(seconds=delay - 1))
    assert _listings(early) == []


def test_a_listing_seconds_old_is_not_taken_again_in_a_loop() -> None:
    """A runtime that does not pass `wanted` on records listings for nothing: the
    decision still waits the shortest step between two listings."""
    fresh = listing(A, at=NOW - timedelta(seconds=2))
    plan = decide(_canopy_replica(), the_listing=fresh)
    assert _listings(plan) == []
    assert plan.requeue_after == timedelta(seconds=3)
    later = decide(_canopy_replica(), the_listing=fresh, now=NOW + timedelta(seconds=3))
    assert [s.wanted for s in _listings(later)] == ["k-b"]


def test_a_new_offer_after_a_missing_one_lists_at_once() -> None:
    """Canopy moved on from C (missing, backing off) to B: the listing was for C."""
    taken = _taken_for("k-c", NOW - timedelta(seconds=20), 6)
    plan = decide(_canopy_replica(), the_listing=taken)
    assert [s.wanted for s in _listings(plan)] == ["k-b"]


def test_the_schedule_keeps_its_rule_for_canopy_replicas() -> None:
    """A due schedule needs a listing taken after its time, even one holding B."""
    due = replica(
        settled_status(nextScheduledRestore=stamp(NOW - timedelta(minutes=1))),
        kopiaSecretRef=None,
        canopySource=CANOPY,
    )
    plan = decide(due, the_listing=listing(A, B, at=NOW - timedelta(minutes=2)))
    assert len(_listings(plan)) == 1 and _created(plan) == []


# Replicas without canopy keep the relist interval ---------------------------------------


@pytest.mark.parametrize(
    ("age", "lists"), [(timedelta(minutes=4), False), (timedelta(minutes=5), True)]
)
def test_other_state_triggers_keep_the_relist_interval(age: timedelta, lists: bool) -> None:
    plan = decide(replica(settled_status()), the_listing=listing(A, at=NOW - age))
    assert [s.wanted for s in _listings(plan)] == ([None] if lists else [])
    assert _created(plan) == ([] if lists else ["k-a"])
