"""Why a replica should restore now: the four triggers of the reference."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pgro.core.schedule import ScheduleDecision, check_schedule, within_minimum_ttl


@dataclass(frozen=True)
class Triggers:
    never_restored: bool
    active_restore_deleted: bool
    canopy_desired_changed: bool
    schedule: ScheduleDecision

    @property
    def should_restore(self) -> bool:
        return (
            self.never_restored
            or self.active_restore_deleted
            or self.canopy_desired_changed
            or self.schedule is ScheduleDecision.TRIGGER
        )

    @property
    def by_state(self) -> bool:
        """A trigger other than the schedule fired: the replica's state, not the clock,
        asks for a restore (the listing rules differ, see `replica_decision`)."""
        return self.never_restored or self.active_restore_deleted or self.canopy_desired_changed

    @property
    def names(self) -> tuple[str, ...]:
        fired = (
            ("never-restored", self.never_restored),
            ("active-restore-deleted", self.active_restore_deleted),
            ("canopy-desired-changed", self.canopy_desired_changed),
            ("schedule", self.schedule is ScheduleDecision.TRIGGER),
        )
        return tuple(name for name, on in fired if on)


def evaluate_triggers(
    *,
    now: datetime,
    serving_snapshot: str | None,
    has_serving: bool,
    current_restore: str | None,
    last_restore_completed_at: datetime | None,
    verified_snapshot_id: str | None,
    canopy: bool,
    canopy_desired_snapshot_id: str | None,
    minimum_ttl: timedelta | None,
    next_scheduled_restore: datetime | None,
    schedule_valid: bool,
    backoff_pending: bool,
) -> Triggers:
    """The triggers, evaluated when no restore is in progress.

    Every trigger waits for a pending failure backoff. The reference gated only
    never-restored and the schedule, so a canopy replica, or one whose serving restore
    was deleted, retried a failing restore as fast as it could fail.

    On the canopy path the effective current snapshot is the serving restore's, else
    `verifiedSnapshotId`: after a verify replica's teardown nothing is serving, and
    without the fallback the desired snapshot would look new forever.
    """
    within_ttl = within_minimum_ttl(minimum_ttl, last_restore_completed_at, now)
    effective_current = serving_snapshot if has_serving else verified_snapshot_id
    schedule = (
        check_schedule(next_scheduled_restore, minimum_ttl, last_restore_completed_at, now)
        if schedule_valid
        else ScheduleDecision.NOT_DUE
    )
    return Triggers(
        never_restored=not has_serving
        and last_restore_completed_at is None
        and not backoff_pending,
        active_restore_deleted=not has_serving
        and current_restore is not None
        and not backoff_pending,
        canopy_desired_changed=(
            canopy
            and canopy_desired_snapshot_id is not None
            and effective_current != canopy_desired_snapshot_id
            and not within_ttl
            and not backoff_pending
        ),
        schedule=schedule,
    )
