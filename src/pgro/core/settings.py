"""Operator-wide numbers the decisions use; the defaults are the reference's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from pgro.core.queue import DEFAULT_UNBACKED_GRACE
from pgro.core.timeouts import BASE_READY_TIMEOUT_S

MAX_RESTORES_PER_REPLICA: Final = 3


@dataclass(frozen=True)
class ReconcilerSettings:
    # Live (not Failed) restores a replica may have before creation is refused.
    max_restores_per_replica: int = MAX_RESTORES_PER_REPLICA
    # Failed restores are deleted this long after their creation.
    failed_restore_retention: timedelta = timedelta(seconds=300)
    # A listing younger than this serves triggers that are not the schedule; it is also
    # how often a replica waiting for a snapshot that is not there yet lists again.
    relist_interval: timedelta = timedelta(seconds=300)
    # `DEPLOYMENT_READY_TIMEOUT_SECS`: the readiness timeout never goes below it.
    ready_timeout_floor_s: int = BASE_READY_TIMEOUT_S
    # The longest a decision lets pass before it wants to run again.
    idle_requeue: timedelta = timedelta(seconds=300)
    unbacked_slot_grace: timedelta = DEFAULT_UNBACKED_GRACE


DEFAULT_SETTINGS: Final = ReconcilerSettings()
