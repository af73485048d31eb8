"""The replica decision: from what is observed about one replica, what happens next.

One pass, in order (the reference's order, replica-lifecycle.md §2, with the snapshot
listing folded into the trigger step):

1. credential source and Secret → `KopiaSecretValid` (stop if unusable);
2. the replica's own resources, `serviceName`, `connectionInfo`;
3. a Switching restore: pre-switchover steps (redaction, persistent-schema migration,
   schema build), then the **switchover** (returns: one per pass);
4. **ephemeral teardown** of an Active restore (returns);
5. **sweep** of superseded Active restores after the grace period;
6. **cleanup** of Failed restores 300 s after their creation;
7. the schedule: `ScheduleValid`, `nextScheduledRestore` when missing or when the
   (schedule, jitter) hash changed;
   `SpecValid`: a byte size that is not a quantity, or `overlayDatabase` (not built);
8. a restore in progress → phase `Restoring` (returns); a byte size that is not a
   quantity then stops the pass before the triggers (no restore is sized from it);
9. **triggers**; when one fires: a listing (`ListSnapshots`, unless one that serves the
   trigger is at hand: see `_needs_listing`), then pick → covered → guardrail → sizing →
   admission (the queue) → `CreateRestore`; the schedule advances once the listing has
   been used (not while the replica waits in the admission line);
10. phase `Ready` / `Pending`, `queuePosition` 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from pgro.api.meta import ObjectMeta
from pgro.api.names import CONNECTION_DATABASE, LABEL_REPLICA, POSTGRES_PORT, service_host
from pgro.api.phases import ReplicaPhase, RestorePhase, SchemaMigrationPhase
from pgro.api.quantity import format_quantity, parse_quantity
from pgro.api.references import LocalObjectReference
from pgro.api.replica import ConnectionInfo, PostgresPhysicalReplica, PostgresPhysicalReplicaStatus
from pgro.api.restore import (
    PostgresPhysicalRestore,
    PostgresPhysicalRestoreSpec,
    PostgresPhysicalRestoreStatus,
)
from pgro.core import reasons, redaction, verification_reports
from pgro.core.backoff import in_backoff, listing_retry_delay
from pgro.core.extra_config import extra_config_events
from pgro.core.naming import restore_name
from pgro.core.observations import ReplicaObservation, SecretState, SnapshotListing
from pgro.core.plan import (
    CreateRestore,
    DeleteRestore,
    EmitEvent,
    EnsureReplicaResources,
    EventType,
    ListSnapshots,
    MarkOutgoing,
    PatchReplicaStatus,
    PatchRestoreStatus,
    PlanStep,
    PointServiceAt,
    ProvisionUsers,
    ReportVerification,
    RunSwitchoverStep,
    SendNotifications,
    StatusDraft,
    SwitchoverStep,
    VerificationOutcome,
)
from pgro.core.queue import AdmissionQueue, Queued, promoted_keys
from pgro.core.restore_set import RestoreSet, created, is_covered
from pgro.core.schedule import (
    CronSchedule,
    InvalidSchedule,
    RandomSource,
    ScheduleDecision,
    jittered_next,
    migration_budget,
    parse_schedule,
    schedule_input_hash,
    schedule_seed,
)
from pgro.core.selection import find_snapshot, select_snapshot
from pgro.core.settings import DEFAULT_SETTINGS, ReconcilerSettings
from pgro.core.sizing import StorageLimitExceeded, restore_storage_size
from pgro.core.snapshot import Snapshot
from pgro.core.triggers import Triggers, evaluate_triggers

REQUEUE_CREDENTIALS: Final = timedelta(seconds=60)
REQUEUE_STEP_RUNNING: Final = timedelta(seconds=30)
REQUEUE_SWITCHOVER: Final = timedelta(seconds=10)
REQUEUE_TEARDOWN: Final = timedelta(seconds=30)
REQUEUE_IN_PROGRESS: Final = timedelta(seconds=30)
REQUEUE_QUEUED: Final = timedelta(seconds=30)
REQUEUE_LISTING: Final = timedelta(seconds=5)
# A canopy desired snapshot missing from a listing taken for it is looked for again after
# 5 s, doubling up to `relist_interval`: canopy may offer a snapshot seconds before the
# repository's index shows it. It is also the least time between two listings of a replica
# whatever they were taken for, so a runtime that does not pass `wanted` on (or two replicas
# sharing a listing) cannot list in a tight loop.
RELIST_MISSING_FIRST: Final = timedelta(seconds=5)
# Deadlines compare strictly ("more than 300 s"); waking a second late makes them hold.
_STRICT: Final = timedelta(seconds=1)

_MIGRATION_DONE: Final = frozenset({"complete", "partial", "timeout-skipped"})
# Phases after which the switching restore holds objects the migration created.
_MIGRATION_CARRIED: Final = frozenset({"complete", "partial"})


@dataclass(frozen=True)
class ReplicaPlan:
    """The outcome of one replica decision.

    `queue` replaces the runtime's admission queue (store it right after deciding, under
    the same lock as the decision); `wake` lists replica keys the queue just promoted, to
    reconcile soon. `requeue_after`: decide again no later than this, even if nothing
    is observed to change.
    """

    steps: tuple[PlanStep, ...]
    queue: AdmissionQueue
    requeue_after: timedelta | None
    wake: tuple[str, ...] = ()
    triggers: Triggers | None = None

    @property
    def status_patches(self) -> tuple[PatchReplicaStatus, ...]:
        return tuple(s for s in self.steps if isinstance(s, PatchReplicaStatus))


@dataclass
class _Pass:
    obs: ReplicaObservation
    queue: AdmissionQueue
    now: datetime
    random: RandomSource
    settings: ReconcilerSettings
    draft: StatusDraft[PostgresPhysicalReplicaStatus]
    steps: list[PlanStep] = field(default_factory=list)
    trailing: list[PlanStep] = field(default_factory=list)
    wakeups: list[datetime] = field(default_factory=list)
    triggers: Triggers | None = None

    @property
    def replica(self) -> PostgresPhysicalReplica:
        return self.obs.replica

    @property
    def key(self) -> str:
        return self.replica.key

    def wake_at(self, when: datetime | None) -> None:
        if when is not None and when > self.now:
            self.wakeups.append(when)

    def flush_status(self) -> None:
        patch = self.draft.take()
        if patch:
            self.steps.append(PatchReplicaStatus(patch))

    def finish(self, requeue: timedelta | None, initial_queue: AdmissionQueue) -> ReplicaPlan:
        self.flush_status()
        candidates = [w - self.now for w in self.wakeups]
        if requeue is not None:
            candidates.append(requeue)
        candidates.append(self.settings.idle_requeue)
        return ReplicaPlan(
            steps=(*self.steps, *self.trailing),
            queue=self.queue,
            requeue_after=max(timedelta(0), min(candidates)),
            wake=promoted_keys(initial_queue, self.queue),
            triggers=self.triggers,
        )


def decide_replica(
    obs: ReplicaObservation,
    queue: AdmissionQueue,
    now: datetime,
    random: RandomSource,
    settings: ReconcilerSettings = DEFAULT_SETTINGS,
) -> ReplicaPlan:
    """Decide what happens next for one replica. Pure: same inputs, same plan (given
    the same `random` draws, which only jitter uses)."""
    replica = obs.replica
    if replica.metadata.is_deleting:
        # Owner references take the restores; only the slot is ours to give back.
        released = queue.release(replica.key)
        return ReplicaPlan((), released, None, wake=promoted_keys(queue, released))

    draft = StatusDraft(replica.status, now, replica.metadata.generation)
    p = _Pass(obs, queue, now, random, settings, draft)

    if not _credentials(p):
        return p.finish(REQUEUE_CREDENTIALS, queue)
    _resources(p)

    restores = RestoreSet(obs.restores, replica.status.current_restore)
    serving = restores.serving

    switching = restores.switching
    if switching is not None:
        if _hold_switchover(p, switching, serving):
            return p.finish(REQUEUE_STEP_RUNNING, queue)
        _switchover(p, switching, serving)
        return p.finish(REQUEUE_SWITCHOVER, queue)

    if replica.spec.ephemeral and _teardown(p, restores):
        return p.finish(REQUEUE_TEARDOWN, queue)

    _sweep(p, restores)
    _cleanup_failed(p, restores)
    _clear_legacy_suspension(p)
    schedule = _maintain_schedule(p)
    sizes_usable = _spec_validity(p)

    if restores.in_progress is not None:
        p.queue = p.queue.withdraw(p.key)
        p.draft.set(phase=ReplicaPhase.RESTORING, queue_position=0)
        return p.finish(REQUEUE_IN_PROGRESS, queue)

    if not sizes_usable:
        # No restore is sized from a value that is not a quantity; what serves keeps
        # serving, and the fix (a spec edit) brings the replica back here.
        p.queue = p.queue.withdraw(p.key)
        phase = ReplicaPhase.READY if serving is not None else ReplicaPhase.PENDING
        p.draft.set(phase=phase, queue_position=0)
        return p.finish(None, queue)

    requeue = _triggers(p, restores, schedule)
    return p.finish(requeue, queue)


# 1. Credentials ------------------------------------------------------------------------


def _credentials(p: _Pass) -> bool:
    replica = p.replica
    problem = replica.credential_source_problem()
    if problem is not None:
        reason, message = problem
        p.draft.condition(reasons.KOPIA_SECRET_VALID, "False", reason, message)
        return False
    if replica.spec.canopy_source is not None:
        check = p.obs.secret
        if check is not None and check.state is SecretState.INVALID:
            # The runtime asked canopy for this group's credentials and was refused
            # (403: no enabled declaration covers it, 409: the group is not ready).
            p.draft.condition(
                reasons.KOPIA_SECRET_VALID,
                "False",
                check.reason or reasons.CANOPY_CREDENTIALS_REFUSED,
                check.detail,
            )
            return False
        if check is not None and check.state is SecretState.NOT_FOUND:
            # Not obtained yet (the first tick after a start): wait rather than fail.
            p.draft.condition(
                reasons.KOPIA_SECRET_VALID,
                "Unknown",
                reasons.CANOPY_CREDENTIALS_PENDING,
                check.detail,
            )
            return False
        p.draft.condition(
            reasons.KOPIA_SECRET_VALID,
            "True",
            reasons.CANOPY_SOURCED,
            "canopy-managed replica; credentials issued by canopy at Job time",
        )
        return True
    secret_ref = replica.spec.kopia_secret_ref
    name = secret_ref.name if secret_ref is not None else ""
    check = p.obs.secret
    if check is None:
        p.draft.condition(
            reasons.KOPIA_SECRET_VALID,
            "Unknown",
            reasons.SECRET_NOT_CHECKED,
            f"Secret {name} has not been checked yet",
        )
        return False
    if check.state is SecretState.NOT_FOUND:
        p.draft.condition(
            reasons.KOPIA_SECRET_VALID,
            "False",
            reasons.SECRET_NOT_FOUND,
            f"Secret {name} not found: {check.detail}",
        )
        return False
    if check.state is SecretState.INVALID:
        p.draft.condition(
            reasons.KOPIA_SECRET_VALID,
            "False",
            reasons.SECRET_INVALID,
            f"Kopia secret {name} invalid: {check.detail}",
        )
        return False
    p.draft.condition(
        reasons.KOPIA_SECRET_VALID, "True", reasons.SECRET_VALID, "All required keys present"
    )
    return True


# 2. Resources ----------------------------------------------------------------------------


def _resources(p: _Pass) -> None:
    replica = p.replica
    spec = replica.spec
    p.steps.append(
        EnsureReplicaResources(
            analytics_username=spec.analytics_username,
            extra_usernames=tuple(u.name for u in spec.extra_users),
            service_annotations=spec.service_annotations,
        )
    )
    endpoint = p.obs.endpoint
    p.draft.set(
        service_name=replica.name,
        connection_info=ConnectionInfo(
            host=endpoint.host if endpoint else service_host(replica.name, replica.namespace),
            port=endpoint.port if endpoint else POSTGRES_PORT,
            database=CONNECTION_DATABASE,
            username=spec.analytics_username,
            password_secret=replica.creds_secret_name,
        ),
    )


# 3. Switchover ---------------------------------------------------------------------------


def _hold_switchover(
    p: _Pass, switching: PostgresPhysicalRestore, serving: PostgresPhysicalRestore | None
) -> bool:
    """Run the pre-switchover steps in order; True while one of them holds it back."""
    spec = p.replica.spec
    status = p.replica.status
    if spec.redaction is not None and not redaction.done(status, switching.name):
        # A failed redaction holds the switchover too, and a phase recorded for another
        # restore counts for nothing: an unredacted restore never serves.
        p.steps.append(RunSwitchoverStep(SwitchoverStep.REDACTION, switching.name))
        return True
    if spec.persistent_schemas is not None and serving is not None:
        phase = status.schema_migration_phase
        if not spec.persistent_schemas:
            p.draft.set(
                schema_migration_job=None, schema_migration_phase=SchemaMigrationPhase.COMPLETE
            )
        elif phase is None or phase.state not in _MIGRATION_DONE:
            p.steps.append(
                RunSwitchoverStep(
                    SwitchoverStep.SCHEMA_MIGRATION,
                    switching.name,
                    source_restore=serving.name,
                    schemas=tuple(spec.persistent_schemas),
                    budget=migration_budget(spec.schedule, p.now),
                )
            )
            return True
    if (
        switching.spec.builder_image is not None
        and switching.spec.migrate_to is not None
        and switching.status.migration_result is not None
        and switching.status.schema_build_result is None
    ):
        # The build runs on the migrated schema: without `migrateTo` (or before its result)
        # there is nothing to build, and the reference builds nothing either. (The rebuild
        # held the switchover forever whenever `builderImage` was set.) A failed build still
        # records a result, so it never holds the switchover.
        p.steps.append(RunSwitchoverStep(SwitchoverStep.SCHEMA_BUILD, switching.name))
        return True
    return False


def _switchover(
    p: _Pass, switching: PostgresPhysicalRestore, serving: PostgresPhysicalRestore | None
) -> None:
    """The Service moves first, then the restore is marked Active, then the replica
    records it: each fact is written only once what it states is true."""
    replica = p.replica
    status = replica.status
    if replica.spec.persistent_users or (
        status.schema_migration_phase is not None
        and status.schema_migration_phase.state in _MIGRATION_CARRIED
    ):
        p.steps.append(ProvisionUsers(switching.name))
    p.steps.append(PointServiceAt(switching.name))
    restore_draft = StatusDraft(switching.status, p.now)
    restore_draft.set(phase=RestorePhase.ACTIVE, activated_at=p.now)
    p.steps.append(PatchRestoreStatus(switching.name, restore_draft.patch()))

    p.draft.set(
        phase=ReplicaPhase.READY,
        current_restore=switching.name,
        previous_restore=status.current_restore,
        last_restore_completed_at=p.now,
        consecutive_restore_failures=0,
    )
    if replica.spec.canopy_source is not None:
        # Persisted with the switchover itself: the report outlives a crash or a canopy
        # outage, and the ephemeral teardown that follows cannot lose it.
        report = verification_reports.new_report(
            switching, "success", p.now, redaction=redaction.report(status, switching.name)
        )
        p.draft.set(
            pending_verification_reports=verification_reports.with_report(
                p.draft.get("pending_verification_reports"), report
            )
        )
    _condition_if_true(
        p,
        reasons.RESTORE_SCHEDULING_SUSPENDED,
        reasons.RESTORE_SUCCEEDED,
        "Consecutive failure counter reset after successful restore",
    )
    _condition_if_true(
        p,
        reasons.LAST_RESTORE_FAILED,
        reasons.RESTORE_SUCCEEDED,
        f"Restore {switching.name} switched over",
    )
    p.flush_status()
    p.queue = p.queue.release(p.key, switching.name)

    if serving is not None and serving.name != switching.name:
        p.steps.append(MarkOutgoing(serving.name))
    p.steps.append(
        EmitEvent(
            EventType.NORMAL,
            reasons.EVENT_RESTORE_COMPLETED,
            f"Switchover to restore {switching.name} completed",
            related=switching.name,
        )
    )
    if replica.spec.notifications:
        p.steps.append(SendNotifications(switching.name))
    if replica.spec.canopy_source is not None:
        p.steps.append(ReportVerification(switching.name, VerificationOutcome.SUCCESS))


def _condition_if_true(p: _Pass, type: str, reason: str, message: str) -> None:
    conditions = p.draft.get("conditions")
    if any(c.type == type and c.is_true for c in conditions):
        p.draft.condition(type, "False", reason, message)


# 4. Ephemeral teardown -------------------------------------------------------------------


def _teardown(p: _Pass, restores: RestoreSet) -> bool:
    """Verified: record it, then delete. The marker comes first so a crash, or a delete
    that fails, never looks like an accidental deletion (`currentRestore` is already
    cleared) and the snapshot is never restored again (`verifiedSnapshotId` covers it).
    """
    targets = [r for r in restores.active if not r.metadata.is_deleting]
    if not targets:
        return False
    verified = max(targets, key=lambda r: (r.status.activated_at or p.now, r.name))
    p.draft.set(
        verified_snapshot_id=verified.spec.snapshot, current_restore=None, previous_restore=None
    )
    p.flush_status()
    for restore in targets:
        p.steps.append(DeleteRestore(restore.name))
    p.steps.append(
        EmitEvent(
            EventType.NORMAL,
            reasons.EVENT_RESTORE_VERIFIED,
            f"Snapshot {verified.spec.snapshot} verified; restore {verified.name} torn down",
            related=verified.name,
        )
    )
    p.queue = p.queue.release(p.key)
    return True


# 5. Sweep --------------------------------------------------------------------------------


def _sweep(p: _Pass, restores: RestoreSet) -> None:
    """Delete superseded Active restores once the grace period has passed.

    Gated on the current restore being Active and the pre-switchover steps being settled
    ("not active", never a list of end states). Status cleanup is drafted into the pass's
    patch, which runs after the deletes: it happens only if every delete succeeded.
    Unlike the reference, leftover step status is cleared even when nothing was stale, so
    a `complete` migration from an old cycle cannot skip the next one's migration.
    """
    status = p.replica.status
    current = restores.current
    if current is None or status.last_restore_completed_at is None:
        return
    if status.schema_migration_phase is not None and not status.schema_migration_phase.settled:
        return
    if _redacting(status, restores):
        return
    grace_ends = status.last_restore_completed_at + p.replica.spec.switchover_grace_period
    if not p.now > grace_ends:
        p.wake_at(grace_ends + _STRICT)
        return
    for restore in restores.active:
        if restore.name != current.name and not restore.metadata.is_deleting:
            p.steps.append(DeleteRestore(restore.name))
    p.draft.set(previous_restore=None, schema_migration_job=None, schema_migration_phase=None)
    if status.redaction_restore != current.name:
        # What describes the serving restore stays (a `partial` must stay visible while it
        # serves); anything else is left from an older cycle.
        p.draft.set(
            redaction_phase=None,
            redaction_restore=None,
            redaction_version=None,
            redaction_columns_applied=None,
        )


def _redacting(status: PostgresPhysicalReplicaStatus, restores: RestoreSet) -> bool:
    """A redaction runs on a restore that still exists (one recorded for a restore since
    deleted, or by the reference for none, must not hold the sweep forever)."""
    phase = status.redaction_phase
    if phase is None or phase.settled:
        return False
    if status.redaction_restore is None:
        return True
    return any(
        r.name == status.redaction_restore and not r.metadata.is_deleting for r in restores.all
    )


# 6. Failed cleanup -----------------------------------------------------------------------


def _cleanup_failed(p: _Pass, restores: RestoreSet) -> None:
    retention = p.settings.failed_restore_retention
    for restore in restores.failed:
        when = created(restore)
        if when is None or restore.metadata.is_deleting:
            continue
        if p.now - when > retention:
            p.steps.append(DeleteRestore(restore.name, pods_first=True))
        else:
            p.wake_at(when + retention + _STRICT)


def _clear_legacy_suspension(p: _Pass) -> None:
    _condition_if_true(
        p,
        reasons.RESTORE_SCHEDULING_SUSPENDED,
        reasons.SUSPENSION_REMOVED,
        "Operator no longer suspends on consecutive failures; backoff is used instead",
    )


# 7. Schedule -----------------------------------------------------------------------------


def _maintain_schedule(p: _Pass) -> CronSchedule | None:
    replica = p.replica
    spec = replica.spec
    expected_hash = schedule_input_hash(spec.schedule, spec.schedule_jitter)
    seed = schedule_seed(replica.metadata.uid, replica.namespace, replica.name)
    try:
        schedule = parse_schedule(spec.schedule, seed)
    except InvalidSchedule as error:
        p.draft.condition(
            reasons.SCHEDULE_VALID,
            "False",
            reasons.INVALID_SCHEDULE,
            f"{error}. Scheduled restores are off until spec.schedule is fixed.",
        )
        if p.draft.get("schedule_input_hash") != expected_hash:
            # A stale time from the old schedule must not fire; a failure backoff stays.
            failures = p.draft.get("consecutive_restore_failures") or 0
            p.draft.set(
                schedule_input_hash=expected_hash,
                next_scheduled_restore=p.draft.get("next_scheduled_restore") if failures else None,
            )
        return None
    p.draft.condition(
        reasons.SCHEDULE_VALID,
        "True",
        reasons.VALID_SCHEDULE,
        f"Schedule {spec.schedule!r} is valid",
    )
    if (
        p.draft.get("next_scheduled_restore") is None
        or p.draft.get("schedule_input_hash") != expected_hash
    ):
        _advance_schedule(p, schedule)
    return schedule


def _advance_schedule(p: _Pass, schedule: CronSchedule) -> None:
    spec = p.replica.spec
    p.draft.set(
        next_scheduled_restore=jittered_next(schedule, p.now, spec.schedule_jitter, p.random),
        schedule_input_hash=schedule_input_hash(spec.schedule, spec.schedule_jitter),
    )


# 7b. The spec as written ------------------------------------------------------------------

OVERLAY_DATABASE_MESSAGE: Final = (
    "spec.overlayDatabase is not supported: the reference operator removed overlay "
    "databases and pgro does not build them, so this replica is restored and served "
    "without one. Carry data across restores with spec.persistentSchemas and roles with "
    "spec.persistentUsers, and remove spec.overlayDatabase."
)


def _spec_validity(p: _Pass) -> bool:
    """`SpecValid`: False while a byte size is not a quantity (returns False: no restore
    may be sized) or while `overlayDatabase` is set (returns True: the replica restores
    without the overlay). Written only when something is wrong, or to clear an earlier
    False, so replicas with nothing to say carry no extra condition."""
    spec = p.replica.spec
    problems = spec.quantity_problems()
    overlay = spec.overlay_database is not None
    if problems:
        message = "; ".join(problems) + (
            ". No new restore is made until this is fixed; a serving restore keeps serving."
        )
        if overlay:
            message += " " + OVERLAY_DATABASE_MESSAGE
        p.draft.condition(reasons.SPEC_VALID, "False", reasons.INVALID_QUANTITY, message)
        return False
    if overlay:
        p.draft.condition(
            reasons.SPEC_VALID,
            "False",
            reasons.OVERLAY_DATABASE_UNSUPPORTED,
            OVERLAY_DATABASE_MESSAGE,
        )
        return True
    if any(c.type == reasons.SPEC_VALID for c in p.draft.get("conditions")):
        p.draft.condition(reasons.SPEC_VALID, "True", reasons.VALID_SPEC, "The spec is usable")
    return True


# 9. Triggers, admission, listing, creation -----------------------------------------------


def _triggers(p: _Pass, restores: RestoreSet, schedule: CronSchedule | None) -> timedelta | None:
    replica = p.replica
    spec = replica.spec
    draft = p.draft
    serving = restores.serving
    failures = draft.get("consecutive_restore_failures") or 0
    next_at: datetime | None = draft.get("next_scheduled_restore")
    backoff = in_backoff(failures, next_at, p.now)
    triggers = evaluate_triggers(
        now=p.now,
        serving_snapshot=serving.spec.snapshot if serving is not None else None,
        has_serving=serving is not None,
        current_restore=draft.get("current_restore"),
        last_restore_completed_at=draft.get("last_restore_completed_at"),
        verified_snapshot_id=draft.get("verified_snapshot_id"),
        canopy=spec.canopy_source is not None,
        canopy_desired_snapshot_id=draft.get("canopy_desired_snapshot_id"),
        minimum_ttl=spec.minimum_ttl,
        next_scheduled_restore=next_at,
        schedule_valid=schedule is not None,
        backoff_pending=backoff,
    )
    p.triggers = triggers
    phase = ReplicaPhase.READY if serving is not None else ReplicaPhase.PENDING
    p.wake_at(next_at)
    last = draft.get("last_restore_completed_at")
    if spec.minimum_ttl is not None and last is not None:
        p.wake_at(last + spec.minimum_ttl)

    if not triggers.should_restore:
        p.queue = p.queue.withdraw(p.key)
        if triggers.schedule is ScheduleDecision.SKIPPED_BY_TTL and schedule is not None:
            _advance_schedule(p, schedule)
        draft.set(phase=phase, queue_position=0)
        return None

    listing = p.obs.listing
    desired: str | None = (
        draft.get("canopy_desired_snapshot_id") if spec.canopy_source is not None else None
    )
    if _needs_listing(p, listing, triggers, next_at, desired):
        p.steps.append(ListSnapshots(wanted=desired))
        draft.set(phase=phase)
        return REQUEUE_LISTING
    assert listing is not None
    if listing.snapshots is None:
        _listing_failed(p, listing)
        draft.set(phase=phase, queue_position=0)
        return None

    relist_at = (
        _relist_missing_at(p, listing, desired)
        if desired is not None and triggers.by_state and not listing.holds(desired)
        else None
    )
    outcome = _use_listing(p, restores, listing.snapshots, relist_at)
    if isinstance(outcome, Queued):
        # Waits with its trigger intact: the schedule advances only once it has run.
        draft.set(phase=phase, queue_position=outcome.position)
        return REQUEUE_QUEUED
    draft.set(queue_position=0)
    if triggers.schedule is ScheduleDecision.TRIGGER and schedule is not None:
        _advance_schedule(p, schedule)
    if outcome is None:
        p.queue = p.queue.withdraw(p.key)
        draft.set(phase=phase)
        if triggers.by_state:
            # A state trigger still holds (e.g. the snapshot is not there yet): look again.
            p.wake_at(relist_at or listing.listed_at + p.settings.relist_interval)
        return None
    p.queue = p.queue.bind(p.key, outcome, p.now)
    draft.set(phase=ReplicaPhase.RESTORING)
    return REQUEUE_IN_PROGRESS


def _needs_listing(
    p: _Pass,
    listing: SnapshotListing | None,
    triggers: Triggers,
    next_at: datetime | None,
    desired: str | None,
) -> bool:
    """Whether the listing at hand serves the triggers that fired.

    - The schedule: a listing taken after the scheduled time.
    - A canopy replica's state triggers (`desired`: canopy's desired snapshot): a listing
      that holds the desired snapshot, whatever its age. One that lacks it and was not
      taken for it predates the offer: list again at once. One taken for it that still
      lacks it: again after 5 s, 10 s, … up to `relist_interval`.
    - The other state triggers: a listing younger than `relist_interval`.

    A failed listing is retried on its own backoff.
    """
    if listing is None:
        return True
    if listing.failed:
        return p.now >= listing.listed_at + listing_retry_delay(listing.consecutive_failures)
    if (
        triggers.schedule is ScheduleDecision.TRIGGER
        and next_at is not None
        and listing.listed_at < next_at
    ):
        return True
    if not triggers.by_state:
        return False
    if desired is not None:
        return not listing.holds(desired) and p.now >= _relist_missing_at(p, listing, desired)
    return listing.listed_at + p.settings.relist_interval <= p.now


def missing_relist_delay(missing_streak: int, cap: timedelta) -> timedelta:
    """5 s, 10 s, 20 s, … up to `cap`, after `missing_streak` listings in a row lacked the
    wanted snapshot (at least the first step, whatever the streak)."""
    steps = min(max(missing_streak, 1) - 1, 16)  # past 16 doublings the cap holds anyway
    delay: timedelta = RELIST_MISSING_FIRST * 2**steps
    return min(cap, delay)


def _relist_missing_at(p: _Pass, listing: SnapshotListing, desired: str) -> datetime:
    """When a listing that lacks canopy's desired snapshot is taken again."""
    if listing.wanted == desired:
        delay = missing_relist_delay(listing.missing_streak, p.settings.relist_interval)
    else:
        # Taken before canopy's offer (or for another snapshot): at once, unless it is
        # only seconds old (the shortest step, so that no loop lists without a pause).
        delay = RELIST_MISSING_FIRST
    return listing.listed_at + delay


def _listing_failed(p: _Pass, listing: SnapshotListing) -> None:
    retry_at = listing.listed_at + listing_retry_delay(listing.consecutive_failures)
    p.draft.condition(
        reasons.SNAPSHOT_AVAILABLE,
        "False",
        reasons.LISTING_FAILED,
        f"Listing snapshots failed ({listing.consecutive_failures} in a row): {listing.error}. "
        f"Retrying at {retry_at:%Y-%m-%dT%H:%M:%SZ}",
    )
    p.queue = p.queue.withdraw(p.key)
    p.wake_at(retry_at)


def _pick(p: _Pass, snapshots: tuple[Snapshot, ...], relist_at: datetime | None) -> Snapshot | None:
    spec = p.replica.spec
    if spec.canopy_source is not None:
        desired = p.draft.get("canopy_desired_snapshot_id")
        found = find_snapshot(snapshots, desired) if desired is not None else None
        if found is None:
            again = f"; listing again at {relist_at:%Y-%m-%dT%H:%M:%SZ}" if relist_at else ""
            p.draft.condition(
                reasons.SNAPSHOT_AVAILABLE,
                "False",
                reasons.CANOPY_DESIRED_SNAPSHOT_MISSING,
                f"canopyDesiredSnapshotId {desired or '<none>'} was not found in the kopia "
                "snapshot list — canopy may be pointing at a snapshot that hasn't been "
                f"indexed yet{again}",
            )
        return found
    picked = select_snapshot(snapshots, spec.snapshot_filter)
    if picked is None:
        p.draft.condition(
            reasons.SNAPSHOT_AVAILABLE,
            "False",
            reasons.NO_MATCHING_SNAPSHOTS,
            f"No snapshot matches the configured filter ({len(snapshots)} snapshots listed)",
        )
    return picked


def _use_listing(
    p: _Pass, restores: RestoreSet, snapshots: tuple[Snapshot, ...], relist_at: datetime | None
) -> str | Queued | None:
    """Pick, check, size, admit and create: the new restore's name, its place in the
    admission line, or None when there is nothing to create. `relist_at`: when a missing
    canopy desired snapshot is looked for again (for the condition's message)."""
    replica = p.replica
    spec = replica.spec
    picked = _pick(p, snapshots, relist_at)
    if picked is None:
        return None
    p.draft.set(latest_available_snapshot=picked.id)
    p.draft.condition(
        reasons.SNAPSHOT_AVAILABLE,
        "True",
        reasons.SNAPSHOT_FOUND,
        f"Snapshot {picked.id} available ({picked.size_bytes} bytes)",
    )
    if is_covered(picked.id, restores.all, p.draft.get("verified_snapshot_id")):
        return None

    live = restores.live
    limit = p.settings.max_restores_per_replica
    if len(live) >= limit:
        names = ", ".join(r.name for r in live)
        p.draft.condition(
            reasons.RESTORE_CREATION_BLOCKED,
            "True",
            reasons.TOO_MANY_RESTORES,
            f"Refusing to create new restore: {len(live)} live restores already exist for "
            f"this replica (limit {limit}). Existing: [{names}]. Reduce the count by "
            "deleting stale restores or fix the pruning issue.",
        )
        p.trailing.append(
            EmitEvent(
                EventType.WARNING,
                reasons.EVENT_RESTORE_CREATION_BLOCKED,
                f"Refused to create restore for snapshot {picked.id} — too many restores "
                "already exist",
            )
        )
        return None

    status = replica.status
    data_size = status.persistent_schema_data_size
    floor = spec.storage_size_override
    try:
        size = restore_storage_size(
            picked.size_bytes,
            maximum=spec.storage_size_maximum_bytes(),
            floor=parse_quantity(floor) if floor is not None else None,
            persistent_schemas=spec.persistent_schemas is not None,
            persistent_schema_data_size=parse_quantity(data_size)
            if data_size is not None
            else None,
        )
    except StorageLimitExceeded as error:
        p.draft.condition(
            reasons.RESTORE_CREATION_BLOCKED, "True", reasons.STORAGE_LIMIT_EXCEEDED, str(error)
        )
        p.trailing.append(
            EmitEvent(
                EventType.WARNING,
                reasons.EVENT_RESTORE_CREATION_BLOCKED,
                f"Refused to create restore for snapshot {picked.id}: {error}",
            )
        )
        return None

    # Admission comes last: only a restore that will really be created waits for a slot,
    # so replicas whose snapshot is already covered never queue.
    p.queue, admission = p.queue.request(p.key, p.now)
    if isinstance(admission, Queued):
        return admission
    name = restore_name(replica.name, p.now, {r.name for r in restores.all})
    restore = PostgresPhysicalRestore(
        metadata=ObjectMeta(
            name=name,
            namespace=replica.namespace,
            labels={LABEL_REPLICA: replica.name},
            owner_references=[replica.owner_reference()],
        ),
        spec=PostgresPhysicalRestoreSpec(
            replica=LocalObjectReference(name=replica.name),
            snapshot=picked.id,
            snapshot_size=picked.size_bytes,
            snapshot_time=picked.start_time or None,
            storage_size=format_quantity(size),
            migrate_to=spec.migrate_to,
            builder_image=spec.builder_image,
        ),
        status=PostgresPhysicalRestoreStatus(),
    )
    p.steps.append(CreateRestore(restore))
    p.steps.append(
        EmitEvent(
            EventType.NORMAL,
            reasons.EVENT_RESTORE_STARTED,
            f"Started restore from snapshot {picked.id}",
            related=name,
        )
    )
    p.steps.extend(extra_config_events(spec.postgres_extra_config, name))
    p.draft.condition(
        reasons.RESTORE_CREATION_BLOCKED,
        "False",
        reasons.HEALTHY,
        "Restore count is below the per-replica limit",
    )
    return name
