from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from pgro.api.quantity import (
    MAX_BYTES,
    Quantity,
    format_quantity,
    parse_quantity,
    parse_quantity_decimal,
)

KI = 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5368709120", 5368709120),
        (5368709120, 5368709120),
        (0, 0),
        ("0", 0),
        ("1Ki", KI),
        ("1Mi", KI**2),
        ("50Gi", 50 * KI**3),
        ("2Ti", 2 * KI**4),
        ("1Pi", KI**5),
        ("1Ei", KI**6),
        ("1k", 1000),
        ("1M", 10**6),
        ("1G", 10**9),
        ("1T", 10**12),
        ("1P", 10**15),
        ("1E", 10**18),
        ("1e3", 1000),
        ("5E6", 5 * 10**6),
        ("1e+3", 1000),
        ("2.5e3", 2500),
        ("1.5Gi", 1536 * KI**2),
        (".5Ki", 512),
        ("1.", 1),
        ("+1Ki", KI),
        ("1000m", 1),
        ("1500m", 2),
        ("1m", 1),
        ("1n", 1),
        ("1u", 1),
        ("1e-3", 1),
        ("0.1", 1),
        (" 50Gi ", 50 * KI**3),
    ],
)
def test_parse_quantity(text: str | int, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250m", Decimal("0.25")),
        ("1500m", Decimal("1.5")),
        ("2", Decimal(2)),
        ("1.5Ki", Decimal(1536)),
        ("-1", Decimal(-1)),
        ("1e-3", Decimal("0.001")),
        ("100n", Decimal("1E-7")),
    ],
)
def test_parse_quantity_decimal_keeps_fractions(text: str, expected: Decimal) -> None:
    assert parse_quantity_decimal(text) == expected


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("", None),
        ("abc", None),
        ("Gi", None),
        ("1Gb", None),
        ("1gi", None),
        ("1 Gi", None),
        ("1KI", None),
        ("1K", None),
        ("1e", None),
        ("1e3Gi", None),
        ("--1", None),
        ("-1Gi", "must not be negative"),
        (-5, "must not be negative"),
        ("1e999", "exponent out of range"),
        ("10Ei", "too large"),
        (True, None),
        (1.5, None),
        (None, None),
    ],
)
def test_parse_quantity_rejects_naming_the_input(value: object, detail: str | None) -> None:
    with pytest.raises(ValueError, match="invalid quantity") as caught:
        parse_quantity(value)  # type: ignore[arg-type]
    message = str(caught.value)
    assert repr(value) in message
    assert "'50Gi'" in message
    if detail is not None:
        assert detail in message


@pytest.mark.parametrize(
    ("n_bytes", "expected"),
    [
        (0, "0"),
        (1, "1"),
        (1000, "1000"),
        (KI, "1Ki"),
        (1536 * KI**2, "1536Mi"),
        (50 * KI**3, "50Gi"),
        (2 * KI**4, "2Ti"),
        (3 * KI**5, "3Pi"),
        (KI**6, "1Ei"),
        (5368709120, "5Gi"),
        (KI + 1, "1025"),
    ],
)
def test_format_quantity(n_bytes: int, expected: str) -> None:
    assert format_quantity(n_bytes) == expected


def test_format_quantity_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_quantity(-1)


@given(st.integers(min_value=0, max_value=MAX_BYTES))
def test_format_then_parse_is_identity(n_bytes: int) -> None:
    assert parse_quantity(format_quantity(n_bytes)) == n_bytes


@given(
    st.integers(min_value=0, max_value=4096),
    st.sampled_from(["Ki", "Mi", "Gi", "Ti", "Pi"]),
)
def test_binary_suffix_is_a_power_of_1024(count: int, suffix: str) -> None:
    power = ["Ki", "Mi", "Gi", "Ti", "Pi"].index(suffix) + 1
    assert parse_quantity(f"{count}{suffix}") == count * KI**power


class _Holder(BaseModel):
    size: Quantity


@pytest.mark.parametrize("raw", ["50Gi", 5368709120, "5368709120", "1e3"])
def test_quantity_field_keeps_the_written_form(raw: int | str) -> None:
    holder = _Holder.model_validate({"size": raw})
    assert holder.size == raw
    assert type(holder.size) is type(raw)
    assert holder.model_dump(mode="json") == {"size": raw}


@pytest.mark.parametrize("raw", ["lots", True, 1.5, None, "-1Gi"])
def test_quantity_field_rejects_unparsable(raw: object) -> None:
    with pytest.raises(ValidationError, match="invalid quantity"):
        _Holder.model_validate({"size": raw})


def test_quantity_field_schema_is_int_or_string() -> None:
    schema = _Holder.model_json_schema()["properties"]["size"]
    assert schema["x-kubernetes-int-or-string"] is True
