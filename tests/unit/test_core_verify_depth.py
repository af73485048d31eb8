"""The depth table and the shaping of integrity verdicts (pure)."""

from __future__ import annotations

import pytest

from pgro.core.verify_depth import (
    BTREE,
    CHECKSUMS,
    DEFAULT_DEPTH,
    FULL_READ,
    HEAP,
    MAX_SHOWN,
    PLANS,
    CheckVerdict,
    Finding,
    Skip,
    UnknownDepth,
    block_in_message,
    incomplete,
    not_checked,
    parse_depth,
    plan_for,
    shape,
    shape_skips,
)


def test_each_depth_runs_what_the_one_below_runs_and_more() -> None:
    assert plan_for("quick").checks == ()
    assert not plan_for("quick").reads_data
    assert plan_for("standard").checks == (CHECKSUMS, BTREE)
    assert not plan_for("standard").heapallindexed
    assert plan_for("full").checks == (CHECKSUMS, BTREE, HEAP, FULL_READ)
    assert plan_for("full").heapallindexed
    assert set(PLANS["quick"].checks) <= set(PLANS["standard"].checks)
    assert set(PLANS["standard"].checks) <= set(PLANS["full"].checks)


def test_the_default_catches_both_damaged_fixtures() -> None:
    # A heap page with a bad checksum (pg_checksums) and a misplaced btree leaf
    # (bt_index_check) are both standard's.
    assert DEFAULT_DEPTH == "standard"
    plan = plan_for(None)
    assert plan.checksums and plan.btree


@pytest.mark.parametrize(
    ("text", "depth"), [("", "standard"), (" FULL ", "full"), ("quick", "quick")]
)
def test_parse_depth(text: str, depth: str) -> None:
    assert parse_depth(text) == depth


def test_an_unknown_depth_names_the_choices() -> None:
    with pytest.raises(UnknownDepth, match="quick, standard, full"):
        parse_depth("deep")


def test_the_block_a_server_message_names() -> None:
    assert block_in_message("invalid page in block 100 of relation base/1/2") == 100
    assert block_in_message("item order invariant violated (Lower index tid=(42,7))") == 42
    assert block_in_message("block 0 of relation x") == 0
    assert block_in_message("could not open relation") is None


def _finding(i: int) -> Finding:
    return Finding(
        BTREE, f"bad {i}", database="shop", relation="public.i", block=i, table="public.t"
    )


def test_a_failed_check_shows_the_first_findings_and_the_count() -> None:
    verdict = shape(BTREE, [_finding(i) for i in range(8)], 12, "btree indexes")
    assert verdict.status == "fail" and verdict.count == 8
    assert len(verdict.findings) == MAX_SHOWN
    assert verdict.detail.startswith("8 problems in 12 btree indexes: ")
    assert "shop.public.i (of public.t) block 0: bad 0" in verdict.detail
    assert "bad 4" in verdict.detail and "bad 5" not in verdict.detail
    assert verdict.detail.endswith("; and 3 more")
    as_dict = verdict.as_dict()
    assert as_dict["count"] == 8
    assert as_dict["findings"][0] == {  # type: ignore[index]
        "message": "bad 0",
        "database": "shop",
        "relation": "public.i",
        "table": "public.t",
        "block": 0,
    }


def test_a_passing_check_says_how_much_it_covered() -> None:
    verdict = shape(FULL_READ, [], 40, "tables")
    assert (verdict.status, verdict.detail) == ("pass", "40 tables checked, no damage found")
    assert "findings" not in verdict.as_dict()


def test_a_file_finding_names_the_file() -> None:
    finding = Finding(CHECKSUMS, "checksum mismatch", file="base/5/16384", block=3)
    assert finding.describe() == "file base/5/16384 block 3: checksum mismatch"


def test_skips_are_grouped_by_reason_with_a_count() -> None:
    skips = [Skip("db", f"public.u{i}", "unlogged") for i in range(7)]
    skips.append(Skip("db", "public.h", "hash index"))
    verdict = shape_skips(skips)
    assert verdict is not None and verdict.status == "not_checked"
    assert verdict.detail.startswith("8 relations not checked: hash index: db.public.h; ")
    assert "unlogged: db.public.u0, " in verdict.detail
    assert verdict.detail.endswith("and 2 more")
    assert shape_skips([]) is None


def test_incomplete_and_not_checked_verdicts() -> None:
    assert incomplete(3, 10).detail.startswith("incomplete after 3 of 10 relations")
    assert incomplete(3, 10).status == "incomplete"
    assert not_checked(BTREE, "amcheck missing").detail == "not checked: amcheck missing"


def test_status_summary_caps_hostile_text_and_puts_failures_first() -> None:
    from pgro.core.verify_depth import MAX_CHECKS, MAX_NAME, MAX_TEXT, damage_summary, data_checks

    long_name = "x" * 5000
    damaged = shape(
        BTREE,
        [Finding(BTREE, "m" * 5000, database="app", relation=long_name, block=7)] * 9,
        3,
        "indexes",
    )
    passes = [CheckVerdict(f"c{i}", "pass", "ok") for i in range(40)]
    summary = data_checks("standard", [*passes, damaged])
    assert summary.verdict == "damaged" and summary.damaged
    assert len(summary.checks) == MAX_CHECKS
    first = summary.checks[0]
    assert (first.name, first.status, first.count) == (BTREE, "fail", 9)
    assert len(first.findings) == MAX_SHOWN
    assert len(first.detail) <= MAX_TEXT
    assert all(len(f.message) <= MAX_TEXT for f in first.findings)
    assert all(len(f.relation or "") <= MAX_NAME for f in first.findings)
    assert first.findings[0].block == 7
    assert damage_summary(summary).startswith("DataDamaged: the data is damaged: btree: 9 problems")
    reported = first.as_report()
    assert reported["count"] == 9 and len(reported["findings"]) == MAX_SHOWN  # type: ignore[arg-type]


def test_status_summary_verdicts() -> None:
    from pgro.core.verify_depth import data_checks

    assert data_checks("full", [CheckVerdict("heap", "pass", "ok")]).verdict == "passed"
    assert data_checks("full", [not_checked("checksums", "off")]).verdict == "passed"
    cut = CheckVerdict("integrity_complete", "incomplete", "budget")
    assert data_checks("full", [cut]).verdict == "incomplete"
    assert data_checks("quick", []).checks == []
