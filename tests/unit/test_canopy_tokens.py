"""Broker tokens, the proxy's check of kopia's signature, and the plain-http rule for
canopy URLs (issue 18 items 9 and 14)."""

from __future__ import annotations

import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgro.canopy.client import plain_http_problem
from pgro.canopy.settings import settings_from_env
from pgro.canopy.sigv4 import (
    SignatureRejected,
    SigningCredentials,
    canonical_path,
    canonical_query,
    sign,
    verify,
)
from pgro.canopy.tokens import BrokerTokens, TokenBinding, bearer, load_or_create_key, new_key

BINDING = TokenBinding(
    group="22222222-2222-2222-2222-222222222222",
    type="tamanu-postgres",
    run_id="0b6f4f8e-6a43-4bb5-9a56-5b3c1f0f2a11",
    job="ns/r-restore",
)


def test_a_token_round_trips_and_binds_what_it_was_issued_for() -> None:
    tokens = BrokerTokens(new_key())
    token = tokens.issue(BINDING)
    assert tokens.verify(token) == BINDING
    assert tokens.verify(f"  {token}\n") == BINDING
    no_run = TokenBinding(BINDING.group, BINDING.type, None, BINDING.job)
    assert tokens.verify(tokens.issue(no_run)) == no_run


def test_a_token_from_another_key_or_altered_is_refused() -> None:
    tokens = BrokerTokens(new_key())
    token = tokens.issue(BINDING)
    assert BrokerTokens(new_key()).verify(token) is None
    payload, _, mac = token.partition(".")
    other = tokens.issue(TokenBinding(BINDING.group, BINDING.type, None, "ns/other"))
    # Another binding with this token's MAC, and this binding with another MAC.
    assert tokens.verify(f"{other.partition('.')[0]}.{mac}") is None
    assert tokens.verify(f"{payload}.{other.partition('.')[2]}") is None
    for junk in ("", ".", "abc", f"{payload}.", f".{mac}", "é.é", f"{payload}.{mac}x"):
        assert tokens.verify(junk) is None


def test_short_keys_are_refused_and_repr_hides_the_key() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        BrokerTokens(b"short")
    key = new_key()
    assert key.hex() not in repr(BrokerTokens(key))


def test_the_key_file_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "canopy-broker.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert len(key) == 32


def test_bearer_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    for value in (None, "", "Bearer", "Basic abc", "abc"):
        assert bearer(value) is None


# -- the proxy's signature check ----------------------------------------------------------

KEYS = SigningCredentials("PGROCLIENTKEY", os.urandom(20).hex())
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _signed(
    keys: SigningCredentials = KEYS, when: datetime = NOW, path: str = "/bkt/p/x y"
) -> list[tuple[str, str]]:
    signed = sign(
        method="GET",
        path=canonical_path(path),
        query=canonical_query("list-type=2&prefix=a b"),
        headers={"host": "127.0.0.1:4000", "x-amz-meta-a": "1"},
        credentials=keys,
        region="ap-southeast-2",
        service="s3",
        when=when,
        payload_hash="UNSIGNED-PAYLOAD",
    )
    return [("Host", "127.0.0.1:4000"), ("X-Amz-Meta-A", "1"), *signed.headers.items()]


def _verify(headers: list[tuple[str, str]], path: str = "/bkt/p/x y") -> None:
    verify(
        method="GET",
        path=canonical_path(path),
        query=canonical_query("list-type=2&prefix=a b"),
        headers=headers,
        credentials=KEYS,
        now=NOW,
    )


def test_a_request_signed_with_the_client_keys_verifies() -> None:
    _verify(_signed())
    _verify(_signed(when=NOW - timedelta(minutes=14)))


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("Host", "127.0.0.1:4000")], "not signed"),
        ([("Authorization", "AWS x")], "AWS4-HMAC-SHA256"),
        (_signed(SigningCredentials("OTHER", KEYS.secret_access_key)), "another access key"),
        (_signed(SigningCredentials(KEYS.access_key_id, "guess")), "does not match"),
        (_signed(when=NOW - timedelta(minutes=16)), "window"),
        ([(k, v) for k, v in _signed() if k != "X-Amz-Meta-A"], "missing"),
        ([(k, "2" if k == "X-Amz-Meta-A" else v) for k, v in _signed()], "does not match"),
    ],
)
def test_anything_else_is_rejected(headers: list[tuple[str, str]], why: str) -> None:
    with pytest.raises(SignatureRejected, match=why):
        _verify(headers)


def test_a_signature_does_not_cover_another_path() -> None:
    with pytest.raises(SignatureRejected, match="does not match"):
        _verify(_signed(), path="/bkt/p/other")


# -- canopy over plain http (item 14) -----------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://meta.tamanu.app",
        "http://127.0.0.1:8080",
        "http://127.8.0.1",
        "http://[::1]:80",
        "http://localhost:9",
    ],
)
def test_https_and_loopback_http_need_no_flag(url: str) -> None:
    assert plain_http_problem(url, allowed=False, flag="--x") is None


def test_plain_http_to_another_host_needs_the_flag_then_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    problem = plain_http_problem("http://user:pw@canopy.example:80/x", allowed=False, flag="--x")
    assert problem is not None and "--x" in problem and "pw" not in problem
    caplog.set_level(logging.WARNING)
    assert plain_http_problem("http://10.0.0.5", allowed=True, flag="--x") is None
    assert "plain http" in caplog.text


def test_the_operator_refuses_plain_http_canopy_unless_told() -> None:
    env = {"CANOPY_BASE_URL": "http://canopy.example"}
    with pytest.raises(ValueError, match="CANOPY_INSECURE_HTTP=true"):
        settings_from_env(env, "pgro-system")
    settings, _ = settings_from_env({**env, "CANOPY_INSECURE_HTTP": "true"}, "pgro-system")
    assert settings is not None and settings.base_url == "http://canopy.example"
    local, _ = settings_from_env({"CANOPY_BASE_URL": "http://127.0.0.1:1"}, "pgro-system")
    assert local is not None
