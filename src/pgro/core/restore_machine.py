"""The restore phase machine: Pending → Restoring → Ready → Switching → Active, or Failed.

The replica decision does the Switching → Active step (the switchover). `Migrating`
(between Ready and Switching, only with `migrateTo`) plans `RunMigration` until the runner
(`pgro.pipeline.app_migration`) has recorded `status.migrationResult`.

Queue slots: a restore binds its replica's slot when it starts restoring, and gives it
back when it becomes Switching, when it fails, and when it is deleted while in progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from pgro.api.data_checks import DataChecks
from pgro.api.names import restore_data_pvc_name, restore_job_name
from pgro.api.phases import JobPhase, RestorePhase
from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplica, PostgresPhysicalReplicaStatus
from pgro.api.restore import JobStatus, PostgresPhysicalRestore, PostgresPhysicalRestoreStatus
from pgro.core import full_reindex, reasons, verification_reports
from pgro.core.backoff import failure_backoff
from pgro.core.observations import RestoreObservation, ServerState, WorkState
from pgro.core.plan import (
    CheckData,
    CleanupRestoreWork,
    DetectPostgresVersion,
    EmitEvent,
    EnsureServer,
    EventType,
    MarkReadyForTraffic,
    PatchReplicaStatus,
    PatchRestoreStatus,
    PlanStep,
    PrepareRestoreStorage,
    ReindexAfterReset,
    ReportVerification,
    RunMigration,
    StartRestoreWork,
    StatusDraft,
    VerificationOutcome,
)
from pgro.core.queue import AdmissionQueue, promoted_keys
from pgro.core.restore_set import is_in_progress
from pgro.core.settings import DEFAULT_SETTINGS, ReconcilerSettings
from pgro.core.timeouts import readiness_timeout
from pgro.core.verify_depth import damage_summary, replica_depth

RunIdSource = Callable[[], str]
"""Mints canopy run ids (a UUID4 in production; a counter in tests)."""

REQUEUE_SOON: Final = timedelta(seconds=5)
REQUEUE_WORK_RUNNING: Final = timedelta(seconds=15)
REQUEUE_WAIT_READY: Final = timedelta(seconds=10)
REQUEUE_SWITCHING: Final = timedelta(seconds=10)
REQUEUE_ACTIVE: Final = timedelta(seconds=300)
# The restore's own condition carrying why it failed.
FAILED_CONDITION: Final = "Failed"


@dataclass(frozen=True)
class RestorePlan:
    steps: tuple[PlanStep, ...]
    queue: AdmissionQueue
    requeue_after: timedelta | None
    wake: tuple[str, ...] = ()

    @property
    def status_patches(self) -> tuple[PlanStep, ...]:
        return tuple(
            s for s in self.steps if isinstance(s, PatchRestoreStatus | PatchReplicaStatus)
        )


@dataclass
class _Pass:
    obs: RestoreObservation
    queue: AdmissionQueue
    now: datetime
    new_run_id: RunIdSource
    settings: ReconcilerSettings
    draft: StatusDraft[PostgresPhysicalRestoreStatus]
    steps: list[PlanStep] = field(default_factory=list)

    @property
    def restore(self) -> PostgresPhysicalRestore:
        return self.obs.restore

    @property
    def key(self) -> str:
        return f"{self.restore.namespace}/{self.restore.replica_name}"

    def flush(self) -> None:
        patch = self.draft.take()
        if patch:
            self.steps.append(PatchRestoreStatus(self.restore.name, patch))

    def finish(self, requeue: timedelta | None, initial: AdmissionQueue) -> RestorePlan:
        self.flush()
        return RestorePlan(
            tuple(self.steps), self.queue, requeue, promoted_keys(initial, self.queue)
        )


def decide_restore(
    obs: RestoreObservation,
    queue: AdmissionQueue,
    now: datetime,
    new_run_id: RunIdSource,
    settings: ReconcilerSettings = DEFAULT_SETTINGS,
) -> RestorePlan:
    """Decide the next step of one restore from its observed work and server."""
    restore = obs.restore
    p = _Pass(obs, queue, now, new_run_id, settings, StatusDraft(restore.status, now))
    if restore.metadata.is_deleting:
        if is_in_progress(restore):
            p.queue = p.queue.release(p.key, restore.name)
        return p.finish(None, queue)

    requeue: timedelta | None
    match restore.status.phase:
        case None | RestorePhase.PENDING:
            requeue = _pending(p)
        case RestorePhase.RESTORING:
            requeue = _restoring(p)
        case RestorePhase.MIGRATING:
            requeue = _migrating(p)
        case RestorePhase.READY:
            requeue = _ready(p)
        case RestorePhase.SWITCHING:
            p.steps.append(EnsureServer(restore.name))
            _reindex_after_reset(p)
            requeue = REQUEUE_SWITCHING
        case RestorePhase.ACTIVE:
            p.steps.append(EnsureServer(restore.name))
            p.steps.append(MarkReadyForTraffic(restore.name))
            _reindex_after_reset(p)
            requeue = min(REQUEUE_ACTIVE, settings.idle_requeue)
        case RestorePhase.FAILED:
            requeue = None
    return p.finish(requeue, queue)


def _pending(p: _Pass) -> timedelta:
    restore = p.restore
    p.steps.append(PrepareRestoreStorage(restore.name))
    if p.restore.status.created_at is None:
        p.draft.set(created_at=p.now)
    # Restoring at once: with WaitForFirstConsumer storage the volume binds only when the
    # work's pod is scheduled, so waiting for it here would deadlock.
    p.draft.set(phase=RestorePhase.RESTORING, pvc=restore_data_pvc_name(restore.name))
    # Restores made by hand take a slot here too (possibly above the limit: they run).
    p.queue = p.queue.bind(p.key, restore.name, p.now)
    return REQUEUE_SOON


def _job_name(p: _Pass) -> str:
    return p.obs.work.name or restore_job_name(p.restore.name)


def _restoring(p: _Pass) -> timedelta | None:
    restore = p.restore
    p.queue = p.queue.bind(p.key, restore.name, p.now)
    work = p.obs.work
    match work.state:
        case WorkState.NOT_STARTED:
            run_id = restore.status.run_id
            replica = p.obs.replica
            if run_id is None and replica is not None and replica.spec.canopy_source is not None:
                # Persisted before the work starts, so a crash in between cannot mint two.
                run_id = p.new_run_id()
                p.draft.set(run_id=run_id)
                p.flush()
            p.steps.append(StartRestoreWork(restore.name, run_id))
            return REQUEUE_WORK_RUNNING
        case WorkState.RUNNING:
            p.draft.set(restore_job=JobStatus(name=_job_name(p), phase=JobPhase.RUNNING))
            return REQUEUE_WORK_RUNNING
        case WorkState.SUCCEEDED:
            p.draft.set(
                phase=RestorePhase.READY,
                restored_at=p.now,
                restore_job=JobStatus(
                    name=_job_name(p),
                    phase=JobPhase.SUCCEEDED,
                    completed_at=work.completed_at or p.now,
                ),
                postgres_version=work.postgres_version or restore.status.postgres_version,
                fixes=dict(work.fixes) if work.fixes is not None else restore.status.fixes,
                data_checks=work.data_checks or restore.status.data_checks,
            )
            p.flush()
            p.steps.append(CleanupRestoreWork(restore.name))
            return REQUEUE_SOON
        case WorkState.FAILED:
            _fail(
                p,
                f"restore failed: {work.reason or 'the restore work failed'}",
                data_checks=work.data_checks,
                restore_job=JobStatus(name=_job_name(p), phase=JobPhase.FAILED),
            )
            return None


def _migrating(p: _Pass) -> timedelta | None:
    restore = p.restore
    p.queue = p.queue.bind(p.key, restore.name, p.now)
    if restore.spec.migrate_to is None or restore.status.migration_result is not None:
        # Withdrawn mid-flight (then a plain verify), or done: Ready moves on to Switching.
        p.draft.set(phase=RestorePhase.READY)
        return REQUEUE_SOON
    outcome = p.obs.migration
    if outcome is not None and outcome.failed:
        # The runtime cannot run migrations at all (`pgro run` without a migrator): holding
        # the slot in `Migrating` forever would block every other restore.
        _fail(p, f"MigrationUnsupported: {outcome.reason}")
        return None
    # The migrator talks to this restore's own server: kept running (and, after pgro run
    # restarted, adopted again) before each look at the run.
    p.steps.append(EnsureServer(restore.name))
    server = p.obs.server
    if server.state is ServerState.FAILED:
        _fail(p, f"PostgreSQL stopped while migrating: {server.reason}")
        return None
    if server.state is not ServerState.READY:
        return REQUEUE_SOON
    # The runner starts the migrator once, then records `migrationResult` when it ended
    # (a failed migration is a finding reported with the result, not a failed restore).
    p.steps.append(RunMigration(restore.name))
    return REQUEUE_WORK_RUNNING


def _ready(p: _Pass) -> timedelta | None:
    restore = p.restore
    status = restore.status
    p.queue = p.queue.bind(p.key, restore.name, p.now)
    if not status.postgres_version:
        return _detect_version(p)
    p.steps.append(EnsureServer(restore.name))
    server = p.obs.server
    if server.state is ServerState.FAILED:
        _fail(p, f"PostgreSQL could not start on the restored data: {server.reason}")
        return None
    if server.state is ServerState.READY:
        checked, wait = _data_checked(p)
        if not checked:
            return wait
        _reindex_after_reset(p)
        if restore.spec.migrate_to is not None and status.migration_result is None:
            p.draft.set(phase=RestorePhase.MIGRATING)
            return REQUEUE_SOON
        p.draft.set(phase=RestorePhase.SWITCHING, deployment=restore.name)
        p.queue = p.queue.release(p.key, restore.name)
        return REQUEUE_SOON
    replica = p.obs.replica
    timeout = readiness_timeout(
        parse_quantity(restore.spec.snapshot_size),
        replica.spec.deployment_ready_timeout if replica is not None else None,
        p.settings.ready_timeout_floor_s,
    )
    if status.restored_at is None:
        return REQUEUE_WAIT_READY
    deadline = status.restored_at + timeout
    if p.now > deadline:
        _fail(
            p,
            f"postgres Deployment did not become Ready within {int(timeout.total_seconds())}s "
            "of restore completion",
        )
        return None
    return min(REQUEUE_WAIT_READY, deadline - p.now + timedelta(seconds=1))


def _data_checked(p: _Pass) -> tuple[bool, timedelta | None]:
    """Whether the data checks of the replica's depth are done and found no damage, and
    if not, when to look again (None: the restore failed).

    Before the switchover and any migration: damage fails the restore, so a damaged
    snapshot is never verified nor served. pgro run's worker ran them before the server
    first started (recorded with the work); the operator runs them now, on the ready
    server (`CheckData`). A run that ended without a verdict, or cut short by its budget,
    is `incomplete`: a note on the report, not a failure."""
    restore = p.restore
    replica = p.obs.replica
    checks = restore.status.data_checks
    if checks is None and replica is not None:
        depth = replica_depth(replica).depth
        if depth == "quick":
            return True, None
        run = p.obs.data_check
        if run is None or run.state in (WorkState.NOT_STARTED, WorkState.RUNNING):
            p.steps.append(CheckData(restore.name, depth))
            return False, REQUEUE_WORK_RUNNING
        checks = run.result
        if run.state is not WorkState.SUCCEEDED or checks is None:
            checks = DataChecks(
                depth=depth,
                verdict="incomplete",
                message="the data checks ended without a verdict: "
                + (run.reason or "no result")[:500],
            )
        p.draft.set(data_checks=checks)
    if checks is not None and checks.damaged:
        _fail(p, damage_summary(checks), data_checks=checks)
        return False, None
    return True, None


def _reindex_after_reset(p: _Pass) -> None:
    """After a WAL reset, the full reindex starts once the server is up and its data checks
    are done (the checks read the indexes as restored; a rebuild swapping them underneath
    would make amcheck fail on vanished relations). It runs in the background: the restore
    moves on to the switchover meanwhile."""
    if full_reindex.due(p.restore):
        p.steps.append(ReindexAfterReset(p.restore.name))


def _detect_version(p: _Pass) -> timedelta | None:
    detection = p.obs.version_detection
    if detection is None or detection.state in (WorkState.NOT_STARTED, WorkState.RUNNING):
        p.steps.append(DetectPostgresVersion(p.restore.name))
        return REQUEUE_SOON
    if detection.state is WorkState.SUCCEEDED and detection.postgres_version:
        p.draft.set(postgres_version=detection.postgres_version)
        return REQUEUE_SOON
    _fail(
        p,
        "version detection failed: "
        + (detection.reason or "it succeeded but did not report a postgres version"),
    )
    return None


def counted_failure(status: PostgresPhysicalReplicaStatus) -> str | None:
    """The restore whose failure the replica's counter last took in, if any."""
    marker = next(
        (c for c in status.conditions if c.type == reasons.LAST_RESTORE_FAILED and c.is_true), None
    )
    if marker is None:
        return None
    words = marker.message.split(" ", 2)
    return words[1] if len(words) >= 2 and words[0] == "Restore" else None


def _fail(p: _Pass, reason: str, data_checks: DataChecks | None = None, **fields: Any) -> None:
    """The shared failure path, once per restore.

    The replica's counter and backoff are written first, together with a marker naming
    this restore; then the restore becomes Failed. Replayed after a crash in between, the
    marker shows the failure was already counted, so it is never counted twice.
    """
    restore = p.restore
    replica: PostgresPhysicalReplica | None = p.obs.replica
    if replica is not None and counted_failure(replica.status) != restore.name:
        failures = (replica.status.consecutive_restore_failures or 0) + 1
        replica_draft = StatusDraft(replica.status, p.now, replica.metadata.generation)
        replica_draft.set(
            consecutive_restore_failures=failures,
            next_scheduled_restore=p.now + failure_backoff(failures),
        )
        replica_draft.condition(
            reasons.LAST_RESTORE_FAILED,
            "True",
            reasons.RESTORE_FAILED,
            f"Restore {restore.name} failed: {reason}",
        )
        if replica.spec.canopy_source is not None:
            report = verification_reports.new_report(
                restore, "failure", p.now, reason, data_checks=data_checks
            )
            replica_draft.set(
                pending_verification_reports=verification_reports.with_report(
                    replica.status.pending_verification_reports, report
                )
            )
        p.steps.append(PatchReplicaStatus(replica_draft.take()))
    if data_checks is not None:
        fields["data_checks"] = data_checks
    p.draft.set(phase=RestorePhase.FAILED, **fields)
    p.draft.condition(FAILED_CONDITION, "True", reasons.RESTORE_FAILED, reason)
    p.flush()
    p.queue = p.queue.release(p.key, restore.name)
    p.steps.append(
        EmitEvent(
            EventType.WARNING,
            reasons.EVENT_RESTORE_FAILED,
            f"Restore {restore.name} failed: {reason}",
            related=restore.name,
        )
    )
    if replica is not None and replica.spec.canopy_source is not None:
        p.steps.append(ReportVerification(restore.name, VerificationOutcome.FAILURE, reason))
