"""Canopy verification reports kept in the replica's status until canopy accepts them.

The decisions add a report in the same status write that records the outcome (see
`pgro.api.verification`); the runtimes deliver what `due` returns and record each
attempt with `delivered`, `rejected` or `attempt_failed`. Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from pgro.api.data_checks import DataChecks
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.verification import PendingVerificationReport, RedactionReport, ReportOutcome

STATUS_FIELD: Final = "pendingVerificationReports"
RETRY_MIN: Final = timedelta(seconds=15)
RETRY_MAX: Final = timedelta(hours=1)
# Error text kept in status: enough to diagnose, bounded so status stays small.
ERROR_LIMIT: Final = 500
# A canopy replica canopy no longer lists is kept while its reports are still being
# retried, for this many attempts (about 2 h with the backoff above); after that the
# report is the only thing left of it and canopy has refused it for hours.
HOLD_REMOVAL_ATTEMPTS: Final = 10


def new_report(
    restore: PostgresPhysicalRestore,
    outcome: ReportOutcome,
    now: datetime,
    error: str | None = None,
    *,
    data_checks: DataChecks | None = None,
    redaction: RedactionReport | None = None,
) -> PendingVerificationReport:
    """The report on `restore`'s run, observed `now`. `restore_duration_sec` is known here;
    sizes, fixes and checks are added by the runtime while the server still runs."""
    status = restore.status
    created = status.created_at or restore.metadata.creation_timestamp
    details: dict[str, Any] = {}
    if created is not None:
        details["restore_duration_sec"] = max(0, int((now - created).total_seconds()))
    if status.fixes is not None:
        details["fixes"] = dict(status.fixes)
    checked = data_checks or status.data_checks
    if checked is not None and checked.checks:
        # The data checks' findings (database, relation, block), failed or not; the
        # runtime's own health checks join them (`with_details`).
        details["checks"] = [c.as_report() for c in checked.checks]
    return PendingVerificationReport(
        restore=restore.name,
        run_id=status.run_id,
        snapshot_id=restore.spec.snapshot,
        outcome=outcome,
        error=error[:ERROR_LIMIT] if error else None,
        observed_at=now,
        postgres_version=status.postgres_version,
        health_details=details or None,
        migrate_to=restore.spec.migrate_to if status.migration_result is not None else None,
        migration_result=status.migration_result,
        redaction=redaction,
    )


def with_report(
    reports: Sequence[PendingVerificationReport], report: PendingVerificationReport
) -> list[PendingVerificationReport]:
    """Add `report` unless its run is already waiting (a run is reported once)."""
    if any(r.key == report.key for r in reports):
        return list(reports)
    return [*reports, report]


def due(
    reports: Sequence[PendingVerificationReport], now: datetime
) -> list[PendingVerificationReport]:
    return [r for r in reports if r.next_attempt_at is None or r.next_attempt_at <= now]


def retry_delay(attempts: int) -> timedelta:
    """15 s, 30 s, 1 m, ... up to 1 h after the `attempts`-th failed delivery."""
    if attempts <= 0:
        return timedelta(0)
    delay: timedelta = RETRY_MIN * 2 ** min(attempts - 1, 20)
    return min(delay, RETRY_MAX)


def delivered(
    reports: Sequence[PendingVerificationReport], key: str
) -> list[PendingVerificationReport]:
    """Canopy accepted the report: it goes."""
    return [r for r in reports if r.key != key]


rejected = delivered
"""Canopy refused the report for good (400, 404): it goes too; the runtime says why."""


def attempt_failed(
    reports: Sequence[PendingVerificationReport], key: str, now: datetime, error: str
) -> list[PendingVerificationReport]:
    """A delivery that may succeed later: count it and wait before the next one."""
    out = []
    for r in reports:
        if r.key == key:
            attempts = r.attempts + 1
            r = r.model_copy(
                update={
                    "attempts": attempts,
                    "next_attempt_at": now + retry_delay(attempts),
                    "last_error": error[:ERROR_LIMIT],
                }
            )
        out.append(r)
    return out


def with_details(
    reports: Sequence[PendingVerificationReport],
    key: str,
    *,
    health_details: dict[str, Any] | None = None,
    traffic: dict[str, int] | None = None,
) -> list[PendingVerificationReport]:
    """Merge what the runtime measured into the waiting report (never overwriting the
    verdict). Details that are None or empty are left out."""
    out = []
    for r in reports:
        if r.key == key:
            update: dict[str, Any] = {}
            if health_details:
                old = r.health_details or {}
                merged = {**old, **health_details}
                if isinstance(old.get("checks"), list) and isinstance(
                    health_details.get("checks"), list
                ):
                    # The server's health checks, then the data checks recorded before.
                    kept = [c for c in old["checks"] if c not in health_details["checks"]]
                    merged["checks"] = [*health_details["checks"], *kept]
                update["health_details"] = merged
            if traffic:
                update["traffic"] = dict(traffic)
            r = r.model_copy(update=update) if update else r
        out.append(r)
    return out


def status_patch(reports: Sequence[PendingVerificationReport]) -> dict[str, Any]:
    """The merge patch writing the list (removing the field when it is empty)."""
    if not reports:
        return {STATUS_FIELD: None}
    return {STATUS_FIELD: [r.to_wire() for r in reports]}


def holds_removal(reports: Sequence[PendingVerificationReport]) -> bool:
    """Whether a replica must be kept a while longer for its reports."""
    return any(r.attempts < HOLD_REMOVAL_ATTEMPTS for r in reports)
