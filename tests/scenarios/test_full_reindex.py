"""The full reindex after `pg_resetwal` (issue 13, features.md §2.3 step 5), through the one
reconciler shell in simulated time: it starts once the restored server is up, runs while the
restore switches over and serves (it never gates readiness), is started again when the
controller that ran it restarted, and is never planned for a restore without a WAL reset."""

from __future__ import annotations

from datetime import timedelta

from pgro.api.phases import RestorePhase
from tests.scenarios.world import T0, World, replica_doc, snapshot


def test_the_reindex_runs_after_ready_while_the_restore_serves() -> None:
    world = World(reindex_duration=timedelta(minutes=40))
    world.reset_snapshots.add("k1")
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("analytics"))

    world.run_for(timedelta(minutes=15))
    serving = world.service[key]
    restore = world.restore(serving)
    # Served while the rebuild runs: it did not hold the switchover.
    assert restore.status.phase is RestorePhase.ACTIVE
    assert restore.status.fixes == {"reset_wal": True}
    assert restore.status.full_reindex == "running"
    [(started, name)] = world.reindex_starts
    assert name == serving
    assert restore.status.restored_at is not None and started >= restore.status.restored_at

    world.run_for(timedelta(hours=1))
    restore = world.restore(serving)
    assert restore.status.full_reindex == "complete"
    assert restore.status.fixes == {"reset_wal": True, "reindex": True}
    assert len(world.reindex_starts) == 1  # never started again once complete
    assert world.violations == []


def test_a_restart_mid_reindex_starts_it_again() -> None:
    world = World(reindex_duration=timedelta(minutes=40))
    world.reset_snapshots.add("k1")
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("analytics"))
    world.run_for(timedelta(minutes=20))
    assert len(world.reindex_starts) == 1

    world.restart()  # the thread that ran it is gone; the status still says running
    world.run_for(timedelta(minutes=5))
    assert [name for _, name in world.reindex_starts] == [world.service[key]] * 2
    world.run_for(timedelta(hours=1))
    assert world.restore(world.service[key]).status.full_reindex == "complete"
    assert world.violations == []


def test_a_restore_without_a_wal_reset_is_never_reindexed() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("analytics"))
    world.run_for(timedelta(hours=1))
    assert world.restore(world.service[key]).status.full_reindex is None
    assert world.reindex_starts == []
