"""The migration's result shaping and log redaction (`pgro.core.app_migration`).

The `result_from_batch` cases are the reference's (`batch_result_*` in its restore tests),
ported as behaviour: Tamanu's `stats` payload with two migrations of 400 000 and 12 500 ms.
"""

from __future__ import annotations

from typing import Any

import pytest

from pgro.core.app_migration import (
    KEEP_LINES,
    MASK,
    MAX_ERROR_BYTES,
    MAX_NAME_CHARS,
    MAX_NUMBER,
    MAX_TIMINGS,
    UNKNOWN_MIGRATION,
    Batch,
    Run,
    droppable,
    error_from_stats,
    redact_log,
    result,
    result_from_batch,
    scrub,
    split_droppable,
)
from pgro.core.observations import WorkState

FOO, BAR = "1721000000-addFoo.ts", "1721000001-addBar.ts"
PATIENT = "Jane Doe"


def tamanu_stats(size: object) -> dict[str, Any]:
    return {
        "durationMsPerMigration": {FOO: 400_000, BAR: 12_500},
        "totalMigrationsDurationMs": 412_500,
        "preSnapshot": {"databaseSizeBytes": size, "tableRowEstimates": []},
    }


def batch(duration: int | None = 415_000, stats: Any = None, names: Any = None) -> Batch:
    return Batch(
        migrations=[FOO, BAR] if names is None else names,
        batch_duration_ms=duration,
        stats=tamanu_stats(1_000_000) if stats is None else stats,
    )


# --- result_from_batch ------------------------------------------------------------------


def test_reads_tamanu_stats() -> None:
    r = result_from_batch(batch(), 1_200_000, failed=False)
    assert r.total_elapsed_seconds == 415
    assert (r.data_bytes_before, r.data_bytes_after) == (1_000_000, 1_200_000)
    assert r.failed_migration is None and r.passed
    assert [(t.name, t.elapsed_seconds) for t in r.timings] == [(FOO, 400), (BAR, 12)]


def test_timings_follow_the_batch_list_not_the_stats_object() -> None:
    r = result_from_batch(batch(names=[BAR, FOO]), 1, failed=False)
    assert [t.name for t in r.timings] == [BAR, FOO]


def test_milliseconds_become_whole_seconds_and_absent_ones_zero() -> None:
    stats = tamanu_stats(10)
    stats["durationMsPerMigration"] = {FOO: 1999, "other": 5000}
    r = result_from_batch(batch(duration=None, stats=stats, names=[FOO, BAR]), 20, False)
    assert [(t.name, t.elapsed_seconds) for t in r.timings] == [(FOO, 1), (BAR, 0)]
    assert r.total_elapsed_seconds == 1  # the sum, when the batch recorded no duration


@pytest.mark.parametrize("size", [-1, "-1", "lots", None, {"bytes": 5}, True])
def test_an_unreadable_size_before_is_the_size_after(size: object) -> None:
    r = result_from_batch(batch(stats=tamanu_stats(size)), 1_200_000, failed=False)
    assert r.data_bytes_before == 1_200_000


@pytest.mark.parametrize("size", ["1000000", " 1000000 ", 1_000_000.0])
def test_a_numeric_string_size_is_read(size: object) -> None:
    assert result_from_batch(batch(stats=tamanu_stats(size)), 5, False).data_bytes_before == (
        1_000_000
    )


def test_numeric_string_durations_are_read() -> None:
    stats = tamanu_stats(1)
    stats["durationMsPerMigration"] = {FOO: "3000", BAR: "x"}
    r = result_from_batch(batch(stats=stats), 1, False)
    assert [t.elapsed_seconds for t in r.timings] == [3, 0]


def test_a_failed_run_names_where_it_stopped() -> None:
    stats = tamanu_stats(1_000)
    stats["failedMigration"] = "1721000002-addBaz.ts"
    r = result_from_batch(batch(duration=None, stats=stats), 2_000, failed=True)
    assert r.failed_migration == "1721000002-addBaz.ts"
    assert r.total_elapsed_seconds == 412  # no batch duration: the sum of the timings


def test_a_failed_run_naming_no_migration_is_unknown() -> None:
    r = result_from_batch(batch(duration=None, stats=tamanu_stats(1_000)), 2_000, failed=True)
    assert r.failed_migration == UNKNOWN_MIGRATION


def test_a_passed_run_ignores_a_failed_migration_in_its_stats() -> None:
    stats = tamanu_stats(1)
    stats["failedMigration"] = BAR
    assert result_from_batch(batch(stats=stats), 1, failed=False).failed_migration is None


def test_stats_of_another_shape_read_as_empty() -> None:
    r = result_from_batch(Batch([FOO], 2_000, {"durationMsPerMigration": [1, 2]}), 7, False)
    assert [(t.name, t.elapsed_seconds) for t in r.timings] == [(FOO, 0)]
    assert (r.total_elapsed_seconds, r.data_bytes_before) == (2, 7)


def test_a_hostile_row_puts_at_most_max_timings_of_cut_names_in_status() -> None:
    # The migrator wrote the row: 5,000 migrations with 10,000-character names.
    names = [f"{i:05d}-" + "x" * 10_000 for i in range(5_000)]
    stats = {
        "durationMsPerMigration": dict.fromkeys(names, 2000),
        "failedMigration": "y" * 10_000,
    }
    r = result_from_batch(batch(duration=None, stats=stats, names=names), 1, failed=True)
    assert (MAX_TIMINGS, MAX_NAME_CHARS) == (1_000, 200)
    assert len(r.timings) == MAX_TIMINGS
    assert all(len(t.name) == MAX_NAME_CHARS for t in r.timings)
    # The first ones, in order, still told apart and still timed.
    assert [t.name[:5] for t in r.timings[:2]] == ["00000", "00001"]
    assert {t.elapsed_seconds for t in r.timings} == {2}
    assert r.failed_migration == "y" * MAX_NAME_CHARS
    # The total without a batch duration is still every migration's.
    assert r.total_elapsed_seconds == 2 * 5_000
    assert len(r.to_wire()["timings"]) == MAX_TIMINGS


def test_huge_numbers_are_bounded_to_what_status_can_hold() -> None:
    huge = 10**30
    stats = {
        "durationMsPerMigration": {FOO: huge},
        "preSnapshot": {"databaseSizeBytes": str(huge)},
    }
    r = result_from_batch(batch(duration=huge, stats=stats, names=[FOO]), 5, failed=False)
    assert r.total_elapsed_seconds == MAX_NUMBER // 1000
    assert r.timings[0].elapsed_seconds == MAX_NUMBER // 1000
    assert r.data_bytes_before == MAX_NUMBER
    summed = result_from_batch(batch(duration=None, stats=stats, names=[FOO] * 3), 5, False)
    assert summed.total_elapsed_seconds <= MAX_NUMBER


def test_names_within_the_cap_are_kept_whole() -> None:
    name = "n" * MAX_NAME_CHARS
    r = result_from_batch(batch(names=[name], stats={}), 1, failed=False)
    assert [t.name for t in r.timings] == [name]


def test_no_batch() -> None:
    ok = result(None, 900, Run(WorkState.SUCCEEDED))
    assert (ok.total_elapsed_seconds, ok.data_bytes_before, ok.data_bytes_after) == (0, 900, 900)
    assert ok.failed_migration is None and ok.timings == [] and ok.error is None
    failed = result(None, 900, Run(WorkState.FAILED, "ERROR: could not connect"))
    assert failed.failed_migration == UNKNOWN_MIGRATION
    assert failed.error == "ERROR: could not connect"


def test_a_failed_run_prefers_the_structured_error_to_its_log() -> None:
    stats = tamanu_stats(1)
    stats["error"] = {"code": "23505", "message": "duplicate key"}
    r = result(batch(stats=stats), 1, Run(WorkState.FAILED, "ERROR: something else"))
    assert r.error == "23505: duplicate key"


def test_a_passed_run_carries_no_error() -> None:
    assert result(batch(), 1, Run(WorkState.SUCCEEDED, "ERROR: noise")).error is None


# --- error_from_stats ---------------------------------------------------------------------


def test_structured_error_with_every_part() -> None:
    stats = {
        "error": {
            "code": "23505",
            "name": "SequelizeUniqueConstraintError",
            "message": f'duplicate key value violates unique constraint "{PATIENT}"',
            "table": "patients",
            "column": "name",
            "constraint": "patients_name_key",
        }
    }
    line = error_from_stats(stats)
    # The code wins over the name; the value PostgreSQL quoted is blanked.
    assert line == (
        '23505: duplicate key value violates unique constraint "…" '
        "[patients.name, patients_name_key]"
    )
    assert PATIENT not in (line or "")


def test_structured_error_parts_are_omitted_when_absent() -> None:
    assert error_from_stats({"error": {"name": "TimeoutError"}}) == "TimeoutError"
    assert error_from_stats({"error": {"message": "boom", "table": "t"}}) == "boom [t]"
    assert error_from_stats({"error": {"column": "c", "constraint": "k"}}) == "[c, k]"
    assert error_from_stats({"error": {"code": " ", "message": 5}}) is None


@pytest.mark.parametrize("stats", [None, {}, {"error": "text"}, {"error": ["a"]}])
def test_no_structured_error(stats: Any) -> None:
    assert error_from_stats(stats) is None


def test_quoted_literals_in_the_structured_message_are_blanked() -> None:
    line = error_from_stats(
        {"error": {"message": f"invalid input value for enum sex: '{PATIENT}'"}}
    )
    assert line == "invalid input value for enum sex: '…'"


# --- redact_log ---------------------------------------------------------------------------


def test_row_data_never_survives() -> None:
    log = "\n".join(
        [
            "migrating 1721000002-addBaz.ts",
            f"ERROR: duplicate key value violates unique constraint '{PATIENT}'",
            f"DETAIL:  Key (name)=({PATIENT}) already exists.",
            f"HINT: the row {PATIENT}",
            f"STATEMENT: INSERT INTO patients VALUES ('{PATIENT}')",
            f"Failing row contains (1, {PATIENT}).",
            f"parameters: $1 = '{PATIENT}'",
            f"  Key (id)=(1) is still referenced {PATIENT}",
        ]
    )
    redacted = redact_log(log)
    assert PATIENT not in redacted
    assert redacted.splitlines() == [
        "migrating 1721000002-addBaz.ts",
        "ERROR: duplicate key value violates unique constraint '…'",
    ]


def test_literals_are_blanked_only_on_error_lines() -> None:
    log = "\n".join(
        [
            'loading "config/production.json"',
            'column "sex" is Invalid for "kangaroo"',
            "it violates 'x' and \"y\"",
        ]
    )
    assert redact_log(log).splitlines() == [
        'loading "config/production.json"',
        'column "…" is Invalid for "…"',
        "it violates '…' and \"…\"",
    ]


def test_an_unterminated_quote_on_an_error_line_is_blanked_to_the_end() -> None:
    assert redact_log(f"error: bad value '{PATIENT}") == "error: bad value '…"


def test_keeps_the_last_lines() -> None:
    lines = [f"step {i}" for i in range(100)]
    assert redact_log("\n".join(lines)).splitlines() == lines[-KEEP_LINES:]


def test_cut_to_the_byte_cap_on_a_character_boundary() -> None:
    line = "é" * 99  # 198 bytes
    redacted = redact_log("\n".join([line] * 30))
    encoded = redacted.encode()
    assert len(encoded) <= MAX_ERROR_BYTES
    assert len(encoded) >= MAX_ERROR_BYTES - 1  # only a split character is dropped
    assert set(redacted) <= {"é", "\n"}
    assert redacted.endswith(line)  # the end is what is kept


def test_empty_log() -> None:
    assert redact_log("") == ""
    assert redact_log(f"DETAIL: {PATIENT}\n") == ""


def test_a_url_password_in_the_log_is_masked() -> None:
    redacted = redact_log("connecting to postgresql://analytics:s3cret@db:5432/app")
    assert "s3cret" not in redacted and f"analytics:{MASK}@db" in redacted


# --- scrub --------------------------------------------------------------------------------


def test_scrub_masks_every_secret_longest_first() -> None:
    text = "pw=abc123 and again abc123; prefix abc"
    assert scrub(text, ["abc", "abc123", ""]) == f"pw={MASK} and again {MASK}; prefix {MASK}"


def test_scrub_masks_any_url_password_even_unknown_ones() -> None:
    text = "postgres://u:p%40ss@h/db and http://user:other@host"
    assert scrub(text, []) == f"postgres://u:{MASK}@h/db and http://user:{MASK}@host"


def test_scrub_leaves_text_without_secrets() -> None:
    assert scrub("postgresql://h:5432/db ok", ["absent"]) == "postgresql://h:5432/db ok"


# --- the droppable guard ------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema", ["public", "information_schema", "pg_catalog", "pg_toast", "pg_temp_3", ""]
)
def test_reserved_schemas_are_never_droppable(schema: str) -> None:
    assert not droppable(schema)


@pytest.mark.parametrize("schema", ["reporting", "Public", "pgro", "fhir", "logs"])
def test_application_schemas_are_droppable(schema: str) -> None:
    assert droppable(schema)


def test_split_keeps_order_and_drops_repeats() -> None:
    assert split_droppable(["b", "public", "a", "b", "pg_catalog", "public"]) == (
        ["b", "a"],
        ["public", "pg_catalog"],
    )
    assert split_droppable(None) == ([], [])
