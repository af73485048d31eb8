"""The report courier: settle finished deliveries, start due ones, never send twice."""

from __future__ import annotations

from concurrent.futures import Executor, Future
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.verification import PendingVerificationReport
from pgro.canopy.broker import Callbacks
from pgro.canopy.client import CanopyError, CanopyTransient
from pgro.canopy.courier import ReportCourier
from pgro.canopy.naming import canopy_labels
from pgro.canopy.wire import VerificationArgs
from tests.fixtures.manifests import replica

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
RUN = "0b0e7f7e-0d1a-4b7e-8f3e-5f8b1c2d3e4f"


class Manual(Executor):
    """Runs a submitted call only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Future[Any], Any, tuple[Any, ...]]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.pending.append((future, fn, args))
        return future

    def run_all(self) -> None:
        for future, fn, args in self.pending:
            try:
                future.set_result(fn(*args))
            except Exception as exc:
                future.set_exception(exc)
        self.pending.clear()


LABELS = canopy_labels(
    replica_id=UUID(int=1), group_id=UUID(int=2), server_id=UUID(int=3), type="t", intent="verify"
)


def _pending(reports: list[PendingVerificationReport]) -> PostgresPhysicalReplica:
    """The canopy replica, holding `reports` to deliver."""
    return replica(
        "canopy-replica",
        None,
        namespace="ns",
        metadata={"labels": LABELS},
        status={"pendingVerificationReports": [r.to_wire() for r in reports]},
        schedule="H * * * *",
        canopySource={"group": str(UUID(int=2)), "type": "t"},
    )


def _report() -> PendingVerificationReport:
    return PendingVerificationReport.model_validate(
        {
            "restore": "r-1",
            "runId": RUN,
            "snapshotId": "kA",
            "outcome": "success",
            "observedAt": "2026-11-27T11:59:00Z",
        }
    )


def _courier(
    answers: list[Exception | None], callbacks: Callbacks | None = None
) -> tuple[ReportCourier, Manual, list[VerificationArgs]]:
    sent: list[VerificationArgs] = []
    pool = Manual()

    def send(args: VerificationArgs) -> None:
        sent.append(args)
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    return ReportCourier(send, pool, lambda: NOW, callbacks=callbacks), pool, sent


def test_delivered_once_and_removed_only_when_written() -> None:
    courier, pool, sent = _courier([None])
    replica = _pending([_report()])
    first = courier.step(replica)
    assert first.reports is None and courier.busy()  # sending, nothing to write yet
    assert courier.step(replica).reports is None  # not sent twice while in flight
    pool.run_all()
    done = courier.step(replica)
    assert done.reports == [] and len(sent) == 1
    # The runtime's write lost a race: the next pass recomputes, still without resending.
    again = courier.step(replica)
    assert again.reports == [] and pool.pending == []
    courier.settled(again)
    assert courier.step(_pending([])).reports is None and len(sent) == 1


def test_a_transient_failure_backs_off_and_a_refusal_drops() -> None:
    error = CanopyTransient(
        "canopy answered 503", method="POST", path="/restore-verification", status=503
    )
    courier, pool, _ = _courier([error])
    replica = _pending([_report()])
    courier.step(replica)
    pool.run_all()
    failed = courier.step(replica)
    assert failed.reports is not None
    [waiting] = failed.reports
    assert waiting.attempts == 1 and waiting.next_attempt_at == NOW + timedelta(seconds=15)
    assert waiting.last_error is not None and "503" in waiting.last_error
    courier.settled(failed)
    # Not due yet: nothing is sent.
    assert courier.step(_pending(failed.reports)).reports is None and pool.pending == []

    gone = CanopyError(
        "unknown replica_id", method="POST", path="/restore-verification", status=404
    )
    courier, pool, _ = _courier([gone])
    courier.step(replica)
    pool.run_all()
    dropped = courier.step(replica)
    assert dropped.reports == [] and [d.report.restore for d in dropped.dropped] == ["r-1"]
    assert dropped.dropped[0].why == "canopy refused it: unknown replica_id"


def test_the_proxys_traffic_totals_go_with_the_report() -> None:
    callbacks = Callbacks(None)
    callbacks.final_stats("ns/r-1", {"received_payload_bytes": 42, "sent_payload_bytes": 7})
    courier, pool, sent = _courier([None], callbacks)
    step = courier.step(_pending([_report()]))
    assert step.reports is not None and step.reports[0].traffic == {
        "s3_received_payload_bytes": 42,
        "s3_sent_payload_bytes": 7,
    }
    pool.run_all()
    assert sent[0].s3_received_payload_bytes == 42 and sent[0].s3_sent_raw_bytes is None
