from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pgro.api.conditions import Condition, get_condition, set_condition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def _condition(type: str, status: str, at: datetime = T0) -> Condition:
    return Condition.model_validate(
        {
            "type": type,
            "status": status,
            "reason": "R",
            "message": "m",
            "lastTransitionTime": at,
        }
    )


def test_new_condition_is_appended_with_now() -> None:
    existing = [_condition("A", "True")]
    result = set_condition(existing, "B", "False", "Why", "because", T1, observed_generation=3)
    assert [c.type for c in result] == ["A", "B"]
    added = result[1]
    assert (added.status, added.reason, added.message) == ("False", "Why", "because")
    assert added.last_transition_time == T1
    assert added.observed_generation == 3


def test_same_status_keeps_transition_time_but_updates_the_rest() -> None:
    result = set_condition([_condition("A", "True")], "A", "True", "New", "newer", T1, 7)
    assert len(result) == 1
    assert result[0].last_transition_time == T0
    assert (result[0].reason, result[0].message, result[0].observed_generation) == (
        "New",
        "newer",
        7,
    )


def test_changed_status_moves_transition_time() -> None:
    result = set_condition([_condition("A", "True")], "A", "False", "Broke", "x", T1)
    assert result[0].status == "False"
    assert result[0].last_transition_time == T1


def test_position_is_kept_and_input_is_not_mutated() -> None:
    original = [_condition("A", "True"), _condition("B", "True"), _condition("C", "True")]
    snapshot = [c.model_copy() for c in original]
    result = set_condition(original, "B", "False", "R", "m", T1)
    assert [c.type for c in result] == ["A", "B", "C"]
    assert result[1].status == "False"
    assert original == snapshot


def test_repeated_types_collapse_into_the_first() -> None:
    conditions = [_condition("A", "True"), _condition("B", "True"), _condition("A", "False")]
    result = set_condition(conditions, "A", "True", "R", "m", T1)
    assert [c.type for c in result] == ["A", "B"]
    assert result[0].last_transition_time == T0


def test_get_condition() -> None:
    conditions = [_condition("A", "True"), _condition("B", "False")]
    found = get_condition(conditions, "B")
    assert found is not None
    assert found.status == "False"
    assert not found.is_true
    assert get_condition(conditions, "Z") is None


def test_condition_wire_form() -> None:
    condition = Condition.model_validate(
        {
            "type": "KopiaSecretValid",
            "status": "True",
            "reason": "SecretValid",
            "message": "All required keys present",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 2,
        }
    )
    assert condition.to_wire() == {
        "type": "KopiaSecretValid",
        "status": "True",
        "reason": "SecretValid",
        "message": "All required keys present",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 2,
    }


def test_condition_reason_and_message_default_to_empty() -> None:
    condition = Condition.model_validate(
        {"type": "A", "status": "Unknown", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    )
    assert (condition.reason, condition.message) == ("", "")


@pytest.mark.parametrize("status", ["true", "Yes", "", None])
def test_condition_status_must_be_true_false_or_unknown(status: object) -> None:
    with pytest.raises(ValidationError):
        Condition.model_validate(
            {"type": "A", "status": status, "lastTransitionTime": "2026-01-01T00:00:00Z"}
        )


_statuses = st.sampled_from(["True", "False", "Unknown"])


@given(st.lists(_statuses, min_size=1, max_size=10))
def test_transition_time_is_when_the_status_last_changed(statuses: list[str]) -> None:
    conditions: list[Condition] = []
    expected_time = T0
    previous: str | None = None
    for step, status in enumerate(statuses):
        now = T0 + timedelta(minutes=step)
        if status != previous:
            expected_time = now
        conditions = set_condition(conditions, "A", status, "R", "m", now)  # type: ignore[arg-type]
        previous = status
    assert len(conditions) == 1
    assert conditions[0].last_transition_time == expected_time
