"""The redaction step's decisions (features §2.6, issue 15), without I/O.

The core holds a Switching restore's switchover while `spec.redaction` is set and the
replica's `redactionPhase` is not `complete` or `partial` *for that restore*
(`redactionRestore`, pgro's addition: a phase left by an earlier restore never lets a new
one through). The runner (`pgro.pipeline.redaction_step`) observes its background task and
asks `next_action` what to do; the phase it records is the only memory between passes that
matters for safety, so every action is safe to repeat after a crash: a restart finds
`active` with no task and starts the redaction again (each table is masked in its own
transaction, the deterministic ones together, so a rerun converges).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pgro.api.phases import RedactionPhase, RestorePhase
from pgro.api.replica import PostgresPhysicalReplica, PostgresPhysicalReplicaStatus
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.verification import RedactionReport

EVENT_STARTED: Final = "RedactionStarted"
EVENT_COMPLETED: Final = "RedactionCompleted"
EVENT_PARTIAL: Final = "RedactionPartial"
EVENT_FAILED: Final = "RedactionFailed"  # the reference's reason
# What a status or event shows of a failure (names and reasons only, never a value).
MAX_DETAIL: Final = 1000
# Retries of a failed redaction: 30 s doubling to 10 minutes (the reference retried every
# pass, hammering the manifest server and the restored database).
RETRY_FIRST_S: Final = 30.0
RETRY_MAX_S: Final = 600.0


class Action(StrEnum):
    START = "start"  # no run for this restore, or one lost with its process
    WAIT = "wait"  # running
    RECORD = "record"  # the task ended: write its outcome
    RETRY_LATER = "retry-later"  # failed, its backoff not over
    DONE = "done"  # complete or partial for this restore


class TaskState(StrEnum):
    NONE = "none"
    RUNNING = "running"
    FINISHED = "finished"


def phase_for(status: PostgresPhysicalReplicaStatus, restore: str) -> RedactionPhase | None:
    """The recorded phase if it describes `restore`, else None."""
    if status.redaction_restore != restore:
        return None
    return status.redaction_phase


def done(status: PostgresPhysicalReplicaStatus, restore: str) -> bool:
    """`restore` was redacted (`complete` or `partial`): it may switch over."""
    phase = phase_for(status, restore)
    return phase is not None and phase.done


def report(status: PostgresPhysicalReplicaStatus, restore: str) -> RedactionReport | None:
    """The canopy report's `redaction` object for `restore`, when it was redacted."""
    phase = phase_for(status, restore)
    if phase is None or not phase.done:
        return None
    return RedactionReport(
        outcome="partial" if phase == RedactionPhase.PARTIAL else "complete",
        manifest_version=status.redaction_version,
        columns_masked=status.redaction_columns_applied,
    )


def held_roles(replica: PostgresPhysicalReplica) -> tuple[str, ...]:
    """The login roles a restore awaiting redaction keeps `NOLOGIN`: the analytics user and
    the extra users (the persistent users get theirs only at the switchover)."""
    return (replica.spec.analytics_username, *(u.name for u in replica.spec.extra_users))


def holds_logins(replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore) -> bool:
    """Whether provisioning `restore` leaves its login roles `NOLOGIN` until it is redacted:
    a replica with redaction, a restore not yet serving and not yet redacted. Not with
    `migrateTo`: the migrator logs in as the analytics user before the switchover."""
    if replica.spec.redaction is None or restore.spec.migrate_to is not None:
        return False
    if restore.effective_phase is RestorePhase.ACTIVE:
        return False
    return not done(replica.status, restore.name)


def next_action(phase: RedactionPhase | None, task: TaskState, retry_due: bool) -> Action:
    if task is TaskState.RUNNING:
        return Action.WAIT
    if task is TaskState.FINISHED:
        return Action.RECORD
    if phase is None or phase.is_active:
        return Action.START
    if phase.done:
        return Action.DONE
    return Action.START if retry_due else Action.RETRY_LATER


def retry_delay(failures: int) -> float:
    """Seconds before a redaction that failed `failures` times in a row is tried again."""
    exponent = min(max(failures - 1, 0), 10)
    return min(RETRY_FIRST_S * float(2**exponent), RETRY_MAX_S)


def started(restore: str) -> dict[str, Any]:
    return {
        "redactionPhase": RedactionPhase.ACTIVE.wire,
        "redactionRestore": restore,
        "redactionVersion": None,
        "redactionColumnsApplied": None,
    }


@dataclass(frozen=True)
class Redacted:
    """What a finished redaction did, in names and counts only."""

    version: str | None
    columns_masked: int
    partial: bool
    summary: str


def finished(restore: str, outcome: Redacted) -> dict[str, Any]:
    phase = RedactionPhase.PARTIAL if outcome.partial else RedactionPhase.COMPLETE
    return {
        "redactionPhase": phase.wire,
        "redactionRestore": restore,
        "redactionVersion": outcome.version,
        "redactionColumnsApplied": outcome.columns_masked,
    }


def failed(restore: str, reason: str) -> dict[str, Any]:
    return {
        "redactionPhase": RedactionPhase.failed(reason[:MAX_DETAIL] or "unknown error").wire,
        "redactionRestore": restore,
    }
