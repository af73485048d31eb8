"""The credential broker: canopy credentials for `pgro canopy-proxy`, without handing
canopy access to the restore pod (reference canopy-protocol §5.2).

`POST /internal/restore-creds` with `{group, type, run_id?}` answers
`{"credentials": {...credential_process...}, "repo_password": "..."}`; `GET /healthz`.
Answers are cached per `(group, type, run_id)` until two minutes before they expire, so a
restore's proxy refreshing every few minutes does not mint credentials each time. Canopy
errors become `502 {"error": ...}` (secret-free), a broker without canopy `503`, as in the
reference. The operator serves it on `PGRO_BROKER_LISTEN_ADDR` (`[::]:9091`); `pgro run`
on loopback.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Protocol
from uuid import UUID

from pgro.canopy.client import CanopyError
from pgro.canopy.wire import RestoreCredentials

log = logging.getLogger("pgro.canopy.broker")

REFRESH_MARGIN: Final = timedelta(minutes=2)
MAX_BODY: Final = 64 * 1024


class CredentialIssuer(Protocol):
    """What the broker needs of the canopy client."""

    def restore_credentials(
        self, group: UUID | str, type: str, run_id: UUID | str | None = None
    ) -> RestoreCredentials: ...


CacheKey = tuple[str, str, str | None]


@dataclass(frozen=True)
class BrokerError(Exception):
    status: int
    message: str


class CredentialBroker:
    """The cache and the canopy calls; `serve` puts HTTP in front of it."""

    def __init__(
        self,
        issuer: CredentialIssuer | None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        margin: timedelta = REFRESH_MARGIN,
    ) -> None:
        self.issuer = issuer
        self.clock = clock
        self.margin = margin
        self._cache: dict[CacheKey, RestoreCredentials] = {}
        self._lock = threading.Lock()
        self.issued = 0

    def credentials(self, group: str, type_: str, run_id: str | None) -> RestoreCredentials:
        if self.issuer is None:
            raise BrokerError(503, "canopy client not configured on this pgro")
        try:
            UUID(group)
            if run_id is not None:
                UUID(run_id)
        except ValueError:
            raise BrokerError(400, "group and run_id must be UUIDs") from None
        if not type_:
            raise BrokerError(400, "type is required")
        key = (group, type_, run_id)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and not cached.credentials.expires_within(
                self.clock(), self.margin
            ):
                return cached
        try:
            fresh = self.issuer.restore_credentials(group, type_, run_id)
        except CanopyError as exc:
            raise BrokerError(502, str(exc)) from None
        with self._lock:
            self._cache[key] = fresh
            self.issued += 1
            # Expired entries of finished runs would otherwise pile up.
            now = self.clock()
            for stale in [k for k, v in self._cache.items() if v.credentials.expiration <= now]:
                del self._cache[stale]
        return fresh

    def handle(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """One request body → (status, JSON answer)."""
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "the body is not JSON"}
        if not isinstance(doc, dict):
            return 400, {"error": "expected a JSON object {group, type, run_id?}"}
        group, type_, run_id = doc.get("group"), doc.get("type"), doc.get("run_id")
        if not isinstance(group, str) or not isinstance(type_, str):
            return 400, {"error": "group and type are required strings"}
        if run_id is not None and not isinstance(run_id, str):
            return 400, {"error": "run_id must be a string"}
        try:
            return 200, self.credentials(group, type_, run_id or None).broker_json()
        except BrokerError as exc:
            log.warning("restore credentials for group %s type %s: %s", group, type_, exc.message)
            return exc.status, {"error": exc.message}


def serve(broker: CredentialBroker, host: str, port: int) -> ThreadingHTTPServer:
    """Serve the broker in a daemon thread; `shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/internal/restore-creds":
                self._send(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(413, {"error": "request body too large"})
                return
            status, answer = broker.handle(self.rfile.read(length))
            self._send(status, answer)

        def _send(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # every proxy refresh would be a log line; failures are logged above

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="broker").start()
    return server
