from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from pgro.api.phases import (
    JobPhase,
    RedactionPhase,
    ReplicaPhase,
    RestorePhase,
    SchemaMigrationPhase,
)


@pytest.mark.parametrize(
    ("wire", "state", "reason"),
    [
        ("active", "active", ""),
        ("complete", "complete", ""),
        ("partial", "partial", ""),
        ("timeout-skipped", "timeout-skipped", ""),
        ("failed: connection refused", "failed", "connection refused"),
        ("failed:connection refused", "failed", "connection refused"),
        ("failed:   spaced out  ", "failed", "spaced out"),
        ("failed: ", "failed", ""),
        ("failed: a: b", "failed", "a: b"),
    ],
)
def test_schema_migration_phase_parses_wire_strings(wire: str, state: str, reason: str) -> None:
    phase = SchemaMigrationPhase.parse(wire)
    assert (phase.state, phase.reason) == (state, reason)


@pytest.mark.parametrize(
    "phase",
    [
        SchemaMigrationPhase.ACTIVE,
        SchemaMigrationPhase.COMPLETE,
        SchemaMigrationPhase.PARTIAL,
        SchemaMigrationPhase.TIMEOUT_SKIPPED,
        SchemaMigrationPhase.failed("connection refused"),
        SchemaMigrationPhase.failed(""),
    ],
)
def test_schema_migration_phase_round_trips(phase: SchemaMigrationPhase) -> None:
    assert SchemaMigrationPhase.parse(phase.wire) == phase


def test_wire_strings_are_the_public_contract() -> None:
    assert SchemaMigrationPhase.ACTIVE.wire == "active"
    assert SchemaMigrationPhase.COMPLETE.wire == "complete"
    assert SchemaMigrationPhase.PARTIAL.wire == "partial"
    assert SchemaMigrationPhase.TIMEOUT_SKIPPED.wire == "timeout-skipped"
    assert SchemaMigrationPhase.failed("boom").wire == "failed: boom"
    assert str(SchemaMigrationPhase.failed("boom")) == "failed: boom"
    assert RedactionPhase.failed("manifest 404").wire == "failed: manifest 404"


@pytest.mark.parametrize(
    "wire", ["what", "", "Active", "COMPLETE", "failed", "failure: x", " active", "done"]
)
def test_schema_migration_phase_rejects_unknown_strings(wire: str) -> None:
    with pytest.raises(ValueError, match="unknown schema migration phase") as caught:
        SchemaMigrationPhase.parse(wire)
    assert repr(wire) in str(caught.value)
    assert "'timeout-skipped'" in str(caught.value)


@pytest.mark.parametrize("wire", ["timeout-skipped", "halfway", "failed"])
def test_redaction_phase_rejects_unknown_strings(wire: str) -> None:
    with pytest.raises(ValueError, match="unknown redaction phase"):
        RedactionPhase.parse(wire)


def test_phase_constructor_checks_state_and_reason() -> None:
    with pytest.raises(ValueError, match="unknown redaction phase state"):
        RedactionPhase("timeout-skipped")
    with pytest.raises(ValueError, match="only a failed"):
        SchemaMigrationPhase("complete", "why")


@pytest.mark.parametrize(
    ("phase", "settled"),
    [
        (SchemaMigrationPhase.ACTIVE, False),
        (SchemaMigrationPhase.COMPLETE, True),
        (SchemaMigrationPhase.PARTIAL, True),
        (SchemaMigrationPhase.TIMEOUT_SKIPPED, True),
        (SchemaMigrationPhase.failed("x"), True),
    ],
)
def test_schema_migration_settled_is_anything_but_active(
    phase: SchemaMigrationPhase, settled: bool
) -> None:
    assert phase.settled is settled
    assert phase.is_active is not settled


@pytest.mark.parametrize(
    ("phase", "settled", "done"),
    [
        (RedactionPhase.ACTIVE, False, False),
        (RedactionPhase.COMPLETE, True, True),
        (RedactionPhase.PARTIAL, True, True),
        (RedactionPhase.failed("x"), True, False),
    ],
)
def test_redaction_settled_is_wider_than_done(
    phase: RedactionPhase, settled: bool, done: bool
) -> None:
    assert phase.settled is settled
    assert phase.done is done


def test_phases_of_different_steps_are_not_equal() -> None:
    redaction: object = RedactionPhase.COMPLETE
    assert redaction != SchemaMigrationPhase.COMPLETE
    assert SchemaMigrationPhase.parse("complete") == SchemaMigrationPhase.COMPLETE
    assert SchemaMigrationPhase.failed("a") != SchemaMigrationPhase.failed("b")


class _Holder(BaseModel):
    migration: SchemaMigrationPhase | None = None
    redaction: RedactionPhase | None = None


def test_phase_fields_read_and_write_wire_strings() -> None:
    holder = _Holder.model_validate(
        {"migration": "failed:  connection refused ", "redaction": "partial"}
    )
    assert holder.migration == SchemaMigrationPhase.failed("connection refused")
    assert holder.redaction == RedactionPhase.PARTIAL
    expected = {"migration": "failed: connection refused", "redaction": "partial"}
    assert holder.model_dump(mode="json") == expected
    assert holder.model_dump() == expected
    assert _Holder(migration=SchemaMigrationPhase.ACTIVE).migration == SchemaMigrationPhase.ACTIVE


@pytest.mark.parametrize("raw", ["halfway", 3, ["active"]])
def test_phase_fields_reject_unknown_values(raw: object) -> None:
    with pytest.raises(ValidationError):
        _Holder.model_validate({"migration": raw})


def test_enum_phase_strings() -> None:
    assert [p.value for p in ReplicaPhase] == ["Pending", "Restoring", "Ready", "Failed"]
    assert [p.value for p in RestorePhase] == [
        "Pending",
        "Restoring",
        "Migrating",
        "Ready",
        "Switching",
        "Active",
        "Failed",
    ]
    assert [p.value for p in JobPhase] == ["Running", "Succeeded", "Failed"]
