"""How long to wait after failures: failed restores and failed snapshot listings."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from pgro.api.replica import PostgresPhysicalReplicaStatus

RESTORE_BACKOFF_UNIT: Final = timedelta(seconds=60)
RESTORE_BACKOFF_MIN: Final = timedelta(seconds=120)
RESTORE_BACKOFF_MAX: Final = timedelta(seconds=3600)
# Past this the doubling has long hit the maximum; the cap keeps 2**n small.
_MAX_EXPONENT: Final = 20

LISTING_RETRY_MIN: Final = timedelta(seconds=30)
LISTING_RETRY_MAX: Final = timedelta(minutes=15)


def _clamped_doubling(
    failures: int, unit: timedelta, lowest: timedelta, highest: timedelta
) -> timedelta:
    if failures <= 0:
        return timedelta(0)
    doubled: timedelta = unit * 2 ** min(failures, _MAX_EXPONENT)
    return max(lowest, min(highest, doubled))


def failure_backoff(consecutive_failures: int) -> timedelta:
    """`clamp(60 s × 2^n, 120 s, 3600 s)`: 120, 240, 480, 960, 1920, then 3600 s; 0 → none.

    Never a permanent stop: most failures are external (capacity, cloud APIs, upstream
    snapshots) and heal by themselves, so retries continue hourly without a person.
    """
    return _clamped_doubling(
        consecutive_failures, RESTORE_BACKOFF_UNIT, RESTORE_BACKOFF_MIN, RESTORE_BACKOFF_MAX
    )


def in_backoff(failures: int, next_at: datetime | None, now: datetime) -> bool:
    """A failed restore's backoff has not elapsed.

    Right after a failure `nextScheduledRestore` holds the backoff's end, at most
    `failure_backoff(failures)` ahead. Once the backoff has run out, the schedule moves
    `nextScheduledRestore` to its next fire time while the failure count stays (it resets
    only at a switchover); a time further ahead than any backoff of that count is that
    schedule time, not a backoff. Without this, a canopy replica on a yearly fallback
    schedule ignored new desired snapshots for a year after one failed restore.
    """
    return failures > 0 and next_at is not None and now < next_at <= now + failure_backoff(failures)


def backoff_pending(status: PostgresPhysicalReplicaStatus, now: datetime) -> bool:
    return in_backoff(status.consecutive_restore_failures or 0, status.next_scheduled_restore, now)


def listing_retry_delay(consecutive_failures: int) -> timedelta:
    """30 s, 1 m, 2 m, … up to 15 m after a failed snapshot listing.

    The reference kept a failed listing Job for 24 h and would not list again meanwhile;
    a repository that was briefly unreachable then blocked restores for a day.
    """
    return _clamped_doubling(
        consecutive_failures, LISTING_RETRY_MIN / 2, LISTING_RETRY_MIN, LISTING_RETRY_MAX
    )
