"""The syncer's bookkeeping both runtimes share: refusals, cached passwords, the removal
grace, and the retries of the capability registration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.verification import PendingVerificationReport
from pgro.canopy.access import CanopyRepository
from pgro.canopy.materialise import ExistingReplica, ReplicaChange, materialise
from pgro.canopy.sync_state import CapabilityRetries, SyncBook
from pgro.canopy.syncer import SyncTick
from pgro.canopy.wire import Worklist, WorklistEntry
from pgro.core.observations import SecretState
from pgro.core.verification_reports import HOLD_REMOVAL_ATTEMPTS

GROUP = "22222222-2222-2222-2222-222222222222"
TYPE = "tamanu-postgres"
GRACE = timedelta(minutes=10)
T0 = datetime(2026, 7, 1, tzinfo=UTC)


def entry(name: str = "int-test") -> WorklistEntry:
    return WorklistEntry.model_validate(
        {
            "replica_id": "11111111-1111-1111-1111-111111111111",
            "group_id": GROUP,
            "machine_id": "33333333-3333-3333-3333-333333333333",
            "server_id": "33333333-3333-3333-3333-333333333333",
            "type": TYPE,
            "intent": "verify",
            "name": name,
            "params": {},
            "snapshot_id": "k1",
            "snapshot_at": "2026-07-01T00:00:00Z",
            "storage": "s3",
            "bucket": "canopy-int-test",
            "prefix": "p/",
            "region": "us-east-1",
        }
    )


NAMESPACE = materialise(entry()).namespace
KEY = f"{NAMESPACE}/canopy-replica"


class Held:
    """A runtime's replicas, as the book sees them through its callables."""

    def __init__(self) -> None:
        self.replicas: dict[str, PostgresPhysicalReplica] = {}
        self.put: list[tuple[str, str | None]] = []
        self.removed: list[str] = []
        self.fail_put: set[str] = set()
        self.fail_remove = False

    def apply(self, book: SyncBook, tick: SyncTick, now: datetime) -> None:
        def put(change: ReplicaChange, password: str | None) -> None:
            if change.desired.entry.name in self.fail_put:
                raise RuntimeError("the API server is away")
            self.put.append((change.desired.namespace, password))
            self.replicas[change.desired.namespace] = change.desired.replica()

        def remove(namespace: str) -> None:
            if self.fail_remove:
                raise RuntimeError("the API server is away")
            self.removed.append(namespace)
            del self.replicas[namespace]

        book.apply(
            tick,
            now,
            existing={ns: ExistingReplica(ns) for ns in self.replicas},
            replica=self.replicas.get,
            put=put,
            remove=remove,
        )


def tick(*entries: WorklistEntry, **kwargs: Any) -> SyncTick:
    return SyncTick(worklist=Worklist(tuple(entries)), **kwargs)


def test_a_password_is_cached_and_a_refusal_is_the_secret_condition_until_it_is_lifted() -> None:
    book, held = SyncBook(GRACE), Held()
    held.apply(book, tick(entry(), refusals={(GROUP, TYPE): "canopy refused: 403"}), T0)
    # The replica is still applied, with no password.
    assert held.put == [(NAMESPACE, None)]
    refused = book.refusal(KEY)
    assert refused is not None and refused.state is SecretState.INVALID
    assert refused.detail == "canopy refused: 403"
    assert book.repository(KEY) is None

    held.apply(book, tick(entry(), passwords={(GROUP, TYPE): "hunter2"}), T0)
    assert book.refusal(KEY) is None
    assert book.repository(KEY) == CanopyRepository("canopy-int-test", "us-east-1", "p/", "hunter2")
    assert held.put[-1] == (NAMESPACE, "hunter2")
    assert "hunter2" not in repr(book)


def test_changes_name_the_replicas_whose_secret_check_changed() -> None:
    book, held = SyncBook(GRACE), Held()
    assert book.take_changes() == set()
    held.apply(book, tick(entry(), passwords={(GROUP, TYPE): "pw"}), T0)
    assert book.take_changes() == {KEY}
    # The same password again is no change; a refusal is.
    held.apply(book, tick(entry(), passwords={(GROUP, TYPE): "pw"}), T0)
    assert book.take_changes() == set()
    held.apply(book, tick(entry(), refusals={(GROUP, TYPE): "canopy refused: 403"}), T0)
    assert book.take_changes() == {KEY}
    held.apply(book, tick(), T0 - GRACE)
    held.apply(book, tick(), T0)
    assert held.removed == [NAMESPACE] and book.take_changes() == {KEY}


def test_a_failed_fetch_changes_nothing() -> None:
    book, held = SyncBook(GRACE), Held()
    held.apply(book, tick(entry(), passwords={(GROUP, TYPE): "pw"}), T0)
    held.apply(book, SyncTick(worklist=None, error="canopy answered 503"), T0 + 2 * GRACE)
    assert held.removed == [] and book.absent_since == {}
    assert book.repository(KEY) is not None


def test_an_unlisted_replica_goes_after_the_grace_and_is_forgotten() -> None:
    book, held = SyncBook(GRACE), Held()
    held.apply(book, tick(entry(), passwords={(GROUP, TYPE): "pw"}), T0)
    held.apply(book, tick(), T0)
    assert held.removed == [] and book.absent_since == {NAMESPACE: T0}
    held.apply(book, tick(), T0 + GRACE - timedelta(seconds=1))
    assert held.removed == []
    held.apply(book, tick(), T0 + GRACE)
    assert held.removed == [NAMESPACE]
    assert book.repository(KEY) is None and book.absent_since == {NAMESPACE: T0}
    # Gone from the runtime, so the next tick forgets when it went missing.
    held.apply(book, tick(), T0 + GRACE)
    assert book.absent_since == {}


def test_listed_again_within_the_grace_starts_over() -> None:
    book, held = SyncBook(GRACE), Held()
    held.apply(book, tick(entry()), T0)
    held.apply(book, tick(), T0)
    held.apply(book, tick(entry()), T0 + GRACE / 2)
    held.apply(book, tick(), T0 + GRACE)
    assert held.removed == [] and book.absent_since == {NAMESPACE: T0 + GRACE}


def test_a_replica_with_reports_to_deliver_is_held() -> None:
    book, held = SyncBook(GRACE), Held()
    held.apply(book, tick(entry()), T0)
    replica = held.replicas[NAMESPACE]
    report = PendingVerificationReport(
        restore="r-1", snapshot_id="k1", outcome="success", observed_at=T0
    )
    replica.status.pending_verification_reports = [report]
    held.apply(book, tick(), T0)
    held.apply(book, tick(), T0 + GRACE)
    assert held.removed == []
    # A report canopy never took after every attempt no longer holds the replica.
    replica.status.pending_verification_reports = [
        report.model_copy(update={"attempts": HOLD_REMOVAL_ATTEMPTS})
    ]
    held.apply(book, tick(), T0 + GRACE)
    assert held.removed == [NAMESPACE]


def test_a_failed_removal_keeps_the_bookkeeping_and_is_tried_next_tick() -> None:
    book, held = SyncBook(GRACE), Held()
    held.apply(book, tick(entry(), refusals={(GROUP, TYPE): "canopy refused: 409"}), T0)
    held.apply(book, tick(), T0 - GRACE)
    held.fail_remove = True
    held.apply(book, tick(), T0)
    assert NAMESPACE in held.replicas and book.refusal(KEY) is not None
    held.fail_remove = False
    held.apply(book, tick(), T0)
    assert held.removed == [NAMESPACE] and book.refusal(KEY) is None


def test_one_change_that_fails_does_not_stop_the_others() -> None:
    book, held = SyncBook(GRACE), Held()
    held.fail_put = {"first"}
    held.apply(book, tick(entry("first"), entry("second")), T0)
    assert [ns for ns, _ in held.put] == [materialise(entry("second")).namespace]


def test_capability_registration_is_retried_with_backoff_then_stops() -> None:
    caps = CapabilityRetries()
    assert caps.due(0) and not caps.tried
    calls: list[float] = []

    def register_failing() -> None:
        calls.append(now)
        raise RuntimeError("canopy answered 503")

    for now in (0.0, 0.5, 1.0, 2.0, 3.0, 4.9, 5.0):
        caps.run(now, register_failing)
    # 1, 2, 4 s between attempts.
    assert calls == [0.0, 1.0, 3.0] and caps.attempts == 3 and caps.tried
    assert not caps.due(6.9) and caps.due(7.0)
    caps.run(7.0, lambda: None)
    assert caps.advertised and not caps.due(10_000.0)


def test_capability_retries_become_hourly_after_eight_attempts() -> None:
    caps = CapabilityRetries()
    for _ in range(8):
        caps.settle(0.0, RuntimeError("no route"))
    assert caps.next_at == pytest.approx(3600.0)
