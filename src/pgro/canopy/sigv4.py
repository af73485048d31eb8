"""AWS Signature Version 4 for header-signed requests, as S3 expects them.

Written out rather than taken from botocore: it is about a hundred lines, it is checked
against AWS's published examples and against botocore's signer in the tests, and it keeps
botocore (and its dependencies) out of the runtime image.

The caller builds the request line itself from `canonical_path` and `canonical_query`, so
what is signed and what is sent are the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote_to_bytes

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# RFC 3986 unreserved characters stay; everything else is %XX with upper-case hex.
_UNRESERVED = "-_.~"


@dataclass(frozen=True)
class SigningCredentials:
    """An access key pair and, for temporary credentials, the session token."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def uri_encode(value: str | bytes, *, keep_slash: bool) -> str:
    """AWS's UriEncode: every byte but the unreserved set as %XX (upper-case hex)."""
    return quote(value, safe=_UNRESERVED + ("/" if keep_slash else ""))


def canonical_path(raw_path: str) -> str:
    """The S3 canonical URI of a request path as a client sent it.

    S3 encodes the path once and does not normalise it (`//` and `..` are part of a key),
    so the path is decoded and re-encoded, not resolved. An empty path is `/`.
    """
    return uri_encode(unquote_to_bytes(raw_path), keep_slash=True) if raw_path else "/"


def canonical_query(raw_query: str) -> str:
    """Canonical query string: pairs encoded, sorted by name then value, `name=` when bare."""
    pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append(
            (
                uri_encode(unquote_to_bytes(name.replace("+", " ")), keep_slash=False),
                uri_encode(unquote_to_bytes(value.replace("+", " ")), keep_slash=False),
            )
        )
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _normalise_value(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header list) for the headers to be signed."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(_normalise_value(value))
    names = sorted(merged)
    block = "".join(f"{n}:{','.join(merged[n])}\n" for n in names)
    return block, ";".join(names)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(f"AWS4{secret_access_key}".encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def amz_date(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class SignedRequest:
    """The headers to add to the request, plus what went into the signature (for tests)."""

    headers: dict[str, str] = field(repr=False)
    canonical_request: str = field(repr=False)
    string_to_sign: str = field(repr=False)


def sign(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    credentials: SigningCredentials,
    region: str,
    service: str,
    when: datetime,
    payload_hash: str,
    content_sha256_header: bool = True,
) -> SignedRequest:
    """Sign a request whose every header in `headers` is to be signed.

    `path` and `query` are already canonical (`canonical_path`, `canonical_query`).
    `headers` must include `host`. The returned headers (`X-Amz-Date`, `Authorization`,
    `X-Amz-Security-Token` with temporary credentials, and `X-Amz-Content-SHA256` when
    `content_sha256_header`, which S3 requires) are to be sent as well; the date, token and
    payload hash are signed with the rest.
    """
    stamp = amz_date(when)
    added: dict[str, str] = {"X-Amz-Date": stamp}
    if content_sha256_header:
        added["X-Amz-Content-SHA256"] = payload_hash
    if credentials.session_token:
        added["X-Amz-Security-Token"] = credentials.session_token
    to_sign = [(k, v) for k, v in headers.items() if k.lower() not in {a.lower() for a in added}]
    block, signed_names = canonical_headers([*to_sign, *added.items()])
    canonical_request = "\n".join([method.upper(), path, query, block, signed_names, payload_hash])
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = signing_key(credentials.secret_access_key, stamp[:8], region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    added["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )
    return SignedRequest(
        headers=added, canonical_request=canonical_request, string_to_sign=string_to_sign
    )


# How far a request's X-Amz-Date may be from the verifier's clock (S3 allows 15 minutes).
MAX_CLOCK_SKEW_S = 15 * 60


class SignatureRejected(Exception):
    """A request whose SigV4 signature does not verify; the message says why, secret-free."""


def _parse_authorization(value: str) -> tuple[str, list[str], list[str], str]:
    """(access key id, scope parts, signed header names, signature) of an Authorization
    header `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureRejected("the request is not signed with AWS4-HMAC-SHA256")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, val = part.strip().partition("=")
        if eq:
            fields[name.strip()] = val.strip()
    try:
        credential, signed, signature = (
            fields["Credential"],
            fields["SignedHeaders"],
            fields["Signature"],
        )
    except KeyError:
        raise SignatureRejected("the Authorization header is incomplete") from None
    key_id, _, scope = credential.partition("/")
    parts = scope.split("/")
    if len(parts) != 4 or parts[3] != "aws4_request":
        raise SignatureRejected("the Authorization header has an invalid credential scope")
    return key_id, parts, signed.split(";"), signature


def verify(
    *,
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    credentials: SigningCredentials,
    now: datetime,
    service: str = "s3",
) -> None:
    """Check that a header-signed request was signed with `credentials`; raise
    `SignatureRejected` if not. `path` and `query` are canonical (`canonical_path`,
    `canonical_query` of what arrived). The payload hash is the one the client declared
    in `X-Amz-Content-SHA256` (S3 requires the header); the body itself is not hashed."""
    received: dict[str, list[str]] = {}
    for name, value in headers:
        received.setdefault(name.strip().lower(), []).append(value)
    auth = received.get("authorization")
    if not auth:
        raise SignatureRejected("the request is not signed")
    key_id, (date, region, scope_service, _), signed_names, signature = _parse_authorization(
        auth[0]
    )
    if not hmac.compare_digest(key_id.encode(), credentials.access_key_id.encode()):
        raise SignatureRejected("the request is signed with another access key")
    if scope_service != service:
        raise SignatureRejected(f"the request is signed for service {scope_service!r}")
    if "host" not in signed_names:
        raise SignatureRejected("the request's signature does not cover its Host header")
    stamp = (received.get("x-amz-date") or [""])[0].strip()
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise SignatureRejected("the request has no valid X-Amz-Date") from None
    if stamp[:8] != date or abs((now - when).total_seconds()) > MAX_CLOCK_SKEW_S:
        raise SignatureRejected("the request's X-Amz-Date is outside the allowed window")
    payload_hash = (received.get("x-amz-content-sha256") or [""])[0].strip()
    if not payload_hash:
        raise SignatureRejected("the request has no X-Amz-Content-SHA256")
    try:
        pairs = [(n, v) for n in signed_names for v in received[n]]
    except KeyError:
        raise SignatureRejected("a signed header is missing from the request") from None
    block, names = canonical_headers(pairs)
    canonical_request = "\n".join([method.upper(), path, query, block, names, payload_hash])
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = signing_key(credentials.secret_access_key, date, region, service)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace")):
        raise SignatureRejected("the request's signature does not match")
