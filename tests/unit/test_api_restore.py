from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from pgro.api import JobPhase, PostgresPhysicalRestore, RestorePhase
from tests.fixtures.manifests import restore_doc

_restore = functools.partial(
    restore_doc,
    "fiji-analytics-20260101-000000",
    "fiji-analytics",
    namespace="analytics",
    metadata={"uid": "u-1", "labels": {"pgro.bes.au/replica": "fiji-analytics"}},
    snapshot="c6e9863aea1eb231ea6b4ba001936a97",
    snapshotSize="3221225472",
    snapshotTime="2026-11-27T11:02:44.458139381Z",
    storageSize="4Gi",
)


def test_spec_fields() -> None:
    restore = PostgresPhysicalRestore.model_validate(
        _restore(migrateTo={"version": "2.63.2", "versionId": "v-1"}, builderImage="img:1")
    )
    assert restore.replica_name == "fiji-analytics"
    assert restore.spec.snapshot == "c6e9863aea1eb231ea6b4ba001936a97"
    assert restore.spec.snapshot_size == "3221225472"
    assert restore.spec.storage_size == "4Gi"
    assert restore.spec.snapshot_time == "2026-11-27T11:02:44.458139381Z"
    assert restore.spec.migrate_to is not None
    assert restore.spec.migrate_to.version == "2.63.2"
    assert restore.spec.builder_image == "img:1"


def test_snapshot_time_is_kept_verbatim_on_the_wire() -> None:
    wire = PostgresPhysicalRestore.model_validate(_restore()).to_wire()
    assert wire["spec"]["snapshotTime"] == "2026-11-27T11:02:44.458139381Z"
    assert wire["spec"]["snapshotSize"] == "3221225472"


@pytest.mark.parametrize("missing", ["replica", "snapshot", "snapshotSize", "storageSize"])
def test_required_spec_fields(missing: str) -> None:
    document = _restore()
    del document["spec"][missing]
    with pytest.raises(ValidationError, match=missing):
        PostgresPhysicalRestore.model_validate(document)


def test_snapshot_size_must_be_a_quantity() -> None:
    with pytest.raises(ValidationError, match="invalid quantity"):
        PostgresPhysicalRestore.model_validate(_restore(snapshotSize="big"))


def test_integer_sizes_stay_integers() -> None:
    restore = PostgresPhysicalRestore.model_validate(_restore(snapshotSize=3))
    assert restore.to_wire()["spec"]["snapshotSize"] == 3


@pytest.mark.parametrize(
    ("status", "phase", "effective"),
    [
        (None, None, RestorePhase.PENDING),
        ({}, None, RestorePhase.PENDING),
        ({"phase": "Pending"}, RestorePhase.PENDING, RestorePhase.PENDING),
        ({"phase": "Migrating"}, RestorePhase.MIGRATING, RestorePhase.MIGRATING),
        ({"phase": "Switching"}, RestorePhase.SWITCHING, RestorePhase.SWITCHING),
        ({"phase": "Active"}, RestorePhase.ACTIVE, RestorePhase.ACTIVE),
        ({"phase": "Failed"}, RestorePhase.FAILED, RestorePhase.FAILED),
    ],
)
def test_absent_phase_means_pending(
    status: dict[str, Any] | None, phase: RestorePhase | None, effective: RestorePhase
) -> None:
    restore = PostgresPhysicalRestore.model_validate(_restore(status=status))
    assert restore.status.phase is phase
    assert restore.effective_phase is effective


def test_full_status_round_trip() -> None:
    status = {
        "phase": "Active",
        "runId": "0b0c0d0e-0000-4000-8000-000000000003",
        "postgresVersion": "16",
        "createdAt": "2026-01-01T00:00:00Z",
        "restoredAt": "2026-01-01T00:30:00Z",
        "activatedAt": "2026-01-01T00:40:00Z",
        "restoreJob": {
            "name": "fiji-analytics-20260101-000000-restore",
            "phase": "Succeeded",
            "completedAt": "2026-01-01T00:29:59Z",
        },
        "migrationJob": {"name": "fiji-analytics-20260101-000000-migrate", "phase": "Failed"},
        "migrationBaseline": "2025-12-31 23:59:59.123+00",
        "migrationResult": {
            "totalElapsedSeconds": 42,
            "failedMigration": "1700000000000-addThing",
            "error": "23505: duplicate key",
            "dataBytesBefore": 100,
            "dataBytesAfter": 150,
            "timings": [{"name": "1700000000000-addThing", "elapsedSeconds": 40}],
        },
        "schemaBuildResult": {"built": True, "totalElapsedSeconds": 7, "schemaBytes": 2048},
        "schemaBuildJob": "fiji-analytics-schema-build",
        "schemaBuildAttempts": 1,
        "pvc": "fiji-analytics-20260101-000000-data",
        "deployment": "fiji-analytics-20260101-000000",
        "credentialsSecret": "fiji-analytics-creds",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "DeploymentReady",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:40:00Z",
            }
        ],
    }
    restore = PostgresPhysicalRestore.model_validate(_restore(status=status))
    parsed = restore.status
    assert parsed.restore_job is not None
    assert parsed.restore_job.phase is JobPhase.SUCCEEDED
    assert parsed.restore_job.completed_at == datetime(2026, 1, 1, 0, 29, 59, tzinfo=UTC)
    assert parsed.migration_result is not None
    assert parsed.migration_result.passed is False
    assert parsed.migration_result.timings[0].elapsed_seconds == 40
    assert parsed.schema_build_result is not None
    assert parsed.schema_build_result.schema_bytes == 2048
    assert restore.to_wire()["status"] == status


def test_migration_result_without_failure_passes_and_defaults_timings() -> None:
    restore = PostgresPhysicalRestore.model_validate(
        _restore(
            status={
                "migrationResult": {
                    "totalElapsedSeconds": 0,
                    "dataBytesBefore": 1,
                    "dataBytesAfter": 1,
                }
            }
        )
    )
    assert restore.status.migration_result is not None
    assert restore.status.migration_result.passed is True
    assert restore.status.migration_result.timings == []


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Done"},
        {"restoreJob": {"name": "j", "phase": "Exploded"}},
        {"restoreJob": {"phase": "Running"}},
        {"schemaBuildAttempts": -1},
        {"createdAt": "yesterday"},
    ],
)
def test_invalid_status_is_rejected(status: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PostgresPhysicalRestore.model_validate(_restore(status=status))


def test_status_without_conditions_omits_them() -> None:
    wire = PostgresPhysicalRestore.model_validate(_restore(status={"phase": "Pending"})).to_wire()
    assert wire["status"] == {"phase": "Pending"}


def test_owner_reference() -> None:
    restore = PostgresPhysicalRestore.model_validate(_restore())
    assert restore.owner_reference() == {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalRestore",
        "name": "fiji-analytics-20260101-000000",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
