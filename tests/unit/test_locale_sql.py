"""The SQL text of the locale rewrite, the reindexes and the collation refresh (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pgro.postgres.collation_refresh import (
    DEPENDENT_INDEXES_SQL,
    MISMATCHED_COLLATIONS_SQL,
    CollationMismatch,
    CollationRefreshResult,
    RebuildFailure,
    RebuiltIndex,
    repair_plan,
)
from pgro.postgres.locale_aliases import (
    WINDOWS_CODE_PAGES,
    default_specs,
    gconv_aliases,
    missing_locales,
    windows_alias_specs,
)
from pgro.postgres.locale_fix import (
    CONFORMING_LOCALES,
    EXCLUDED_NAMESPACES_SQL,
    concurrent_database_rebuild,
    concurrent_index_rebuild,
    default_collation_indexes_sql,
    default_collation_statement,
    error_text,
    fallback_rewrite_statement,
    mismatch_probe_statement,
    non_conforming_predicate,
    parse_mismatch_count,
    rebuild_statement,
    rewrite_statement,
    single_user_statements,
)
from pgro.postgres.single_user import reports_failure

HOSTILE = 'x"; DROP TABLE y; --'


def test_the_single_user_session_probes_then_rewrites_on_separate_lines() -> None:
    probe, rewrite = single_user_statements(150000)
    assert probe == mismatch_probe_statement()
    assert rewrite == rewrite_statement(150000)
    assert "\n" not in probe
    assert "\n" not in rewrite
    assert probe.startswith("SELECT count(*) AS pgro_locale_mismatch FROM pg_catalog.pg_database")
    assert rewrite.startswith("UPDATE pg_catalog.pg_database SET datcollate = ")
    # Both select the same databases.
    assert probe.endswith(f"WHERE {non_conforming_predicate()};")
    assert rewrite.endswith(f"WHERE {non_conforming_predicate()};")


def test_conforming_locales_are_left_alone() -> None:
    predicate = non_conforming_predicate()
    for name in ("C", "C.UTF-8", "PG_UNICODE_FAST", "POSIX", "C.utf8"):
        assert name in CONFORMING_LOCALES
        assert f"'{name}'" in predicate
    assert "datcollate NOT IN" in predicate
    assert "datctype NOT IN" in predicate


def test_the_rewrite_targets_c_utf8_for_utf8_databases_and_c_otherwise() -> None:
    statement = rewrite_statement(150000)
    assert "WHEN encoding = pg_catalog.pg_char_to_encoding('UTF8') THEN 'C.UTF-8' ELSE 'C'" in (
        statement
    )


def test_datcollversion_is_reset_only_where_it_exists() -> None:
    assert "datcollversion = NULL" in rewrite_statement(150000)
    assert "datcollversion = NULL" in rewrite_statement(170000)
    assert "datcollversion" not in rewrite_statement(140000)
    assert "datcollversion" not in rewrite_statement(130000)
    assert "datcollversion = NULL" in fallback_rewrite_statement(150000)
    assert "datcollversion" not in fallback_rewrite_statement(140000)


def test_the_fallback_counts_what_it_rewrote() -> None:
    statement = fallback_rewrite_statement(160000)
    assert statement.startswith("WITH rewritten AS (UPDATE pg_catalog.pg_database")
    assert "RETURNING 1) SELECT count(*) FROM rewritten" in statement
    assert non_conforming_predicate() in statement


def test_the_default_collation_row_is_rewritten_only_when_it_names_a_locale() -> None:
    statement = default_collation_statement()
    assert "WHERE oid = 100 AND collname = 'default'" in statement
    assert "collcollate <> ''" in statement  # NULL (15+) and '' rows stay as they are
    assert "SELECT count(*) FROM rewritten" in statement


SINGLE_USER_OUTPUT = (
    "PostgreSQL stand-alone backend 15.18\n"
    "backend> \t 1: pgro_locale_mismatch\t(typeid = 20, len = 8, typmod = -1, byval = t)\n"
    "\t----\n"
    '\t 1: pgro_locale_mismatch = "4"\t(typeid = 20, len = 8, typmod = -1, byval = t)\n'
    "\t----\n"
    "backend> backend>\n"
)


def test_the_probe_count_is_read_from_single_user_output() -> None:
    assert parse_mismatch_count(SINGLE_USER_OUTPUT) == 4
    assert parse_mismatch_count(SINGLE_USER_OUTPUT.replace('"4"', '"0"')) == 0
    assert parse_mismatch_count("backend> backend>") is None
    # A name printed elsewhere cannot pose as the count.
    assert parse_mismatch_count('datname = "xpgro_locale_mismatch = "9""') is None


def test_the_quick_reindex_takes_valid_user_indexes_on_the_default_collation() -> None:
    sql = default_collation_indexes_sql()
    assert "i.indisvalid" in sql
    assert "a.attcollation = 100" in sql
    assert "<> 0" not in sql
    assert EXCLUDED_NAMESPACES_SQL in sql


@pytest.mark.parametrize("sql", [default_collation_indexes_sql(), DEPENDENT_INDEXES_SQL])
def test_catalog_namespaces_are_excluded(sql: str) -> None:
    assert "n.nspname NOT IN ('pg_catalog', 'information_schema')" in sql
    assert "NOT pg_catalog.starts_with(n.nspname, 'pg_toast')" in sql
    assert "NOT pg_catalog.starts_with(n.nspname, 'pg_temp')" in sql


def test_dependent_indexes_are_found_by_key_column_and_expression_collation() -> None:
    assert "i.indisvalid" in DEPENDENT_INDEXES_SQL
    assert "i.indcollation" in DEPENDENT_INDEXES_SQL
    assert "a.attcollation = ANY(%(colls)s)" in DEPENDENT_INDEXES_SQL
    assert "pg_catalog.pg_depend" in DEPENDENT_INDEXES_SQL
    # psycopg placeholders only: no stray % that would be read as one.
    assert DEPENDENT_INDEXES_SQL.count("%") == DEPENDENT_INDEXES_SQL.count("%(colls)s") * 1


def test_detection_ignores_unversioned_collations() -> None:
    assert "c.collversion IS NOT NULL" in MISMATCHED_COLLATIONS_SQL
    assert "c.collversion <> pg_catalog.pg_collation_actual_version(c.oid)" in (
        MISMATCHED_COLLATIONS_SQL
    )


def _text(plan: list[object]) -> list[str]:
    return [s.as_string(None) for s in plan]  # type: ignore[attr-defined]


def test_refresh_comes_after_every_rebuild() -> None:
    plan = repair_plan(
        [("public", "a"), ("s", "b")],
        [("public", "en_icu")],
        database="app",
        server_version_num=160000,
    )
    statements = _text(list(plan.ordered()))
    assert statements == [
        'REINDEX INDEX CONCURRENTLY "public"."a"',
        'REINDEX INDEX CONCURRENTLY "s"."b"',
        'ALTER COLLATION "public"."en_icu" REFRESH VERSION',
        'ALTER DATABASE "app" REFRESH COLLATION VERSION',
    ]
    assert len(plan.rebuilds) == 2
    assert len(plan.refreshes) == 2


def test_the_database_refresh_needs_15_and_concurrent_rebuilds_need_14() -> None:
    plan = repair_plan(
        [("public", "a")], [("public", "c")], database="app", server_version_num=130000
    )
    assert _text(list(plan.ordered())) == [
        'REINDEX INDEX "public"."a"',
        'ALTER COLLATION "public"."c" REFRESH VERSION',
    ]
    plan = repair_plan([], [("public", "c")], database=None, server_version_num=170000)
    assert _text(list(plan.refreshes)) == ['ALTER COLLATION "public"."c" REFRESH VERSION']
    assert not concurrent_index_rebuild(130000)
    assert concurrent_index_rebuild(140000)
    assert not concurrent_database_rebuild(110000)
    assert concurrent_database_rebuild(120000)


def test_catalog_names_are_quoted_never_formatted() -> None:
    text = rebuild_statement(HOSTILE, HOSTILE, concurrently=True).as_string(None)
    assert text == 'REINDEX INDEX CONCURRENTLY "x""; DROP TABLE y; --"."x""; DROP TABLE y; --"'
    plan = repair_plan([], [(HOSTILE, HOSTILE)], database=HOSTILE, server_version_num=150000)
    assert (
        _text(list(plan.refreshes))[1]
        == 'ALTER DATABASE "x""; DROP TABLE y; --" REFRESH COLLATION VERSION'
    )


@dataclass
class _Diag:
    message_primary: str | None
    message_detail: str | None


class _ServerError(Exception):
    def __init__(self) -> None:
        super().__init__(
            "could not create unique index\nDETAIL: Key (email)=(a@b.c) is duplicated."
        )
        self.diag = _Diag('could not create unique index "u"', "Key (email)=(a@b.c) is duplicated.")


def test_errors_keep_their_primary_message_only() -> None:
    assert error_text(_ServerError()) == 'could not create unique index "u"'
    assert error_text(ValueError("first line\nsecond")) == "first line"


MISMATCH = CollationMismatch("app", "public", "en_icu", "0.0", "153.120")
DEFAULT = CollationMismatch("app", "pg_catalog", "default", "0.0", "153.120")


def test_a_result_with_failures_reports_what_remains() -> None:
    result = CollationRefreshResult(
        mismatches=(MISMATCH, DEFAULT),
        rebuilt=(),
        failures=(
            RebuildFailure("app", "public", "t_name", "canceling statement due to lock timeout"),
        ),
        refreshed=(),
    )
    assert result.needed
    assert not result.repaired
    assert result.remaining == (MISMATCH, DEFAULT)
    (note,) = result.notes()
    assert "2 collation version mismatch(es) remain" in note
    assert "app:public.t_name: canceling statement due to lock timeout" in note
    assert "app:public.en_icu (recorded 0.0, library 153.120)" in note


def test_a_clean_result_notes_the_refresh() -> None:
    result = CollationRefreshResult(
        mismatches=(MISMATCH,),
        rebuilt=(RebuiltIndex("app", "public", "t_name"),),
        refreshed=(MISMATCH,),
    )
    assert result.repaired
    assert result.remaining == ()
    (note,) = result.notes()
    assert note.startswith("refreshed 1 collation version(s) after rebuilding 1 index(es)")
    assert CollationRefreshResult(mismatches=()).notes() == []
    assert not CollationRefreshResult(mismatches=()).repaired


def test_the_aliases_are_the_references_set() -> None:
    names = [s.name for s in windows_alias_specs()]
    assert len(names) == 2 * (len(WINDOWS_CODE_PAGES) + 1)
    assert "English_United States.1250" in names
    assert "English_United Kingdom.1258" in names
    assert "English_United States.65001" in names
    assert {s.source for s in windows_alias_specs()} == {"en_US"}
    assert default_specs()[0].name == "en_US.UTF-8"
    text = gconv_aliases()
    assert "alias\t1252//\tCP1252//" in text
    assert "alias\t65001//\tISO-10646/UTF8/" in text
    # Aliases only: a `module` line would make glibc load code from the directory.
    assert not [line for line in text.splitlines() if line.startswith("module")]


def test_missing_locales_are_read_from_the_servers_message() -> None:
    log = (
        'DETAIL:  The database was initialized with LC_COLLATE "English_United States.1252",'
        "  which is not recognized by setlocale().\n"
        'DETAIL:  The database was initialized with LC_CTYPE "de_DE.UTF-8",  which is not'
    )
    assert missing_locales(log) == ["English_United States.1252", "de_DE.UTF-8"]
    assert missing_locales("FATAL:  something else") == []


@pytest.mark.parametrize(
    ("log", "failed"),
    [
        ("2026-12-04 16:30:20.502 UTC [24750] FATAL:  database locale is incompatible", True),
        ("ERROR:  division by zero", True),  # an empty log_line_prefix
        ("PANIC:  could not locate a valid checkpoint record", True),
        ("LOG:  checkpoint starting: shutdown immediate\nWARNING:  some warning", False),
        ("", False),
    ],
)
def test_single_user_failures_are_read_whatever_the_prefix(log: str, failed: bool) -> None:
    assert reports_failure(log) is failed
