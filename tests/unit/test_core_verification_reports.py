"""Verification reports waiting in status: dedup per run, backoff, details, removal."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from pgro.core import verification_reports as vr
from tests.fixtures.manifests import restore

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
RUN = "0b0e7f7e-0d1a-4b7e-8f3e-5f8b1c2d3e4f"


verified = functools.partial(
    restore,
    name="r-1",
    replica="canopy-replica",
    namespace="ns",
    metadata={"creationTimestamp": "2026-11-27T11:58:00Z"},
    status={"runId": RUN, "postgresVersion": "15", "fixes": {"reset_wal": True}},
    snapshot="kA",
)


def test_new_report_carries_the_run_and_the_duration() -> None:
    report = vr.new_report(verified(), "success", NOW)
    assert (report.restore, report.run_id, report.snapshot_id) == ("r-1", RUN, "kA")
    assert report.postgres_version == "15" and report.outcome == "success"
    assert report.health_details == {"restore_duration_sec": 120, "fixes": {"reset_wal": True}}
    assert report.key == RUN and report.attempts == 0 and report.next_attempt_at is None


def test_a_run_is_reported_once() -> None:
    first = vr.new_report(verified(), "success", NOW)
    again = vr.new_report(verified(), "failure", NOW, "late failure")
    reports = vr.with_report(vr.with_report([], first), again)
    assert reports == [first]
    other = vr.new_report(verified(name="r-2", status={}), "failure", NOW, "x" * 2000)
    reports = vr.with_report(reports, other)
    assert [r.key for r in reports] == [RUN, "r-2"]
    assert other.error is not None and len(other.error) == vr.ERROR_LIMIT


def test_failed_deliveries_back_off_and_delivery_removes() -> None:
    reports = [vr.new_report(verified(), "success", NOW)]
    assert vr.due(reports, NOW) == reports
    delays = []
    for _ in range(10):
        reports = vr.attempt_failed(reports, RUN, NOW, "canopy answered 503")
        [r] = reports
        assert r.next_attempt_at is not None
        delays.append(r.next_attempt_at - NOW)
        assert vr.due(reports, NOW) == []
        assert vr.due(reports, r.next_attempt_at) == reports
    assert delays[:3] == [timedelta(seconds=15), timedelta(seconds=30), timedelta(seconds=60)]
    assert delays[-1] == vr.RETRY_MAX
    assert reports[0].attempts == 10 and reports[0].last_error == "canopy answered 503"
    assert not vr.holds_removal(reports)
    assert vr.holds_removal(
        vr.attempt_failed([vr.new_report(verified(), "success", NOW)], RUN, NOW, "e")
    )
    assert vr.delivered(reports, RUN) == []
    assert vr.status_patch([]) == {"pendingVerificationReports": None}


def test_details_are_merged_not_replacing_the_verdict() -> None:
    reports = [vr.new_report(verified(), "success", NOW)]
    reports = vr.with_details(
        reports,
        RUN,
        health_details={"sizes": {"app": 10}},
        traffic={"s3_received_payload_bytes": 5},
    )
    [r] = reports
    assert r.health_details == {
        "restore_duration_sec": 120,
        "fixes": {"reset_wal": True},
        "sizes": {"app": 10},
    }
    assert r.traffic == {"s3_received_payload_bytes": 5} and r.outcome == "success"
    assert vr.with_details(reports, "other", health_details={"x": 1}) == reports
    [wire] = vr.status_patch(reports)["pendingVerificationReports"]
    assert wire["runId"] == RUN and wire["healthDetails"]["sizes"] == {"app": 10}


def test_data_checks_ride_on_the_report_and_join_the_health_checks() -> None:
    from pgro.api.data_checks import DataCheck, DataCheckFinding, DataChecks

    checks = DataChecks(
        depth="standard",
        verdict="damaged",
        checks=[
            DataCheck(
                name="btree",
                status="fail",
                detail="1 problem",
                count=1,
                findings=[DataCheckFinding(message="bad", database="app", block=3)],
            )
        ],
    )
    [r] = [vr.new_report(verified(), "failure", NOW, "DataDamaged: …", data_checks=checks)]
    assert r.health_details is not None
    assert r.health_details["checks"] == [
        {
            "name": "btree",
            "status": "fail",
            "detail": "1 problem",
            "count": 1,
            "findings": [{"message": "bad", "database": "app", "block": 3}],
        }
    ]
    connect = {"name": "connect", "status": "pass", "detail": "ok"}
    [merged] = vr.with_details([r], RUN, health_details={"checks": [connect]})
    assert merged.health_details is not None
    assert [c["name"] for c in merged.health_details["checks"]] == ["connect", "btree"]
