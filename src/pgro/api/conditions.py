"""Kubernetes-style status conditions and the rule for updating them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import Field

from pgro.api.base import ApiModel
from pgro.api.timestamp import Timestamp

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    type: str
    status: ConditionStatus
    # Older writers sometimes left these out; an empty value is still a condition.
    reason: str = ""
    message: str = ""
    last_transition_time: Timestamp
    observed_generation: int | None = Field(default=None, ge=0)

    @property
    def is_true(self) -> bool:
        return self.status == "True"


def get_condition(conditions: Sequence[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)


def set_condition(
    conditions: Sequence[Condition],
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with `type` set; other conditions and their order are kept.

    `lastTransitionTime` moves only when the status changes, so it says how long the
    condition has been in its current state, not when it was last written.
    """
    existing = get_condition(conditions, type)
    transition_time = (
        existing.last_transition_time if existing is not None and existing.status == status else now
    )
    updated = Condition(
        type=type,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition_time,
        observed_generation=observed_generation,
    )
    if existing is None:
        return [*conditions, updated]
    # A hand-edited list may repeat a type; the first entry's place wins.
    return [updated if c is existing else c for c in conditions if c.type != type or c is existing]
