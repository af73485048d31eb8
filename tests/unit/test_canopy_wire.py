"""Canopy's bodies: lenient decoding of what canopy sends, strict encoding of what pgro sends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from pgro.api.migration import MigrateTo, MigrationResult, MigrationTiming
from pgro.canopy.wire import (
    INT64_MAX,
    PGRO_INTENTS,
    AwsCredentials,
    CheckResult,
    HealthDetails,
    IntentDescriptor,
    MigrationArgs,
    ParamSpec,
    ProblemDocument,
    ProgressArgs,
    RestoreCredentials,
    RestoreCredentialsArgs,
    VerificationArgs,
    WorklistEntry,
    capabilities_request,
    format_canopy_time,
    parse_problem,
    parse_worklist,
)

REPLICA = "11111111-1111-1111-1111-111111111111"
GROUP = "22222222-2222-2222-2222-222222222222"
MACHINE = "33333333-3333-3333-3333-333333333333"
RUN = "44444444-4444-4444-8444-444444444444"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FQoGZXIvYXdzEXAMPLE"
REPO_PASSWORD = "stub-repo-password"
NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)

# -- capabilities (§3.1) ----------------------------------------------------------------------

# The reference's newest descriptors, verbatim from the protocol document, with the newest
# intents spec's analytics `migrate_to` (features §2.14).
REFERENCE_CAPABILITIES = json.loads("""
{"intents": [
  {"intent": "verify",
   "description": "Restore the snapshot to prove it is restorable, then discard it.",
   "semantics": ["check", "once"]},
  {"intent": "upgrade",
   "description": "Restore the snapshot, apply the next version's schema migrations to it to prove the upgrade survives this deployment's data, then discard it.",
   "semantics": ["check", "once", "migrate"]},
  {"intent": "analytics",
   "description": "Keep a long-lived read-only query replica restored from the latest snapshot.",
   "semantics": ["check", "url", "redact"],
   "params": {
     "minimum_ttl": {"type": "duration", "default": 7200},
     "switchover_grace": {"type": "duration", "default": 120},
     "storage_size_maximum": {"type": "bytes"},
     "persistent_schemas": {"type": "text"},
     "expose": {"type": "boolean", "default": false},
     "extra_users": {"type": "text"},
     "memory_request": {"type": "bytes"},
     "memory_limit": {"type": "bytes"},
     "cpu_request": {"type": "text"},
     "cpu_limit": {"type": "text"},
     "resources_maximum": {"type": "bytes"},
     "deployment_ready_timeout": {"type": "duration"},
     "redaction_manifest_url": {"type": "text"},
     "redaction_version_query": {"type": "text"},
     "redaction_version_fallback_to_base": {"type": "boolean", "default": false},
     "migrate_to": {"type": "text"}
   }}
]}
""")  # noqa: E501


def test_capabilities_are_the_references_descriptors_exactly() -> None:
    assert capabilities_request().to_wire() == REFERENCE_CAPABILITIES
    analytics = REFERENCE_CAPABILITIES["intents"][2]
    assert len(analytics["params"]) == 16
    # `params` is left out (not `{}`) for the intents that take none.
    assert [("params" in d) for d in capabilities_request().to_wire()["intents"]] == [
        False,
        False,
        True,
    ]
    assert [d.intent for d in PGRO_INTENTS] == ["verify", "upgrade", "analytics"]


def test_a_param_default_must_match_its_type() -> None:
    with pytest.raises(ValidationError, match="non-negative whole number of seconds"):
        ParamSpec(type="duration", default="2h")
    with pytest.raises(ValidationError, match="true or false"):
        ParamSpec(type="boolean", default=0)
    assert ParamSpec(type="integer", default=-3).to_wire() == {"type": "integer", "default": -3}


def test_descriptors_refuse_unknown_fields_and_are_immutable() -> None:
    with pytest.raises(ValidationError, match="extra"):
        IntentDescriptor.model_validate({"intent": "verify", "semantic": ["check"]})
    descriptor = IntentDescriptor(intent="verify")
    with pytest.raises(ValidationError):
        descriptor.intent = "other"  # type: ignore[misc]
    assert descriptor.to_wire() == {"intent": "verify", "semantics": []}


# -- worklist (§3.2) -----------------------------------------------------------------------------

REFERENCE_ENTRY: dict[str, Any] = {
    "replica_id": REPLICA,
    "group_id": GROUP,
    "machine_id": MACHINE,
    "server_id": MACHINE,
    "type": "tamanu-postgres",
    "intent": "verify",
    "name": "int-test",
    "overdue_after_seconds": None,
    "params": {},
    "snapshot_id": "k000000000000000000000000000000f",
    "snapshot_at": "2026-07-01T00:00:00Z",
    "storage": "s3",
    "bucket": "canopy-int-test",
    "prefix": "",
    "region": "us-east-1",
    "target_version": None,
    "target_version_id": None,
}


def test_the_reference_example_decodes() -> None:
    worklist = parse_worklist([REFERENCE_ENTRY])
    assert worklist.rejected == ()
    (entry,) = worklist.entries
    assert entry.replica_id == UUID(REPLICA)
    assert entry.group_id == UUID(GROUP)
    assert entry.machine_id == entry.server_id == UUID(MACHINE)
    assert entry.snapshot_id == "k000000000000000000000000000000f"
    assert entry.snapshot_at == datetime(2026, 7, 1, tzinfo=UTC)
    assert entry.params == {}
    assert entry.migrate_to is None
    assert entry.application_type is None


def test_the_oldest_shape_decodes() -> None:
    old = {
        "replica_id": REPLICA,
        "group_id": GROUP,
        "server_id": MACHINE,
        "type": "tamanu-postgres",
        "intent": "verify",
        "name": "int-test",
        "freshness_seconds": 86400,
        "snapshot_id": "k1",
        "snapshot_at": "2026-07-01T00:00:00.250+10:00",
        "storage": "s3",
        "bucket": "b",
        "prefix": "",
        "region": "ap-southeast-2",
    }
    (entry,) = parse_worklist([old]).entries
    assert entry.machine_id == UUID(MACHINE)
    assert entry.overdue_after_seconds == 86400
    assert entry.params == {}
    assert entry.snapshot_at == datetime(2026, 6, 30, 14, 0, 0, 250000, tzinfo=UTC)


def test_the_newest_shape_with_unknown_fields_decodes() -> None:
    new = {
        **REFERENCE_ENTRY,
        "intent": "upgrade",
        "application_type": "tamanu-central",
        "target_version": "2.31.0",
        "target_version_id": "55555555-5555-5555-5555-555555555555",
        "overdue_after_seconds": 3600,
        "params": {"minimum_ttl": None},
        "some_future_field": {"nested": True},
    }
    del new["server_id"]
    (entry,) = parse_worklist([new]).entries
    assert entry.application_type == "tamanu-central"
    assert entry.overdue_after_seconds == 3600
    assert entry.params == {"minimum_ttl": None}
    assert entry.migrate_to == MigrateTo(
        version="2.31.0", version_id="55555555-5555-5555-5555-555555555555"
    )


def test_a_null_machine_id_falls_back_to_server_id() -> None:
    (entry,) = parse_worklist([{**REFERENCE_ENTRY, "machine_id": None}]).entries
    assert entry.machine_id == UUID(MACHINE)


def test_migrate_to_needs_both_target_fields() -> None:
    entry = WorklistEntry.model_validate({**REFERENCE_ENTRY, "target_version": "2.31.0"})
    assert entry.migrate_to is None


def test_an_unreadable_snapshot_time_does_not_cost_the_entry() -> None:
    (entry,) = parse_worklist([{**REFERENCE_ENTRY, "snapshot_at": "yesterday"}]).entries
    assert entry.snapshot_at is None
    assert entry.snapshot_id == "k000000000000000000000000000000f"


def test_an_empty_snapshot_id_means_none() -> None:
    (entry,) = parse_worklist([{**REFERENCE_ENTRY, "snapshot_id": ""}]).entries
    assert entry.snapshot_id is None


def test_a_bad_entry_is_set_aside_with_its_identity_and_the_rest_kept() -> None:
    bad = {**REFERENCE_ENTRY, "name": "broken", "bucket": None}
    conflicting = {**REFERENCE_ENTRY, "name": "two-machines", "server_id": GROUP}
    worklist = parse_worklist([bad, REFERENCE_ENTRY, conflicting, "not an object"])
    assert [e.name for e in worklist.entries] == ["int-test"]
    first, second, third = worklist.rejected
    assert (first.index, first.name, first.replica_id, first.machine_id) == (
        0,
        "broken",
        REPLICA,
        MACHINE,
    )
    assert "bucket" in first.problem
    assert second.index == 2
    assert "differ" in second.problem
    assert (third.index, third.name, third.replica_id) == (3, None, None)


def test_a_worklist_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(ValueError, match="JSON array"):
        parse_worklist({"entries": []})


# -- credentials (§3.3) -------------------------------------------------------------------------

CREDENTIALS_ANSWER: dict[str, Any] = {
    "credentials": {
        "Version": 1,
        "AccessKeyId": "AKIAIOSFODNN7EXAMPLE",
        "SecretAccessKey": SECRET_KEY,
        "SessionToken": SESSION_TOKEN,
        "Expiration": "2026-07-01T13:00:00Z",
    },
    "repo_password": REPO_PASSWORD,
    "issued_by": "a future field",
}


def test_credentials_decode_with_the_expiry_parsed_and_secrets_hidden() -> None:
    creds = RestoreCredentials.model_validate(CREDENTIALS_ANSWER)
    assert creds.credentials.expiration == datetime(2026, 7, 1, 13, 0, tzinfo=UTC)
    assert creds.credentials.access_key_id == "AKIAIOSFODNN7EXAMPLE"
    for text in (repr(creds), str(creds), str(creds.model_dump())):
        assert SECRET_KEY not in text
        assert SESSION_TOKEN not in text
        assert REPO_PASSWORD not in text


def test_credentials_expiry_margin() -> None:
    creds = RestoreCredentials.model_validate(CREDENTIALS_ANSWER).credentials
    assert not creds.expires_within(NOW, timedelta(minutes=2))
    assert creds.expires_within(NOW + timedelta(minutes=58), timedelta(minutes=2))
    assert creds.expires_within(NOW + timedelta(hours=2), timedelta(0))


def test_broker_json_reveals_the_credential_process_shape() -> None:
    creds = RestoreCredentials.model_validate(CREDENTIALS_ANSWER)
    assert creds.broker_json() == {
        "credentials": {
            "Version": 1,
            "AccessKeyId": "AKIAIOSFODNN7EXAMPLE",
            "SecretAccessKey": SECRET_KEY,
            "SessionToken": SESSION_TOKEN,
            "Expiration": "2026-07-01T13:00:00Z",
        },
        "repo_password": REPO_PASSWORD,
    }


def test_credentials_without_session_token_decode() -> None:
    answer = {**CREDENTIALS_ANSWER, "credentials": dict(CREDENTIALS_ANSWER["credentials"])}
    del answer["credentials"]["SessionToken"]
    creds = AwsCredentials.model_validate(answer["credentials"])
    assert creds.session_token is None
    assert "SessionToken" not in creds.credential_process_json()


def test_credentials_request_omits_a_missing_run_id() -> None:
    assert RestoreCredentialsArgs(group=UUID(GROUP), type="tamanu-postgres").to_wire() == {
        "group": GROUP,
        "type": "tamanu-postgres",
    }
    assert RestoreCredentialsArgs.model_validate(
        {"group": GROUP, "type": "tamanu-postgres", "run_id": RUN}
    ).to_wire() == {"group": GROUP, "type": "tamanu-postgres", "run_id": RUN}


# -- verification (§3.4) ------------------------------------------------------------------------


def _report(**overrides: Any) -> VerificationArgs:
    fields: dict[str, Any] = {
        "replica_id": REPLICA,
        "group": GROUP,
        "server_id": MACHINE,
        "type": "tamanu-postgres",
        "intent": "verify",
        "outcome": "success",
        "replica_healthy": True,
        "observed_at": NOW,
        **overrides,
    }
    return VerificationArgs.model_validate(fields)


def test_a_minimal_report_sends_only_what_was_measured() -> None:
    assert _report().to_wire() == {
        "replica_id": REPLICA,
        "group": GROUP,
        "server_id": MACHINE,
        "type": "tamanu-postgres",
        "intent": "verify",
        "outcome": "success",
        "replica_healthy": True,
        "observed_at": "2026-07-01T12:00:00Z",
    }


def test_a_full_report() -> None:
    report = _report(
        machine_id=MACHINE,
        server_id=None,
        snapshot_id="k1",
        postgres_version="16",
        s3_received_raw_bytes=1000,
        s3_received_payload_bytes=900,
        run_id=RUN,
        observed_at=datetime(2026, 7, 1, 22, 0, 0, 123000, tzinfo=timezone(timedelta(hours=10))),
        health_details=HealthDetails(
            restore_duration_sec=42,
            sizes={"tamanu": 123, "postgres": 7},
            fixes={"locale": True, "reindex": False},
            checks=(
                CheckResult(name="connect", status="pass", detail="as postgres"),
                CheckResult(name="primary", status="pass"),
            ),
        ),
    )
    wire = report.to_wire()
    assert wire["machine_id"] == MACHINE
    assert "server_id" not in wire
    assert wire["observed_at"] == "2026-07-01T12:00:00.123000Z"
    assert wire["run_id"] == RUN
    assert wire["s3_received_raw_bytes"] == 1000
    assert "s3_sent_raw_bytes" not in wire  # unmeasured: left out, not 0
    assert wire["health_details"] == {
        "restore_duration_sec": 42,
        "sizes": {"tamanu": 123, "postgres": 7},
        "fixes": {"locale": True, "reindex": False},
        "checks": [
            {"name": "connect", "status": "pass", "detail": "as postgres"},
            {"name": "primary", "status": "pass", "detail": ""},
        ],
    }


def test_empty_health_details_are_left_out() -> None:
    empty = HealthDetails(sizes={}, checks=())
    assert empty.is_empty()
    assert "health_details" not in _report(health_details=empty).to_wire()
    only_url = HealthDetails(url="https://infra-replica-x.tail.ts.net", sizes={})
    assert _report(health_details=only_url).to_wire()["health_details"] == {
        "url": "https://infra-replica-x.tail.ts.net"
    }


@pytest.mark.parametrize(
    "machines",
    [{"server_id": None}, {"machine_id": MACHINE}],
    ids=["neither", "both"],
)
def test_exactly_one_machine_field(machines: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of machine_id or server_id"):
        _report(**machines)


@pytest.mark.parametrize(
    "missing",
    ["replica_id", "group", "type", "intent", "outcome", "replica_healthy", "observed_at"],
)
def test_required_report_fields(missing: str) -> None:
    fields = _report().model_dump()
    del fields[missing]
    with pytest.raises(ValidationError, match=missing):
        VerificationArgs.model_validate(fields)


def test_reports_refuse_unknown_fields_naive_times_and_healthy_failures() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _report(reason="NotPostgres")
    with pytest.raises(ValidationError, match="timezone"):
        _report(observed_at=datetime(2026, 7, 1, 12, 0))
    with pytest.raises(ValidationError, match="replica_healthy is true"):
        _report(outcome="failure")
    with pytest.raises(ValidationError):
        _report(s3_sent_raw_bytes=-1)
    with pytest.raises(ValidationError):
        _report(replica_id="not-a-uuid")
    failure = _report(outcome="failure", replica_healthy=False, error="deployment never ready")
    assert failure.to_wire()["error"] == "deployment never ready"


def test_health_details_refuse_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        HealthDetails.model_validate({"restore_duration": 3})


def test_migration_report() -> None:
    result = MigrationResult(
        total_elapsed_seconds=90,
        failed_migration="1700000000-addIndex",
        error="x" * 5000,
        data_bytes_before=1000,
        data_bytes_after=1200,
        timings=[MigrationTiming(name="1690000000-init", elapsed_seconds=3)],
    )
    migration = MigrationArgs.from_result(
        result, MigrateTo(version="2.31.0", version_id=RUN), "tamanu-central"
    )
    wire = _report(intent="upgrade", migration=migration).to_wire()["migration"]
    assert wire["target_version"] == "2.31.0"
    assert wire["target_version_id"] == RUN
    assert wire["application_type"] == "tamanu-central"
    assert wire["failed_migration"] == "1700000000-addIndex"
    assert len(wire["error"]) == 2000
    assert wire["timings"] == [{"name": "1690000000-init", "elapsed_seconds": 3}]
    with pytest.raises(ValidationError, match="must name target_version"):
        MigrationArgs(total_elapsed_seconds=1, data_bytes_before=0, data_bytes_after=0)
    empty_timings = MigrationArgs(
        target_version="2.31.0", total_elapsed_seconds=1, data_bytes_before=0, data_bytes_after=0
    )
    assert empty_timings.to_wire()["timings"] == []


# -- progress (§3.5) -------------------------------------------------------------------------------


def test_progress_sends_measured_counters_only() -> None:
    sample = ProgressArgs.model_validate(
        {
            "run_id": RUN,
            "type": "tamanu-postgres",
            "s3_sent_raw_bytes": 10,
            "s3_sent_payload_bytes": 0,
            "s3_received_raw_bytes": 2**64 - 1,  # the sidecar's u64
            "s3_received_payload_bytes": 5,
        }
    )
    assert sample.to_wire() == {
        "run_id": RUN,
        "type": "tamanu-postgres",
        "purpose": "restore",
        "s3_sent_raw_bytes": 10,
        "s3_sent_payload_bytes": 0,
        "s3_received_raw_bytes": INT64_MAX,
        "s3_received_payload_bytes": 5,
        "extra": {},
    }


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
def test_progress_counters_are_non_negative_integers(bad: object) -> None:
    with pytest.raises(ValidationError):
        ProgressArgs.model_validate({"run_id": RUN, "type": "t", "files_done": bad})


def test_progress_needs_a_run_id() -> None:
    with pytest.raises(ValidationError, match="run_id"):
        ProgressArgs.model_validate({"type": "tamanu-postgres"})


# -- problem documents, times ---------------------------------------------------------------------


def test_problem_documents() -> None:
    problem = parse_problem(
        {
            "type": "/errors/rate-limited",
            "title": "Too many requests",
            "status": 429,
            "detail": "60 per 300s",
            "instance": "/x",
        }
    )
    assert problem is not None
    assert problem.slug == "rate-limited"
    assert problem.reason == "Too many requests"
    assert ProblemDocument(detail="only detail").reason == "only detail"
    assert ProblemDocument().slug is None
    assert parse_problem(["not", "a", "document"]) is None
    assert parse_problem({"unrelated": 1}) is None


def test_canopy_times_are_utc_with_z() -> None:
    assert format_canopy_time(datetime(2026, 7, 1, tzinfo=UTC)) == "2026-07-01T00:00:00Z"
    assert (
        format_canopy_time(datetime(2026, 7, 1, 10, 0, 0, 5, tzinfo=timezone(timedelta(hours=10))))
        == "2026-07-01T00:00:00.000005Z"
    )
    with pytest.raises(ValueError, match="timezone"):
        format_canopy_time(datetime(2026, 7, 1))
