"""Pending reports → the verification body canopy receives; syncer timing helpers."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from pgro.api.verification import PendingVerificationReport
from pgro.canopy import reports
from pgro.canopy.naming import canopy_labels
from pgro.canopy.syncer import capability_retry_delay, jittered
from tests.fixtures.manifests import replica

REPLICA_ID = UUID("11111111-1111-1111-1111-111111111111")
GROUP = UUID("22222222-2222-2222-2222-222222222222")
MACHINE = UUID("33333333-3333-3333-3333-333333333333")
RUN = "0b0e7f7e-0d1a-4b7e-8f3e-5f8b1c2d3e4f"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


LABELS = canopy_labels(
    replica_id=REPLICA_ID,
    group_id=GROUP,
    server_id=MACHINE,
    type="tamanu-postgres",
    intent="verify",
)
canopy_replica = functools.partial(
    replica,
    "canopy-replica",
    None,
    namespace="int-test-15de9039",
    metadata={"labels": LABELS},
    schedule="H * * * *",
    canopySource={"group": str(GROUP), "type": "tamanu-postgres"},
)


def _report(**fields: Any) -> PendingVerificationReport:
    base: dict[str, Any] = {
        "restore": "r-1",
        "runId": RUN,
        "snapshotId": "kA",
        "outcome": "success",
        "observedAt": "2026-11-27T12:00:00Z",
        "postgresVersion": "15",
    }
    return PendingVerificationReport.model_validate({**base, **fields})


def test_success_report_from_labels_and_details() -> None:
    report = _report(
        healthDetails={
            "restore_duration_sec": 42,
            "sizes": {"myapp": 1000},
            "fixes": {"reset_wal": False},
            "checks": [{"name": "connect", "status": "pass", "detail": "ok"}],
        },
        traffic={"s3_received_payload_bytes": 123, "s3_sent_raw_bytes": 7},
    )
    wire = reports.verification_args(canopy_replica(), report).to_wire()
    assert wire["replica_id"] == str(REPLICA_ID) and wire["group"] == str(GROUP)
    assert wire["server_id"] == str(MACHINE) and "machine_id" not in wire
    assert (wire["type"], wire["intent"]) == ("tamanu-postgres", "verify")
    assert (wire["outcome"], wire["replica_healthy"]) == ("success", True)
    assert "error" not in wire and wire["run_id"] == RUN
    assert wire["observed_at"].startswith("2026-11-27T12:00:00")
    assert wire["health_details"]["sizes"] == {"myapp": 1000}
    assert wire["s3_received_payload_bytes"] == 123 and wire["s3_sent_raw_bytes"] == 7
    # Unmeasured counters are left out, not sent as 0.
    assert "s3_sent_payload_bytes" not in wire


def test_failure_report_carries_the_reason_and_a_bad_run_id_is_absent() -> None:
    wire = reports.verification_args(
        canopy_replica(), _report(outcome="failure", error="NotPostgres: no PG_VERSION", runId="x")
    ).to_wire()
    assert (wire["outcome"], wire["replica_healthy"]) == ("failure", False)
    assert wire["error"] == "NotPostgres: no PG_VERSION"
    assert "run_id" not in wire and "health_details" not in wire


def test_unknown_detail_keys_never_hold_back_the_verdict() -> None:
    wire = reports.verification_args(
        canopy_replica(), _report(healthDetails={"surprise": 1})
    ).to_wire()
    assert "health_details" not in wire and wire["outcome"] == "success"


@pytest.mark.parametrize("missing", ["pgro.bes.au/declaration-id", "pgro.bes.au/server"])
def test_missing_identity_cannot_be_sent(missing: str) -> None:
    labels = canopy_labels(
        replica_id=REPLICA_ID,
        group_id=GROUP,
        server_id=MACHINE,
        type="tamanu-postgres",
        intent="verify",
    )
    del labels[missing]
    with pytest.raises(reports.ReportUnsendable, match=missing):
        reports.verification_args(canopy_replica(metadata={"labels": labels}), _report())


def test_traffic_from_the_proxys_final_stats() -> None:
    stats = {"sent_raw_bytes": 1, "sent_payload_bytes": 2, "received_raw_bytes": 3}
    stats["received_payload_bytes"] = -1  # malformed: left out
    assert reports.traffic_from_stats({**stats, "extra": True}) == {
        "s3_sent_raw_bytes": 1,
        "s3_sent_payload_bytes": 2,
        "s3_received_raw_bytes": 3,
    }


def test_tick_jitter_and_capability_backoff() -> None:
    assert jittered(timedelta(seconds=30), lambda: 0.0) == pytest.approx(24)
    assert jittered(timedelta(seconds=30), lambda: 1.0) == pytest.approx(36)
    delays = [capability_retry_delay(n).total_seconds() for n in range(1, 10)]
    assert delays[:8] == [1, 2, 4, 8, 16, 32, 64, 3600]
    assert delays[8] == 3600


def test_a_failed_health_check_makes_a_successful_restore_unhealthy() -> None:
    checks = [
        {"name": "connect", "status": "pass", "detail": "ok"},
        {"name": "application_database", "status": "fail", "detail": "only system databases"},
    ]
    wire = reports.verification_args(
        canopy_replica(), _report(healthDetails={"checks": checks})
    ).to_wire()
    assert (wire["outcome"], wire["replica_healthy"]) == ("success", False)
    assert wire["error"] == "health check application_database failed: only system databases"
    assert wire["health_details"]["checks"][1]["status"] == "fail"


UPGRADE_LABELS = canopy_labels(
    replica_id=REPLICA_ID,
    group_id=GROUP,
    server_id=MACHINE,
    type="tamanu-postgres",
    intent="upgrade",
    application_type="tamanu-central",
)
VERSION_ID = "44444444-4444-4444-4444-444444444444"
MIGRATION_RESULT = {
    "totalElapsedSeconds": 3,
    "failedMigration": "002-b.js",
    "error": "23505: duplicate key value violates unique constraint",
    "dataBytesBefore": 100,
    "dataBytesAfter": 150,
    "timings": [
        {"name": "001-a.js", "elapsedSeconds": 1},
        {"name": "002-b.js", "elapsedSeconds": 2},
    ],
}


def test_an_upgrade_report_carries_the_migration_object() -> None:
    report = _report(
        migrateTo={"version": "2.1.0", "versionId": VERSION_ID}, migrationResult=MIGRATION_RESULT
    )
    upgrade = canopy_replica(metadata={"labels": UPGRADE_LABELS})
    wire = reports.verification_args(upgrade, report).to_wire()
    # A failed migration is the upgrade's verdict, not the restore's: still a healthy success.
    assert (wire["outcome"], wire["replica_healthy"]) == ("success", True)
    assert wire["migration"] == {
        "target_version": "2.1.0",
        "target_version_id": VERSION_ID,
        "application_type": "tamanu-central",
        "total_elapsed_seconds": 3,
        "failed_migration": "002-b.js",
        "error": "23505: duplicate key value violates unique constraint",
        "data_bytes_before": 100,
        "data_bytes_after": 150,
        "timings": [
            {"name": "001-a.js", "elapsed_seconds": 1},
            {"name": "002-b.js", "elapsed_seconds": 2},
        ],
    }


@pytest.mark.parametrize(
    ("labels", "version_id", "result"),
    [
        # analytics `migrate_to`: no version id, never reported (features §2.14)
        (LABELS, "", MIGRATION_RESULT),
        (UPGRADE_LABELS, "", MIGRATION_RESULT),
        (UPGRADE_LABELS, "not-a-uuid", MIGRATION_RESULT),
        # a restore that failed before migrating has no result to report
        (UPGRADE_LABELS, VERSION_ID, None),
    ],
)
def test_the_migration_object_needs_an_upgrade_with_a_uuid_target_and_a_result(
    labels: dict[str, str], version_id: str, result: dict[str, Any] | None
) -> None:
    report = _report(
        migrateTo={"version": "2.1.0", "versionId": version_id}, migrationResult=result
    )
    wire = reports.verification_args(canopy_replica(metadata={"labels": labels}), report).to_wire()
    assert "migration" not in wire


def test_an_application_type_that_cannot_be_a_label_is_left_out() -> None:
    labels = canopy_labels(
        replica_id=REPLICA_ID,
        group_id=GROUP,
        server_id=MACHINE,
        type="tamanu-postgres",
        intent="upgrade",
        application_type="Tamanu Central!",
    )
    assert "pgro.bes.au/application-type" not in labels
    assert UPGRADE_LABELS["pgro.bes.au/application-type"] == "tamanu-central"


def test_a_damage_report_carries_the_data_checks_findings() -> None:
    checks = [
        {"name": "connect", "status": "pass", "detail": "ok"},
        {
            "name": "btree",
            "status": "fail",
            "detail": "1 problem in 3 indexes: shop.public.orders_pkey block 7: bad",
            "count": 1,
            "findings": [
                {
                    "message": "item order invariant violated",
                    "database": "shop",
                    "relation": "public.orders_pkey",
                    "table": "public.orders",
                    "block": 7,
                }
            ],
        },
        {"name": "checksums", "status": "not_checked", "detail": "not checked: no checksums"},
    ]
    report = _report(
        outcome="failure",
        error="DataDamaged: the data is damaged: btree: …",
        healthDetails={"restore_duration_sec": 9, "checks": checks},
    )
    wire = reports.verification_args(canopy_replica(), report).to_wire()
    assert (wire["outcome"], wire["replica_healthy"]) == ("failure", False)
    sent = wire["health_details"]["checks"]
    assert [c["status"] for c in sent] == ["pass", "fail", "not_checked"]
    assert sent[1]["count"] == 1
    assert sent[1]["findings"][0] == checks[1]["findings"][0]  # type: ignore[index]
    # A backup the checks could not fully judge still reports its details.
    incomplete = [{"name": "integrity_complete", "status": "incomplete", "detail": "budget"}]
    wire = reports.verification_args(
        canopy_replica(), _report(healthDetails={"checks": incomplete})
    ).to_wire()
    assert wire["health_details"]["checks"][0]["status"] == "incomplete"


def test_a_redacted_restore_reports_the_redaction_object() -> None:
    report = _report(
        redaction={"outcome": "partial", "manifestVersion": "1.0.0", "columnsMasked": 6}
    )
    wire = reports.verification_args(canopy_replica(), report).to_wire()
    assert wire["redaction"] == {
        "outcome": "partial",
        "manifest_version": "1.0.0",
        "columns_masked": 6,
    }
    assert "redaction" not in reports.verification_args(canopy_replica(), _report()).to_wire()
