"""The persistent-schema migration's decisions (features §2.1), without I/O.

Between the serving restore and the switching one, the schemas named in
`spec.persistentSchemas` are copied (a schema-only-plus-data dump of just those schemas), so
what users wrote into them survives the refresh. The runner (`pgro.pipeline.schema_migration`)
observes the transfer and asks `next_action` what to do; the phase it then records in
`status.schemaMigrationPhase` is the only memory between passes, so every action is safe to
repeat after a crash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from pgro.api.phases import SchemaMigrationPhase
from pgro.core.observations import WorkState

EVENT_MISSING_ON_SOURCE: Final = "PersistentSchemaMissingOnSource"
EVENT_PARTIAL: Final = "SchemaMigrationPartial"
EVENT_TIMED_OUT: Final = "SchemaMigrationTimedOut"
EVENT_FAILED: Final = "SchemaMigrationFailed"
EVENT_STARTED: Final = "SchemaMigrationStarted"
EVENT_COMPLETED: Final = "SchemaMigrationCompleted"

SUCCESS: Final = "success"
_PARTIAL = re.compile(r"partial: (\d+) statement error\(s\)")
# What a status or event shows of a transfer's own words (its stderr tail).
MAX_DETAIL: Final = 500


@dataclass(frozen=True)
class Transfer:
    """The copy as the runtime sees it: not started, running (since `started_at`), or
    finished with its `result` line (`success`, `partial: N statement error(s)`) or its
    `failure`."""

    state: WorkState
    started_at: datetime | None = None
    result: str | None = None
    failure: str | None = None

    @classmethod
    def absent(cls) -> Transfer:
        return cls(WorkState.NOT_STARTED)


class Action(StrEnum):
    START = "start"  # nothing running: prepare the target and start the copy
    WAIT = "wait"  # the copy runs within its budget
    TIME_OUT = "time-out"  # over budget: stop it, drop the schemas, let the switchover go
    FINISH = "finish"  # the copy ended with a result: check the target, record the phase
    FAIL = "fail"  # the copy died without a result: record `failed: ...`, retry next pass
    DONE = "done"  # the phase is settled; nothing to do


_SETTLED: Final = frozenset({"complete", "partial", "timeout-skipped"})


def next_action(
    phase: SchemaMigrationPhase | None,
    transfer: Transfer,
    budget: timedelta,
    now: datetime,
) -> Action:
    """What the runner does on this pass. A phase that is not `active` (none yet, or
    `failed: ...`) starts over: a copy left from before (a crash between starting it and
    recording `active`, or a failed one) is discarded by the start itself."""
    if phase is not None and phase.state in _SETTLED:
        return Action.DONE
    if phase is None or phase.state != "active":
        return Action.START
    if transfer.state is WorkState.SUCCEEDED:
        return Action.FINISH
    if transfer.state in (WorkState.FAILED, WorkState.NOT_STARTED):
        # NOT_STARTED while `active`: the copy vanished (its process died with a killed
        # pgro, or its Job was deleted) without a result.
        return Action.FAIL
    if transfer.started_at is not None and now - transfer.started_at > budget:
        return Action.TIME_OUT
    return Action.WAIT


def statement_errors(result: str) -> int | None:
    """The statement errors a finished copy reported; None for a result that is neither
    `success` nor `partial: N statement error(s)` (treated as a failure)."""
    if result == SUCCESS:
        return 0
    found = _PARTIAL.fullmatch(result)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class Outcome:
    phase: SchemaMigrationPhase
    missing: tuple[str, ...]
    partial_note: str | None  # the `SchemaMigrationPartial` event's note, when partial


def finish(result: str, configured: Sequence[str], on_target: Sequence[str]) -> Outcome:
    """`complete` only when the copy reported no statement error **and** every configured
    schema exists on the target; otherwise `partial`, with what is missing."""
    present = set(on_target)
    missing = tuple(s for s in configured if s not in present)
    errors = statement_errors(result)
    if errors == 0 and not missing:
        return Outcome(SchemaMigrationPhase.COMPLETE, (), None)
    parts = []
    if errors:
        parts.append(f"{errors} statement error(s) while copying")
    if missing:
        parts.append(f"schemas missing on the new restore: {', '.join(missing)}")
    return Outcome(SchemaMigrationPhase.PARTIAL, missing, "; ".join(parts))


def split_present(
    configured: Sequence[str], on_source: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(present, missing): the configured schemas the serving restore has, and the others."""
    found = set(on_source)
    return [s for s in configured if s in found], [s for s in configured if s not in found]


def missing_note(missing: Sequence[str]) -> str:
    return f"Persistent schemas not found on the serving restore, skipped: {', '.join(missing)}"


def timed_out_note(schemas: Sequence[str]) -> str:
    # The reference's wording, so alerts written against it keep matching.
    return (
        "Schema migration exceeded its time budget (20% of cron interval). Persistent schemas "
        f"[{', '.join(schemas)}] were dropped on the new restore so it can come up. The next "
        "restore cycle will reattempt migration if the schemas have been regenerated upstream."
    )


def data_size(source_database_bytes: int, snapshot_bytes: int) -> int:
    """What the serving restore grew by since its snapshot: the persistent data the next
    restore's volume must also hold (`status.persistentSchemaDataSize`)."""
    return max(0, source_database_bytes - snapshot_bytes)


def failed_phase(reason: str) -> SchemaMigrationPhase:
    return SchemaMigrationPhase.failed(reason[:MAX_DETAIL])
