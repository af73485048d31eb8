"""The checks that read a restore's data (issue 16), through the one reconciler shell in
simulated time: a verify replica's restore is checked on its ready server before it counts
as verified, damage fails it with the findings in its canopy report (never verified, never
served), an analytics replica is checked only when its annotation asks, and a damaged new
snapshot leaves the serving restore serving."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgro.api.names import ANNOTATION_VERIFY_DEPTH
from pgro.api.phases import RestorePhase
from pgro.core.plan import CheckData
from tests.scenarios.world import T0, World, replica_doc, snapshot

CANOPY = {"group": "6f1c0a4e-0000-4000-8000-000000000001", "type": "tamanu-postgres"}


def _canopy_verify(world: World) -> str:
    key = world.add_replica(
        replica_doc(
            "verify",
            namespace="canopy-verify-1",
            ephemeral=True,
            kopiaSecretRef=None,
            canopySource=CANOPY,
            schedule="H * * * *",
        )
    )
    world.set_status(key, canopyDesiredSnapshotId="k1")
    return key


def _annotated(doc: dict[str, Any], depth: str) -> dict[str, Any]:
    doc["metadata"].setdefault("annotations", {})[ANNOTATION_VERIFY_DEPTH] = depth
    return doc


def test_a_sound_snapshot_is_verified_only_after_its_checks() -> None:
    world = World(data_check_duration=timedelta(minutes=3))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = _canopy_verify(world)

    world.run_for(timedelta(minutes=2, seconds=30))
    [restore] = world.all_restores()
    # The server is up; the checks run (at the verify replica's default depth) and hold it.
    assert restore.status.phase is RestorePhase.READY
    assert world.data_checks[restore.name][1] == "standard"
    assert world.replica(key).status.verified_snapshot_id is None

    world.run_for(timedelta(minutes=10))
    assert world.restores == {}
    replica = world.replica(key)
    assert replica.status.verified_snapshot_id == "k1"
    [report] = replica.status.pending_verification_reports
    assert report.outcome == "success"
    assert report.health_details is not None
    assert [c["status"] for c in report.health_details["checks"]] == ["pass"]
    assert world.violations == []


def test_damage_fails_the_restore_names_it_in_the_report_and_is_never_verified() -> None:
    world = World(data_check_duration=timedelta(minutes=1), damaged_snapshots={"k1"})
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = _canopy_verify(world)

    world.run_for(timedelta(minutes=10))
    replica = world.replica(key)
    assert replica.status.verified_snapshot_id is None
    # Failed, and retried with the failure backoff: each attempt fails the same way.
    assert world.failures and {k for _, k in world.failures} == {key}
    report = replica.status.pending_verification_reports[0]
    assert {r.outcome for r in replica.status.pending_verification_reports} == {"failure"}
    assert report.error is not None and report.error.startswith("DataDamaged")
    assert "orders_pkey" in report.error
    assert report.health_details is not None
    [check] = report.health_details["checks"]
    assert (check["name"], check["status"]) == ("btree", "fail")
    assert "RestoreFailed" in world.event_reasons(key)
    # Never served.
    assert {snap for _, _, snap in world.data_checks.values()} == {"k1"}
    assert world.service.get(key) is None
    assert world.violations == []


def test_an_analytics_replica_is_checked_only_when_annotated() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    world.add_replica(replica_doc("plain"))
    world.run_for(timedelta(minutes=10))
    assert world.data_checks == {}

    world.add_replica(_annotated(replica_doc("checked"), "full"))
    world.run_for(timedelta(minutes=10))
    [(_, depth, _)] = world.data_checks.values()
    assert depth == "full"


def test_a_damaged_new_snapshot_leaves_the_serving_restore_serving() -> None:
    world = World(data_check_duration=timedelta(minutes=1))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(_annotated(replica_doc("analytics"), "standard"))
    world.run_for(timedelta(minutes=10))
    serving = world.service[key]
    assert world.restore(serving).spec.snapshot == "k1"

    world.damaged_snapshots.add("k2")
    world.add_snapshot(snapshot("k2", T0 + timedelta(hours=5)))
    world.run_for(timedelta(hours=7))
    assert world.service[key] == serving
    assert {snap for _, _, snap in world.data_checks.values()} == {"k1", "k2"}
    assert world.failures and {k for _, k in world.failures} == {key}
    assert "RestoreFailed" in world.event_reasons(key)
    assert world.violations == []


def test_a_restart_while_checking_does_not_start_the_checks_again() -> None:
    world = World(data_check_duration=timedelta(minutes=5))
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    planned: list[str] = []

    def spy(step: object) -> bool:
        if isinstance(step, CheckData):
            planned.append(step.restore)
        return False

    world.fail_step = spy
    key = _canopy_verify(world)
    world.run_for(timedelta(minutes=3))
    assert len(world.data_checks) == 1
    world.restart()
    world.run_for(timedelta(minutes=10))
    assert len(world.data_checks) == 1
    assert len(set(planned)) == 1
    assert world.replica(key).status.verified_snapshot_id == "k1"
