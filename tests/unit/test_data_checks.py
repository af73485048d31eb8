"""pipeline.data_checks: the depth a replica is verified at, and how the data checks'
verdicts become the verification's (no server needed)."""

from __future__ import annotations

import pytest

from pgro.api.names import ANNOTATION_VERIFY_DEPTH
from pgro.core.verify_depth import CheckVerdict, Finding, UnknownDepth, incomplete, not_checked
from pgro.pipeline.data_checks import (
    DATA_DAMAGED,
    VERIFICATION_INCOMPLETE,
    _checksum_verdict,
    depth_for,
    record,
)
from pgro.postgres.checksums import ChecksumResult
from pgro.postgres.health import HealthReport


def test_the_flag_beats_the_annotation_which_beats_the_fallback() -> None:
    annotated = {ANNOTATION_VERIFY_DEPTH: "full"}
    assert depth_for(annotated, "quick").depth == "quick"
    assert depth_for(annotated).depth == "full"
    assert depth_for({}).depth == "standard"
    assert depth_for({}, fallback="quick").depth == "quick"
    assert depth_for({ANNOTATION_VERIFY_DEPTH: " Quick "}).warning is None
    with pytest.raises(UnknownDepth):
        depth_for({}, "deep")


def test_an_invalid_annotation_is_the_fallback_with_a_warning() -> None:
    choice = depth_for({ANNOTATION_VERIFY_DEPTH: "everything"}, fallback="quick")
    assert choice.depth == "quick"
    assert choice.warning is not None
    assert ANNOTATION_VERIFY_DEPTH in choice.warning and "'everything'" in choice.warning


def _healthy() -> HealthReport:
    health = HealthReport()
    health.passed("connect", "ok")
    return health


def test_a_failed_check_is_data_damaged_naming_it_and_carries_its_findings() -> None:
    finding = Finding("btree", "out of order", "shop", "public.orders_pkey", 51, "public.orders")
    failed = CheckVerdict("btree", "fail", "1 problem: shop.public.orders_pkey", (finding,), 1)
    health = _healthy()
    record(health, [not_checked("checksums", "no checksums"), failed, incomplete(3, 9)])
    assert not health.healthy
    assert health.failure_reason == DATA_DAMAGED  # damage beats a budget that ran out
    assert (
        health.failure_message is not None and "shop.public.orders_pkey" in health.failure_message
    )
    btree = health.checks[-2].as_dict()
    assert btree["count"] == 1
    assert btree["findings"] == [
        {
            "message": "out of order",
            "database": "shop",
            "relation": "public.orders_pkey",
            "table": "public.orders",
            "block": 51,
        }
    ]


def test_not_checked_is_no_failure_and_a_cut_short_check_is_incomplete() -> None:
    health = _healthy()
    record(health, [not_checked("checksums", "no pg_checksums")])
    assert health.healthy and health.failure_reason is None
    record(health, [incomplete(0, 4)])
    assert not health.healthy and health.failure_reason == VERIFICATION_INCOMPLETE
    assert "incomplete after 0 of 4 relations" in (health.failure_message or "")


def test_an_earlier_failure_keeps_its_reason() -> None:
    health = HealthReport()
    health.failed("application_database", "only system databases", "NoApplicationDatabase")
    record(health, [CheckVerdict("btree", "fail", "damage")])
    assert health.failure_reason == "NoApplicationDatabase"


@pytest.mark.parametrize(
    ("result", "status", "words"),
    [
        (ChecksumResult(enabled=False), "not_checked", "no data checksums"),
        (ChecksumResult(enabled=True, blocks_scanned=12), "pass", "12 blocks checked"),
        (
            ChecksumResult(enabled=True, error="pg_checksums did not finish within 5s"),
            "incomplete",
            "time budget",
        ),
        (
            ChecksumResult(enabled=True, error="pg_checksums failed: cluster must be shut down"),
            "not_checked",
            "running server",
        ),
    ],
)
def test_checksum_results_become_verdicts(result: ChecksumResult, status: str, words: str) -> None:
    verdict = _checksum_verdict(result, 60)
    assert verdict is not None and verdict.status == status and words in verdict.detail


def test_checksum_findings_wait_to_be_named() -> None:
    found = ChecksumResult(enabled=True, findings=[Finding("checksums", "mismatch", file="x")])
    assert _checksum_verdict(found, 60) is None
