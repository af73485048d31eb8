"""Delivering the verification reports waiting in replica statuses, for both runtimes.

The runtime calls `step(replica)` whenever it reconciles a canopy replica. The courier
settles the deliveries that finished, starts the ones that are due (in its thread pool:
canopy may take seconds to answer) and returns the report list the replica's status
should now hold. Only once the runtime has written that list does it call `settled`:
until then a delivered report is never sent again, and a write that lost a race is simply
recomputed on the next pass from the replica as it then is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.verification import PendingVerificationReport
from pgro.canopy import reports
from pgro.canopy.broker import Callbacks
from pgro.canopy.client import CanopyError
from pgro.canopy.wire import HealthDetails, VerificationArgs
from pgro.core import verification_reports as vr
from pgro.core.plan import EmitEvent, EventType
from pgro.core.reasons import EVENT_VERIFICATION_REPORT_REJECTED
from pgro.observability import REPORT_ACCEPTED, REPORT_FAILED, REPORT_REFUSED, Metrics

log = logging.getLogger("pgro.canopy.reports")

# Canopy's answers to a report that no retry can change: malformed (400, 422), or naming
# a declaration that no longer exists (404: "refused rather than recorded").
DEFINITIVE_REFUSALS: Final = frozenset({400, 404, 422})

_Key = tuple[str, str]  # (replica key, report key)


@dataclass(frozen=True)
class Dropped:
    report: PendingVerificationReport
    why: str

    def event(self) -> EmitEvent:
        """The Warning every runtime records on the replica for a report dropped for good."""
        note = f"The {self.report.outcome} report on restore {self.report.restore} was dropped"
        return EmitEvent(
            EventType.WARNING,
            EVENT_VERIFICATION_REPORT_REJECTED,
            f"{note}: {self.why}",
            self.report.restore,
        )


@dataclass(frozen=True)
class Step:
    """What the runtime writes: `reports` (None: nothing changed), and a Warning event
    for each report dropped for good."""

    reports: list[PendingVerificationReport] | None
    dropped: tuple[Dropped, ...] = ()
    keys: tuple[_Key, ...] = ()


@dataclass
class _Done:
    error: BaseException | None = None


@dataclass
class ReportCourier:
    send: Callable[[VerificationArgs], None]
    pool: Executor
    clock: Callable[[], datetime]
    callbacks: Callbacks | None = None
    # The proxy's stats callback key for a restore: `<namespace>/<job>`.
    stats_key: Callable[[str, str], str] = lambda namespace, restore: f"{namespace}/{restore}"
    # Counts each delivery's outcome (`postgres_restore_canopy_reports_total`); the runtime
    # that owns the registry sets it.
    metrics: Metrics | None = None
    # The `url` semantic: the replica's address, added to `health_details.url` at delivery
    # (on the pool's thread: it may ask tailscaled). None: no url (`pgro run`).
    url_for: Callable[[PostgresPhysicalReplica], str | None] | None = None
    _flying: dict[_Key, Future[None]] = field(default_factory=dict)
    _done: dict[_Key, _Done] = field(default_factory=dict)
    # The operator's workers step different replicas at the same time.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self, replica: PostgresPhysicalReplica) -> Step:
        with self._lock:
            return self._step(replica)

    def _step(self, replica: PostgresPhysicalReplica) -> Step:
        rkey = replica.key
        for key, future in list(self._flying.items()):
            if key[0] == rkey and future.done():
                del self._flying[key]
                self._done[key] = _Done(future.exception())
        before = list(replica.status.pending_verification_reports)
        current = list(before)
        dropped: list[Dropped] = []
        settled: list[_Key] = []
        now = self.clock()
        for report in before:
            key = (rkey, report.key)
            done = self._done.get(key)
            if done is None:
                continue
            settled.append(key)
            error = done.error
            if error is None:
                log.info(
                    "canopy accepted the %s report on %s (snapshot %s)",
                    report.outcome,
                    rkey,
                    report.snapshot_id,
                )
                current = vr.delivered(current, report.key)
                self._count(REPORT_ACCEPTED)
            elif isinstance(error, CanopyError) and error.status in DEFINITIVE_REFUSALS:
                current = vr.rejected(current, report.key)
                dropped.append(Dropped(report, f"canopy refused it: {error}"))
                self._count(REPORT_REFUSED)
            else:
                current = vr.attempt_failed(current, report.key, now, str(error))
                log.warning("canopy report on %s not delivered: %s", rkey, error)
                self._count(REPORT_FAILED)
        # Results for reports no longer waiting (removed by someone else) are forgotten.
        waiting = {(rkey, r.key) for r in before}
        for key in [k for k in self._done if k[0] == rkey and k not in waiting]:
            del self._done[key]
        for report in vr.due(current, now):
            key = (rkey, report.key)
            if key in self._flying or key in self._done:
                continue
            current, report = self._with_traffic(replica, current, report)
            try:
                args = reports.verification_args(replica, report)
            except reports.ReportUnsendable as exc:
                current = vr.rejected(current, report.key)
                dropped.append(Dropped(report, f"the report cannot be built: {exc}"))
                self._count(REPORT_REFUSED)
                continue
            self._flying[key] = self.pool.submit(self._deliver, replica, args)
        changed = current != before
        return Step(current if changed else None, tuple(dropped), tuple(settled))

    def _deliver(self, replica: PostgresPhysicalReplica, args: VerificationArgs) -> None:
        self.send(self._with_url(replica, args))

    def _with_url(
        self, replica: PostgresPhysicalReplica, args: VerificationArgs
    ) -> VerificationArgs:
        """`args` with `health_details.url`, when `url_for` gives one; never fails."""
        if self.url_for is None:
            return args
        try:
            url = self.url_for(replica)
        except Exception as exc:  # the url is an extra: it never holds back the verdict
            log.debug("%s: no url for its report (%s)", replica.key, type(exc).__name__)
            return args
        if url is None:
            return args
        details = args.health_details or HealthDetails()
        return args.model_copy(update={"health_details": details.model_copy(update={"url": url})})

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.report_delivery(outcome)

    def settled(self, step: Step) -> None:
        """The runtime wrote `step.reports`: the results it applied are done with."""
        with self._lock:
            for key in step.keys:
                self._done.pop(key, None)

    def _with_traffic(
        self,
        replica: PostgresPhysicalReplica,
        current: list[PendingVerificationReport],
        report: PendingVerificationReport,
    ) -> tuple[list[PendingVerificationReport], PendingVerificationReport]:
        if report.traffic is not None or self.callbacks is None:
            return current, report
        stats = self.callbacks.take_stats(self.stats_key(replica.namespace, report.restore))
        if stats is None:
            return current, report
        current = vr.with_details(current, report.key, traffic=reports.traffic_from_stats(stats))
        return current, next(r for r in current if r.key == report.key)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._flying)
