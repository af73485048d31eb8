"""Random interleavings of everything that can happen to a fleet, checked for safety and
convergence: snapshots appearing (some not PostgreSQL), restores succeeding, failing and
being deleted by hand, listing outages, crashes between plan steps, controller restarts
(queue and listings lost) and clock jumps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgro.api.phases import RestorePhase
from pgro.core.plan import Step
from pgro.core.restore_set import is_in_progress, is_live
from pgro.core.settings import ReconcilerSettings
from tests.scenarios.world import T0, World, replica_doc, snapshot

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "tamanu-postgres"}


@dataclass(frozen=True)
class AddSnapshot:
    bad: bool


@dataclass(frozen=True)
class Advance:
    seconds: int


@dataclass(frozen=True)
class DeleteByHand:
    index: int


@dataclass(frozen=True)
class Outage:
    listing: bool
    restores: bool


@dataclass(frozen=True)
class Crashes:
    every: int  # 0: none; n: every n-th critical step fails


@dataclass(frozen=True)
class Restart:
    pass


@dataclass(frozen=True)
class Desire:
    index: int


Op = AddSnapshot | Advance | DeleteByHand | Outage | Crashes | Restart | Desire

ops = st.one_of(
    st.builds(AddSnapshot, bad=st.booleans()),
    st.builds(Advance, seconds=st.sampled_from([5, 30, 90, 600, 3600, 6 * 3600, 86400])),
    st.builds(DeleteByHand, index=st.integers(0, 10)),
    st.builds(Outage, listing=st.booleans(), restores=st.booleans()),
    st.builds(Crashes, every=st.sampled_from([0, 0, 2, 3, 7])),
    st.just(Restart()),
    st.builds(Desire, index=st.integers(0, 10)),
)

fleets = st.lists(
    st.tuples(
        st.booleans(),  # ephemeral
        st.booleans(),  # canopy
        st.sampled_from(["0 * * * *", "*/20 * * * *", "H */6 * * *", "0 0 1 1 *"]),
        st.sampled_from(["0s", "10m"]),
    ),
    min_size=1,
    max_size=3,
)


def _build(fleet: list[tuple[bool, bool, str, str]], limit: int, seed: int) -> World:
    world = World(
        limit=limit,
        seed=seed,
        deletion_delay=timedelta(seconds=20),
        work_duration=timedelta(minutes=3),
        # The safety-net requeue stretched: convergence must come from the decisions'
        # own wake-up times, and the long simulated days stay cheap.
        settings=ReconcilerSettings(idle_requeue=timedelta(hours=6)),
    )
    for index, (ephemeral, canopy, schedule, jitter) in enumerate(fleet):
        spec: dict[str, object] = {
            "schedule": schedule,
            "scheduleJitter": jitter,
            "ephemeral": ephemeral,
            "switchoverGracePeriod": "2m",
        }
        if canopy:
            spec.update(kopiaSecretRef=None, canopySource=CANOPY)
        world.add_replica(replica_doc("replica", namespace=f"ns-{index}", **spec))
    return world


def _add_snapshot(world: World, id: str, bad: bool = False) -> None:
    # Strictly newer than any before, so "the newest snapshot" is never a tie.
    latest = max(datetime.fromisoformat(s.start_time) for s in world.snapshots)
    world.add_snapshot(snapshot(id, max(world.now, latest + timedelta(seconds=1))), bad=bad)


def _apply(world: World, op: Op, counter: list[int]) -> None:
    match op:
        case AddSnapshot(bad):
            _add_snapshot(world, f"k{len(world.snapshots):03d}", bad=bad)
        case Advance(seconds):
            world.run_for(timedelta(seconds=seconds))
        case DeleteByHand(index):
            names = sorted(world.restores)
            if names:
                world.delete_restore_by_hand(names[index % len(names)])
        case Outage(listing, restores):
            world.listing_error = "connection refused" if listing else None
            world.restore_outage = restores
        case Crashes(every):
            counter[0] = every
        case Restart():
            world.restart()
        case Desire(index):
            if world.snapshots:
                wanted = world.snapshots[index % len(world.snapshots)].id
                for key in world.replicas:
                    if world.replica(key).spec.canopy_source is not None:
                        world.set_status(key, canopyDesiredSnapshotId=wanted)


def _check_now(world: World) -> None:
    for key in world.replicas:
        live = [r for r in world.restores_of(key) if is_live(r)]
        snapshots = [r.spec.snapshot for r in live]
        assert len(snapshots) == len(set(snapshots)), f"{key}: duplicate live restores {snapshots}"
        assert len(live) <= 3, f"{key}: {len(live)} live restores"


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    fleet=fleets,
    limit=st.integers(1, 2),
    seed=st.integers(0, 1000),
    script=st.lists(ops, min_size=1, max_size=25),
)
def test_random_interleavings_are_safe_and_converge(
    fleet: list[tuple[bool, bool, str, str]], limit: int, seed: int, script: list[Op]
) -> None:
    world = _build(fleet, limit, seed)
    world.add_snapshot(snapshot("k-initial", T0 - timedelta(hours=1)))
    crash_every = [0]
    critical_steps = [0]

    def crash(step: Step) -> bool:
        critical_steps[0] += 1
        return crash_every[0] > 0 and critical_steps[0] % crash_every[0] == 0

    world.fail_step = crash
    for op in script:
        _apply(world, op, crash_every)
        _check_now(world)
        assert world.violations == []

    # Calm: no faults, one fresh good snapshot every canopy replica wants.
    crash_every[0] = 0
    world.listing_error = None
    world.restore_outage = False
    _add_snapshot(world, "k-final")
    for key in world.replicas:
        if world.replica(key).spec.canopy_source is not None:
            world.set_status(key, canopyDesiredSnapshotId="k-final")
        else:
            # A replica's schedule may be yearly; the calm must not wait a year for it.
            world.set_spec(key, schedule="0 * * * *")
    world.run_for(timedelta(days=2))
    _check_now(world)
    assert world.violations == []

    for key in world.replicas:
        replica = world.replica(key)
        mine = world.restores_of(key)
        assert not any(is_in_progress(r) for r in mine), f"{key}: still restoring"
        assert not any(r.status.phase is RestorePhase.FAILED for r in mine)
        if replica.spec.ephemeral:
            assert mine == [], f"{key}: verify replica kept {[r.name for r in mine]}"
            assert replica.status.verified_snapshot_id == "k-final"
            assert replica.status.current_restore is None
        else:
            assert [r.name for r in mine] == [replica.status.current_restore]
            assert mine[0].spec.snapshot == "k-final"
            assert mine[0].status.phase is RestorePhase.ACTIVE
            assert world.service[key] == mine[0].name
        assert (replica.status.consecutive_restore_failures or 0) == 0
    assert world.queue.slots == () and world.queue.waiting == ()

    # Converged means quiet: a day with no news writes no status outside schedule fires.
    patches = len(world.replica_patches)
    world.run_for(timedelta(hours=12))
    extra = [patch for _, _, patch in world.replica_patches[patches:]]
    assert all(set(p) <= {"nextScheduledRestore", "scheduleInputHash"} for p in extra), extra
