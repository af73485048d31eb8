"""Durations ("TimeSpan" fields) as the reference writes them.

The reference parses jiff "friendly" spans (`10m`, `2h30m`, `1h 30m`, `1d`, `10 minutes`)
and ISO-8601 durations (`PT10M`, `P1DT2H`) and always writes the compact friendly form.
Days and weeks are fixed lengths here (24 h, 7 d), as the reference treats them when it
converts a span to seconds; years and months have no fixed length and are refused rather
than guessed.

`format_duration` writes days (`1d2h`, not `26h`): jiff reads that form back, and it is
what a person would write. Sub-second parts are written as a decimal fraction of the
seconds (`1.5s`), which jiff also accepts.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from fractions import Fraction
from typing import Annotated, Final

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

_EXAMPLES: Final = (
    "expected a span like '30s', '10m', '2h30m', '1h 30m', '1d', '10 minutes' "
    "or an ISO-8601 duration like 'PT10M', 'P1DT2H', 'PT0.5S'"
)

_SECOND: Final = Fraction(1)
_MINUTE: Final = 60 * _SECOND
_HOUR: Final = 60 * _MINUTE
_DAY: Final = 24 * _HOUR
_WEEK: Final = 7 * _DAY

# Each friendly unit: its length, its rank (units must appear largest first, once each)
# and whether a fraction is allowed on it (jiff allows one on hours and smaller only).
_Unit = tuple[Fraction, int, bool]
_WEEKS: Final[_Unit] = (_WEEK, 7, False)
_DAYS: Final[_Unit] = (_DAY, 6, False)
_HOURS: Final[_Unit] = (_HOUR, 5, True)
_MINUTES: Final[_Unit] = (_MINUTE, 4, True)
_SECONDS: Final[_Unit] = (_SECOND, 3, True)
_MILLIS: Final[_Unit] = (Fraction(1, 1000), 2, True)
_MICROS: Final[_Unit] = (Fraction(1, 1_000_000), 1, True)
_NANOS: Final[_Unit] = (Fraction(1, 1_000_000_000), 0, True)

_FRIENDLY_UNITS: Final[dict[str, _Unit]] = {
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), _WEEKS),
    **dict.fromkeys(("d", "day", "days"), _DAYS),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), _HOURS),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), _MINUTES),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), _SECONDS),
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), _MILLIS),
    **dict.fromkeys(("us", "µs", "μs", "usec", "usecs", "microsecond", "microseconds"), _MICROS),
    **dict.fromkeys(("ns", "nsec", "nsecs", "nanosecond", "nanoseconds"), _NANOS),
}
_CALENDAR_UNITS: Final = frozenset(
    ("y", "yr", "yrs", "year", "years", "mo", "mos", "month", "months")
)

_FRIENDLY_PART: Final = re.compile(
    r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[^\W\d_]+)\s*(?:,\s*)?", re.UNICODE
)
_ISO: Final = re.compile(
    r"P(?:(?P<Y>\d+)Y)?(?:(?P<MO>\d+)M)?(?:(?P<W>\d+)W)?(?:(?P<D>\d+)D)?"
    r"(?:(?P<T>T)(?:(?P<H>\d+(?:[.,]\d+)?)H)?(?:(?P<MI>\d+(?:[.,]\d+)?)M)?"
    r"(?:(?P<S>\d+(?:[.,]\d+)?)S)?)?",
    re.IGNORECASE,
)
_ISO_LENGTHS: Final = (("W", _WEEK), ("D", _DAY), ("H", _HOUR), ("MI", _MINUTE), ("S", _SECOND))


def _bad(text: str, detail: str | None = None) -> ValueError:
    why = f" ({detail})" if detail else ""
    return ValueError(f"invalid duration {text!r}{why}: {_EXAMPLES}")


def _to_timedelta(text: str, seconds: Fraction) -> timedelta:
    # timedelta holds microseconds; a finer part is rounded, as no field needs it.
    try:
        return timedelta(microseconds=round(seconds * 1_000_000))
    except OverflowError:
        raise _bad(text, "too large") from None


def _parse_iso(text: str, body: str) -> timedelta:
    match = _ISO.fullmatch(body)
    if match is None:
        raise _bad(text)
    if match["Y"] is not None or match["MO"] is not None:
        raise _bad(text, "years and months have no fixed length; use days")
    present = [(name, length) for name, length in _ISO_LENGTHS if match[name] is not None]
    if not present:
        raise _bad(text, "no duration components")
    if match["T"] is not None and not any(match[n] is not None for n in ("H", "MI", "S")):
        raise _bad(text, "'T' must be followed by hours, minutes or seconds")
    total = Fraction(0)
    for index, (name, length) in enumerate(present):
        number = match[name].replace(",", ".")
        if "." in number and index != len(present) - 1:
            raise _bad(text, "only the smallest component may have a fraction")
        total += Fraction(number) * length
    return _to_timedelta(text, total)


def _parse_friendly(text: str, body: str) -> timedelta:
    position = 0
    last_rank: int | None = None
    total = Fraction(0)
    fraction_seen = False
    while position < len(body):
        match = _FRIENDLY_PART.match(body, position)
        if match is None:
            raise _bad(text)
        number, unit_name = match["number"], match["unit"]
        if unit_name in _CALENDAR_UNITS:
            raise _bad(text, f"{unit_name!r}: years and months have no fixed length; use days")
        unit = _FRIENDLY_UNITS.get(unit_name)
        if unit is None:
            raise _bad(text, f"unknown unit {unit_name!r}")
        length, rank, fraction_allowed = unit
        if last_rank is not None and rank >= last_rank:
            raise _bad(text, "units must go from largest to smallest, each at most once")
        if fraction_seen:
            raise _bad(text, "only the smallest unit may have a fraction")
        if "." in number:
            if not fraction_allowed:
                raise _bad(text, f"a fraction is not allowed on {unit_name!r}")
            fraction_seen = True
        total += Fraction(number) * length
        last_rank = rank
        position = match.end()
    if last_rank is None:
        raise _bad(text)
    return _to_timedelta(text, total)


def parse_duration(text: str) -> timedelta:
    """Parse a friendly span or an ISO-8601 duration; negative durations are refused."""
    body = text.strip()
    if not body:
        raise _bad(text, "empty")
    if body.startswith("-") or body.endswith(" ago"):
        raise _bad(text, "negative durations are not allowed")
    body = body.removeprefix("+").lstrip()
    if body[:1] in ("P", "p"):
        return _parse_iso(text, body)
    return _parse_friendly(text, body)


def format_duration(value: timedelta) -> str:
    """Compact friendly form: `10m`, `1h30m`, `1d2h`, `1.5s`, and `0s` for zero."""
    if value < timedelta(0):
        raise ValueError(f"cannot format negative duration {value!r}")
    micros = value // timedelta(microseconds=1)
    seconds, micros = divmod(micros, 1_000_000)
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if seconds or micros:
        fraction = f".{micros:06d}".rstrip("0") if micros else ""
        parts.append(f"{seconds}{fraction}s")
    return "".join(parts) or "0s"


def _validate(value: object) -> timedelta:
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError(f"invalid duration {value!r}: negative durations are not allowed")
        return value
    if isinstance(value, str):
        return parse_duration(value)
    # A bare number is seconds, as canopy parameters and hand-written YAML use it.
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid duration {value!r}: {_EXAMPLES}")
        return timedelta(seconds=value)
    raise ValueError(f"invalid duration {value!r}: {_EXAMPLES}")


Duration = Annotated[
    timedelta,
    PlainValidator(_validate, json_schema_input_type=str),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "format": "duration"}),
]
"""A duration field: reads friendly or ISO-8601 text (or seconds), writes compact text."""
