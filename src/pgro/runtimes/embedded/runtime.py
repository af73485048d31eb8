"""`pgro run`: the reconciler core applied to local processes, with state in SQLite.

One loop thread observes, decides (pure `core`) and applies plans step by step with the
ordering contract of `pgro.core.plan`. Slow work never runs on it: snapshot listings run
in a small thread pool, restores as child processes (`restore_worker`), servers as
supervised children. Every pass is level-triggered, so a restart at any point converges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from pgro.api.conditions import set_condition
from pgro.api.phases import RestorePhase
from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.canopy.client import CanopyClient
from pgro.core import reasons
from pgro.core.access import analytics_owned_schemas, effective_read_only
from pgro.core.observations import (
    Endpoint as ConnectionEndpoint,
)
from pgro.core.observations import (
    MigrationOutcome,
    ReplicaObservation,
    RestoreObservation,
    RestoreWork,
    SecretCheck,
    Server,
    SnapshotListing,
    VersionDetection,
    WorkState,
    record_listing_failure,
    record_listing_success,
)
from pgro.core.plan import (
    UNSUPPORTED_SWITCHOVER_EVENT,
    CleanupRestoreWork,
    CreateRestore,
    DeleteRestore,
    DetectPostgresVersion,
    EmitEvent,
    EnsureReplicaResources,
    EnsureServer,
    ListSnapshots,
    PatchReplicaStatus,
    PatchRestoreStatus,
    PointServiceAt,
    PrepareRestoreStorage,
    ReportVerification,
    RunSwitchoverStep,
    SendNotifications,
    StartRestoreWork,
    Step,
    SwitchoverStep,
    VerificationOutcome,
    apply_in_order,
    unsupported_switchover_step,
)
from pgro.core.queue import AdmissionQueue
from pgro.core.replica_decision import decide_replica
from pgro.core.restore_machine import decide_restore
from pgro.core.restore_set import is_in_progress
from pgro.core.secrets import scrub
from pgro.core.step_failures import (
    EVENT_STEP_FAILED,
    RECOVERED,
    RETRY_NOTE,
    STEP_FAILING,
    STEPS_CONDITION,
    StepFailure,
    StepFailures,
    error_shape,
    step_name,
)
from pgro.interrupts import deferred_interrupts
from pgro.kopia.repository import KopiaRepository
from pgro.notifications import Notifier
from pgro.observability import Health, Metrics
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.binaries import find_binaries
from pgro.postgres.health import check_health
from pgro.postgres.server import Endpoint, free_port, socket_dir_for
from pgro.postgres.users import RoleCredentials, provision_users
from pgro.processes import process_args, read_pid, spawn
from pgro.runtimes.embedded import restore_worker as worker
from pgro.runtimes.embedded.canopy import CanopyOptions, EmbeddedCanopy, is_canopy_managed
from pgro.runtimes.embedded.credentials import CredentialStore
from pgro.runtimes.embedded.manifest import (
    Manifest,
    ManifestError,
    kopia_credentials,
    load_manifests,
)
from pgro.runtimes.embedded.servers import ServerHandle, running_postmaster, stop_postmaster
from pgro.runtimes.embedded.state_dir import (
    PRIVATE,
    TRAVERSE,
    choose_run_root,
    ensure_dir,
    ensure_dirs,
    prepare_state_dir,
)
from pgro.runtimes.embedded.store import Store

log = logging.getLogger("pgro.run")

# A restore needs its `storageSize` free (the core already sizes it at 1.1x the snapshot,
# the reference's PVC sizing, which leaves room for WAL and temp files).
DISK_HEADROOM = 1.0
QUEUE_RECONCILE_EVERY = timedelta(seconds=60)
RUN_ROOT_SETTING = "run-root"


class StableEndpoint(Protocol):
    """The replica's fixed address (PgBouncer in production; see pgro.pgbouncer)."""

    def route(self, backend: Endpoint | None, users: Mapping[str, str]) -> None: ...

    def stop(self) -> object: ...


EndpointFactory = Callable[[str, Path, RunAccount, int, str], StableEndpoint]


@dataclass
class RunOptions:
    manifests: Sequence[Path]
    state_dir: Path
    keep_serving: bool = False
    tick: float = 1.0
    listen_host: str = "127.0.0.1"
    max_concurrent_restores: int = 2
    # `--canopy-url`: the client to canopy and the syncer's settings; None: no canopy.
    canopy: tuple[CanopyClient, CanopyOptions] | None = None


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    log: Any


@dataclass
class _EndpointState:
    endpoint: StableEndpoint
    port: int
    routed: tuple[Any, ...] | None = None


@dataclass
class _ReplicaRuntime:
    listing: SnapshotListing | None = None
    listing_job: Future[SnapshotListing] | None = None
    next_pass: float = 0.0


class StepFailed(Exception):
    pass


class _BackingOff(Exception):
    """The step failed recently; its retry time has not come (not a new failure)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Runtime:
    def __init__(
        self,
        options: RunOptions,
        endpoint_factory: EndpointFactory,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.options = options
        # Raises StateDirError (the CLI exits 2 with its message) before anything is made.
        self.state_dir = prepare_state_dir(options.state_dir)
        self.account = resolve_run_account()
        self.store = Store(self.state_dir / "state.db")
        # Only the path to restores and endpoints is for the run account (see state_dir).
        self.run_root = choose_run_root(
            self.state_dir, self.account, self.store.setting(RUN_ROOT_SETTING)
        )
        if self.store.setting(RUN_ROOT_SETTING) != str(self.run_root):
            self.store.set_setting(RUN_ROOT_SETTING, str(self.run_root))
        if self.run_root != self.state_dir:
            log.info(
                "%s cannot reach %s: restores and endpoints live in %s",
                self.account.name,
                self.state_dir,
                self.run_root,
            )
        for name in ("restores", "endpoints"):
            ensure_dir(self.run_root / name, TRAVERSE)
        ensure_dir(self.state_dir / "credentials", PRIVATE)
        ensure_dir(self.state_dir / "kopia", PRIVATE)
        self.credentials = CredentialStore(self.state_dir / "credentials")
        self.metrics = Metrics()
        self.health = Health()
        self.clock = clock
        self.endpoint_factory = endpoint_factory
        self.manifest = Manifest()
        self._manifest_mtimes: dict[Path, float] = {}
        self.reload_requested = threading.Event()
        self.replicas: dict[str, _ReplicaRuntime] = {}
        self.workers: dict[str, _Worker] = {}
        self.servers: dict[str, ServerHandle] = {}
        self.endpoints: dict[str, _EndpointState] = {}
        # A failing step is retried after 1 s, then 2, 4, … up to 5 minutes (per object
        # and step), and reported once per change of its error.
        self._step_failures = StepFailures()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="listing")
        self.random = random.Random()  # noqa: S311 - schedule jitter, not secrets
        self.queue = self._rebuild_queue()
        self._last_queue_reconcile = self.clock()
        self._completed_seen: set[str] = set()
        self.notifier = Notifier(self.metrics, clock=self.clock)
        self.canopy: EmbeddedCanopy | None = None
        if options.canopy is not None:
            client, canopy_options = options.canopy
            self.canopy = EmbeddedCanopy(
                client, canopy_options, self.store, clock=self.clock, rnd=self.random.random
            )

    # -- manifests ----------------------------------------------------------------------
    def load(self) -> None:
        """Read the manifests; on an error keep running with what was loaded before.

        The files' times are taken first, whether the load works or not: a manifest that
        does not load is reported once, and read again when it changes (or on SIGHUP).
        """
        self._manifest_mtimes = {p: _mtime(p) for p in self.options.manifests}
        try:
            manifest = load_manifests(self.options.manifests)
        except ManifestError as exc:
            log.error("manifest not reloaded: %s", exc, extra={"reason": exc.reason})
            return
        except Exception as exc:
            # Whatever a file holds, the replicas already running keep running.
            log.exception("manifest not reloaded: %s: %s", type(exc).__name__, exc)
            return
        self.manifest = manifest
        wanted = {r.key for r in manifest.replicas}
        for replica in manifest.replicas:
            if self.store.apply_replica(replica):
                log.info("replica %s loaded", replica.key)
            self.replicas.setdefault(replica.key, _ReplicaRuntime())
        for existing in self.store.replicas():
            # Canopy's replicas are the syncer's to remove, not the manifests'.
            if existing.key not in wanted and not is_canopy_managed(existing):
                self._remove_replica(existing.key)

    def _manifests_changed(self) -> bool:
        return any(_mtime(p) != self._manifest_mtimes.get(p) for p in self.options.manifests)

    def _remove_replica(self, key: str) -> None:
        log.info("replica %s is no longer in the manifests: removing it and its restores", key)
        self._step_failures.forget(lambda _, f: f.replica_key == key)
        for restore in self.store.restores(key):
            self._delete_restore(restore)
        state = self.endpoints.pop(key, None) or self._adopted_endpoint(key)
        if state is not None:
            state.endpoint.stop()
        self.notifier.cancel(key)
        # Its slot or place in line goes now, not after the queue's unbacked grace.
        self.queue = self.queue.release(key)
        self.store.delete_replica(key)
        self.replicas.pop(key, None)

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        # Whatever ends the loop (a stop, an exception), the children are stopped.
        try:
            self.load()
            self.health.set_ready(True)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if self.reload_requested.is_set() or self._manifests_changed():
                        self.reload_requested.clear()
                        self.load()
                    self.reconcile_once()
                except Exception:
                    log.exception("reconcile pass failed")
                self.metrics.reconciliation_duration.observe(time.monotonic() - started)
                self.health.beat()
                stop.wait(self.options.tick)
        finally:
            self.shutdown()

    def reconcile_once(self) -> None:
        now = self.clock()
        if now - self._last_queue_reconcile >= QUEUE_RECONCILE_EVERY:
            self.queue = self.queue.reconcile(self._in_progress(), now)
            self._last_queue_reconcile = now
        if self.canopy is not None:
            self.canopy.poll(self._remove_replica)
        for key in self.store.replica_keys():
            self._collect_notifications(key)
            self._reconcile_replica(key, now)
            for restore in self.store.restores(key):
                self._reconcile_restore(restore, now)
        self.metrics.queue_depth.set(len(self.queue.waiting))
        self.metrics.active_count.set(len(self.queue.slots))

    def _rebuild_queue(self) -> AdmissionQueue:
        positions = {
            r.key: (r.status.queue_position or 0) if r.status else 0 for r in self.store.replicas()
        }
        return AdmissionQueue.rebuild(
            self.options.max_concurrent_restores, self._in_progress(), positions, self.clock()
        )

    def _in_progress(self) -> dict[str, str]:
        return {
            f"{r.namespace}/{r.replica_name}": r.name
            for r in self.store.restores()
            if is_in_progress(r)
        }

    # -- replicas -----------------------------------------------------------------------
    def _secret_check(self, replica: PostgresPhysicalReplica) -> SecretCheck | None:
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                return SecretCheck.invalid(
                    "the replica's credentials come from canopy, but this pgro run has no "
                    "--canopy-url",
                    reasons.CANOPY_NOT_CONFIGURED,
                )
            return self.canopy.secret_check(replica)
        try:
            kopia_credentials(self.manifest, replica)
        except ManifestError as exc:
            if exc.reason == "SecretNotFound":
                return SecretCheck.not_found(str(exc))
            if exc.reason == "SecretInvalid":
                return SecretCheck.invalid(str(exc))
            return None
        return SecretCheck.valid()

    def _reconcile_replica(self, key: str, now: datetime) -> None:
        replica = self.store.replica(key)
        if replica is None:
            return
        rt = self.replicas.setdefault(key, _ReplicaRuntime())
        if rt.listing_job is not None and rt.listing_job.done():
            rt.listing = rt.listing_job.result()
            rt.listing_job = None
        endpoint = self.endpoints.get(key)
        obs = ReplicaObservation(
            replica=replica,
            restores=self.store.restores(key),
            secret=self._secret_check(replica),
            listing=rt.listing,
            endpoint=ConnectionEndpoint(self.options.listen_host, endpoint.port)
            if endpoint
            else None,
        )
        self.metrics.reconciliations.labels("replica").inc()
        plan = decide_replica(obs, self.queue, now, self.random.random)
        self.queue = plan.queue
        self._apply(plan.steps, replica, None)

    # -- restores -----------------------------------------------------------------------
    def _restore_dir(self, restore: PostgresPhysicalRestore) -> Path:
        return self.run_root / "restores" / restore.namespace / restore.name

    def _make_restore_dir(self, restore: PostgresPhysicalRestore) -> Path:
        # The server's account must traverse into it but not list or alter the rest.
        return ensure_dirs(self.run_root, ("restores", restore.namespace, restore.name), TRAVERSE)

    def _restore_key(self, restore: PostgresPhysicalRestore) -> str:
        return f"{restore.namespace}/{restore.name}"

    def _work(self, restore: PostgresPhysicalRestore) -> RestoreWork:
        rdir = self._restore_dir(restore)
        result = worker.read_result(rdir)
        if result is not None:
            if result.ok:
                return RestoreWork.succeeded(result.postgres_version, fixes=result.fixes)
            return RestoreWork.failed(f"{result.reason}: {result.error}")
        w = self.workers.get(self._restore_key(restore))
        if w is not None:
            rc = w.process.poll()
            if rc is None:
                return RestoreWork.running()
            tail = _tail(rdir / worker.LOG)
            return RestoreWork.failed(f"the restore process exited with code {rc}: {tail}")
        pid = read_pid(rdir / worker.PIDFILE)
        if pid is not None and _is_worker(pid):
            return RestoreWork.running()  # started by a pgro run that was killed
        return RestoreWork.not_started()

    def _reconcile_restore(self, restore: PostgresPhysicalRestore, now: datetime) -> None:
        key = f"{restore.namespace}/{restore.replica_name}"
        replica = self.store.replica(key)
        work = self._work(restore)
        if work.state is WorkState.SUCCEEDED and self._restore_key(restore) not in (
            self._completed_seen
        ):
            self._completed_seen.add(self._restore_key(restore))
            if (restore.effective_phase) in (RestorePhase.PENDING, RestorePhase.RESTORING):
                self.metrics.completed.inc()
        handle = self.servers.get(self._restore_key(restore))
        server = handle.observe() if handle is not None else Server()
        version = None
        if work.state is WorkState.SUCCEEDED:
            version = VersionDetection(WorkState.SUCCEEDED, work.postgres_version)
        obs = RestoreObservation(
            restore=restore,
            replica=replica,
            work=work,
            server=server,
            version_detection=version,
            migration=MigrationOutcome.unsupported("pgro run") if restore.spec.migrate_to else None,
        )
        self.metrics.reconciliations.labels("restore").inc()
        plan = decide_restore(obs, self.queue, now, lambda: str(uuid.uuid4()))
        self.queue = plan.queue
        if replica is not None:
            self._apply(plan.steps, replica, restore)

    # -- applying plans -----------------------------------------------------------------
    def _apply(
        self,
        steps: Sequence[Step],
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore | None,
    ) -> None:
        owner = self._restore_key(restore) if restore is not None else replica.key

        def apply(step: Step) -> None:
            key = (owner, step_name(step))
            if self._step_failures.backing_off(key, time.monotonic()):
                raise _BackingOff
            failure = self._step_failures.get(key)
            self._apply_step(step, replica, restore)
            if failure is not None:
                self._step_recovered(key, failure)

        def failed(step: Step, exc: Exception) -> None:
            if isinstance(exc, _BackingOff):
                return  # the rest of the plan waits, as after the failure itself
            if not step.best_effort:
                self.metrics.reconciliation_errors.labels("restore" if restore else "replica").inc()
            self._step_failed((owner, step_name(step)), replica, step, exc)

        apply_in_order(steps, apply, failed)

    def _step_failed(
        self, key: tuple[str, str], replica: PostgresPhysicalReplica, step: Step, exc: Exception
    ) -> None:
        """Back the step off; log, record an event and set the condition once per change."""
        message = f"{key[1]} for {key[0]} failed: {exc}"
        outcome = self._step_failures.failed(
            key, replica.key, error_shape(exc), message, time.monotonic()
        )
        if not outcome.report:
            log.debug(
                "%s (again, %d times; next try in %.0fs)",
                message,
                outcome.record.failures,
                outcome.delay,
            )
            return
        level = logging.WARNING if step.best_effort else logging.ERROR
        log.log(level, "%s; %s", message, RETRY_NOTE)
        self.store.add_event(replica.key, "Warning", EVENT_STEP_FAILED, message)
        self._set_steps_condition(replica.key, "False", STEP_FAILING, message)

    def _step_recovered(self, key: tuple[str, str], failure: StepFailure) -> None:
        self._step_failures.succeeded(key)
        log.info("%s for %s succeeded after %d failures", key[1], key[0], failure.failures)
        if not self._step_failures.failing(failure.replica_key):
            self._set_steps_condition(
                failure.replica_key, "True", RECOVERED, f"{key[1]} for {key[0]} succeeded"
            )

    def _set_steps_condition(self, replica_key: str, status: Any, reason: str, msg: str) -> None:
        replica = self.store.replica(replica_key)
        if replica is None:
            return
        current = replica.status.conditions if replica.status else []
        updated = set_condition(
            current, STEPS_CONDITION, status, reason, msg, self.clock(), replica.metadata.generation
        )
        self.store.patch_replica_status(replica_key, {"conditions": [c.to_wire() for c in updated]})

    def _apply_step(
        self,
        step: Step,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore | None,
    ) -> None:
        key = replica.key
        match step:
            case PatchReplicaStatus(patch=patch):
                self.store.patch_replica_status(key, patch)
            case PatchRestoreStatus(restore=name, patch=patch):
                rkey = f"{replica.namespace}/{name}"
                before = self.store.restore(rkey)
                self.store.patch_restore_status(rkey, patch)
                if patch.get("phase") == RestorePhase.FAILED and (
                    before is None or before.effective_phase is not RestorePhase.FAILED
                ):
                    self.metrics.failed.inc()
            case EmitEvent(type=type_, reason=reason, note=note, related=related):
                self.store.add_event(key, str(type_), reason, note, related)
                level = logging.WARNING if str(type_) == "Warning" else logging.INFO
                log.log(level, "%s %s: %s", key, reason, note)
            case EnsureReplicaResources():
                self._ensure_resources(replica)
            case ListSnapshots():
                self._start_listing(replica)
            case CreateRestore(restore=new):
                if not self.store.create_restore(new):
                    raise StepFailed(f"restore {new.metadata.name} already exists")
                self.metrics.started.inc()
            case DeleteRestore(restore=name):
                target = self.store.restore(f"{replica.namespace}/{name}")
                if target is not None:
                    self._delete_restore(target)
            case PointServiceAt(restore=name):
                self._point_service_at(replica, name)
            case PrepareRestoreStorage():
                assert restore is not None
                self._prepare_storage(restore)
            case StartRestoreWork(run_id=run_id):
                assert restore is not None
                self._start_work(replica, restore, run_id)
            case CleanupRestoreWork():
                assert restore is not None
                shutil.rmtree(self._restore_dir(restore) / "kopia", ignore_errors=True)
                self.workers.pop(self._restore_key(restore), None)
            case DetectPostgresVersion():
                pass  # the worker's result carries the version
            case EnsureServer():
                assert restore is not None
                self._ensure_server(replica, restore)
            case RunSwitchoverStep(kind=kind):
                self._unsupported_switchover_step(replica, kind)
            case SendNotifications(restore=name):
                self._send_notifications(key, name)
            case ReportVerification(restore=name, outcome=outcome):
                self._report_details(replica, name, outcome)
            case _:
                # The outgoing mark (best effort). RunMigration never comes: the restore
                # is observed as unable to migrate (MigrationOutcome.unsupported).
                log.debug("%s: %s is not handled by pgro run", key, type(step).__name__)

    def _send_notifications(self, key: str, restore_name: str) -> None:
        # Re-read: connectionInfo was written by the status patch just before this step.
        replica = self.store.replica(key)
        restore = self.store.restore(f"{key.split('/')[0]}/{restore_name}")
        if replica is None or restore is None:
            return
        info = replica.status.connection_info if replica.status else None
        if info is None:
            log.info("%s: no connectionInfo yet, notifications skipped", key)
            return
        analytics = self.credentials.ensure(key, replica.spec.analytics_username)
        self.notifier.notify(
            key,
            replica,
            restore_name,
            restore.spec.snapshot,
            restore.status.postgres_version if restore.status else None,
            info.to_wire(),
            analytics.password,
            self.manifest.secrets,
        )

    def _report_details(
        self, replica: PostgresPhysicalReplica, restore_name: str, outcome: VerificationOutcome
    ) -> None:
        """Add what only the running server can tell to the report the decision persisted:
        database sizes and the checks run on it (the repairs come from the restore's
        status). Delivery happens in `EmbeddedCanopy`, with retries."""
        if self.canopy is None:
            return
        fresh = self.store.replica(replica.key)
        if fresh is None:
            return
        details: dict[str, Any] = {}
        handle = self.servers.get(f"{replica.namespace}/{restore_name}")
        if outcome is VerificationOutcome.SUCCESS and handle is not None:
            health = check_health(handle.endpoint, "postgres")
            details["checks"] = [c.as_dict() for c in health.checks]
            if health.sizes:
                details["sizes"] = dict(health.sizes)
        self.canopy.add_details(fresh, restore_name, details or None)

    def _collect_notifications(self, key: str) -> None:
        statuses = self.notifier.take_status(key)
        if statuses:
            self.store.patch_replica_status(key, {"notifications": [s.to_wire() for s in statuses]})

    def _unsupported_switchover_step(
        self, replica: PostgresPhysicalReplica, kind: SwitchoverStep
    ) -> None:
        patch, message = unsupported_switchover_step(kind, "pgro run")
        if patch:
            self.store.patch_replica_status(replica.key, patch)
        self.store.add_event(replica.key, "Warning", UNSUPPORTED_SWITCHOVER_EVENT, message)

    # -- resources, endpoint ------------------------------------------------------------
    def _users(self, replica: PostgresPhysicalReplica) -> dict[str, RoleCredentials]:
        users = {
            replica.spec.analytics_username: self.credentials.ensure(
                replica.key, replica.spec.analytics_username
            )
        }
        for extra in replica.spec.extra_users:
            users[extra.name] = self.credentials.ensure(replica.key, extra.name)
        return users

    def _adopted_endpoint(self, key: str) -> _EndpointState | None:
        """The endpoint of a replica this run never routed (it left the manifest while pgro
        was stopped, its PgBouncer kept serving): built from its recorded port and run
        directory, so stopping it finds the PgBouncer through its pidfile."""
        stored = self.store.setting(f"endpoint-port/{key}")
        namespace, _, name = key.partition("/")
        run_dir = self.run_root / "endpoints" / namespace / name
        if not stored or not name or not run_dir.is_dir():
            return None
        endpoint = self.endpoint_factory(
            key, run_dir, self.account, int(stored), self.options.listen_host
        )
        return _EndpointState(endpoint=endpoint, port=int(stored))

    def _endpoint(self, replica: PostgresPhysicalReplica) -> _EndpointState:
        state = self.endpoints.get(replica.key)
        if state is not None:
            return state
        setting = f"endpoint-port/{replica.key}"
        stored = self.store.setting(setting)
        port = int(stored) if stored else free_port(self.options.listen_host)
        if not stored:
            self.store.set_setting(setting, str(port))
        ensure_dirs(self.run_root, ("endpoints", replica.namespace), TRAVERSE)
        run_dir = self.run_root / "endpoints" / replica.namespace / replica.name
        endpoint = self.endpoint_factory(
            replica.key, run_dir, self.account, port, self.options.listen_host
        )
        state = _EndpointState(endpoint=endpoint, port=port)
        self.endpoints[replica.key] = state
        return state

    def _route(self, replica: PostgresPhysicalReplica, restore_name: str | None) -> None:
        state = self._endpoint(replica)
        backend = None
        if restore_name is not None:
            handle = self.servers.get(f"{replica.namespace}/{restore_name}")
            if handle is None:
                # Not adopted yet (the first pass after a restart reaches the replica
                # before its restores): leave the endpoint as it is, still serving the
                # running server, instead of refusing logins until the next pass.
                return
            backend = handle.endpoint
        users = {name: c.password for name, c in self._users(replica).items()}
        wanted = (backend, tuple(sorted(users.items())))
        if state.routed == wanted:
            return
        state.endpoint.route(backend, users)
        state.routed = wanted

    def _ensure_resources(self, replica: PostgresPhysicalReplica) -> None:
        current = replica.status.current_restore if replica.status else None
        self._route(replica, current)

    def _point_service_at(self, replica: PostgresPhysicalReplica, name: str) -> None:
        handle = self.servers.get(f"{replica.namespace}/{name}")
        if handle is None:
            raise StepFailed(f"restore {name} has no running server to switch to")
        self._route(replica, name)
        self.metrics.switchovers.inc()
        restore = self.store.restore(f"{replica.namespace}/{name}")
        if restore is not None and restore.metadata.creation_timestamp is not None:
            created = restore.metadata.creation_timestamp
            self.metrics.duration.observe((self.clock() - created).total_seconds())

    # -- restore work -------------------------------------------------------------------
    def _prepare_storage(self, restore: PostgresPhysicalRestore) -> None:
        rdir = self._make_restore_dir(restore)
        if worker.read_result(rdir) is not None:
            return
        needed = int(parse_quantity(str(restore.spec.storage_size)) * DISK_HEADROOM)
        free = shutil.disk_usage(rdir).free
        if needed > free:
            result = worker.WorkResult(
                ok=False,
                reason="InsufficientDisk",
                error=f"the restore needs {needed // 2**20} MiB (storageSize) but "
                f"{rdir.parent} has {free // 2**20} MiB free",
            )
            _write_private(rdir / worker.RESULT, json.dumps(result.__dict__))

    def _start_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        run_id: str | None = None,
    ) -> None:
        if self._work(restore).state is not WorkState.NOT_STARTED:
            return
        proxy: dict[str, Any] | None = None
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                raise StepFailed("canopy replicas need pgro run --canopy-url")
            # The run id from the step: this pass persisted it, `restore` predates that.
            creds, proxy = self.canopy.restore_job(replica, restore, run_id)
        else:
            creds = kopia_credentials(self.manifest, replica)
        rdir = self._make_restore_dir(restore)
        job = {
            "restoreDir": str(rdir),
            "snapshot": restore.spec.snapshot,
            "snapshotSize": restore.spec.snapshot_size,
            "snapshotTime": restore.spec.snapshot_time,
            "readOnly": effective_read_only(replica, restore),
            "credentials": worker.credentials_to_json(creds),
            "canopyProxy": proxy,
        }
        logf = os.fdopen(
            os.open(
                rdir / worker.LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
            ),
            "ab",
        )
        with deferred_interrupts():
            proc = spawn(
                [sys.executable, "-m", "pgro.runtimes.embedded.restore_worker"],
                # pgro run gone (even kill -9): the worker unwinds, and its kopia and
                # canopy-proxy go with it; the next run restarts the restore from scratch.
                death_signal=signal.SIGTERM,
                stdin=subprocess.PIPE,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (rdir / worker.PIDFILE).write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        self.workers[self._restore_key(restore)] = _Worker(proc, logf)
        log.info("restore %s: downloading snapshot %s", restore.name, restore.spec.snapshot)

    def _ensure_server(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        rkey = self._restore_key(restore)
        handle = self.servers.get(rkey)
        if handle is None:
            result = worker.read_result(self._restore_dir(restore))
            if result is None or not result.ok or not result.pgdata:
                raise StepFailed(f"restore {restore.name} has no restored data yet")
            rdir = self._restore_dir(restore)
            port_setting = f"server-port/{rkey}"
            stored = self.store.setting(port_setting)
            port = int(stored) if stored else free_port()
            if not stored:
                self.store.set_setting(port_setting, str(port))
            users = self._users(replica)
            analytics = users[replica.spec.analytics_username]
            extras = [(u, users[u.name]) for u in replica.spec.extra_users if u.name in users]
            read_only = effective_read_only(replica, restore)
            owned_schemas = analytics_owned_schemas(replica, restore)

            def provision(endpoint: Endpoint) -> None:
                report = provision_users(
                    lambda db: endpoint.conninfo(db, "postgres"),
                    analytics=analytics,
                    extra_users=extras,
                    read_only=read_only,
                    persistent_schemas=owned_schemas,
                )
                for note in report.catalog_notes:
                    log.warning("restore %s: %s", restore.name, note)

            handle = ServerHandle(
                pgdata=Path(result.pgdata),
                socket_dir=self._socket_dir(rkey, rdir),
                port=port,
                log_path=rdir / "postgres.log",
                binaries=find_binaries(result.postgres_version or ""),
                account=self.account,
                provision=provision,
            )
            self.servers[rkey] = handle
        handle.ensure()

    def _socket_dir(self, rkey: str, rdir: Path) -> Path:
        """The server's socket directory: chosen once by pgro and remembered, so an adopted
        server is reached (and its directory removed) by pgro's record, never by what
        `postmaster.pid` (written by the run account) says."""
        setting = f"server-socket/{rkey}"
        stored = self.store.setting(setting)
        if stored:
            path = Path(stored)
            if path == rdir / "run" or _our_tmp_socket_dir(path, self.account.uid):
                return path
        path = socket_dir_for(rdir / "run")
        self.store.set_setting(setting, str(path))
        return path

    def _delete_restore(self, restore: PostgresPhysicalRestore) -> None:
        rkey = self._restore_key(restore)
        self._step_failures.forget(lambda k, _: k[0] == rkey)
        w = self.workers.pop(rkey, None)
        if w is not None and w.process.poll() is None:
            w.process.terminate()
            w.process.wait(30)
        pid = read_pid(self._restore_dir(restore) / worker.PIDFILE)
        if pid is not None and _is_worker(pid):
            os.kill(pid, signal.SIGTERM)
        handle = self.servers.pop(rkey, None)
        remembered = self.store.setting(f"server-socket/{rkey}")
        if handle is None:
            # Possibly left running by an earlier pgro run: adopt it only to stop it (if
            # /proc shows it is that server, whatever postmaster.pid claims).
            result = worker.read_result(self._restore_dir(restore))
            if result is not None and result.pgdata:
                pgdata = Path(result.pgdata)
                found = running_postmaster(pgdata, self.account)
                if found is not None:
                    stop_postmaster(found.pid, pgdata, self.account)
        else:
            handle.stop()
        if remembered:
            _remove_outside(Path(remembered), self._restore_dir(restore))
        shutil.rmtree(self._restore_dir(restore), ignore_errors=True)
        self.store.delete_setting(f"server-port/{rkey}")
        self.store.delete_setting(f"server-socket/{rkey}")
        self.store.delete_restore(rkey)
        log.info("restore %s deleted", rkey)

    # -- listings -----------------------------------------------------------------------
    def _start_listing(self, replica: PostgresPhysicalReplica) -> None:
        rt = self.replicas.setdefault(replica.key, _ReplicaRuntime())
        if rt.listing_job is not None:
            return
        canopy = self.canopy
        access: Any = None
        if replica.spec.canopy_source is not None:
            if canopy is None:
                raise StepFailed("canopy replicas need pgro run --canopy-url")
            access = canopy.listing(replica)
        else:
            access = contextlib.nullcontext(kopia_credentials(self.manifest, replica))
        previous = rt.listing
        state = (
            self.state_dir / "kopia" / f"{replica.namespace}-{replica.name}-{uuid.uuid4().hex[:8]}"
        )

        def list_now() -> SnapshotListing:
            secrets: list[str] = []
            try:
                with access as creds, KopiaRepository(creds, state) as repo:
                    secrets = creds.secret_values()
                    snapshots = repo.list_snapshots()
                return record_listing_success(snapshots, self.clock())
            except Exception as exc:
                # Shown in a condition message: never with a secret in it.
                error = scrub(str(exc), secrets)
                return record_listing_failure(previous, error, self.clock())

        rt.listing_job = self.pool.submit(list_now)

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        self.health.set_ready(False)
        for key, w in list(self.workers.items()):
            if w.process.poll() is None:
                log.info("stopping restore work %s (it restarts on the next run)", key)
                w.process.terminate()
        for w in self.workers.values():
            try:
                w.process.wait(30)
            except subprocess.TimeoutExpired:
                w.process.kill()
        if not self.options.keep_serving:
            for key, handle in list(self.servers.items()):
                log.info("stopping PostgreSQL of %s", key)
                handle.stop()
                _remove_outside(handle.socket_dir, self.run_root)
            for state in self.endpoints.values():
                state.endpoint.stop()
        self.notifier.shutdown()
        if self.canopy is not None:
            self.canopy.shutdown()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _is_worker(pid: int) -> bool:
    args = process_args(pid)
    return args is not None and "pgro.runtimes.embedded.restore_worker" in args


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _our_tmp_socket_dir(path: Path, run_uid: int) -> bool:
    """A remembered /tmp socket directory that is still the one pgro made (not replaced by
    a link or someone else's directory; /tmp is everybody's)."""
    if path.parent != Path("/tmp") or not path.name.startswith("pgro-sock-"):  # noqa: S108
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (os.geteuid(), run_uid)


def _remove_outside(socket_dir: Path, restore_dir: Path) -> None:
    """Remove a socket directory pgro made in /tmp for a too-long path (see socket_dir_for).

    Only ever called with a path pgro chose and remembered, never one read from a file."""
    if not socket_dir.is_relative_to(restore_dir) and socket_dir.name.startswith("pgro-sock-"):
        shutil.rmtree(socket_dir, ignore_errors=True)
