"""Prompt triggers (issue 11, build point 4), in simulated time: a canopy offer is served
by a listing taken after it, and a snapshot canopy offers before the repository shows it
is looked for again on a short backoff, not every `relist_interval`."""

from __future__ import annotations

from datetime import datetime, timedelta

from pgro.api.conditions import get_condition
from tests.scenarios.world import T0, World, replica_doc, snapshot

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "tamanu-postgres"}


def _verified_on_a(world: World) -> str:
    """A canopy verify replica that restored, verified and tore down snapshot A."""
    world.add_snapshot(snapshot("k-a", T0 - timedelta(hours=2)))
    key = world.add_replica(
        replica_doc(
            "canopy-replica",
            kopiaSecretRef=None,
            canopySource=CANOPY,
            schedule="H 3 * * *",
            ephemeral=True,
        )
    )
    world.set_status(key, canopyDesiredSnapshotId="k-a")
    world.run_for(timedelta(minutes=5))
    assert world.replica(key).status.verified_snapshot_id == "k-a"
    assert world.restores == {}
    return key


def _listings_since(world: World, key: str, since: datetime) -> list[timedelta]:
    return [at - since for at, k in world.listing_calls if k == key and at >= since]


def test_an_offer_of_a_new_snapshot_starts_its_restore_at_once() -> None:
    """The issue's case: B is taken after A's listing and offered 30 s after A was verified.
    Before, A's listing served the offer for 300 s, did not hold B, and the restore waited."""
    world = World()
    key = _verified_on_a(world)
    world.add_snapshot(snapshot("k-b", world.now))
    world.run_for(timedelta(seconds=30))
    offered = world.now
    created_before = len(world.created)

    world.set_status(key, canopyDesiredSnapshotId="k-b")
    world.run_for(timedelta(seconds=1))

    assert len(world.created) == created_before + 1
    at, _, name = world.created[-1]
    assert at == offered
    assert world.restore(name).spec.snapshot == "k-b"
    # One listing, taken for the offer; none of the waiting the old rule did.
    assert _listings_since(world, key, offered) == [timedelta(0)]
    world.run_for(timedelta(minutes=5))
    assert world.replica(key).status.verified_snapshot_id == "k-b"
    assert world.violations == []


def test_an_offer_the_repository_does_not_show_yet_is_found_within_seconds() -> None:
    """Canopy offers B 12 s before the repository's listing shows it."""
    world = World()
    key = _verified_on_a(world)
    world.run_for(timedelta(minutes=1))
    offered = world.now

    world.set_status(key, canopyDesiredSnapshotId="k-b")
    world.run_for(timedelta(seconds=12))
    condition = get_condition(world.replica(key).status.conditions, "SnapshotAvailable")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "CanopyDesiredSnapshotMissing")
    assert "listing again at" in condition.message
    assert world.restores == {}

    world.add_snapshot(snapshot("k-b", world.now))
    world.run_for(timedelta(seconds=30))
    [(at, _, name)] = [c for c in world.created if c[0] >= offered]
    assert world.restore(name).spec.snapshot == "k-b"
    # Within the 5 s steps of the backoff after it appeared, not 300 s.
    assert at - offered <= timedelta(seconds=20)


def test_a_missing_offer_is_looked_for_on_a_doubling_backoff() -> None:
    world = World()
    key = _verified_on_a(world)
    world.run_for(timedelta(minutes=1))
    offered = world.now

    world.set_status(key, canopyDesiredSnapshotId="k-never")
    world.run_for(timedelta(minutes=15))

    seconds = [d.total_seconds() for d in _listings_since(world, key, offered)]
    # At once, then 5, 10, 20, 40, 80, 160 s apart, then every relist_interval (300 s).
    assert seconds == [0, 5, 15, 35, 75, 155, 315, 615]
    assert world.restores == {}
    condition = get_condition(world.replica(key).status.conditions, "SnapshotAvailable")
    assert condition is not None and condition.reason == "CanopyDesiredSnapshotMissing"
    assert "listing again at 2026-03-01T00:" in condition.message
