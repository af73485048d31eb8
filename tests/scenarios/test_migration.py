"""`migrateTo` (features §2.2) through the one reconciler shell, in simulated time: the
restore migrates once between Ready and Switching, a failed migration is a finding (the
restore still verifies and serves), a controller restart never starts the migrator again,
and the stable endpoint never points at a restore whose migration has not ended."""

from __future__ import annotations

from datetime import timedelta

from pgro.api.phases import RestorePhase
from tests.scenarios.world import T0, World, replica_doc, snapshot

TARGET = {"version": "2.31.0", "versionId": "44444444-4444-4444-4444-444444444444"}
CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "tamanu-postgres"}


def _verify_world(*, fails: bool = False) -> tuple[World, str]:
    world = World(migration_duration=timedelta(minutes=10), migration_fails=fails)
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(
        replica_doc(
            "upgrade",
            namespace="canopy-upgrade-1",
            ephemeral=True,
            migrateTo=TARGET,
            kopiaSecretRef=None,
            canopySource=CANOPY,
            schedule="H * * * *",
        )
    )
    world.set_status(key, canopyDesiredSnapshotId="k1")
    return world, key


def test_an_upgrade_rehearsal_migrates_once_then_verifies_and_tears_down() -> None:
    world, key = _verify_world()
    world.run_for(timedelta(minutes=5))
    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.MIGRATING
    assert restore.spec.migrate_to is not None
    assert world.migration_starts == [restore.name]

    world.run_for(timedelta(minutes=15))
    assert world.migration_starts == [restore.name]  # polled, never started again
    assert world.restores == {}  # verified and torn down
    replica = world.replica(key)
    assert replica.status.verified_snapshot_id == "k1"
    [report] = replica.status.pending_verification_reports
    assert report.outcome == "success"
    assert report.migrate_to is not None and report.migrate_to.version == "2.31.0"
    assert report.migration_result is not None and report.migration_result.passed
    assert "RestoreFailed" not in world.event_reasons(key)
    assert world.violations == []


def test_a_failed_migration_is_reported_and_does_not_fail_the_restore() -> None:
    world, key = _verify_world(fails=True)
    world.run_for(timedelta(minutes=20))
    replica = world.replica(key)
    assert replica.status.verified_snapshot_id == "k1"
    [report] = replica.status.pending_verification_reports
    assert report.outcome == "success"
    assert report.migration_result is not None
    assert report.migration_result.failed_migration == "001-a.js"
    assert world.failures == []
    assert world.violations == []


def test_a_restart_during_the_migration_does_not_start_it_again() -> None:
    world, key = _verify_world()
    world.run_for(timedelta(minutes=5))
    [restore] = world.all_restores()
    assert restore.status.phase is RestorePhase.MIGRATING
    world.restart()
    world.run_for(timedelta(minutes=2))
    world.restart()
    world.run_for(timedelta(minutes=15))
    assert world.migration_starts == [restore.name]
    assert world.replica(key).status.verified_snapshot_id == "k1"
    assert world.violations == []


def test_an_analytics_replica_keeps_serving_while_its_next_restore_migrates() -> None:
    world = World(migration_duration=timedelta(minutes=30))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(replica_doc("analytics", migrateTo=TARGET))
    world.run_for(timedelta(minutes=40))
    first = world.replica(key).status.current_restore
    assert first is not None and world.service[key] == first

    # The next scheduled refresh (every six hours) restores a newer snapshot.
    world.add_snapshot(snapshot("k2", T0 + timedelta(hours=1)))
    world.run_until(T0 + timedelta(hours=6, minutes=10))
    second = next(r.name for r in world.all_restores() if r.name != first)
    assert world.restore(second).status.phase is RestorePhase.MIGRATING
    assert world.service[key] == first  # the serving restore keeps serving

    world.run_for(timedelta(minutes=30))
    assert world.service[key] == second
    assert world.migration_starts == [first, second]
    # The world flags any RunMigration aimed at the restore the endpoint serves.
    assert world.violations == []
