"""The redaction step's decisions (pgro.core.redaction): which action each recorded phase and
task state leads to, the phase tied to its restore, the retry backoff, the login hold and the
status patches."""

from __future__ import annotations

from typing import Any

import pytest

from pgro.api.migration import MigrateTo
from pgro.api.phases import RedactionPhase
from pgro.api.replica import PostgresPhysicalReplicaStatus
from pgro.core import redaction
from pgro.core.redaction import Action, Redacted, TaskState
from tests.scenarios.builders import replica, restore

REDACTION = {"manifestUrl": "https://m.test/v{version}.json", "version": "1.0.0"}


@pytest.mark.parametrize(
    ("phase", "task", "retry_due", "action"),
    [
        (None, TaskState.NONE, True, Action.START),
        (RedactionPhase.ACTIVE, TaskState.NONE, True, Action.START),  # lost with its process
        (RedactionPhase.ACTIVE, TaskState.RUNNING, True, Action.WAIT),
        (RedactionPhase.ACTIVE, TaskState.FINISHED, True, Action.RECORD),
        (RedactionPhase.COMPLETE, TaskState.NONE, True, Action.DONE),
        (RedactionPhase.PARTIAL, TaskState.NONE, True, Action.DONE),
        (RedactionPhase.failed("404"), TaskState.NONE, False, Action.RETRY_LATER),
        (RedactionPhase.failed("404"), TaskState.NONE, True, Action.START),
    ],
)
def test_next_action(
    phase: RedactionPhase | None, task: TaskState, retry_due: bool, action: Action
) -> None:
    assert redaction.next_action(phase, task, retry_due) is action


def test_a_phase_counts_only_for_its_restore() -> None:
    status = PostgresPhysicalReplicaStatus.model_validate(
        {"redactionPhase": "complete", "redactionRestore": "fiji-1"}
    )
    assert redaction.done(status, "fiji-1")
    assert not redaction.done(status, "fiji-2")
    assert redaction.phase_for(status, "fiji-2") is None
    unnamed = PostgresPhysicalReplicaStatus.model_validate({"redactionPhase": "complete"})
    assert not redaction.done(unnamed, "fiji-1")


def test_the_retry_backs_off_to_ten_minutes() -> None:
    assert [redaction.retry_delay(n) for n in (1, 2, 3, 4, 5, 6, 50)] == [
        30.0,
        60.0,
        120.0,
        240.0,
        480.0,
        600.0,
        600.0,
    ]


@pytest.mark.parametrize(
    ("spec", "restore_status", "replica_status", "held"),
    [
        ({}, {"phase": "Ready"}, {}, False),  # no redaction
        ({"redaction": REDACTION}, {"phase": "Ready"}, {}, True),
        ({"redaction": REDACTION}, {"phase": "Switching"}, {}, True),
        # Redacted already (a new pod of it, or pgro restarted): let in.
        (
            {"redaction": REDACTION},
            {"phase": "Switching"},
            {"redactionPhase": "partial", "redactionRestore": "fiji-2"},
            False,
        ),
        # Serving: never held, even once the cleanup cleared the phase.
        ({"redaction": REDACTION}, {"phase": "Active"}, {}, False),
    ],
)
def test_logins_are_held_until_the_restore_is_redacted(
    spec: dict[str, Any],
    restore_status: dict[str, Any],
    replica_status: dict[str, Any],
    held: bool,
) -> None:
    target = restore("fiji-2", "k2", **restore_status)
    assert redaction.holds_logins(replica(replica_status, **spec), target) is held


def test_a_migrating_restore_keeps_its_logins() -> None:
    """The migrator logs in as the analytics user before the switchover."""
    target = restore("fiji-2", "k2", "Ready")
    spec = target.spec.model_copy(update={"migrate_to": MigrateTo(version="2.1", version_id="v")})
    target = target.model_copy(update={"spec": spec})
    assert not redaction.holds_logins(replica(redaction=REDACTION), target)


def test_the_held_roles_are_the_analytics_and_extra_users() -> None:
    spec = replica(redaction=REDACTION, extraUsers=[{"name": "reader", "schemas": ["public"]}])
    assert redaction.held_roles(spec) == ("analytics", "reader")


def test_the_status_patches() -> None:
    assert redaction.started("fiji-2") == {
        "redactionPhase": "active",
        "redactionRestore": "fiji-2",
        "redactionVersion": None,
        "redactionColumnsApplied": None,
    }
    done = Redacted(version="1.0.0", columns_masked=6, partial=False, summary="6 of 6")
    assert redaction.finished("fiji-2", done) == {
        "redactionPhase": "complete",
        "redactionRestore": "fiji-2",
        "redactionVersion": "1.0.0",
        "redactionColumnsApplied": 6,
    }
    partial = Redacted(version=None, columns_masked=4, partial=True, summary="4 of 6")
    assert redaction.finished("fiji-2", partial)["redactionPhase"] == "partial"
    failed = redaction.failed("fiji-2", "x" * 5000)
    assert failed["redactionPhase"].startswith("failed: ")
    assert len(failed["redactionPhase"]) <= len("failed: ") + redaction.MAX_DETAIL
    assert redaction.failed("fiji-2", "")["redactionPhase"] == "failed: unknown error"
