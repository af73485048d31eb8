"""The persistent-schema migration's pure decisions (features §2.1), with a hand-moved clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgro.api.phases import SchemaMigrationPhase
from pgro.core.observations import WorkState
from pgro.core.schema_migration import (
    Action,
    Transfer,
    data_size,
    finish,
    next_action,
    split_present,
    statement_errors,
    timed_out_note,
)
from pgro.pipeline.schema_transfer import read_result, schema_arguments

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
BUDGET = timedelta(seconds=12)
ACTIVE = SchemaMigrationPhase.ACTIVE


def running(since: datetime = T0) -> Transfer:
    return Transfer(WorkState.RUNNING, started_at=since)


@pytest.mark.parametrize(
    ("phase", "transfer", "now", "action"),
    [
        # Nothing recorded yet, or a failure: start (a leftover copy is discarded by it).
        (None, Transfer.absent(), T0, Action.START),
        (None, running(), T0, Action.START),
        (SchemaMigrationPhase.failed("pg_dump: gone"), Transfer.absent(), T0, Action.START),
        # Active: wait within the budget, time out beyond it.
        (ACTIVE, running(), T0 + BUDGET, Action.WAIT),
        (ACTIVE, running(), T0 + BUDGET + timedelta(seconds=1), Action.TIME_OUT),
        (ACTIVE, Transfer(WorkState.SUCCEEDED, T0, "success"), T0, Action.FINISH),
        # A result arriving after the budget still counts: the copy is done.
        (
            ACTIVE,
            Transfer(WorkState.SUCCEEDED, T0, "success"),
            T0 + 10 * BUDGET,
            Action.FINISH,
        ),
        (ACTIVE, Transfer(WorkState.FAILED, T0, failure="x"), T0, Action.FAIL),
        # Active, and the copy vanished without a result (pgro killed, Job deleted).
        (ACTIVE, Transfer.absent(), T0, Action.FAIL),
        (SchemaMigrationPhase.COMPLETE, Transfer.absent(), T0, Action.DONE),
        (SchemaMigrationPhase.PARTIAL, running(), T0, Action.DONE),
        (SchemaMigrationPhase.TIMEOUT_SKIPPED, Transfer.absent(), T0, Action.DONE),
    ],
)
def test_next_action(
    phase: SchemaMigrationPhase | None, transfer: Transfer, now: datetime, action: Action
) -> None:
    assert next_action(phase, transfer, BUDGET, now) is action


def test_results() -> None:
    assert statement_errors("success") == 0
    assert statement_errors("partial: 3 statement error(s)") == 3
    assert statement_errors("partial: lots") is None
    assert statement_errors("done") is None


def test_complete_needs_no_error_and_every_schema_on_the_target() -> None:
    done = finish("success", ["a", "b"], ["b", "a"])
    assert (done.phase, done.missing, done.partial_note) == (
        SchemaMigrationPhase.COMPLETE,
        (),
        None,
    )
    errors = finish("partial: 2 statement error(s)", ["a"], ["a"])
    assert errors.phase == SchemaMigrationPhase.PARTIAL
    assert errors.partial_note == "2 statement error(s) while copying"
    # A clean result that did not bring a schema is not complete either.
    lost = finish("success", ["a", "b"], ["a"])
    assert (lost.phase, lost.missing) == (SchemaMigrationPhase.PARTIAL, ("b",))
    assert lost.partial_note == "schemas missing on the new restore: b"


def test_present_and_missing_keep_the_configured_order() -> None:
    assert split_present(["c", "a", "b"], ["b", "c", "zz"]) == (["c", "b"], ["a"])


def test_data_size_never_negative() -> None:
    assert data_size(150, 100) == 50
    assert data_size(80, 100) == 0


def test_timed_out_note_is_the_references() -> None:
    assert timed_out_note(["a", "b"]).startswith(
        "Schema migration exceeded its time budget (20% of cron interval). Persistent schemas "
        "[a, b] were dropped on the new restore so it can come up."
    )


def test_the_copy_names_exactly_the_schemas() -> None:
    # pg_dump reads patterns: quoted, a name's `*`, `?`, `.` and quotes stay literal.
    assert schema_arguments(["plain", 'we"ird*.?']) == [
        '--schema="plain"',
        '--schema="we""ird*.?"',
    ]


@pytest.mark.parametrize(
    ("text", "state", "result", "failure"),
    [
        ("success\n", WorkState.SUCCEEDED, "success", None),
        (
            "partial: 1 statement error(s)\n",
            WorkState.SUCCEEDED,
            "partial: 1 statement error(s)",
            None,
        ),
        ("failed: pg_dump: no such schema\n", WorkState.FAILED, None, "pg_dump: no such schema"),
        ("", WorkState.FAILED, None, "the copy ended without a result"),
    ],
)
def test_read_result(text: str, state: WorkState, result: str | None, failure: str | None) -> None:
    found = read_result(text)
    assert (found.state, found.result, found.failure) == (state, result, failure)
