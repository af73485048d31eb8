"""The canopy S3 proxy: kopia talks plain S3 with dummy keys, the proxy re-signs for real.

Canopy hands out short-lived, read-only S3 credentials per (group, type). kopia must never
hold them, and a restore outlives one set (they last an hour, a restore up to four), so
kopia is pointed at this loopback proxy with dummy keys. For every request the proxy drops
kopia's signature, signs again (SigV4, service `s3`, with the session token) with live
credentials and forwards it path-style to the real endpoint, streaming bodies both ways.

Credentials come from a `CredentialSource`: the operator's broker
(`BrokerCredentialSource`, `POST /internal/restore-creds`) in the Kubernetes sidecar, or
any callable (the embedded runtime asks its canopy client directly). `CredentialCache`
keeps them until two minutes before they expire; an `ExpiredToken` answer from S3 forces
a refresh and, when the request can be replayed, one retry.

Traffic is counted (`TrafficStats`): samples go to a progress callback every 30 s while a
restore runs, and the totals to a stats callback at shutdown (`run_sidecar`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol
from xml.sax.saxutils import escape

import httpx

from pgro.api.timestamp import parse_rfc3339
from pgro.canopy.sigv4 import (
    UNSIGNED_PAYLOAD,
    SignatureRejected,
    SigningCredentials,
    canonical_path,
    canonical_query,
    sign,
    verify,
)
from pgro.clock import utcnow
from pgro.http_listener import BodyRefused, ListenerServer, content_length

log = logging.getLogger(__name__)

DEFAULT_REFRESH_MARGIN: Final = timedelta(minutes=2)
DEFAULT_PROGRESS_INTERVAL: Final = 30.0
DEFAULT_PORT_FILE: Final = Path("/var/run/pgro/proxy-port")
BROKER_PATH: Final = "/internal/restore-creds"
BROKER_TIMEOUT: Final = 10.0
CALLBACK_TIMEOUT: Final = 5.0
# A failed credential fetch is not repeated for this long: kopia retries every request,
# and each of those must not become a broker (and STS) call.
FETCH_RETRY_AFTER: Final = timedelta(seconds=2)
# Request bodies up to this size are held in memory so an ExpiredToken answer can be
# retried here; larger ones stream, and kopia's own retry covers them.
REPLAY_LIMIT: Final = 1024 * 1024
CHUNK: Final = 64 * 1024
# S3's largest single PUT; a larger Content-Length is refused before anything is read.
MAX_BODY: Final = 5 * 1024**3
INT64_MAX: Final = 2**63 - 1

# S3 answers expired or revoked session credentials with these codes (400 or 403).
_REFRESH_CODES: Final = frozenset({"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"})
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# kopia's own signature and what the proxy sets itself.
_DROPPED_REQUEST_HEADERS: Final = _HOP_BY_HOP | {
    "host",
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
    "content-length",
    "expect",
}
# Only meaningful for an aws-chunked body, which the proxy decodes.
_CHUNKED_ONLY_HEADERS: Final = frozenset(
    {"x-amz-decoded-content-length", "x-amz-trailer", "x-amz-sdk-checksum-algorithm"}
)
_SIGNED_PLAIN_HEADERS: Final = frozenset({"content-md5", "content-type"})


# -- credentials ---------------------------------------------------------------------------


class CredentialsUnavailable(RuntimeError):
    """No usable S3 credentials: the source failed and nothing valid is cached."""


@dataclass(frozen=True)
class TemporaryCredentials(SigningCredentials):
    """STS credentials with their expiry (`None`: valid until S3 says otherwise)."""

    expiration: datetime | None = None


class CredentialSource(Protocol):
    """Anything that fetches fresh S3 credentials when called; raises on failure."""

    def __call__(self) -> TemporaryCredentials: ...


def parse_credentials(doc: Any) -> TemporaryCredentials:
    """Read the AWS `credential_process` shape canopy and the broker return.

    Error messages name the missing field, never a value.
    """
    if not isinstance(doc, Mapping):
        raise CredentialsUnavailable("credentials are not a JSON object")
    for key in ("AccessKeyId", "SecretAccessKey"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise CredentialsUnavailable(f"credentials have no {key}")
    token = doc.get("SessionToken")
    expiration = doc.get("Expiration")
    try:
        expires = parse_rfc3339(expiration) if isinstance(expiration, str) else None
    except ValueError:
        raise CredentialsUnavailable("credentials have an unreadable Expiration") from None
    return TemporaryCredentials(
        access_key_id=doc["AccessKeyId"],
        secret_access_key=doc["SecretAccessKey"],
        session_token=token if isinstance(token, str) and token else None,
        expiration=expires,
    )


class BrokerCredentialSource:
    """The operator's credential broker: `POST <broker>/internal/restore-creds`.

    The body is `{group, type, run_id?}`, authenticated with the restore's bearer token;
    of the answer only `credentials` is used (the repository password in it is not the
    proxy's business).
    """

    def __init__(
        self,
        broker_url: str,
        group: str,
        backup_type: str,
        run_id: str | None = None,
        *,
        token: str,
        timeout: float = BROKER_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = broker_url.rstrip("/") + BROKER_PATH
        self._headers = auth_headers(token)
        self._body: dict[str, str] = {"group": group, "type": backup_type}
        if run_id:
            self._body["run_id"] = run_id
        self._timeout = timeout
        self._client = client or httpx.Client(follow_redirects=False)

    def __call__(self) -> TemporaryCredentials:
        try:
            reply = self._client.post(
                self.url, json=self._body, headers=self._headers, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise CredentialsUnavailable(
                f"credential broker {self.url} unreachable ({type(exc).__name__})"
            ) from None
        if reply.status_code != 200:
            raise CredentialsUnavailable(
                f"credential broker answered {reply.status_code}: {_error_text(reply)}"
            )
        try:
            doc = reply.json()
        except ValueError:
            raise CredentialsUnavailable("credential broker answered with invalid JSON") from None
        if not isinstance(doc, Mapping):
            raise CredentialsUnavailable("credential broker answered with a non-object")
        return parse_credentials(doc.get("credentials"))


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error_text(reply: httpx.Response) -> str:
    try:
        doc = reply.json()
    except ValueError:
        return reply.text[:200]
    if isinstance(doc, Mapping):
        for key in ("error", "title", "detail"):
            if isinstance(doc.get(key), str):
                return str(doc[key])[:300]
    return "(no message)"


class CredentialCache:
    """Serve one set of credentials until `refresh_margin` before it expires.

    One fetch at a time: concurrent requests wait for it rather than each calling the
    source. If a refresh fails while the current set has not actually expired, that set
    is kept (and the failure logged) so a broker blip does not stop a restore.
    """

    def __init__(
        self,
        source: CredentialSource,
        *,
        refresh_margin: timedelta = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._source = source
        self._margin = refresh_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._current: TemporaryCredentials | None = None
        self._failed_until: datetime | None = None
        self._last_error = ""
        self.fetches = 0

    def _fresh_enough(self, creds: TemporaryCredentials, now: datetime) -> bool:
        return creds.expiration is None or creds.expiration - self._margin > now

    def get(self) -> TemporaryCredentials:
        with self._lock:
            now = self._clock()
            current = self._current
            if current is not None and self._fresh_enough(current, now):
                return current
            still_valid = current is not None and (
                current.expiration is None or current.expiration > now
            )
            if self._failed_until is not None and now < self._failed_until:
                if still_valid and current is not None:
                    return current
                raise CredentialsUnavailable(self._last_error)
            try:
                fresh = self._source()
            except Exception as exc:
                # Sources raise secret-free messages; the type says which failure it was.
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._failed_until = now + FETCH_RETRY_AFTER
                if still_valid and current is not None:
                    log.warning(
                        "credential refresh failed, using the current set until it expires: %s",
                        self._last_error,
                    )
                    return current
                log.error("could not obtain S3 credentials: %s", self._last_error)
                raise CredentialsUnavailable(self._last_error) from None
            self._failed_until = None
            self._current = fresh
            self.fetches += 1
            log.info(
                "obtained S3 credentials (fetch %d), expiring %s",
                self.fetches,
                fresh.expiration.isoformat() if fresh.expiration else "never",
            )
            return fresh

    def invalidate(self, creds: TemporaryCredentials) -> None:
        """Forget `creds` (S3 rejected them); a newer set fetched meanwhile is kept."""
        with self._lock:
            if self._current is creds:
                self._current = None
                self._failed_until = None


# -- traffic accounting ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficSnapshot:
    """Cumulative S3 traffic through the proxy.

    "sent" is towards S3, "received" is from S3. Payload bytes are message bodies (decoded
    from aws-chunked when kopia used it); raw bytes add the request or status line and the
    headers, as the proxy wrote or read them (TLS framing not included).
    """

    sent_raw_bytes: int = 0
    sent_payload_bytes: int = 0
    received_raw_bytes: int = 0
    received_payload_bytes: int = 0
    requests: int = 0

    def stats_body(self) -> dict[str, int]:
        """The final-stats callback body the operator stores for the verification report."""
        return {
            "sent_raw_bytes": self.sent_raw_bytes,
            "sent_payload_bytes": self.sent_payload_bytes,
            "received_raw_bytes": self.received_raw_bytes,
            "received_payload_bytes": self.received_payload_bytes,
        }

    def progress_body(self, run_id: str, backup_type: str) -> dict[str, Any]:
        """A cumulative progress sample in canopy's `/backup-progress` shape.

        Only the S3 counters are measured here; every other counter is omitted, not zeroed.
        """
        return {
            "run_id": run_id,
            "type": backup_type,
            "purpose": "restore",
            "s3_sent_raw_bytes": min(self.sent_raw_bytes, INT64_MAX),
            "s3_sent_payload_bytes": min(self.sent_payload_bytes, INT64_MAX),
            "s3_received_raw_bytes": min(self.received_raw_bytes, INT64_MAX),
            "s3_received_payload_bytes": min(self.received_payload_bytes, INT64_MAX),
            "extra": {},
        }


class TrafficStats:
    """Thread-safe counters behind `TrafficSnapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {
            "sent_raw_bytes": 0,
            "sent_payload_bytes": 0,
            "received_raw_bytes": 0,
            "received_payload_bytes": 0,
            "requests": 0,
        }

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def sent(self, payload: int, overhead: int = 0) -> None:
        self.add(sent_payload_bytes=payload, sent_raw_bytes=payload + overhead)

    def received(self, payload: int, overhead: int = 0) -> None:
        self.add(received_payload_bytes=payload, received_raw_bytes=payload + overhead)

    def snapshot(self) -> TrafficSnapshot:
        with self._lock:
            return TrafficSnapshot(**self._counts)


# -- request bodies ----------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _ClientGone(Exception):
    """kopia closed the connection before sending the whole body."""


class _LimitedReader:
    """At most `limit` bytes of the client's stream."""

    def __init__(self, stream: io.BufferedIOBase, limit: int) -> None:
        self._stream = stream
        self.remaining = limit

    def read(self, n: int) -> bytes:
        n = min(n, self.remaining)
        if n <= 0:
            return b""
        data = self._stream.read(n)
        if not data:
            raise _ClientGone("client closed the connection mid-body")
        self.remaining -= len(data)
        return data

    def read_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            data = self.read(min(n, CHUNK))
            if not data:
                raise _ClientGone("body shorter than its Content-Length")
            n -= len(data)
            yield data

    def readline(self, limit: int) -> bytes:
        line = self._stream.readline(min(limit, self.remaining))
        if not line:
            raise _ClientGone("client closed the connection mid-body")
        self.remaining -= len(line)
        return line

    def drain(self) -> None:
        while self.remaining > 0:
            self.read(min(self.remaining, CHUNK))


def _decode_aws_chunked(reader: _LimitedReader, decoded_length: int) -> Iterator[bytes]:
    """The payload of an aws-chunked body (`STREAMING-…` content hashes).

    minio-go sends PUTs this way over plain HTTP; the chunk signatures chain from kopia's
    dummy-key signature, so the body is unwrapped and sent on whole with `UNSIGNED-PAYLOAD`.
    Trailers (checksums, trailer signature) are read and dropped.
    """
    total = 0
    while True:
        line = reader.readline(4096)
        if not line.endswith(b"\r\n"):
            raise _ClientGone("malformed aws-chunked body: chunk header")
        try:
            size = int(line[:-2].split(b";", 1)[0], 16)
        except ValueError:
            raise _ClientGone("malformed aws-chunked body: chunk size") from None
        if size == 0:
            reader.drain()
            break
        total += size
        if total > decoded_length:
            raise _ClientGone("aws-chunked body longer than x-amz-decoded-content-length")
        yield from reader.read_exact(size)
        if b"".join(reader.read_exact(2)) != b"\r\n":
            raise _ClientGone("malformed aws-chunked body: chunk end")
    if total != decoded_length:
        raise _ClientGone("aws-chunked body shorter than x-amz-decoded-content-length")


@dataclass
class _Body:
    length: int
    data: bytes | None = None  # held in memory: replayable
    stream: Iterator[bytes] | None = None

    @property
    def replayable(self) -> bool:
        return self.stream is None


def _read_body(handler: BaseHTTPRequestHandler) -> tuple[_Body, bool]:
    """The request body as it is to go upstream, and whether it was aws-chunked."""
    headers = handler.headers
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        raise _BadRequest(411, "MissingContentLength", "a Content-Length is required")
    try:
        wire_length = content_length(headers.get("Content-Length"), MAX_BODY)
    except BodyRefused as exc:
        code = "EntityTooLarge" if exc.status == 413 else "InvalidArgument"
        raise _BadRequest(exc.status, code, exc.message) from None
    reader = _LimitedReader(handler.rfile, wire_length)
    content_sha = (headers.get("x-amz-content-sha256") or "").upper()
    encodings = [e.strip().lower() for e in (headers.get("Content-Encoding") or "").split(",")]
    chunked = content_sha.startswith("STREAMING-") or "aws-chunked" in encodings
    if chunked:
        decoded = headers.get("x-amz-decoded-content-length")
        if not decoded:
            raise _BadRequest(
                411, "MissingContentLength", "aws-chunked body without its decoded length"
            )
        try:
            length = content_length(decoded, MAX_BODY)
        except BodyRefused as exc:
            raise _BadRequest(exc.status, "InvalidArgument", exc.message) from None
        stream: Iterator[bytes] = _decode_aws_chunked(reader, length)
    else:
        length = wire_length
        stream = reader.read_exact(wire_length)
    if length <= REPLAY_LIMIT:
        return _Body(length=length, data=b"".join(stream)), chunked
    return _Body(length=length, stream=stream), chunked


# -- the proxy -----------------------------------------------------------------------------


def default_endpoint(region: str) -> str:
    """AWS's regional S3 endpoint, as the reference's sidecar uses."""
    return f"https://s3.{region}.amazonaws.com"


class _Server(ListenerServer):
    # kopia opens one connection per parallel download and keeps idle ones; far more
    # than any restore uses, still a bound.
    max_connections = 256

    def __init__(self, address: tuple[str, int], proxy: CanopyProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a reset connection is routine here.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections and stalled clients release their thread after this;
    # longer than Go's 90 s idle-connection timeout, so kopia closes first.
    timeout = 120
    server: _Server

    def _proxy(self) -> None:
        self.server.proxy._handle(self)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("client %s: " + format, self.address_string(), *args)


def new_client_credentials() -> SigningCredentials:
    """A random key pair for one proxy's kopia (what the proxy checks requests against)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key_id = "PGRO" + "".join(secrets.choice(alphabet) for _ in range(16))
    return SigningCredentials(key_id, secrets.token_urlsafe(30))


class CanopyProxy:
    """A loopback S3 endpoint that re-signs every request with live credentials.

    It signs only for its own kopia: every request must carry a valid SigV4 signature
    made with `client_credentials` (random per proxy unless given; hand them to kopia as
    its S3 keys), anything else gets 403 AccessDenied and is not forwarded. Loopback is
    shared by every local user, so the port alone proves nothing.

    `start()` binds and serves in a background thread and returns the port; `stop()`
    stops serving and returns the final traffic totals. Also a context manager.
    """

    def __init__(
        self,
        credentials: CredentialCache | CredentialSource,
        *,
        region: str,
        upstream: str | None = None,
        host: str = "::1",
        port: int = 0,
        stats: TrafficStats | None = None,
        clock: Callable[[], datetime] = utcnow,
        transport: httpx.BaseTransport | None = None,
        upstream_timeout: float = 300.0,
        client_credentials: SigningCredentials | None = None,
    ) -> None:
        self.client_credentials = client_credentials or new_client_credentials()
        self.cache = (
            credentials
            if isinstance(credentials, CredentialCache)
            else CredentialCache(credentials, clock=clock)
        )
        self.region = region
        self.upstream = httpx.URL(upstream or default_endpoint(region))
        if self.upstream.scheme not in ("http", "https") or not self.upstream.host:
            raise ValueError(f"S3 endpoint {upstream!r} is not an http(s) URL")
        if self.upstream.path not in ("", "/") or self.upstream.query:
            raise ValueError(f"S3 endpoint {upstream!r} must not have a path or query")
        self.stats = stats or TrafficStats()
        self._host = host
        self._port = port
        self._clock = clock
        self._client = httpx.Client(
            transport=transport,
            follow_redirects=False,
            timeout=httpx.Timeout(upstream_timeout, connect=30.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        # Send S3 what kopia sent, not httpx's defaults (an Accept-Encoding kopia did not
        # ask for could get it a body it cannot read).
        for name in ("Accept", "Accept-Encoding", "User-Agent"):
            del self._client.headers[name]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """`host:port` as kopia's `--endpoint` wants it (IPv6 in brackets)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    def start(self) -> int:
        server = _Server((self._host, self._port), self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="canopy-proxy"
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("canopy proxy listening on %s, forwarding to %s", self.endpoint, self.upstream)
        return self.port

    def stop(self) -> TrafficSnapshot:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(10)
            self._server = None
        self._client.close()
        return self.stats.snapshot()

    def __enter__(self) -> CanopyProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- one request ------------------------------------------------------------------------
    def _handle(self, h: _Handler) -> None:
        target = h.path
        if "://" in target.split("?", 1)[0]:  # absolute-form request target
            target = httpx.URL(target).raw_path.decode("ascii", "replace")
        raw_path, _, raw_query = target.partition("?")
        path, query = canonical_path(raw_path), canonical_query(raw_query)
        method = h.command
        try:
            verify(
                method=method,
                path=path,
                query=query,
                headers=h.headers.items(),
                credentials=self.client_credentials,
                now=self._clock(),
            )
        except SignatureRejected as exc:
            # Not our kopia: nothing is forwarded, and its body is never read.
            h.close_connection = True
            log.warning("%s %s refused: %s", method, raw_path, exc)
            self._error(h, 403, "AccessDenied", f"canopy-proxy: {exc}")
            return
        self.stats.add(requests=1)
        try:
            body, chunked = _read_body(h)
        except _BadRequest as exc:
            h.close_connection = True
            self._error(h, exc.status, exc.code, str(exc))
            return
        except _ClientGone as exc:
            h.close_connection = True
            log.debug("%s %s: %s", method, raw_path, exc)
            return
        headers = _forward_headers(h, chunked)
        url = self.upstream.copy_with(raw_path=(path + ("?" + query if query else "")).encode())
        for attempt in (1, 2):
            try:
                creds = self.cache.get()
            except CredentialsUnavailable as exc:
                if body.stream is not None:  # its body is still unread on the connection
                    h.close_connection = True
                self._error(h, 503, "ServiceUnavailable", f"no S3 credentials: {exc}")
                return
            request = self._signed_request(method, url, path, query, headers, body, creds)
            try:
                response = self._client.send(request, stream=True)
            except (httpx.HTTPError, _ClientGone) as exc:
                if isinstance(exc, _ClientGone) or body.stream is not None:
                    h.close_connection = True
                log.warning("%s %s: upstream failed: %s", method, raw_path, type(exc).__name__)
                self._error(h, 502, "BadGateway", f"S3 request failed: {type(exc).__name__}")
                return
            try:
                head_overhead = _request_overhead(request)
                self.stats.sent(body.length, head_overhead)
                prefetched = self._prefetch_error(response, method)
                if prefetched is not None and _error_code(prefetched) in _REFRESH_CODES:
                    self.cache.invalidate(creds)
                    if attempt == 1 and body.replayable:
                        log.info("%s %s: S3 rejected expired credentials, retrying", method, path)
                        self.stats.received(len(prefetched), _response_overhead(response))
                        continue
                self._relay(h, response, method, prefetched)
                log.debug(
                    "%s %s -> %d%s",
                    method,
                    raw_path,
                    response.status_code,
                    f" {_error_code(prefetched)}" if prefetched else "",
                )
            finally:
                response.close()
            return

    def _signed_request(
        self,
        method: str,
        url: httpx.URL,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body: _Body,
        creds: TemporaryCredentials,
    ) -> httpx.Request:
        host = url.netloc.decode("ascii")
        signed = {"host": host}
        for name, value in headers:
            low = name.lower()
            if low.startswith("x-amz-") or low in _SIGNED_PLAIN_HEADERS:
                signed[low] = f"{signed[low]},{value}" if low in signed else value
        signature = sign(
            method=method,
            path=path,
            query=query,
            headers=signed,
            credentials=creds,
            region=self.region,
            service="s3",
            when=self._clock(),
            payload_hash=UNSIGNED_PAYLOAD,
        )
        out: list[tuple[str, str]] = [("Host", host), *headers, *signature.headers.items()]
        if body.length or method in ("PUT", "POST"):
            out.append(("Content-Length", str(body.length)))
        content: bytes | Iterator[bytes] | None = body.data if body.replayable else body.stream
        return self._client.build_request(
            method,
            url,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in out],
            content=content if body.length else None,
        )

    def _prefetch_error(self, response: httpx.Response, method: str) -> bytes | None:
        """An error body small enough to inspect for an expired-token code, read whole."""
        if response.status_code not in (400, 403) or method == "HEAD":
            return None
        length = response.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > CHUNK):
            return None
        return b"".join(response.iter_raw())

    def _relay(
        self,
        h: _Handler,
        response: httpx.Response,
        method: str,
        prefetched: bytes | None,
    ) -> None:
        status = response.status_code
        no_body = method == "HEAD" or status in (204, 304) or status < 200
        lines = [f"HTTP/1.1 {status} {response.reason_phrase}".encode("latin-1")]
        framed = False
        for name, value in response.headers.raw:
            if name.decode("latin-1").lower() in _HOP_BY_HOP:
                continue
            lines.append(name + b": " + value)
        if not no_body and "content-length" not in response.headers:
            lines.append(b"Transfer-Encoding: chunked")
            framed = True
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        self.stats.received(0, _response_overhead(response))
        source: Iterator[bytes] | list[bytes]
        if no_body:
            source = []
        elif prefetched is not None:
            source = [prefetched]
        else:
            source = response.iter_raw(CHUNK)
        try:
            h.wfile.write(head)
            for piece in source:
                if not piece:
                    continue
                self.stats.received(len(piece))
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framed else piece)
            if framed:
                h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except httpx.HTTPError as exc:
            # Headers are out: the only honest signal left is a truncated body.
            h.close_connection = True
            log.warning("%s: S3 response broke off: %s", method, type(exc).__name__)
        except OSError:
            h.close_connection = True
            log.debug("%s: client went away during the response", method)

    def _error(self, h: _Handler, status: int, code: str, message: str) -> None:
        """An S3-shaped error from the proxy itself (kopia retries 5xx)."""
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            "<Resource>canopy-proxy</Resource></Error>"
        ).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(body) if h.command != "HEAD" else 0))
            if h.close_connection:
                h.send_header("Connection", "close")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
        except OSError:
            h.close_connection = True


def _forward_headers(h: BaseHTTPRequestHandler, chunked: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in h.headers.items():
        low = name.lower()
        if low in _DROPPED_REQUEST_HEADERS or (chunked and low in _CHUNKED_ONLY_HEADERS):
            continue
        if low == "content-encoding" and chunked:
            rest = [e.strip() for e in value.split(",") if e.strip().lower() != "aws-chunked"]
            if not rest:
                continue
            value = ",".join(rest)
        out.append((name, value))
    return out


def _request_overhead(request: httpx.Request) -> int:
    line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2


def _response_overhead(response: httpx.Response) -> int:
    line = len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 2


_CODE = re.compile(rb"<Code>\s*([^<\s]+)\s*</Code>")


def _error_code(body: bytes) -> str | None:
    match = _CODE.search(body)
    return match.group(1).decode("ascii", "replace") if match else None


# -- progress, final stats, port file ----------------------------------------------------------


def post_json(
    client: httpx.Client,
    url: str,
    body: Mapping[str, Any],
    what: str,
    token: str | None = None,
) -> bool:
    """POST best-effort: failures are logged (without the URL's query), never raised."""
    try:
        reply = client.post(
            url, json=dict(body), headers=auth_headers(token), timeout=CALLBACK_TIMEOUT
        )
    except httpx.HTTPError as exc:
        log.warning("%s to %s failed: %s", what, _safe_url(url), type(exc).__name__)
        return False
    if reply.status_code >= 300:
        log.warning("%s to %s answered %d", what, _safe_url(url), reply.status_code)
        return False
    return True


def _safe_url(url: str) -> str:
    return url.split("?", 1)[0]


class ProgressReporter:
    """Every `interval` seconds, hand a cumulative traffic sample to `send`.

    Stopping aborts the loop rather than sending a last sample: the final totals go to the
    stats callback instead.
    """

    def __init__(
        self,
        stats: TrafficStats,
        send: Callable[[TrafficSnapshot], None],
        interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self._stats = stats
        self._send = send
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canopy-progress", daemon=True)

    def start(self) -> ProgressReporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(CALLBACK_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._send(self._stats.snapshot())
            except Exception:
                log.warning("progress sample failed", exc_info=True)


def http_progress_sender(
    client: httpx.Client, url: str, run_id: str, backup_type: str, token: str | None = None
) -> Callable[[TrafficSnapshot], None]:
    def send(sample: TrafficSnapshot) -> None:
        post_json(client, url, sample.progress_body(run_id, backup_type), "progress sample", token)

    return send


def write_port_file(path: Path, port: int) -> None:
    """Write the port as decimal text, atomically (the kopia side polls for the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


def valid_run_id(value: str | None) -> str | None:
    """The run id if it is a UUID (the reference samples progress only then), else None."""
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        log.warning("PGRO_RUN_ID is not a UUID; progress samples are off")
        return None


@dataclass(frozen=True)
class SidecarSettings:
    """What the `canopy-proxy` command is given (the reference's `PGRO_*` environment),
    plus the two secrets it is handed out of argv: the restore's broker token and the
    key pair its kopia signs with."""

    broker_url: str
    group: str
    backup_type: str
    region: str
    broker_token: str = field(repr=False)
    client_credentials: SigningCredentials = field(repr=False)
    s3_endpoint: str | None = None
    listen_host: str = "::1"
    port: int = 0
    port_file: Path | None = DEFAULT_PORT_FILE
    run_id: str | None = None
    progress_url: str | None = None
    stats_url: str | None = None
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    refresh_margin: timedelta = field(default=DEFAULT_REFRESH_MARGIN)


def run_sidecar(
    settings: SidecarSettings,
    stop: threading.Event,
    *,
    on_ready: Callable[[CanopyProxy], None] | None = None,
) -> TrafficSnapshot:
    """Serve until `stop` is set, then post the final stats; returns them."""
    run_id = valid_run_id(settings.run_id)
    with httpx.Client(follow_redirects=False) as callbacks:
        token = settings.broker_token
        source = BrokerCredentialSource(
            settings.broker_url,
            settings.group,
            settings.backup_type,
            run_id,
            token=token,
            client=callbacks,
        )
        proxy = CanopyProxy(
            CredentialCache(source, refresh_margin=settings.refresh_margin),
            region=settings.region,
            upstream=settings.s3_endpoint,
            host=settings.listen_host,
            port=settings.port,
            client_credentials=settings.client_credentials,
        )
        port = proxy.start()
        reporter: ProgressReporter | None = None
        try:
            if settings.port_file is not None:
                write_port_file(settings.port_file, port)
            if run_id and settings.progress_url:
                send = http_progress_sender(
                    callbacks, settings.progress_url, run_id, settings.backup_type, token
                )
                reporter = ProgressReporter(proxy.stats, send, settings.progress_interval).start()
            if on_ready is not None:
                on_ready(proxy)
            while not stop.wait(1.0):
                pass
        finally:
            if reporter is not None:
                reporter.stop()
            totals = proxy.stop()
            log.info(
                "canopy proxy stopped after %d requests: %d bytes sent, %d received",
                totals.requests,
                totals.sent_payload_bytes,
                totals.received_payload_bytes,
            )
            if settings.stats_url:
                post_json(callbacks, settings.stats_url, totals.stats_body(), "final stats", token)
    return totals


def wait_for_port_file(path: Path, timeout: float = 30.0) -> int:
    """Read the port the sidecar wrote (what the restore script's prelude does)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text().strip())
        if time.monotonic() > deadline:
            raise TimeoutError(f"canopy-proxy did not write {path} within {timeout:.0f}s")
        time.sleep(0.1)
