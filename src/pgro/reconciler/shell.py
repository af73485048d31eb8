"""The reconciler shell: deciding and applying, written once for every runtime.

A runtime (embedded, Kubernetes, the scenario tests' world) implements `Effects` and a
`schedule(kind, key, delay)` callback, and calls `reconcile(kind, key)` when an object
may need work and `tick()` every second or so. The shell owns everything in between:

- the admission queue and the lock that serialises deciding with storing its new state
  (docs/reconciler.md, ordering contract 5);
- observing through the effects, calling `decide_replica` / `decide_restore`;
- applying the plan in order, stopping at the first failing step that is not best effort
  (contract 1-2), through one exhaustive dispatch (`dispatch.py`);
- backing off failing steps and reporting them once per change: a log line, a
  `StepFailed` event, the replica's `StepsSucceeding` condition (`core.step_failures`);
- the restore metrics (started, completed, failed, switchovers and their duration), the
  pass metrics, the queue gauges;
- notification rounds (the switchover's webhooks) and writing their outcome back;
- requeueing: the plan's `requeue_after`, the keys the queue promoted, a failing step's
  retry time.

Threads: passes for different keys may run at once (the operator runs several workers);
a runtime never runs two passes for the same key at once (one work-queue key per object).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from pgro.api.conditions import ConditionStatus, set_condition
from pgro.api.phases import RestorePhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.plan import (
    UNSUPPORTED_SWITCHOVER_EVENT,
    CreateRestore,
    EmitEvent,
    EventType,
    PatchReplicaStatus,
    PatchRestoreStatus,
    PlanStep,
    PointServiceAt,
    RunSwitchoverStep,
    SwitchoverStep,
    apply_in_order,
    unsupported_switchover_step,
)
from pgro.core.queue import AdmissionQueue, promoted_keys
from pgro.core.replica_decision import decide_replica
from pgro.core.restore_machine import FAILED_CONDITION, decide_restore
from pgro.core.secrets import scrub
from pgro.core.settings import DEFAULT_SETTINGS, ReconcilerSettings
from pgro.core.step_failures import (
    EVENT_STEP_FAILED,
    RECOVERED,
    RETRY_NOTE,
    STEP_FAILING,
    STEPS_CONDITION,
    StepFailures,
    StepKey,
    error_shape,
    step_name,
)
from pgro.event_publisher import EventPublisher
from pgro.notifications import Notifier
from pgro.observability import Metrics
from pgro.reconciler.dispatch import dispatch
from pgro.reconciler.effects import Effects, Gone

log = logging.getLogger("pgro.reconciler")

WorkKind = Literal["replica", "restore"]
# Reconcile (kind, key) again within `delay` seconds (a shorter pending delay wins).
Schedule = Callable[[WorkKind, str, float], None]

ADMISSION_RECONCILE_EVERY: Final = 60.0
# A pass that raised (not a failing step: a bug or an unreadable object) is tried again.
PASS_RETRY_S: Final = 30.0


class _BackingOff(Exception):
    """The step failed recently; its retry time has not come (not a new failure)."""


def restore_owner(key: str) -> str:
    """What a restore plan's failing steps are recorded under."""
    return f"restore {key}"


def replica_owner(key: str) -> str:
    return f"replica {key}"


class Shell:
    def __init__(
        self,
        effects: Effects,
        *,
        schedule: Schedule,
        clock: Callable[[], datetime],
        limit: int,
        random: Callable[[], float],
        new_run_id: Callable[[], str],
        settings: ReconcilerSettings = DEFAULT_SETTINGS,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        event_publisher: EventPublisher | None = None,
    ) -> None:
        self.effects = effects
        self.schedule = schedule
        self.clock = clock
        self.random = random
        self.new_run_id = new_run_id
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.notifier = notifier
        self.event_publisher = event_publisher
        self.admission = AdmissionQueue(limit=limit)
        self._lock = threading.Lock()
        # Steps failing in a row, per (object, step): retried 1 s, 2 s, … up to 5 minutes
        # apart and reported once per change. Passes of a replica and of its restores may
        # run at once and share it.
        self._failures = StepFailures()
        self._notifying: set[str] = set()
        # (replica key, restore, step kind) already reported unsupported: once per restore.
        self._unsupported: set[tuple[str, str, SwitchoverStep]] = set()
        self._last_admission_reconcile = clock().timestamp()

    # -- admission ------------------------------------------------------------------------
    def rebuild_admission(self) -> None:
        """After a start (or gaining leadership): the line as the objects record it."""
        in_progress = dict(self.effects.restores_in_progress())
        positions = dict(self.effects.queue_positions())
        with self._lock:
            self.admission = AdmissionQueue.rebuild(
                self.admission.limit, in_progress, positions, self.clock()
            )

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.admission = self.admission.with_limit(limit)

    def release(self, replica_key: str, restore: str | None = None) -> None:
        """Give a slot or place in line back now, not after the queue's unbacked grace."""
        with self._lock:
            before = self.admission
            self.admission = before.release(replica_key, restore)
            woken = promoted_keys(before, self.admission)
        for key in woken:
            self.schedule("replica", key, 0.0)

    def tick(self) -> None:
        """Periodic upkeep: re-derive the admission queue from what exists (a slot whose
        restore vanished unseen is freed), finish notification rounds, update gauges."""
        now = self.clock().timestamp()
        if now - self._last_admission_reconcile >= ADMISSION_RECONCILE_EVERY:
            self._last_admission_reconcile = now
            in_progress = dict(self.effects.restores_in_progress())
            with self._lock:
                self.admission = self.admission.reconcile(in_progress, self.clock())
        with self._lock:
            self.metrics.queue_depth.set(len(self.admission.waiting))
            self.metrics.active_count.set(len(self.admission.slots))
            notifying = list(self._notifying)
        if self.notifier is not None:
            for key in notifying:
                if not self.notifier.running(key):
                    with self._lock:
                        self._notifying.discard(key)
                    self.schedule("replica", key, 0.0)

    # -- forgetting -----------------------------------------------------------------------
    def forget_replica(self, key: str) -> None:
        """The replica is gone: its notifications, place in line and failures go too."""
        if self.notifier is not None:
            self.notifier.cancel(key)
        with self._lock:
            self._notifying.discard(key)
            self._failures.forget(lambda _, f: f.replica_key == key)
            self._unsupported = {u for u in self._unsupported if u[0] != key}
        self.metrics.forget_replica(key)
        self.release(key)

    def forget_restore(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        with self._lock:
            held = self.admission.key_bound_to(namespace, name)
            self._failures.forget(lambda k, _: k[0] == restore_owner(key))
            self._unsupported = {
                u for u in self._unsupported if (u[0].partition("/")[0], u[1]) != (namespace, name)
            }
        if held is not None:
            self.release(held, name)

    # -- passes ---------------------------------------------------------------------------
    def reconcile(self, kind: WorkKind, key: str) -> None:
        """One pass for one object; never raises (a failed pass is retried later)."""
        started = time.monotonic()
        self.metrics.reconciliations.labels(kind).inc()
        try:
            if kind == "replica":
                self.reconcile_replica(key)
            else:
                self.reconcile_restore(key)
        except Exception:
            self.metrics.reconciliation_errors.labels(kind).inc()
            log.exception("reconciling %s %s failed", kind, key)
            self.schedule(kind, key, PASS_RETRY_S)
        finally:
            self.metrics.reconciliation_duration.observe(time.monotonic() - started)

    def reconcile_replica(self, key: str) -> None:
        view = self.effects.observe_replica(key)
        if isinstance(view, Gone):
            self.forget_replica(key)
            return
        if view is None:
            return
        obs = view.observation
        replica = obs.replica
        self.metrics.observe_replica(replica, self.clock())
        self._collect_notifications(replica)
        with self._lock:
            plan = decide_replica(obs, self.admission, self.clock(), self.random, self.settings)
            self.admission = plan.queue
        phases = {r.name: r.effective_phase for r in obs.restores}
        created = {r.name: r.metadata.creation_timestamp for r in obs.restores}
        retry = self._apply(
            plan.steps, replica, None, replica_owner(key), view.secrets, phases, created
        )
        # Stopped at a failing step: the next pass is its retry, not the plan's wake-up
        # time (which may have passed already).
        self._requeue("replica", key, plan.requeue_after if retry is None else retry, plan.wake)
        self.effects.replica_plan_applied(replica)

    def reconcile_restore(self, key: str) -> None:
        obs = self.effects.observe_restore(key)
        if isinstance(obs, Gone):
            self.forget_restore(key)
            return
        if obs is None:
            return
        with self._lock:
            plan = decide_restore(obs, self.admission, self.clock(), self.new_run_id, self.settings)
            self.admission = plan.queue
        retry = None
        if obs.replica is not None:
            restore = obs.restore
            retry = self._apply(
                plan.steps,
                obs.replica,
                restore,
                restore_owner(key),
                (),
                {restore.name: restore.effective_phase},
                {restore.name: restore.metadata.creation_timestamp},
            )
        self._requeue("restore", key, plan.requeue_after if retry is None else retry, plan.wake)

    def _requeue(
        self, kind: WorkKind, key: str, after: timedelta | None, wake: Iterable[str]
    ) -> None:
        for replica_key in wake:
            self.schedule("replica", replica_key, 0.0)
        if after is not None:
            self.schedule(kind, key, max(0.0, after.total_seconds()))

    # -- applying a plan ------------------------------------------------------------------
    def _apply(
        self,
        steps: Sequence[PlanStep],
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore | None,
        owner: str,
        secrets: Sequence[str],
        phases: Mapping[str, RestorePhase],
        created: Mapping[str, datetime | None],
    ) -> timedelta | None:
        """Apply a plan with the ordering contract. A step that failed recently is not tried
        before its backoff ends, and the rest of the plan waits with it. Returns when to
        look again if the plan stopped at a failing step (None: it ran to its end)."""
        kind = "restore" if restore is not None else "replica"
        # The conditions as this plan leaves them (None: as observed).
        conditions: list[Mapping[str, Any]] | None = None
        recovered: list[str] = []

        def apply(step: PlanStep) -> None:
            nonlocal conditions
            key: StepKey = (owner, step_name(step))
            with self._lock:
                if self._failures.backing_off(key, self._seconds()):
                    raise _BackingOff
            dispatch(
                self.effects,
                step,
                replica,
                restore,
                switchover_unsupported=self._switchover_unsupported,
                notify=self._notify,
            )
            self._count(step, phases, created)
            self._publish_failure(step, replica, restore, phases)
            if isinstance(step, PatchReplicaStatus) and "conditions" in step.patch:
                conditions = list(step.patch["conditions"] or [])
            with self._lock:
                gone = self._failures.succeeded(key)
            if gone is not None:
                log.info("%s for %s succeeded after %d failures", key[1], owner, gone.failures)
                recovered.append(f"{key[1]} for {owner} succeeded")

        def failed(step: PlanStep, exc: Exception) -> None:
            if isinstance(exc, _BackingOff):
                return  # the rest of the plan waits, as after the failure itself
            if not step.best_effort:
                self.metrics.reconciliation_errors.labels(kind).inc()
            message = f"{step_name(step)} for {owner} failed: {scrub(str(exc), secrets)}"
            with self._lock:
                outcome = self._failures.failed(
                    (owner, step_name(step)),
                    replica.key,
                    error_shape(exc),
                    message,
                    self._seconds(),
                )
            if not outcome.report:
                log.debug(
                    "%s (again, %d times; next try in %.0fs)",
                    message,
                    outcome.record.failures,
                    outcome.delay,
                )
                return
            log.log(
                logging.WARNING if step.best_effort else logging.ERROR,
                "%s; %s",
                message,
                RETRY_NOTE,
            )
            self._event(
                replica,
                EmitEvent(
                    EventType.WARNING,
                    EVENT_STEP_FAILED,
                    message,
                    restore.name if restore is not None else None,
                ),
            )

        complete = apply_in_order(steps, apply, failed)
        with self._lock:
            if complete:
                for (_, name), _ in self._failures.settle(owner, (step_name(s) for s in steps)):
                    recovered.append(f"{name} for {owner} is no longer planned")
            retry = None if complete else self._failures.retry_in(owner, self._seconds())
        self._show_step_failures(replica, conditions, complete, recovered)
        return None if retry is None else timedelta(seconds=retry)

    def _seconds(self) -> float:
        return self.clock().timestamp()

    def _count(
        self,
        step: PlanStep,
        phases: Mapping[str, RestorePhase],
        created: Mapping[str, datetime | None],
    ) -> None:
        """The restore metrics, counted as the step that makes each fact true succeeds."""
        match step:
            case CreateRestore():
                self.metrics.started.inc()
            case PatchRestoreStatus(restore=name, patch=patch):
                before = phases.get(name)
                phase = patch.get("phase")
                if phase == RestorePhase.FAILED and before is not RestorePhase.FAILED:
                    self.metrics.failed.inc()
                elif phase == RestorePhase.READY and before in (
                    RestorePhase.PENDING,
                    RestorePhase.RESTORING,
                ):
                    self.metrics.completed.inc()
            case PointServiceAt(restore=name):
                self.metrics.switchovers.inc()
                started = created.get(name)
                if started is not None:
                    self.metrics.duration.observe((self.clock() - started).total_seconds())
            case _:
                pass

    def _publish_failure(
        self,
        step: PlanStep,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore | None,
        phases: Mapping[str, RestorePhase],
    ) -> None:
        """`eventPublisher`: once the restore's failure is recorded, publish it (in the
        background, best effort: nothing it does reaches the plan)."""
        if self.event_publisher is None or restore is None:
            return
        if not isinstance(step, PatchRestoreStatus) or step.restore != restore.name:
            return
        if step.patch.get("phase") != RestorePhase.FAILED:
            return
        if phases.get(step.restore) is RestorePhase.FAILED:
            return
        reason = next(
            (
                str(c.get("message", ""))
                for c in step.patch.get("conditions") or []
                if c.get("type") == FAILED_CONDITION
            ),
            "",
        )
        try:
            self.event_publisher.restore_failed(
                replica, restore.name, restore.spec.snapshot, reason
            )
        except Exception as exc:
            log.warning("%s: restore failure not published: %s", replica.key, type(exc).__name__)

    def _event(self, replica: PostgresPhysicalReplica, event: EmitEvent) -> None:
        try:
            self.effects.emit_event(replica, event)
        except Exception as exc:
            log.warning("event %s for %s not recorded: %s", event.reason, replica.key, exc)

    # -- StepsSucceeding ------------------------------------------------------------------
    def _show_step_failures(
        self,
        replica: PostgresPhysicalReplica,
        conditions: Sequence[Mapping[str, Any]] | None,
        complete: bool,
        recovered: Sequence[str],
    ) -> None:
        """Keep the replica's `StepsSucceeding` condition level with the failure record:
        False (StepFailing) while one of its steps fails, True (Recovered) once a plan ran
        to its end with none failing. Written only when it differs, so once per change."""
        with self._lock:
            failing = self._failures.failing(replica.key)
        if conditions is None:
            conditions = [c.to_wire() for c in replica.status.conditions]
        have = next((c for c in conditions if c.get("type") == STEPS_CONDITION), None)
        want: tuple[ConditionStatus, str, str]
        if failing:
            want = ("False", STEP_FAILING, failing[0].message)
        elif complete and have is not None and have.get("status") == "False":
            want = ("True", RECOVERED, recovered[-1] if recovered else "every step succeeds again")
        else:
            return
        if have is not None and (have.get("status"), have.get("reason"), have.get("message")) == (
            want
        ):
            return
        self._set_steps_condition(replica.key, *want)

    def _set_steps_condition(
        self, key: str, status: ConditionStatus, reason: str, message: str
    ) -> None:
        # Read afresh: the observed copy may not hold the plan's own status patch yet, and
        # the whole list is written back.
        try:
            fresh = self.effects.read_replica(key)
            if fresh is None:
                return
            current = fresh.status.conditions
            have = next((c for c in current if c.type == STEPS_CONDITION), None)
            if have is not None and (have.status, have.reason, have.message) == (
                status,
                reason,
                message,
            ):
                return
            updated = set_condition(
                current,
                STEPS_CONDITION,
                status,
                reason,
                message,
                self.clock(),
                fresh.metadata.generation,
            )
            self.effects.patch_replica_status(fresh, {"conditions": [c.to_wire() for c in updated]})
        except Exception as exc:
            log.warning("%s: the %s condition was not written: %s", key, STEPS_CONDITION, exc)

    # -- the steps the shell orchestrates itself ------------------------------------------
    def _switchover_unsupported(
        self, replica: PostgresPhysicalReplica, step: RunSwitchoverStep
    ) -> None:
        patch, message = unsupported_switchover_step(step.kind, self.effects.runtime_name)
        wire = replica.status.to_wire()
        if any(wire.get(k) != v for k, v in patch.items()):
            self.effects.patch_replica_status(replica, patch)
        reported = (replica.key, step.restore, step.kind)
        with self._lock:
            if reported in self._unsupported:
                return
            self._unsupported.add(reported)
        self._event(replica, EmitEvent(EventType.WARNING, UNSUPPORTED_SWITCHOVER_EVENT, message))

    def _notify(self, replica: PostgresPhysicalReplica, restore_name: str) -> None:
        if self.notifier is None or not replica.spec.notifications:
            return
        found = self.effects.notification_input(replica, restore_name)
        if found is None:
            return
        info = found.replica.status.connection_info
        if info is None:
            log.info("%s: no connectionInfo yet, notifications skipped", replica.key)
            return
        self.notifier.notify(
            replica.key,
            found.replica,
            restore_name,
            found.restore.spec.snapshot,
            found.restore.status.postgres_version,
            info.to_wire(),
            found.password,
            found.secrets,
            found.unavailable,
        )
        with self._lock:
            self._notifying.add(replica.key)

    def _collect_notifications(self, replica: PostgresPhysicalReplica) -> None:
        """A finished round's outcome goes into `status.notifications`, once."""
        if self.notifier is None:
            return
        statuses = self.notifier.take_status(replica.key)
        if statuses:
            self.effects.patch_replica_status(
                replica, {"notifications": [s.to_wire() for s in statuses]}
            )
