"""The collation-version verdict of `pgro verify` (features.md §2.4): a mismatch the repair
could not remove fails the health check, naming the collation and the indexes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgro.pipeline.locale_repair import ALIASES_SWITCH, LocaleRepair, aliases_disabled
from pgro.postgres.collation_refresh import (
    CollationMismatch,
    CollationRefreshResult,
    RebuildFailure,
    RebuiltIndex,
)
from pgro.postgres.health import (
    COLLATION_CHECK,
    COLLATION_MISMATCH,
    HealthReport,
    record_collation_versions,
)
from pgro.postgres.locale_aliases import restore_locale_env

DRIFTED = CollationMismatch("app", "public", "en_icu", "0.0", "153.120")
DEFAULT = CollationMismatch("icudb", "pg_catalog", "default", "0.0", "153.120")


def test_no_mismatch_passes() -> None:
    report = HealthReport()
    record_collation_versions(report, CollationRefreshResult(()))
    assert report.healthy
    assert [c.name for c in report.checks] == [COLLATION_CHECK]
    assert report.checks[0].status == "pass"


def test_a_refreshed_mismatch_passes_and_says_what_was_refreshed() -> None:
    result = CollationRefreshResult(
        (DRIFTED,), rebuilt=(RebuiltIndex("app", "public", "t_name"),), refreshed=(DRIFTED,)
    )
    report = HealthReport()
    record_collation_versions(report, result)
    assert report.healthy
    assert "refreshed 1 collation version(s) after rebuilding 1" in report.checks[0].detail
    assert "app:public.en_icu" in report.checks[0].detail


def test_a_remaining_mismatch_fails_naming_collation_and_indexes() -> None:
    result = CollationRefreshResult(
        (DRIFTED, DEFAULT),
        rebuilt=(RebuiltIndex("icudb", "public", "words_w"),),
        failures=(
            RebuildFailure("app", "public", "t_name", "canceling statement due to lock timeout"),
        ),
        refreshed=(DEFAULT,),
    )
    report = HealthReport()
    record_collation_versions(report, result)
    assert not report.healthy
    assert report.failure_reason == COLLATION_MISMATCH
    check = report.checks[0]
    assert check.status == "fail"
    assert "app:public.en_icu (recorded 0.0, library 153.120)" in check.detail
    assert "app:public.t_name: canceling statement due to lock timeout" in check.detail
    assert "icudb" not in check.detail  # refreshed: not what remains


def test_the_private_locales_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALIASES_SWITCH, raising=False)
    assert not aliases_disabled()
    for value in ("off", "0", "False", " no "):
        monkeypatch.setenv(ALIASES_SWITCH, value)
        assert aliases_disabled(), value
    monkeypatch.setenv(ALIASES_SWITCH, "on")
    assert not aliases_disabled()


def test_the_served_server_gets_the_locales_only_when_built(tmp_path: Path) -> None:
    assert restore_locale_env(tmp_path) is None
    (tmp_path / "locales" / "gconv").mkdir(parents=True)
    assert restore_locale_env(tmp_path) is None  # half-built: no gconv-modules yet
    (tmp_path / "locales" / "gconv" / "gconv-modules").write_text("")
    assert restore_locale_env(tmp_path) == {
        "LOCPATH": str(tmp_path / "locales"),
        "GCONV_PATH": str(tmp_path / "locales" / "gconv"),
    }


def test_the_locale_fix_is_the_or_of_both_counts(tmp_path: Path) -> None:
    state = LocaleRepair(tmp_path, single_user=3, fallback=0)
    assert state.rewritten
    assert LocaleRepair(tmp_path, single_user=0, fallback=1).rewritten
    assert not LocaleRepair(tmp_path).rewritten
    assert LocaleRepair(tmp_path).env() is None
