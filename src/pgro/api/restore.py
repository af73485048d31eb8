"""`PostgresPhysicalRestore`: one restore of one snapshot, from Kopia to a serving database."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pgro.api.base import ApiModel
from pgro.api.conditions import Condition
from pgro.api.data_checks import DataChecks
from pgro.api.meta import ObjectMeta
from pgro.api.migration import MigrateTo, MigrationResult, SchemaBuildResult
from pgro.api.names import API_VERSION, RESTORE_KIND
from pgro.api.phases import JobPhase, RestorePhase
from pgro.api.quantity import Quantity
from pgro.api.references import LocalObjectReference
from pgro.api.timestamp import Timestamp


class JobStatus(ApiModel):
    name: str
    phase: JobPhase
    completed_at: Timestamp | None = None


class PostgresPhysicalRestoreSpec(ApiModel):
    replica: LocalObjectReference
    snapshot: str
    snapshot_size: Quantity
    # Kopia's startTime exactly as kopia wrote it.
    snapshot_time: str | None = None
    storage_size: Quantity
    migrate_to: MigrateTo | None = None
    builder_image: str | None = None


class PostgresPhysicalRestoreStatus(ApiModel):
    omit_when_empty = frozenset({"conditions"})

    phase: RestorePhase | None = None
    run_id: str | None = None
    postgres_version: str | None = None
    # The repairs the restore step made to the data directory (`reset_wal`, ...), as
    # reported to canopy in `health_details.fixes`.
    fixes: dict[str, bool] | None = None
    # What the checks that read the data found (`pgro.bes.au/verify-depth`), once run.
    data_checks: DataChecks | None = None
    # After `pg_resetwal` (`fixes.reset_wal`): the full reindex, run once the server is up
    # without gating readiness: `running`, `complete`, `partial: <what failed>` or
    # `failed: <why>` (`pgro.core.full_reindex`).
    full_reindex: str | None = None
    created_at: Timestamp | None = None
    restored_at: Timestamp | None = None
    activated_at: Timestamp | None = None
    restore_job: JobStatus | None = None
    migration_job: JobStatus | None = None
    migration_baseline: str | None = None
    migration_result: MigrationResult | None = None
    schema_build_result: SchemaBuildResult | None = None
    schema_build_job: str | None = None
    schema_build_attempts: int | None = Field(default=None, ge=0)
    pvc: str | None = None
    deployment: str | None = None
    credentials_secret: str | None = None
    conditions: list[Condition] = Field(default_factory=list)

    @property
    def effective_phase(self) -> RestorePhase:
        """An absent phase means Pending. Callers that must tell "no status yet" from
        Pending (the reference's in-progress check does) read `phase` itself."""
        return self.phase or RestorePhase.PENDING


class PostgresPhysicalRestore(ApiModel):
    api_version: Literal["pgro.bes.au/v1alpha1"] = API_VERSION
    kind: Literal["PostgresPhysicalRestore"] = RESTORE_KIND
    metadata: ObjectMeta
    spec: PostgresPhysicalRestoreSpec
    status: PostgresPhysicalRestoreStatus = Field(default_factory=PostgresPhysicalRestoreStatus)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def replica_name(self) -> str:
        return self.spec.replica.name

    @property
    def effective_phase(self) -> RestorePhase:
        return self.status.effective_phase

    def owner_reference(self) -> dict[str, Any]:
        """What objects owned by this restore carry, so deleting it drops its database."""
        return {
            "apiVersion": API_VERSION,
            "kind": RESTORE_KIND,
            "name": self.metadata.name,
            "uid": self.metadata.uid or "",
            "controller": True,
            "blockOwnerDeletion": True,
        }
