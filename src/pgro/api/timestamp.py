"""RFC 3339 timestamps as Kubernetes stores them (`metav1.Time`).

The API server keeps whole seconds in UTC (`2026-01-02T03:04:05Z`). A `Timestamp` field
truncates to whole seconds when it is set, so the value in memory is the value that
comes back after a write, and "did this status change?" comparisons stay exact.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Final

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

_RFC3339: Final = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?:(?P<utc>[Zz])|(?P<sign>[+-])(?P<oh>\d{2}):(?P<om>\d{2}))"
)


def parse_rfc3339(text: str) -> datetime:
    """A timezone-aware UTC datetime, keeping microseconds (finer digits are dropped)."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid timestamp {text!r}: expected RFC 3339 like '2026-01-02T03:04:05Z' "
            "or '2026-01-02T03:04:05.123+10:00'"
        )
    offset = UTC
    if match["sign"] is not None:
        minutes = int(match["oh"]) * 60 + int(match["om"])
        offset = timezone(timedelta(minutes=-minutes if match["sign"] == "-" else minutes))
    micros = int((match["fraction"] or "").ljust(6, "0")[:6])
    try:
        naive = datetime.fromisoformat(f"{match['date']}T{match['time']}")
    except ValueError as error:
        raise ValueError(f"invalid timestamp {text!r}: {error}") from None
    return naive.replace(microsecond=micros, tzinfo=offset).astimezone(UTC)


def format_rfc3339(value: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SSZ` in UTC, whole seconds."""
    return _to_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        # A naive time is ambiguous; core code is handed aware times, so this is a bug.
        raise ValueError(f"timestamp {value!r} has no timezone; pass an aware datetime")
    return value.astimezone(UTC)


def _validate(value: object) -> datetime:
    if isinstance(value, datetime):
        aware = _to_utc(value)
    elif isinstance(value, str):
        aware = parse_rfc3339(value)
    else:
        raise ValueError(f"invalid timestamp {value!r}: expected an RFC 3339 string")
    return aware.replace(microsecond=0)


Timestamp = Annotated[
    datetime,
    PlainValidator(_validate, json_schema_input_type=str),
    PlainSerializer(format_rfc3339, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A status time: RFC 3339 text or an aware datetime in, whole-second UTC text out."""
