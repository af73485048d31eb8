"""When scheduled restores fire: cron with `H` and a timezone, jitter, and the due check.

A schedule is five cron fields (minute, hour, day of month, month, day of week) with an
optional trailing IANA timezone (`20 15 * * * Pacific/Auckland`); without one it is UTC.
`H` may stand in any field, alone (`H`), with a range (`H(0-29)`), with a step (`H/15`) or
both (`H(0-29)/10`). It resolves to a value taken from a per-replica seed, so a fleet of
replicas with `H 3 * * *` spreads over the hour while each replica keeps its own minute.
The reference's exact seed→value mapping (Rust's cronexpr) cannot be reproduced, so this
mapping is our own: stable across processes and versions, not across implementations.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from pgro.api.duration import format_duration

RandomSource = Callable[[], float]
"""A source of floats uniform in [0, 1), such as `random.Random(seed).random`."""

SCHEDULE_HELP: Final = (
    "expected 5 fields (minute hour day-of-month month day-of-week) and an optional IANA "
    "timezone, e.g. '0 */6 * * *' or '20 15 * * * Pacific/Auckland'"
)

# (name, lowest, highest) of each field for `H`. Day of month stops at 28 so a hashed day
# exists in every month; day of week uses 0-6 (7 is another spelling of Sunday).
_H_FIELDS: Final = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 28),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_H_ITEM: Final = re.compile(r"H(?:\((?P<lo>\d+)-(?P<hi>\d+)\))?(?:/(?P<step>\d+))?")
# Bounds the search for a jittered time in the future; see `jittered_next`.
_MAX_JITTER_SKIPS: Final = 10_000
_MIGRATION_BUDGET_SHARE: Final = 0.2
MIGRATION_BUDGET_FALLBACK: Final = timedelta(hours=1)


class InvalidSchedule(ValueError):
    """The schedule cannot be evaluated; the message names the expression and the cause."""


class ScheduleDecision(StrEnum):
    TRIGGER = "Trigger"
    NOT_DUE = "NotDue"
    SKIPPED_BY_TTL = "SkippedByTtl"


def schedule_seed(uid: str | None, namespace: str, name: str) -> int:
    """The per-replica seed for `H`: from the uid, else from namespace and name.

    A hash with a fixed definition (not Python's `hash`, which changes per process), so a
    replica's `H` fields stay put across controller restarts.
    """
    if uid:
        material = b"uid\0" + uid.encode()
    else:
        material = b"name\0" + namespace.encode() + b"\0" + name.encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big")


def schedule_input_hash(schedule: str, jitter: timedelta) -> str:
    """16 hex characters identifying (schedule, jitter), stored beside the next time so a
    change to either recomputes it."""
    material = f"{schedule}\0{format_duration(jitter)}".encode()
    return hashlib.sha256(material).hexdigest()[:16]


def _field_hash(seed: int, index: int) -> int:
    # Each field gets its own value so `H H * * *` is not always hour == minute mod 24.
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _resolve_h_item(item: str, index: int, seed: int, expression: str) -> str:
    match = _H_ITEM.fullmatch(item)
    name, lowest, highest = _H_FIELDS[index]
    if match is None:
        raise InvalidSchedule(
            f"invalid schedule {expression!r}: {name} field item {item!r} uses H in an "
            "unsupported form (use H, H(a-b), H/n or H(a-b)/n)"
        )
    lo = int(match["lo"]) if match["lo"] is not None else lowest
    hi = int(match["hi"]) if match["hi"] is not None else highest
    if not lowest <= lo <= hi <= highest:
        raise InvalidSchedule(
            f"invalid schedule {expression!r}: {name} range in {item!r} must lie within "
            f"{lowest}-{highest} and go upwards"
        )
    value = _field_hash(seed, index)
    if match["step"] is None:
        return str(lo + value % (hi - lo + 1))
    step = int(match["step"])
    if step < 1:
        raise InvalidSchedule(f"invalid schedule {expression!r}: step in {item!r} must be ≥ 1")
    start = lo + value % min(step, hi - lo + 1)
    return f"{start}-{hi}/{step}"


def _resolve_h(fields: list[str], seed: int, expression: str) -> list[str]:
    resolved = []
    for index, field in enumerate(fields):
        if "H" not in field:
            resolved.append(field)
            continue
        items = [
            _resolve_h_item(item, index, seed, expression) if "H" in item else item
            for item in field.split(",")
        ]
        resolved.append(",".join(items))
    return resolved


@dataclass(frozen=True)
class CronSchedule:
    """A parsed schedule; `cron` is the five fields with `H` already resolved."""

    expression: str
    cron: str
    zone: tzinfo

    def next_after(self, instant: datetime) -> datetime:
        """The first fire strictly after `instant`, in UTC."""
        local = instant.astimezone(self.zone)
        try:
            fire = next(iter(CronSim(self.cron, local)))
        except (CronSimError, StopIteration) as error:
            # Parsing already proved the expression can fire; this is a cronsim edge case.
            raise InvalidSchedule(
                f"invalid schedule {self.expression!r}: no fire time after {instant}: {error}"
            ) from None
        return fire.astimezone(UTC)


@functools.lru_cache(maxsize=4096)
def parse_schedule(expression: str, seed: int = 0) -> CronSchedule:
    """Parse a schedule, resolving `H` from `seed`; `InvalidSchedule` says what is wrong."""
    tokens = expression.split()
    zone: tzinfo = UTC
    if len(tokens) == 6:
        zone_name = tokens.pop()
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidSchedule(
                f"invalid schedule {expression!r}: unknown timezone {zone_name!r} "
                "(use an IANA name such as 'UTC' or 'Pacific/Auckland')"
            ) from None
    if len(tokens) != 5:
        raise InvalidSchedule(
            f"invalid schedule {expression!r}: it has {len(tokens)} fields; {SCHEDULE_HELP}"
        )
    cron = " ".join(_resolve_h(tokens, seed, expression))
    try:
        # Evaluating once proves it can fire (cronsim refuses `0 0 30 2 *` here).
        next(iter(CronSim(cron, datetime(2000, 1, 1, tzinfo=zone))))
    except CronSimError as error:
        raise InvalidSchedule(
            f"invalid schedule {expression!r}: {error}; {SCHEDULE_HELP}"
        ) from None
    except StopIteration:
        raise InvalidSchedule(f"invalid schedule {expression!r}: it never fires") from None
    return CronSchedule(expression=expression, cron=cron, zone=zone)


def jitter_offset(jitter: timedelta, random: RandomSource) -> timedelta:
    """Uniform in [-jitter/2, +jitter/2), whole seconds (status keeps whole seconds)."""
    if jitter <= timedelta(0):
        return timedelta(0)
    seconds = (random() - 0.5) * jitter.total_seconds()
    return timedelta(seconds=int(seconds // 1))


def jittered_next(
    schedule: CronSchedule, now: datetime, jitter: timedelta, random: RandomSource
) -> datetime:
    """The next fire after `now`, moved by a jitter offset, and never at or before `now`.

    The reference adds the offset to the first fire after now, which can land in the
    past and trigger again at once (with `* * * * *` and 10 m jitter, several times in a
    row). Here the offset is drawn once and later fires are taken until fire + offset is
    in the future, so every computed time is a real wait.
    """
    offset = jitter_offset(jitter, random)
    fire = schedule.next_after(now)
    for _ in range(_MAX_JITTER_SKIPS):
        if fire + offset > now:
            break
        fire = schedule.next_after(fire)
    return (fire + offset).replace(microsecond=0)


def within_minimum_ttl(
    minimum_ttl: timedelta | None, last_completed: datetime | None, now: datetime
) -> bool:
    return (
        minimum_ttl is not None
        and last_completed is not None
        and now < last_completed + minimum_ttl
    )


def check_schedule(
    next_scheduled: datetime | None,
    minimum_ttl: timedelta | None,
    last_completed: datetime | None,
    now: datetime,
) -> ScheduleDecision:
    """Whether the schedule asks for a restore now (reference `check_schedule`)."""
    if next_scheduled is not None and now < next_scheduled:
        return ScheduleDecision.NOT_DUE
    if within_minimum_ttl(minimum_ttl, last_completed, now):
        return ScheduleDecision.SKIPPED_BY_TTL
    return ScheduleDecision.TRIGGER


def migration_budget(expression: str, now: datetime) -> timedelta:
    """20 % of the interval between the next two fires (`H` resolved with seed 0), or
    one hour when the schedule cannot be parsed. The persistent-schema migration gets this
    long before it is abandoned, so it never delays the next scheduled restore."""
    try:
        schedule = parse_schedule(expression, 0)
        first = schedule.next_after(now)
        second = schedule.next_after(first)
    except InvalidSchedule:
        return MIGRATION_BUDGET_FALLBACK
    return timedelta(seconds=int((second - first).total_seconds() * _MIGRATION_BUDGET_SHARE))
