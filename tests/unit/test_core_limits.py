"""Backoff, sizing, readiness timeout and restore names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgro.api.replica import PostgresPhysicalReplicaStatus
from pgro.core.backoff import backoff_pending, failure_backoff, listing_retry_delay
from pgro.core.naming import restore_name
from pgro.core.sizing import StorageLimitExceeded, restore_storage_size
from pgro.core.timeouts import readiness_timeout

GIB = 1024**3
MIB = 1024**2
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 0), (1, 120), (2, 240), (3, 480), (4, 960), (5, 1920), (6, 3600), (7, 3600), (1000, 3600)],
)
def test_failure_backoff_table(failures: int, seconds: int) -> None:
    assert failure_backoff(failures) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("failures", "next_in", "pending"),
    [
        (0, timedelta(minutes=5), False),
        (None, timedelta(minutes=5), False),
        (1, timedelta(minutes=2), True),
        (3, timedelta(seconds=1), True),
        # Further ahead than one failure's backoff (120 s): the schedule's next fire time.
        (1, timedelta(minutes=5), False),
        (1, timedelta(days=300), False),
        (6, timedelta(minutes=59), True),
        (1, timedelta(0), False),
        (1, timedelta(minutes=-5), False),
        (2, None, False),
    ],
)
def test_backoff_pending(failures: int | None, next_in: timedelta | None, pending: bool) -> None:
    status = PostgresPhysicalReplicaStatus(
        consecutive_restore_failures=failures,
        next_scheduled_restore=NOW + next_in if next_in is not None else None,
    )
    assert backoff_pending(status, NOW) is pending


def test_listing_retry_delay_doubles_to_fifteen_minutes() -> None:
    delays = [listing_retry_delay(n).total_seconds() for n in range(8)]
    assert delays == [0, 30, 60, 120, 240, 480, 900, 900]


def test_storage_grows_snapshot_by_a_tenth() -> None:
    assert restore_storage_size(100 * GIB, maximum=2048 * GIB) == 110 * GIB


def test_storage_with_override_floor_is_still_above_the_snapshot() -> None:
    size = restore_storage_size(120 * GIB, maximum=2048 * GIB, floor=50 * GIB)
    assert size > 120 * GIB


def test_storage_floor_applies_to_small_snapshots() -> None:
    assert restore_storage_size(250 * MIB, maximum=2048 * GIB, floor=50 * GIB) == 50 * GIB


def test_storage_floor_above_maximum_is_clamped() -> None:
    assert restore_storage_size(250 * MIB, maximum=10 * GIB, floor=50 * GIB) == 10 * GIB


def test_storage_limit_exceeded() -> None:
    with pytest.raises(StorageLimitExceeded) as raised:
        restore_storage_size(500 * GIB, maximum=100 * GIB)
    assert raised.value.computed == 550 * GIB
    assert "Computed PVC size (550Gi) exceeds storageSizeMaximum (100Gi)" in str(raised.value)


def test_only_the_derived_size_is_limited_not_the_floor() -> None:
    assert restore_storage_size(GIB, maximum=2 * GIB, floor=50 * GIB) == 2 * GIB


@pytest.mark.parametrize(
    ("snapshot", "measured", "expected"),
    [
        (100 * GIB, None, 100 * GIB + 10 * GIB + 5 * GIB),
        (100 * GIB, 30 * GIB, 100 * GIB + 30 * GIB + 5 * GIB),
        (100 * GIB, 1 * GIB, 100 * GIB + 10 * GIB + 5 * GIB),
        (0, None, 5 * GIB),
    ],
)
def test_storage_with_persistent_schemas(
    snapshot: int, measured: int | None, expected: int
) -> None:
    size = restore_storage_size(
        snapshot,
        maximum=4096 * GIB,
        persistent_schemas=True,
        persistent_schema_data_size=measured,
    )
    assert size == expected


def test_storage_rounds_up_to_a_whole_byte() -> None:
    assert restore_storage_size(11, maximum=GIB) == 13


def test_ready_timeout_grows_with_snapshot_size() -> None:
    small = readiness_timeout(10 * GIB)
    large = readiness_timeout(500 * GIB)
    assert large > small
    assert readiness_timeout(100 * GIB) == timedelta(seconds=1800 + 900)


def test_ready_timeout_never_below_the_default() -> None:
    assert readiness_timeout(MIB) >= timedelta(seconds=1800)
    assert readiness_timeout(0) == timedelta(seconds=1800)


def test_explicit_ready_timeout_wins() -> None:
    assert readiness_timeout(500 * GIB, timedelta(minutes=90)) == timedelta(minutes=90)
    assert readiness_timeout(500 * GIB, timedelta(minutes=5)) == timedelta(minutes=5)


def test_restore_name_is_replica_and_utc_second() -> None:
    when = datetime(2026, 3, 1, 23, 4, 5, tzinfo=UTC)
    assert restore_name("analytics", when, set()) == "analytics-20260301-230405"


def test_restore_names_created_in_the_same_second_do_not_collide() -> None:
    when = datetime(2026, 3, 1, 23, 4, 5, tzinfo=UTC)
    taken: set[str] = set()
    for _ in range(4):
        taken.add(restore_name("analytics", when, taken))
    assert taken == {
        "analytics-20260301-230405",
        "analytics-20260301-230405-2",
        "analytics-20260301-230405-3",
        "analytics-20260301-230405-4",
    }


def test_restore_name_fits_in_a_kubernetes_name() -> None:
    long = "r" * 60
    name = restore_name(long, NOW, {f"{'r' * 47}-20260301-120000"})
    assert len(name) <= 63
    assert name.endswith("-20260301-120000-2")
