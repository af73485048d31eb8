from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pgro.api.phases import JobPhase, ReplicaPhase
from pgro.api.replica import ConnectionInfo, PostgresPhysicalReplicaStatus
from pgro.api.restore import JobStatus, PostgresPhysicalRestoreStatus
from pgro.core.plan import DeleteRestore, EmitEvent, EventType, MarkOutgoing, StatusDraft

NOW = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def test_setting_equal_values_yields_no_patch() -> None:
    status = PostgresPhysicalReplicaStatus(
        phase=ReplicaPhase.READY, service_name="fiji", last_restore_completed_at=NOW
    )
    draft = StatusDraft(status, NOW)
    draft.set(phase=ReplicaPhase.READY, service_name="fiji", last_restore_completed_at=NOW)
    draft.condition("KopiaSecretValid", "True", "SecretValid", "ok")
    first = draft.take()
    assert set(first) == {"conditions"}
    again = StatusDraft(draft.base, NOW + timedelta(seconds=5))
    again.condition("KopiaSecretValid", "True", "SecretValid", "ok")
    assert again.patch() == {}


def test_times_are_whole_seconds_so_rewrites_compare_equal() -> None:
    draft = StatusDraft(PostgresPhysicalReplicaStatus(), NOW)
    draft.set(next_scheduled_restore=NOW)
    assert draft.patch() == {"nextScheduledRestore": "2026-03-01T12:00:00Z"}
    settled = StatusDraft(draft.result(), NOW)
    settled.set(next_scheduled_restore=NOW)
    assert settled.patch() == {}


def test_removed_fields_are_null_and_nested_objects_are_diffed() -> None:
    status = PostgresPhysicalRestoreStatus(
        restore_job=JobStatus(name="j", phase=JobPhase.SUCCEEDED, completed_at=NOW),
        pvc="x",
    )
    draft = StatusDraft(status, NOW)
    draft.set(restore_job=JobStatus(name="j", phase=JobPhase.RUNNING), pvc=None)
    assert draft.patch() == {
        "restoreJob": {"phase": "Running", "completedAt": None},
        "pvc": None,
    }


def test_setting_back_the_original_value_drops_the_change() -> None:
    info = ConnectionInfo(
        host="h", port=5432, database="postgres", username="a", password_secret="s"
    )
    draft = StatusDraft(PostgresPhysicalReplicaStatus(connection_info=info), NOW)
    draft.set(connection_info=info.model_copy(update={"port": 1}))
    draft.set(connection_info=info)
    assert not draft.changed


def test_best_effort_steps() -> None:
    assert EmitEvent(EventType.NORMAL, "R", "n").best_effort
    assert MarkOutgoing("r").best_effort
    assert not DeleteRestore("r").best_effort


def test_apply_in_order_stops_at_a_failing_step_but_not_a_best_effort_one() -> None:
    from pgro.core.plan import (
        EmitEvent,
        EventType,
        ListSnapshots,
        PatchReplicaStatus,
        apply_in_order,
    )

    event = EmitEvent(EventType.NORMAL, "R", "n")
    listing = ListSnapshots()
    patch = PatchReplicaStatus({"phase": "Ready"})
    applied: list[object] = []
    failures: list[object] = []

    def apply(step: object) -> None:
        if step in (event, listing):
            raise RuntimeError("boom")
        applied.append(step)

    def failed(step: object, exc: Exception) -> None:
        failures.append(step)

    assert apply_in_order([event, patch, listing, patch], apply, failed) is False
    assert applied == [patch]  # the event failed but did not stop the plan; the listing did
    assert failures == [event, listing]
    assert apply_in_order([patch, event], apply, failed) is True


def test_unsupported_switchover_step_names_the_runtime_and_the_phase_it_owns() -> None:
    from pgro.core.plan import SwitchoverStep, unsupported_switchover_step

    patch, note = unsupported_switchover_step(SwitchoverStep.REDACTION, "pgro run")
    assert patch == {"redactionPhase": "failed: redaction is not supported by pgro run yet"}
    assert note == "redaction is not supported by pgro run yet"
    assert unsupported_switchover_step(SwitchoverStep.SCHEMA_BUILD, "x")[0] == {}
