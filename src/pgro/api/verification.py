"""A canopy verification report waiting in the replica's status until canopy accepts it.

The reference sends each report once, best effort, and loses it when canopy is down. pgro
writes the report into `status.pendingVerificationReports` in the same status write that
records the outcome (the switchover, or the failure count), so a crash, a restart or an
outage of canopy cannot lose it; the runtime delivers it with backoff and removes it once
canopy answers 2xx. Reports are keyed by the restore's run id (else its name), so a
restore run is reported at most once by pgro.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pgro.api.base import ApiModel
from pgro.api.migration import MigrateTo, MigrationResult
from pgro.api.timestamp import Timestamp

ReportOutcome = Literal["success", "failure"]


class RedactionReport(ApiModel):
    """What the redaction did to the reported restore, sent to canopy as the report's
    `redaction` object (canopy raises a per-machine warning for an incomplete one)."""

    outcome: Literal["complete", "partial", "failed"]
    manifest_version: str | None = None
    columns_masked: int | None = Field(default=None, ge=0)


class PendingVerificationReport(ApiModel):
    restore: str
    run_id: str | None = None
    snapshot_id: str
    outcome: ReportOutcome
    error: str | None = None
    observed_at: Timestamp
    postgres_version: str | None = None
    # Free-form `health_details` (sizes, fixes, checks...), gathered by the runtime while
    # the restored server still runs; the verdict does not wait for them.
    health_details: dict[str, Any] | None = None
    # The canopy proxy's final traffic totals (`s3_*` counters), when they arrived.
    traffic: dict[str, int] | None = None
    # An upgrade rehearsal (`migrateTo`): its target and what the migrations did, sent to
    # canopy as the report's `migration` object.
    migrate_to: MigrateTo | None = None
    migration_result: MigrationResult | None = None
    # A redacting replica's restore: the redaction's outcome (the report's `redaction`).
    redaction: RedactionReport | None = None
    attempts: int = Field(default=0, ge=0)
    next_attempt_at: Timestamp | None = None
    last_error: str | None = None

    @property
    def key(self) -> str:
        return self.run_id or self.restore
