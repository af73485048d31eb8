from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pgro.api.duration import Duration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", timedelta(minutes=10)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("2h30m", timedelta(hours=2, minutes=30)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("1h, 30m", timedelta(hours=1, minutes=30)),
        ("30s", timedelta(seconds=30)),
        ("0s", timedelta(0)),
        ("1d", timedelta(hours=24)),
        ("1d2h", timedelta(hours=26)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("1w", timedelta(days=7)),
        ("10 minutes", timedelta(minutes=10)),
        ("2 hours", timedelta(hours=2)),
        ("1 hour 5 mins", timedelta(hours=1, minutes=5)),
        ("3 days", timedelta(days=3)),
        ("45sec", timedelta(seconds=45)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("1h 0.5m", timedelta(hours=1, seconds=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("250us", timedelta(microseconds=250)),
        ("  5m  ", timedelta(minutes=5)),
        ("+5m", timedelta(minutes=5)),
        ("PT10M", timedelta(minutes=10)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("PT1H30M", timedelta(hours=1, minutes=30)),
        ("PT0.5S", timedelta(milliseconds=500)),
        ("PT0,5S", timedelta(milliseconds=500)),
        ("PT1.5H", timedelta(hours=1, minutes=30)),
        ("P2D", timedelta(days=2)),
        ("P1W", timedelta(days=7)),
        ("pt10m", timedelta(minutes=10)),
        ("PT36H", timedelta(hours=36)),
    ],
)
def test_parse_duration_accepts(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("abc", None),
        ("10", None),
        ("10x", "unknown unit 'x'"),
        ("h5", None),
        ("5 m x", None),
        ("1m1h", "largest to smallest"),
        ("1h1h", "largest to smallest"),
        ("1.5d", "fraction is not allowed on 'd'"),
        ("1.5h30m", "only the smallest unit"),
        ("-5m", "negative"),
        ("5m ago", "negative"),
        ("1y", "no fixed length"),
        ("2 months", "no fixed length"),
        (".5h", None),
        ("P", "no duration components"),
        ("PT", "no duration components"),
        ("P1DT", "'T' must be followed"),
        ("P1Y", "no fixed length"),
        ("P1M", "no fixed length"),
        ("PT1.5H30M", "only the smallest component"),
        ("P1.5D", None),
        ("PT10X", None),
        ("P10M1D", None),
    ],
)
def test_parse_duration_rejects_with_named_text_and_examples(text: str, detail: str | None) -> None:
    with pytest.raises(ValueError, match="invalid duration") as caught:
        parse_duration(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "'10m'" in message
    assert "'PT10M'" in message
    if detail is not None:
        assert detail in message


def test_parse_duration_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("99999999999999d")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=30), "30s"),
        (timedelta(minutes=10), "10m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(hours=24), "1d"),
        (timedelta(hours=26), "1d2h"),
        (timedelta(days=7), "7d"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(milliseconds=500), "0.5s"),
        (timedelta(seconds=1, microseconds=250), "1.00025s"),
        (timedelta(minutes=1, milliseconds=1), "1m0.001s"),
    ],
)
def test_format_duration(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


def test_format_duration_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(timedelta(seconds=-1))


_durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=100_000))


@given(_durations)
def test_format_then_parse_is_identity(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


@given(
    st.lists(st.integers(min_value=0, max_value=10_000), min_size=4, max_size=4),
    st.sampled_from(["", " ", ", "]),
)
def test_friendly_and_iso_forms_agree(parts: list[int], separator: str) -> None:
    days, hours, minutes, seconds = parts
    friendly = separator.join([f"{days}d", f"{hours}h", f"{minutes}m", f"{seconds}s"])
    iso = f"P{days}DT{hours}H{minutes}M{seconds}S"
    expected = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    assert parse_duration(friendly) == expected
    assert parse_duration(iso) == expected
    assert parse_duration(format_duration(expected)) == expected


class _Holder(BaseModel):
    value: Duration


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10m", timedelta(minutes=10)),
        ("PT1H30M", timedelta(hours=1, minutes=30)),
        (90, timedelta(seconds=90)),
        (0, timedelta(0)),
        (1.5, timedelta(seconds=1.5)),
        (timedelta(hours=2), timedelta(hours=2)),
    ],
)
def test_duration_field_reads_text_seconds_and_timedelta(raw: object, expected: timedelta) -> None:
    assert _Holder.model_validate({"value": raw}).value == expected


@pytest.mark.parametrize(
    "raw", ["soon", True, -1, float("nan"), float("inf"), None, [], timedelta(seconds=-1)]
)
def test_duration_field_rejects(raw: object) -> None:
    with pytest.raises(ValidationError, match="invalid duration"):
        _Holder.model_validate({"value": raw})


def test_duration_field_writes_compact_text() -> None:
    holder = _Holder.model_validate({"value": "PT1H30M"})
    assert holder.model_dump() == {"value": "1h30m"}
    assert holder.model_dump(mode="json") == {"value": "1h30m"}
    schema = _Holder.model_json_schema()["properties"]["value"]
    assert (schema["type"], schema["format"]) == ("string", "duration")
