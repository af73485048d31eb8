"""The application migration step (`migrateTo`, features §2.2), run by both runtimes.

Re-entered on every pass while the restore is `Migrating` (the core plans `RunMigration`
until `status.migrationResult` is set). Each runtime brings a `Migrator`: how to reach the
restore's own server as the bootstrap superuser, and how to start and observe the
application's migrator pointed at that restore (a Job in Kubernetes, the `--migrator`
command in `pgro run`). It never points at the stable endpoint, so a switchover cannot
move a running migration to another database.

Crash safety: the migrator's own artefact (the Job, the local run record) is the only
"started" marker. Before it exists, everything done here is safe to repeat (the baseline is
read from a database nothing has written to yet, dropping absent schemas and re-owning owned
objects change nothing). Once it exists it is never started again, and whatever its exit
code the result is read from the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pgro.api.phases import JobPhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core import app_migration as decide
from pgro.core.app_migration import Run
from pgro.core.observations import WorkState
from pgro.core.plan import EmitEvent, EventType
from pgro.postgres import app_migration as sql
from pgro.postgres.schema_migration import Conninfo, main_database

log = logging.getLogger("pgro.app_migration")


class Migrator(Protocol):
    """One runtime's means to run the application's migrator against one restore."""

    @property
    def name(self) -> str:
        """What `status.migrationJob.name` shows (`<restore>-migrate`)."""
        ...

    def conninfo_for(self) -> Conninfo:
        """The restore's server, as the bootstrap superuser."""
        ...

    def observe(self) -> Run: ...

    def start(self, *, database: str) -> None:
        """Start the migrator against `database` of the restore, logging in as the
        analytics user. Never called twice for one restore: `observe` sees what it started,
        also after pgro restarted."""
        ...


@dataclass
class AppMigration:
    replica: PostgresPhysicalReplica
    restore: PostgresPhysicalRestore
    migrator: Migrator
    patch: Callable[[Mapping[str, Any]], None]
    event: Callable[[EmitEvent], None]

    def run(self) -> None:
        target = self.restore.spec.migrate_to
        if target is None or self.restore.status.migration_result is not None:
            return  # the core moves the restore on
        run = self.migrator.observe()
        log.debug("%s: migration %s", self._key, run.state)
        if run.state is WorkState.NOT_STARTED:
            self._start(target.version)
        elif run.ended:
            self._finish(run, target.version)

    def _start(self, version: str) -> None:
        conninfo = self.migrator.conninfo_for()
        database = main_database(conninfo)
        # Recorded before the run exists, so the result reader attributes only batches the
        # run wrote; kept as PostgreSQL's text (it carries the source site's clock offset).
        baseline = sql.latest_batch_at(conninfo, database)
        if baseline is not None and baseline != self.restore.status.migration_baseline:
            self.patch({"migrationBaseline": baseline})
        droppable, refused = decide.split_droppable(self.replica.spec.pre_migrate_drop_schemas)
        if refused:
            self._warn(decide.EVENT_DROP_REFUSED, decide.refused_note(refused))
        if droppable:
            dropped = sql.drop_schemas(conninfo, database, droppable)
            if dropped:
                log.info("%s: dropped %s before migrating", self._key, ", ".join(dropped))
        owner = self.replica.spec.analytics_username
        # DDL on the application's tables needs their owner's rights; the migrator logs in
        # as the analytics user, which is never made a superuser (docs/roles.md).
        sql.hand_over(conninfo, database, owner)
        self.migrator.start(database=database)
        self.patch({"migrationJob": {"name": self.migrator.name, "phase": JobPhase.RUNNING.value}})
        self._normal(
            decide.EVENT_STARTED,
            f"Running the migrations of {version} on {self.restore.name} (database {database})",
        )

    def _finish(self, run: Run, version: str) -> None:
        conninfo = self.migrator.conninfo_for()
        database = main_database(conninfo)
        batch = sql.read_batch(conninfo, database, self.restore.status.migration_baseline)
        after = sql.database_size(conninfo, database)
        shaped = decide.result(batch, after, run)
        note = decide.finished_note(self.restore.name, version, shaped)
        if shaped.passed:
            self._normal(decide.EVENT_FINISHED, note)
        else:
            self._warn(decide.EVENT_FAILED, note)
        self.patch(
            {
                "migrationJob": {
                    "name": self.migrator.name,
                    "phase": (JobPhase.FAILED if run.failed else JobPhase.SUCCEEDED).value,
                },
                "migrationResult": shaped.to_wire(),
            }
        )

    @property
    def _key(self) -> str:
        return f"{self.restore.namespace}/{self.restore.name}"

    def _warn(self, reason: str, note: str) -> None:
        self.event(EmitEvent(EventType.WARNING, reason, note, related=self.restore.name))

    def _normal(self, reason: str, note: str) -> None:
        self.event(EmitEvent(EventType.NORMAL, reason, note, related=self.restore.name))
