from __future__ import annotations

import hashlib
import random
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgro.core.schedule import (
    InvalidSchedule,
    ScheduleDecision,
    check_schedule,
    jitter_offset,
    jittered_next,
    migration_budget,
    parse_schedule,
    schedule_input_hash,
    schedule_seed,
    within_minimum_ttl,
)

NOW = datetime(2026, 3, 1, 10, 17, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("0 */6 * * *", NOW, datetime(2026, 3, 1, 12, 0, tzinfo=UTC)),
        (
            "0 */6 * * *",
            datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
            datetime(2026, 3, 1, 18, 0, tzinfo=UTC),
        ),
        ("* * * * *", NOW, datetime(2026, 3, 1, 10, 18, tzinfo=UTC)),
        ("0 0 1 1 *", NOW, datetime(2027, 1, 1, tzinfo=UTC)),
        # 15:20 in Auckland (NZDT, +13:00 on 1 March) is 02:20 UTC.
        ("20 15 * * * Pacific/Auckland", NOW, datetime(2026, 3, 2, 2, 20, tzinfo=UTC)),
        ("0 9 * * 1-5 America/New_York", NOW, datetime(2026, 3, 2, 14, 0, tzinfo=UTC)),
        ("0 0 * * * UTC", NOW, datetime(2026, 3, 2, tzinfo=UTC)),
    ],
)
def test_next_fire_strictly_after(expression: str, after: datetime, expected: datetime) -> None:
    assert parse_schedule(expression).next_after(after) == expected


def test_next_fire_follows_daylight_saving() -> None:
    schedule = parse_schedule("0 3 * * * Pacific/Auckland")
    # NZ leaves daylight saving on 5 April 2026: 03:00 is 14:00 UTC before, 15:00 after.
    before = schedule.next_after(datetime(2026, 4, 3, 0, tzinfo=UTC))
    after = schedule.next_after(datetime(2026, 4, 6, 0, tzinfo=UTC))
    assert before.hour == 14
    assert after.hour == 15


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("61 * * * *", "minute"),
        ("* 24 * * *", "hour"),
        ("0 0 30 2 *", "day-of-month"),
        ("* * * *", "4 fields"),
        ("* * * * * * *", "7 fields"),
        ("0 0 * * * Mars/Olympus_Mons", "unknown timezone 'Mars/Olympus_Mons'"),
        ("H(50-10) * * * *", "must lie within"),
        ("H(0-70) * * * *", "must lie within"),
        ("Hx * * * *", "unsupported form"),
        ("", "0 fields"),
        ("@daily", "1 fields"),
    ],
)
def test_invalid_schedules_name_expression_and_cause(expression: str, why: str) -> None:
    with pytest.raises(InvalidSchedule) as raised:
        parse_schedule(expression)
    message = str(raised.value)
    assert repr(expression) in message
    assert why.lower() in message.lower()


def test_h_is_stable_per_seed_and_in_range() -> None:
    seed = schedule_seed("5f1c0a4e-0000-4000-8000-000000000001", "ns", "name")
    first = parse_schedule("H H H H H", seed)
    second = parse_schedule("H H H H H", seed)
    assert first.cron == second.cron
    minute, hour, day, month, weekday = (int(f) for f in first.cron.split())
    assert 0 <= minute <= 59 and 0 <= hour <= 23 and 1 <= day <= 28
    assert 1 <= month <= 12 and 0 <= weekday <= 6


def test_h_spreads_replicas() -> None:
    minutes = {
        parse_schedule("H 3 * * *", schedule_seed(None, "ns", f"replica-{i}")).cron.split()[0]
        for i in range(200)
    }
    assert len(minutes) > 40


@pytest.mark.parametrize(
    ("expression", "pattern"),
    [
        ("H/15 * * * *", r"^(\d+)-59/15 "),
        ("H(0-29) * * * *", r"^(\d+) "),
        ("H(10-20)/5 * * * *", r"^(\d+)-20/5 "),
        ("0,H * * * *", r"^0,(\d+) "),
    ],
)
def test_h_forms(expression: str, pattern: str) -> None:
    for seed in range(50):
        cron = parse_schedule(expression, seed).cron
        match = re.match(pattern, cron)
        assert match is not None, cron
        value = int(match.group(1))
        if expression.startswith("H/15"):
            assert 0 <= value < 15
        elif expression.startswith("H(0-29)"):
            assert 0 <= value <= 29
        elif expression.startswith("H(10-20)/5"):
            assert 10 <= value < 15
        # Evaluates: the resolved expression is a real schedule.
        parse_schedule(expression, seed).next_after(NOW)


def test_seed_prefers_uid_and_falls_back_to_namespace_and_name() -> None:
    assert schedule_seed("uid-1", "a", "b") == schedule_seed("uid-1", "c", "d")
    assert schedule_seed(None, "a", "b") != schedule_seed(None, "b", "a")
    assert schedule_seed(None, "ns1", "canopy-replica") != schedule_seed(
        None, "ns2", "canopy-replica"
    )
    # A fixed definition (not Python's per-process hash): a restart keeps H values.
    digest = hashlib.sha256(b"name\0ns\0x").digest()
    assert schedule_seed(None, "ns", "x") == int.from_bytes(digest[:8], "big")


def test_input_hash_changes_with_schedule_or_jitter() -> None:
    base = schedule_input_hash("0 */6 * * *", timedelta(minutes=10))
    assert len(base) == 16 and int(base, 16) >= 0
    assert base == schedule_input_hash("0 */6 * * *", timedelta(minutes=10))
    assert base != schedule_input_hash("0 */4 * * *", timedelta(minutes=10))
    assert base != schedule_input_hash("0 */6 * * *", timedelta(minutes=5))


def test_jitter_varies_and_stays_within_half_the_window() -> None:
    rng = random.Random(7)
    offsets = {jitter_offset(timedelta(minutes=10), rng.random) for _ in range(200)}
    assert len(offsets) > 50
    assert min(offsets) >= timedelta(minutes=-5)
    assert max(offsets) < timedelta(minutes=5)
    assert jitter_offset(timedelta(0), rng.random) == timedelta(0)


@given(st.floats(0, 1, exclude_max=True))
def test_jitter_bounds(draw: float) -> None:
    offset = jitter_offset(timedelta(minutes=10), lambda: draw)
    assert timedelta(minutes=-5) <= offset < timedelta(minutes=5)


@given(
    draw=st.floats(0, 1, exclude_max=True),
    expression=st.sampled_from(["* * * * *", "*/5 * * * *", "0 * * * *", "0 0 * * *"]),
    seconds=st.integers(0, 86400 * 30),
)
def test_jittered_next_is_always_in_the_future(draw: float, expression: str, seconds: int) -> None:
    now = NOW + timedelta(seconds=seconds)
    when = jittered_next(parse_schedule(expression), now, timedelta(minutes=10), lambda: draw)
    assert when > now
    assert when.microsecond == 0


def test_jittered_next_without_jitter_is_the_cron_time() -> None:
    schedule = parse_schedule("0 */6 * * *")
    assert jittered_next(schedule, NOW, timedelta(0), lambda: 0.99) == datetime(
        2026, 3, 1, 12, tzinfo=UTC
    )


LAST = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("next_at", "ttl", "last", "now", "expected"),
    [
        (None, None, None, NOW, ScheduleDecision.TRIGGER),
        (NOW + timedelta(seconds=1), None, None, NOW, ScheduleDecision.NOT_DUE),
        (NOW - timedelta(seconds=1), None, None, NOW, ScheduleDecision.TRIGGER),
        (NOW, None, None, NOW, ScheduleDecision.TRIGGER),
        (
            NOW - timedelta(seconds=1),
            timedelta(hours=24),
            LAST,
            NOW,
            ScheduleDecision.SKIPPED_BY_TTL,
        ),
        (NOW - timedelta(seconds=1), timedelta(hours=1), LAST, NOW, ScheduleDecision.TRIGGER),
        (NOW - timedelta(seconds=1), None, LAST, NOW, ScheduleDecision.TRIGGER),
        (NOW - timedelta(seconds=1), timedelta(hours=24), None, NOW, ScheduleDecision.TRIGGER),
    ],
    ids=[
        "no-next",
        "future",
        "past",
        "exactly-now",
        "within-ttl",
        "past-ttl",
        "no-ttl",
        "ttl-without-last-completion",
    ],
)
def test_check_schedule(
    next_at: datetime | None,
    ttl: timedelta | None,
    last: datetime | None,
    now: datetime,
    expected: ScheduleDecision,
) -> None:
    assert check_schedule(next_at, ttl, last, now) is expected


def test_within_minimum_ttl_boundary() -> None:
    ttl = timedelta(hours=1)
    assert within_minimum_ttl(ttl, LAST, LAST + ttl - timedelta(seconds=1))
    assert not within_minimum_ttl(ttl, LAST, LAST + ttl)


@pytest.mark.parametrize(
    ("expression", "seconds"),
    [("0 */6 * * *", 4320), ("0 0 * * *", 17280), ("not a cron", 3600), ("H H * * *", 17280)],
)
def test_migration_budget(expression: str, seconds: int) -> None:
    assert migration_budget(expression, NOW) == timedelta(seconds=seconds)
