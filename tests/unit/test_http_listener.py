"""The request-body rule every pgro listener applies (issue 18 item 17)."""

from __future__ import annotations

import socket

import pytest

from pgro.http_listener import BodyRefused, address_family, content_length


@pytest.mark.parametrize(("value", "length"), [(None, 0), ("", 0), ("0", 0), (" 12 ", 12)])
def test_plain_decimal_lengths_are_read(value: str | None, length: int) -> None:
    assert content_length(value, 100) == length


@pytest.mark.parametrize("value", ["-1", "+5", "1_0", "0x10", "abc", "1e3", "١٢", "9" * 20])
def test_anything_else_is_a_400(value: str) -> None:
    """`int()` accepts `-1` (then `rfile.read(-1)` reads to EOF), `+5`, `1_0` and
    non-ASCII digits; none of them is a Content-Length."""
    with pytest.raises(BodyRefused) as refused:
        content_length(value, 100)
    assert refused.value.status == 400


def test_over_the_limit_is_a_413() -> None:
    with pytest.raises(BodyRefused) as refused:
        content_length("101", 100)
    assert refused.value.status == 413


def test_address_family_follows_the_address() -> None:
    assert address_family("::") == socket.AF_INET6
    assert address_family("::1") == socket.AF_INET6
    assert address_family("0.0.0.0") == socket.AF_INET  # noqa: S104 - no bind here
    assert address_family("127.0.0.1") == socket.AF_INET
    assert address_family("localhost") in (socket.AF_INET, socket.AF_INET6)
