"""The credential broker: canopy credentials for `pgro canopy-proxy`, without handing
canopy access to the restore pod (reference canopy-protocol §5.2).

`POST /internal/restore-creds` with `{group, type, run_id?}` and the restore's bearer
token (`pgro.canopy.tokens`) answers
`{"credentials": {...credential_process...}, "repo_password": "..."}`; `GET /healthz`.
Answers are cached per `(group, type, run_id)` until two minutes before they expire, so a
restore's proxy refreshing every few minutes does not mint credentials each time. Canopy
errors become `502 {"error": ...}` (secret-free), a broker without canopy `503`, as in the
reference; a missing or forged token `401`, a token for another group, type, run or job
`403`. The operator serves it on `PGRO_BROKER_LISTEN_ADDR` (`[::]:9091`, behind the
NetworkPolicy in deploy/canopy); `pgro run` on loopback.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import ThreadingHTTPServer
from typing import Any, Final, Protocol
from uuid import UUID

from pydantic import ValidationError

from pgro.canopy.client import CanopyError
from pgro.canopy.tokens import BrokerTokens, TokenBinding, bearer
from pgro.canopy.wire import ProgressArgs, RestoreCredentials, describe_validation_error
from pgro.clock import utcnow
from pgro.http_listener import BodyRefused, ListenerHandler, ListenerServer

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
    # What canopy answered, when the error is canopy's (403, 409, 5xx...).
    upstream_status: int | None = None


class CredentialBroker:
    """The cache and the canopy calls; `serve` puts HTTP in front of it."""

    def __init__(
        self,
        issuer: CredentialIssuer | None,
        *,
        clock: Callable[[], datetime] = utcnow,
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
            raise BrokerError(502, str(exc), exc.status) from None
        with self._lock:
            self._cache[key] = fresh
            self.issued += 1
            # Expired entries of finished runs would otherwise pile up.
            now = self.clock()
            for stale in [k for k, v in self._cache.items() if v.credentials.expiration <= now]:
                del self._cache[stale]
        return fresh

    def handle(self, body: bytes, binding: TokenBinding) -> tuple[int, dict[str, Any]]:
        """One request body from the holder of a token for `binding` → (status, answer)."""
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
        if (group, type_, run_id or None) != (binding.group, binding.type, binding.run_id):
            log.warning(
                "restore credentials for group %s type %s refused: the token is for %s",
                group,
                type_,
                binding.job,
            )
            return 403, {"error": "the token does not cover this group, type and run"}
        try:
            return 200, self.credentials(group, type_, run_id or None).broker_json()
        except BrokerError as exc:
            log.warning("restore credentials for group %s type %s: %s", group, type_, exc.message)
            return exc.status, {"error": exc.message}


class Callbacks:
    """Where the canopy proxies report: final traffic totals, kept until the verification
    report takes them, and progress samples, relayed to canopy at once (reference §5.3).

    Keyed by `namespace/job` as in the reference (the restore's work: `<restore>-restore`
    on Kubernetes, `<restore>` for `pgro run`). Never blocks a proxy on canopy: a relay
    failure is logged at debug level and the proxy still gets its 204.
    """

    def __init__(self, relay: ProgressRelay | None) -> None:
        self.relay = relay
        self._stats: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.relayed = 0

    def final_stats(self, key: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._stats[key] = body

    def take_stats(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._stats.pop(key, None)

    def progress(self, body: dict[str, Any]) -> None:
        if self.relay is None:
            return
        try:
            sample = ProgressArgs.model_validate(body)
        except ValidationError as error:
            log.debug("progress sample dropped: %s", describe_validation_error(error))
            return
        try:
            self.relay.backup_progress(sample)
            self.relayed += 1
        except CanopyError as exc:
            log.debug("progress sample not relayed: %s", exc)


class ProgressRelay(Protocol):
    def backup_progress(self, sample: ProgressArgs) -> None: ...


_CALLBACK = re.compile(
    r"^/api/v1/canopy-(stats|progress)/([a-z0-9][-a-z0-9.]*)/([a-z0-9][-a-z0-9.]*)$"
)


def serve(
    broker: CredentialBroker,
    host: str,
    port: int,
    callbacks: Callbacks | None = None,
    *,
    tokens: BrokerTokens,
) -> ThreadingHTTPServer:
    """Serve the broker (and, with `callbacks`, the proxies' callback routes) in a daemon
    thread; `shutdown()` stops it.

    Every route but `/healthz` needs `Authorization: Bearer <token>` with a token from
    `tokens` (401 without a genuine one), and answers only for what that token names
    (403 otherwise): credentials for its `(group, type, run_id)`, callbacks for its job.
    """

    class Handler(ListenerHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            try:
                body = self.read_body(MAX_BODY)
            except BodyRefused as exc:
                self._send(exc.status, {"error": exc.message})
                return
            creds_route = self.path == "/internal/restore-creds"
            match = _CALLBACK.match(self.path)
            if not creds_route and (callbacks is None or match is None):
                self._send(404, {"error": "not found"})
                return
            token = bearer(self.headers.get("Authorization"))
            binding = tokens.verify(token) if token else None
            if binding is None:
                log.warning("broker: %s without a valid token refused", self.path)
                self._send(401, {"error": "a valid bearer token is required"}, challenge=True)
                return
            if creds_route:
                status, answer = broker.handle(body, binding)
                self._send(status, answer)
                return
            assert callbacks is not None and match is not None
            try:
                doc = json.loads(body or b"{}")
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                self._send(400, {"error": "expected a JSON object"})
                return
            kind, namespace, job = match.groups()
            if f"{namespace}/{job}" != binding.job:
                self._send(403, {"error": "the token is for another restore's callbacks"})
                return
            if kind == "stats":
                callbacks.final_stats(binding.job, doc)
            elif binding.run_id is None or doc.get("run_id") != binding.run_id:
                self._send(403, {"error": "the token is for another run"})
                return
            else:
                callbacks.progress(doc)
            self._send(204, None)

        def _send(
            self, status: int, doc: dict[str, Any] | None, *, challenge: bool = False
        ) -> None:
            body = b"" if doc is None else json.dumps(doc).encode()
            self.send_response(status)
            if doc is not None:
                self.send_header("Content-Type", "application/json")
            if challenge:
                self.send_header("WWW-Authenticate", "Bearer")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # every proxy refresh would be a log line; failures are logged above

    server = ListenerServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="broker").start()
    return server
