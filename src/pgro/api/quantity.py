"""Kubernetes resource quantities (`2Ti`, `50Gi`, `5368709120`, `1e3`, `500m`).

A quantity field is "int-or-string" on the wire; the model keeps whatever was written so
that a manifest round-trips unchanged, and callers convert with `parse_quantity` when they
need bytes.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal
from typing import Annotated, Final

from pydantic import PlainValidator, WithJsonSchema

_EXAMPLES: Final = (
    "expected a Kubernetes quantity like '50Gi', '2Ti', '500M', '1e9' or a plain byte "
    "count like '5368709120'"
)

_BINARY: Final = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_DECIMAL_EXPONENTS: Final = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}

# The exponent alternative comes before the bare SI suffixes so `1E3` is 1000, not a
# malformed exa value; `1E` alone is still one exa.
_QUANTITY: Final = re.compile(
    r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?:(?P<binary>Ki|Mi|Gi|Ti|Pi|Ei)|[eE](?P<exponent>[+-]?\d+)|(?P<si>[numkMGTPE]))?"
)

# Exponents past this are not quantities anyone writes, and bounding them keeps a
# hostile value like `1e999999999` from turning into a gigantic integer.
_MAX_EXPONENT: Final = 60
# Kubernetes stores quantities as int64.
MAX_BYTES: Final = 2**63 - 1

_CONTEXT: Final = decimal.Context(prec=80, rounding=decimal.ROUND_CEILING)


def _bad(value: object, detail: str | None = None) -> ValueError:
    why = f" ({detail})" if detail else ""
    return ValueError(f"invalid quantity {value!r}{why}: {_EXAMPLES}")


def parse_quantity_decimal(value: str | int) -> Decimal:
    """The exact value of a quantity; fractional and milli values stay exact."""
    if isinstance(value, bool):
        raise _bad(value)
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str):
        raise _bad(value)
    match = _QUANTITY.fullmatch(value.strip())
    if match is None:
        raise _bad(value)
    number = Decimal(match["number"])
    if match["binary"] is not None:
        return _CONTEXT.multiply(number, Decimal(_BINARY[match["binary"]]))
    exponent = (
        int(match["exponent"])
        if match["exponent"] is not None
        else _DECIMAL_EXPONENTS[match["si"] or ""]
    )
    if abs(exponent) > _MAX_EXPONENT:
        raise _bad(value, "exponent out of range")
    return number.scaleb(exponent, _CONTEXT)


def parse_quantity(value: str | int) -> int:
    """A byte count: the quantity rounded up to a whole byte (`1500m` → 2)."""
    exact = parse_quantity_decimal(value)
    if exact < 0:
        raise _bad(value, "must not be negative")
    if exact > MAX_BYTES:
        raise _bad(value, "too large")
    return int(exact.to_integral_value(rounding=decimal.ROUND_CEILING))


def format_quantity(n_bytes: int) -> str:
    """The largest binary suffix that is exact (`2Ti`, `50Gi`), else plain bytes."""
    if n_bytes < 0:
        raise ValueError(f"cannot format negative byte count {n_bytes}")
    for suffix, size in reversed(_BINARY.items()):
        if n_bytes and n_bytes % size == 0:
            return f"{n_bytes // size}{suffix}"
    return str(n_bytes)


def _validate(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(value)
    parse_quantity(value)
    return value


Quantity = Annotated[
    int | str,
    PlainValidator(_validate, json_schema_input_type=int | str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A byte-size field: must parse, and keeps the form it was written in."""
