"""Metrics with the reference's names, and the `/metrics`, `/livez`, `/readyz` endpoints."""

from __future__ import annotations

import threading
import time
from http.server import ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pgro.http_listener import ListenerHandler, ListenerServer

# /livez fails when the loop has not turned for this long (the reference: 30 s heartbeat).
HEARTBEAT_STALE_S = 30.0


class Metrics:
    """One registry per runtime, so tests and several runtimes in a process never collide.

    `postgres_restore_started_total` counts each restore once, when it is created (the
    reference increments it twice per restore: at creation and at Pending→Restoring).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciliations = Counter(
            "postgres_restore_reconciliations", "Reconcile passes", ["controller"], registry=r
        )
        self.reconciliation_errors = Counter(
            "postgres_restore_reconciliation_errors",
            "Reconcile passes that failed",
            ["controller"],
            registry=r,
        )
        self.reconciliation_duration = Histogram(
            "postgres_restore_reconciliation_duration_seconds",
            "Reconcile pass duration",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
            registry=r,
        )
        self.queue_depth = Gauge(
            "postgres_restore_queue_depth", "Replicas waiting for a restore slot", registry=r
        )
        self.active_count = Gauge(
            "postgres_restore_active_count", "Restores holding a slot", registry=r
        )
        self.started = Counter("postgres_restore_started", "Restores started", registry=r)
        self.completed = Counter(
            "postgres_restore_completed", "Restore downloads that succeeded", registry=r
        )
        self.failed = Counter("postgres_restore_failed", "Restores that failed", registry=r)
        self.switchovers = Counter(
            "postgres_restore_switchovers", "Switchovers completed", registry=r
        )
        self.duration = Histogram(
            "postgres_restore_duration_seconds",
            "From restore creation to Active",
            buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
            registry=r,
        )
        self.notifications_sent = Counter(
            "postgres_restore_notifications_sent",
            "Notifications delivered",
            ["name", "event"],
            registry=r,
        )
        self.notifications_failed = Counter(
            "postgres_restore_notifications_failed",
            "Notifications that exhausted their attempts",
            ["name", "event"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """What /livez and /readyz report: a heartbeat the main loop beats every turn."""

    def __init__(self) -> None:
        self._beat = time.monotonic()
        self._ready = False
        self._lock = threading.Lock()

    def beat(self) -> None:
        with self._lock:
            self._beat = time.monotonic()

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = ready

    def live(self) -> tuple[bool, str]:
        with self._lock:
            age = time.monotonic() - self._beat
        if age > HEARTBEAT_STALE_S:
            return False, f"heartbeat stale ({age:.0f}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        with self._lock:
            ready = self._ready
        if not live:
            return False, why
        return (True, "ok") if ready else (False, "not ready")


def serve(metrics: Metrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Start the HTTP server in a daemon thread; `shutdown()` stops it.

    `host` may be an IPv4 or IPv6 address (`::` serves both) or a host name; OSError when
    it cannot be bound (the port is taken, the address is not this host's)."""

    class Handler(ListenerHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif self.path in ("/livez", "/readyz"):
                ok, why = health.live() if self.path == "/livez" else health.ready()
                self._send(200 if ok else 503, why.encode() + b"\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the structured log

    server = ListenerServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    return server
