"""The persistent-schema migration step (features §2.1), run by both runtimes.

Re-entered on every pass while the core holds the switchover for it
(`RunSwitchoverStep(SCHEMA_MIGRATION)`); what it does is `core.schema_migration.next_action`'s
answer for the recorded phase and the observed copy. Each runtime brings a `Copy`: how to
reach the two restores' servers as the bootstrap superuser, and how to start, observe and
discard the copy program (`pipeline.schema_transfer`). The serving restore is only read.

A connection error (either server unreachable) raises: the phase is left as it is and the
shell retries the step with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pgro.api.quantity import format_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.core import schema_migration as decide
from pgro.core.plan import EmitEvent, EventType, RunSwitchoverStep
from pgro.core.schedule import MIGRATION_BUDGET_FALLBACK
from pgro.core.schema_migration import Action, Transfer
from pgro.postgres import schema_migration as sql
from pgro.postgres.schema_migration import Conninfo

log = logging.getLogger("pgro.schema_migration")


class Copy(Protocol):
    """One runtime's means for the copy between `source` and `target` (restore names)."""

    def conninfo_for(self, restore: str) -> Conninfo: ...

    def observe(self) -> Transfer: ...

    def start(self, *, source_db: str, target_db: str, owner: str, schemas: Sequence[str]) -> str:
        """Start the copy (discarding what an earlier attempt left); returns its name for
        `status.schemaMigrationJob`."""
        ...

    def discard(self) -> None:
        """Stop the copy if it runs and remove what it left (its Job, its directory)."""
        ...


@dataclass
class SchemaMigration:
    replica: PostgresPhysicalReplica
    step: RunSwitchoverStep
    copy: Copy
    patch: Callable[[Mapping[str, Any]], None]
    event: Callable[[EmitEvent], None]
    # The serving restore's snapshot size: what it grew beyond is persistent data.
    source_snapshot_bytes: int
    now: datetime

    def run(self) -> None:
        transfer = self.copy.observe()
        action = decide.next_action(
            self.replica.status.schema_migration_phase,
            transfer,
            self.step.budget or MIGRATION_BUDGET_FALLBACK,
            self.now,
        )
        log.debug("%s: schema migration %s (%s)", self.replica.key, action, transfer.state)
        match action:
            case Action.START:
                self._start()
            case Action.TIME_OUT:
                self._time_out()
            case Action.FINISH:
                self._finish(transfer.result or "")
            case Action.FAIL:
                self._fail(transfer.failure or "no result received")
            case Action.WAIT | Action.DONE:
                pass

    @property
    def _schemas(self) -> list[str]:
        return list(self.step.schemas)

    def _start(self) -> None:
        source_restore = self.step.source_restore
        if source_restore is None:
            raise ValueError("a schema migration needs the serving restore to copy from")
        source = self.copy.conninfo_for(source_restore)
        target = self.copy.conninfo_for(self.step.restore)
        source_db = sql.main_database(source)
        target_db = sql.main_database(target)
        present, missing = decide.split_present(
            self._schemas, sql.schemas_present(source, source_db, self._schemas)
        )
        if missing:
            self._warn(decide.EVENT_MISSING_ON_SOURCE, decide.missing_note(missing))
        if not present:
            # Setting `complete` here matters: the reference left such migrations unsettled,
            # and the sweep (gated on it) kept 41 superseded restores.
            self.copy.discard()
            self.patch(
                {
                    "schemaMigrationJob": None,
                    "schemaMigrationPhase": "complete",
                    "persistentSchemasMissing": missing or None,
                }
            )
            return
        grown = decide.data_size(sql.database_size(source, source_db), self.source_snapshot_bytes)
        owner = self.replica.spec.analytics_username
        # A copy an earlier attempt left (a crash between starting it and recording
        # `active`) must not write into the schemas prepared next.
        self.copy.discard()
        # Every configured schema goes on the target (stale snapshot copies included); the
        # copy brings back the ones the source has.
        sql.prepare_target(target, target_db, self._schemas)
        name = self.copy.start(
            source_db=source_db, target_db=target_db, owner=owner, schemas=present
        )
        self.patch(
            {
                "schemaMigrationJob": name,
                "schemaMigrationPhase": "active",
                "persistentSchemaDataSize": format_quantity(grown),
                "persistentSchemasMissing": missing or None,
            }
        )
        self._normal(
            decide.EVENT_STARTED,
            f"Copying persistent schemas {', '.join(present)} from {source_restore} "
            f"to {self.step.restore}",
        )

    def _time_out(self) -> None:
        self.copy.discard()
        try:
            target = self.copy.conninfo_for(self.step.restore)
            sql.drop_schemas(target, sql.main_database(target), self._schemas)
        except Exception as exc:  # best effort: the switchover goes ahead either way
            log.warning(
                "%s: dropping the half-copied schemas on %s failed: %s",
                self.replica.key,
                self.step.restore,
                exc,
            )
        self._warn(decide.EVENT_TIMED_OUT, decide.timed_out_note(self._schemas))
        self.patch({"schemaMigrationJob": None, "schemaMigrationPhase": "timeout-skipped"})

    def _finish(self, result: str) -> None:
        target = self.copy.conninfo_for(self.step.restore)
        on_target = sql.schemas_present(target, sql.main_database(target), self._schemas)
        if decide.statement_errors(result) is None:
            self._fail(f"the copy reported {result[: decide.MAX_DETAIL]!r}")
            return
        # Schemas the serving restore lacked (recorded at the start) were not copied.
        not_on_source = set(self.replica.status.persistent_schemas_missing or ())
        copied = [s for s in self._schemas if s not in not_on_source]
        outcome = decide.finish(result, copied, on_target)
        missing = [s for s in self._schemas if s in not_on_source or s in outcome.missing]
        if outcome.partial_note is not None:
            self._warn(decide.EVENT_PARTIAL, outcome.partial_note)
        else:
            self._normal(
                decide.EVENT_COMPLETED,
                f"Persistent schemas copied to {self.step.restore}",
            )
        self.copy.discard()
        self.patch(
            {
                "schemaMigrationJob": None,
                "schemaMigrationPhase": outcome.phase.wire,
                "persistentSchemasMissing": missing or None,
            }
        )

    def _fail(self, reason: str) -> None:
        self.copy.discard()
        phase = decide.failed_phase(reason)
        self._warn(decide.EVENT_FAILED, f"Schema migration failed, will retry: {phase.reason}")
        self.patch({"schemaMigrationJob": None, "schemaMigrationPhase": phase.wire})

    def _warn(self, reason: str, note: str) -> None:
        self.event(EmitEvent(EventType.WARNING, reason, note, related=self.step.restore))

    def _normal(self, reason: str, note: str) -> None:
        self.event(EmitEvent(EventType.NORMAL, reason, note, related=self.step.restore))
