from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pgro.api.timestamp import Timestamp, format_rfc3339, parse_rfc3339


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.5Z", datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
        (
            "2026-11-27T11:02:44.458139381Z",
            datetime(2026, 11, 27, 11, 2, 44, 458139, tzinfo=UTC),
        ),
        ("2026-01-02T13:04:05+10:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-01T23:30:00-01:00", datetime(2026, 1, 2, 0, 30, tzinfo=UTC)),
    ],
)
def test_parse_rfc3339(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    ["", "2026-01-02", "2026-01-02T03:04:05", "2026-13-02T03:04:05Z", "yesterday", "1700000000"],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid timestamp"):
        parse_rfc3339(text)


def test_format_rfc3339_is_whole_seconds_utc() -> None:
    value = datetime(2026, 1, 2, 13, 4, 5, 999999, tzinfo=timezone(timedelta(hours=10)))
    assert format_rfc3339(value) == "2026-01-02T03:04:05Z"


def test_format_rfc3339_refuses_naive() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        format_rfc3339(datetime(2026, 1, 2))


class _Holder(BaseModel):
    at: Timestamp


def test_timestamp_field_truncates_to_seconds_so_round_trips_are_exact() -> None:
    holder = _Holder.model_validate({"at": "2026-01-02T03:04:05.75Z"})
    assert holder.at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    dumped = holder.model_dump(mode="json")
    assert dumped == {"at": "2026-01-02T03:04:05Z"}
    assert _Holder.model_validate(dumped) == holder


def test_timestamp_field_accepts_aware_datetime() -> None:
    local = datetime(2026, 1, 2, 13, 0, tzinfo=timezone(timedelta(hours=10)))
    assert _Holder(at=local).at == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize("raw", [datetime(2026, 1, 2), 1700000000, "soon", None])
def test_timestamp_field_rejects(raw: object) -> None:
    with pytest.raises(ValidationError):
        _Holder.model_validate({"at": raw})


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(9999, 12, 31),
        timezones=st.just(UTC),
    )
)
def test_format_then_parse_keeps_the_second(value: datetime) -> None:
    assert parse_rfc3339(format_rfc3339(value)) == value.replace(microsecond=0)
