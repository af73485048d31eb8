"""Metrics with the reference's names, pgro's per-replica gauges and canopy report counter
(docs/monitoring.md), and the `/metrics`, `/livez`, `/readyz` endpoints."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pgro.api.conditions import get_condition
from pgro.api.phases import RedactionPhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.core.reasons import LAST_RESTORE_FAILED
from pgro.core.schedule import InvalidSchedule, parse_schedule, schedule_seed
from pgro.http_listener import ListenerHandler, ListenerServer

log = logging.getLogger("pgro.observability")

# /livez fails when the loop has not turned for this long (the reference: 30 s heartbeat).
HEARTBEAT_STALE_S = 30.0

# The per-replica gauges (pgro's own, beyond the reference's names) carry these labels.
REPLICA_LABELS: Final = ("namespace", "replica")
# How many consecutive gaps of a schedule are measured for its longest one: enough to
# cover a weekday-only or twice-a-month cron.
SCHEDULE_GAPS: Final = 16
# Outcomes of delivering a canopy verification report (`postgres_restore_canopy_reports_total`).
REPORT_ACCEPTED: Final = "accepted"
REPORT_REFUSED: Final = "refused"  # dropped for good: canopy refused it, or it cannot be built
REPORT_FAILED: Final = "failed"  # an attempt that is retried later


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

        # Per replica, from the replica as each pass observes it (its status is what
        # survives a restart, so the gauges are right again after the first pass).
        self.replica_last_restore_completed = Gauge(
            "postgres_restore_replica_last_restore_completed_timestamp_seconds",
            "When the replica last switched over to a new restore (status.lastRestoreCompletedAt)",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_created = Gauge(
            "postgres_restore_replica_created_timestamp_seconds",
            "When the replica was created",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_redaction_incomplete = Gauge(
            "postgres_restore_replica_redaction_incomplete",
            "1 while a redacting replica's latest redaction is partial (it serves with masks "
            "not applied) or failed (its new restore is held), else 0; absent without "
            "spec.redaction",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_max_data_age = Gauge(
            "postgres_restore_replica_max_data_age_seconds",
            "The longest its schedule lets a replica go between restores: the longest gap "
            "between fires, plus minimumTtl and scheduleJitter",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_consecutive_failures = Gauge(
            "postgres_restore_replica_consecutive_restore_failures",
            "Restores of the replica that failed in a row (status.consecutiveRestoreFailures)",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_last_restore_failed = Gauge(
            "postgres_restore_replica_last_restore_failed",
            "1 while the replica's latest restore failed (condition LastRestoreFailed)",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_reports_pending = Gauge(
            "postgres_restore_replica_canopy_reports_pending",
            "Verification reports waiting in the replica's status for canopy to accept them",
            REPLICA_LABELS,
            registry=r,
        )
        self.replica_oldest_report = Gauge(
            "postgres_restore_replica_oldest_pending_canopy_report_timestamp_seconds",
            "When the oldest report still waiting for canopy was written",
            REPLICA_LABELS,
            registry=r,
        )
        self.canopy_reports = Counter(
            "postgres_restore_canopy_reports",
            "Deliveries of verification reports to canopy, by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in (REPORT_ACCEPTED, REPORT_REFUSED, REPORT_FAILED):
            # Exported at 0 from the start: `increase()` needs a sample before the first one.
            self.canopy_reports.labels(outcome)
        self._replica_gauges = (
            self.replica_last_restore_completed,
            self.replica_created,
            self.replica_max_data_age,
            self.replica_consecutive_failures,
            self.replica_last_restore_failed,
            self.replica_reports_pending,
            self.replica_oldest_report,
            self.replica_redaction_incomplete,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_replica(self, replica: PostgresPhysicalReplica, now: datetime) -> None:
        """Set the replica's gauges from the replica as observed; a value the replica does
        not have (yet) is left out rather than shown as 0. Never raises: a gauge must not
        fail the reconcile pass that sets it."""
        try:
            self._observe_replica(replica, now)
        except Exception:
            log.exception("the metrics of replica %s were not updated", replica.key)

    def _observe_replica(self, replica: PostgresPhysicalReplica, now: datetime) -> None:
        labels = (replica.namespace, replica.name)
        status = replica.status
        created = replica.metadata.creation_timestamp
        completed = status.last_restore_completed_at
        failed = get_condition(status.conditions, LAST_RESTORE_FAILED)
        pending = status.pending_verification_reports
        self._set(self.replica_created, labels, created.timestamp() if created else None)
        self._set(
            self.replica_last_restore_completed,
            labels,
            completed.timestamp() if completed else None,
        )
        self._set(self.replica_max_data_age, labels, max_data_age(replica, now))
        self._set(
            self.replica_consecutive_failures, labels, status.consecutive_restore_failures or 0
        )
        self._set(
            self.replica_last_restore_failed,
            labels,
            1 if failed is not None and failed.is_true else 0,
        )
        phase = status.redaction_phase
        self._set(
            self.replica_redaction_incomplete,
            labels,
            None
            if replica.spec.redaction is None
            else int(phase is not None and (phase.is_failed or phase == RedactionPhase.PARTIAL)),
        )
        self._set(self.replica_reports_pending, labels, len(pending))
        oldest = min((r.observed_at for r in pending), default=None)
        self._set(self.replica_oldest_report, labels, oldest.timestamp() if oldest else None)

    def forget_replica(self, key: str) -> None:
        """The replica is gone: so are its series."""
        namespace, _, name = key.partition("/")
        for gauge in self._replica_gauges:
            self._set(gauge, (namespace, name), None)

    def report_delivery(self, outcome: str) -> None:
        self.canopy_reports.labels(outcome).inc()

    @staticmethod
    def _set(gauge: Gauge, labels: tuple[str, str], value: float | None) -> None:
        if value is not None:
            gauge.labels(*labels).set(value)
            return
        with contextlib.suppress(KeyError):  # never set
            gauge.remove(*labels)


def max_data_age(replica: PostgresPhysicalReplica, now: datetime) -> float | None:
    """Seconds: the longest gap between two fires of the replica's schedule (measured over
    the next `SCHEDULE_GAPS` gaps from the start of this hour), plus `minimumTtl` (fires
    within it after a restore are skipped, so the next restore waits for the first fire
    after it ends) and `scheduleJitter` (one fire early, the next late). None when the
    schedule is invalid: it does not fire at all."""
    spec = replica.spec
    seed = schedule_seed(replica.metadata.uid, replica.namespace, replica.name)
    hour = int(now.timestamp()) // 3600 * 3600
    gap = _longest_gap(spec.schedule, seed, hour)
    if gap is None:
        return None
    ttl = spec.minimum_ttl.total_seconds() if spec.minimum_ttl is not None else 0.0
    return gap + ttl + spec.schedule_jitter.total_seconds()


@functools.lru_cache(maxsize=1024)
def _longest_gap(expression: str, seed: int, hour: int) -> float | None:
    try:
        schedule = parse_schedule(expression, seed)
        fire = schedule.next_after(datetime.fromtimestamp(hour, UTC))
        longest = timedelta(0)
        for _ in range(SCHEDULE_GAPS):
            following = schedule.next_after(fire)
            longest = max(longest, following - fire)
            fire = following
    except InvalidSchedule:
        return None
    return longest.total_seconds()


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
