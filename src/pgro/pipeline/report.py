"""The verification verdict, shaped like canopy's `RestoreVerification` body."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pgro.postgres.health import Check

Outcome = Literal["success", "failure"]

EXIT_VERIFIED = 0
EXIT_FAILED_VERIFICATION = 1
EXIT_USAGE = 2
# `pgro verify --migrate-to`: the backup is healthy but the application's migrations failed.
EXIT_MIGRATION_FAILED = 3


@dataclass
class VerificationReport:
    outcome: Outcome
    snapshot_id: str | None
    error: str | None = None
    reason: str | None = None
    exit_code: int = EXIT_VERIFIED
    postgres_version: str | None = None
    replica: str | None = None
    snapshot_time: str | None = None
    snapshot_size: int | None = None
    repository: str | None = None
    observed_at: str | None = None
    restore_duration_sec: float | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    fixes: dict[str, bool] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # `--migrate-to`: `status.migrationResult`'s shape plus `version` and `versionId`.
    migration: dict[str, Any] | None = None
    # How deep the checks read the data (quick | standard | full).
    depth: str | None = None

    @property
    def replica_healthy(self) -> bool:
        return self.outcome == "success"

    def to_json(self) -> dict[str, Any]:
        """canopy's verification fields, then pgro's additions (`reason`, `timings`, ...)."""
        body: dict[str, Any] = {
            "outcome": self.outcome,
            "replica_healthy": self.replica_healthy,
            "snapshot_id": self.snapshot_id,
            "postgres_version": self.postgres_version,
            "error": self.error,
            "health_details": {
                "restore_duration_sec": (
                    round(self.restore_duration_sec)
                    if self.restore_duration_sec is not None
                    else None
                ),
                "sizes": self.sizes,
                "fixes": self.fixes,
                "checks": [c.as_dict() for c in self.checks],
            },
            "observed_at": self.observed_at,
            "reason": self.reason,
            "replica": self.replica,
            "snapshot_time": self.snapshot_time,
            "snapshot_size": self.snapshot_size,
            "repository": self.repository,
            "verify_depth": self.depth,
            "notes": self.notes,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if self.migration is not None:
            body["migration"] = self.migration
        return body
