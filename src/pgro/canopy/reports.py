"""Verification reports: what the replica's status holds → the body canopy receives.

Identity comes from the labels the syncer put on the replica (declaration, group,
machine, type, intent), the verdict from the pending report the decision wrote. The
machine is named as `server_id`: every canopy generation accepts it (the newest one also
takes `machine_id`, the oldest only `server_id`), and naming both is a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from uuid import UUID

from pydantic import ValidationError

from pgro.api.names import (
    LABEL_CANOPY_APPLICATION_TYPE,
    LABEL_CANOPY_DECLARATION_ID,
    LABEL_CANOPY_GROUP,
    LABEL_CANOPY_INTENT,
    LABEL_CANOPY_SERVER,
    LABEL_CANOPY_TYPE,
)
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.verification import PendingVerificationReport
from pgro.canopy.wire import (
    INTENT_UPGRADE,
    HealthDetails,
    MigrationArgs,
    RedactionArgs,
    VerificationArgs,
    describe_validation_error,
)

TRAFFIC_FIELDS: Final = (
    "s3_sent_raw_bytes",
    "s3_sent_payload_bytes",
    "s3_received_raw_bytes",
    "s3_received_payload_bytes",
)


class ReportUnsendable(ValueError):
    """The report cannot be built (labels missing or malformed): retrying cannot help."""


def traffic_from_stats(stats: Mapping[str, Any]) -> dict[str, int]:
    """The proxy's final stats body (`sent_raw_bytes`, ...) → the report's `s3_*` fields.
    Anything missing or malformed is left out rather than sent as 0."""
    out: dict[str, int] = {}
    for name in TRAFFIC_FIELDS:
        value = stats.get(name.removeprefix("s3_"))
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[name] = value
    return out


def _failed_check(details: Mapping[str, Any] | None) -> str | None:
    checks = (details or {}).get("checks")
    if not isinstance(checks, list):
        return None
    for check in checks:
        if isinstance(check, Mapping) and check.get("status") == "fail":
            return f"health check {check.get('name')} failed: {check.get('detail', '')}".strip()
    return None


def canopy_ids(labels: Mapping[str, str]) -> tuple[UUID, UUID, UUID]:
    """The declaration, group and server ids from the replica's labels.

    Raises ReportUnsendable naming every one that is absent or not a UUID at once (as the
    reference's `canopy_ids`), so one look at the message says all that needs fixing."""
    ids: list[UUID] = []
    problems: list[str] = []
    for key in (LABEL_CANOPY_DECLARATION_ID, LABEL_CANOPY_GROUP, LABEL_CANOPY_SERVER):
        value = labels.get(key)
        if not value:
            problems.append(f"no {key} label")
            continue
        try:
            ids.append(UUID(value))
        except ValueError:
            problems.append(f"label {key}={value!r} is not a UUID")
    if problems:
        raise ReportUnsendable(f"the replica has {'; '.join(problems)}")
    declaration, group, server = ids
    return declaration, group, server


def _migration(
    labels: Mapping[str, str], intent: str, report: PendingVerificationReport
) -> MigrationArgs | None:
    """The `migration` object: an `upgrade` report whose target canopy named by a UUID.
    Analytics `migrate_to` targets carry no version id, and canopy files results by it."""
    target, result = report.migrate_to, report.migration_result
    if intent != INTENT_UPGRADE or target is None or result is None:
        return None
    try:
        UUID(target.version_id)
    except ValueError:
        return None
    return MigrationArgs.from_result(result, target, labels.get(LABEL_CANOPY_APPLICATION_TYPE))


def _redaction(report: PendingVerificationReport) -> RedactionArgs | None:
    done = report.redaction
    if done is None:
        return None
    return RedactionArgs(
        outcome=done.outcome,
        manifest_version=done.manifest_version,
        columns_masked=done.columns_masked,
    )


def verification_args(
    replica: PostgresPhysicalReplica, report: PendingVerificationReport
) -> VerificationArgs:
    labels = replica.metadata.labels or {}
    type_ = labels.get(LABEL_CANOPY_TYPE) or (
        replica.spec.canopy_source.type if replica.spec.canopy_source else ""
    )
    intent = labels.get(LABEL_CANOPY_INTENT, "")
    if not intent:
        raise ReportUnsendable(f"the replica has no {LABEL_CANOPY_INTENT} label")
    replica_id, group, server_id = canopy_ids(labels)
    run_id: UUID | None
    try:
        run_id = UUID(report.run_id) if report.run_id else None
    except ValueError:
        run_id = None  # as the reference: a malformed run id is sent as absent
    restored = report.outcome == "success"
    failed_check = _failed_check(report.health_details)
    # The restore worked but the server is not what a backup should give back (still in
    # recovery, no application database): success, unhealthy. Canopy settles a snapshot
    # only on success *and* healthy, so it keeps alerting, and pgro, which has verified
    # the snapshot, does not restore it again.
    healthy = restored and failed_check is None
    error = None if restored else (report.error or "restore failed")
    if restored and failed_check is not None:
        error = failed_check
    try:
        details = (
            HealthDetails.model_validate(report.health_details) if report.health_details else None
        )
    except ValidationError:
        details = None  # details are extras: a bad one never holds back the verdict
    try:
        return VerificationArgs.model_validate(
            {
                "replica_id": replica_id,
                "group": group,
                "server_id": server_id,
                "type": type_,
                "intent": intent,
                "snapshot_id": report.snapshot_id,
                "outcome": report.outcome,
                "error": error,
                "replica_healthy": healthy,
                "postgres_version": report.postgres_version,
                "observed_at": report.observed_at,
                "health_details": details,
                "run_id": run_id,
                "migration": _migration(labels, intent, report),
                "redaction": _redaction(report),
                **(report.traffic or {}),
            }
        )
    except ValidationError as error:
        raise ReportUnsendable(describe_validation_error(error)) from None
