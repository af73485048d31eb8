"""A small in-memory world that runs the core decisions in simulated time.

It plays both the cluster and the runtime: objects are kept in wire form (so every status
patch is applied as the JSON merge patch it is), plans are applied step by step with the
ordering contract of `pgro.core.plan`, restores progress when told to (work takes
`work_duration`, servers become ready `ready_after` after they are started), and objects
are reconciled when they change or when their requeue time comes, like a controller.

Invariants are checked as plans are applied; a violation is recorded, not raised, so a
test can report all of them.
"""

from __future__ import annotations

import copy
import heapq
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from pgro.api.data_checks import DataCheck, DataChecks
from pgro.api.phases import RestorePhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.merge_patch import merge_patch as apply_merge_patch
from pgro.core.observations import (
    DataCheckRun,
    ReplicaObservation,
    RestoreObservation,
    RestoreWork,
    SecretCheck,
    Server,
    ServerState,
    SnapshotListing,
    WorkState,
    record_listing_failure,
    record_listing_success,
)
from pgro.core.plan import (
    CheckData,
    CleanupRestoreWork,
    CreateRestore,
    DeleteRestore,
    DetectPostgresVersion,
    EmitEvent,
    EnsureReplicaResources,
    EnsureServer,
    ListSnapshots,
    MarkOutgoing,
    MarkReadyForTraffic,
    PatchReplicaStatus,
    PatchRestoreStatus,
    PointServiceAt,
    PrepareRestoreStorage,
    ProvisionUsers,
    ReindexAfterReset,
    ReportVerification,
    RunMigration,
    RunSwitchoverStep,
    StartRestoreWork,
    Step,
    SwitchoverStep,
)
from pgro.core.queue import AdmissionQueue
from pgro.core.restore_set import is_in_progress, is_live
from pgro.core.settings import DEFAULT_SETTINGS, ReconcilerSettings
from pgro.core.snapshot import Snapshot, SnapshotSource
from pgro.reconciler.effects import GONE, Gone, NotificationInput, ReplicaView
from pgro.reconciler.shell import Shell
from tests.fixtures import manifests

T0 = datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC)
GIB = 1024**3


def snapshot(
    id: str, start: datetime, size: int = GIB, host: str = "prod-db", postgres: bool = True
) -> Snapshot:
    return Snapshot(
        id=id,
        description="nightly" if postgres else "not a database",
        source=SnapshotSource(host=host, user_name="postgres", path="/var/lib/postgresql"),
        tags=MappingProxyType({"tag:kind": "postgres" if postgres else "files"}),
        start_time=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        size_bytes=size,
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, on a private copy of the patch: the world keeps documents in memory."""
    return apply_merge_patch(target, copy.deepcopy(patch))


def replica_doc(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A replica as the scenarios start from: not ephemeral, every six hours, no jitter."""
    defaults: dict[str, Any] = {
        "ephemeral": None,
        "schedule": "0 */6 * * *",
        "scheduleJitter": "0s",
        "switchoverGracePeriod": "10s",
    }
    return manifests.replica_doc(
        name,
        f"{name}-kopia",
        namespace=namespace,
        metadata={"uid": f"uid-{namespace}-{name}"},
        **{**defaults, **spec},
    )


class StepFailed(Exception):
    pass


@dataclass
class Run:
    started: datetime
    duration: timedelta


@dataclass
class Violation:
    at: datetime
    what: str


@dataclass
class World:
    now: datetime = T0
    limit: int = 2
    seed: int = 0
    work_duration: timedelta = timedelta(seconds=60)
    ready_after: timedelta | None = timedelta(seconds=30)
    # Deleted restores linger this long with a deletionTimestamp (finalizers).
    deletion_delay: timedelta = timedelta(0)
    listing_error: str | None = None
    # Restores of these snapshots fail: not PostgreSQL.
    bad_snapshots: set[str] = field(default_factory=set)
    # When set, every restore's work fails (an outage).
    restore_outage: bool = False
    # Critical steps fail when this says so (crash-between-steps simulation).
    fail_step: Callable[[Step], bool] = lambda step: False
    # `migrateTo`: how long the migrator runs, and whether its migrations fail (a finding).
    migration_duration: timedelta = timedelta(minutes=2)
    migration_fails: bool = False
    # The operator's data checks (`CheckData`): how long they run, and the snapshots whose
    # data they find damaged.
    data_check_duration: timedelta = timedelta(0)
    damaged_snapshots: set[str] = field(default_factory=set)
    # Snapshots whose restore resets the WAL (`fixes.reset_wal`), and how long the full
    # reindex after it runs (`ReindexAfterReset`).
    reset_snapshots: set[str] = field(default_factory=set)
    reindex_duration: timedelta = timedelta(minutes=20)

    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    restores: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)
    secrets: dict[str, SecretCheck | None] = field(default_factory=dict)
    listings: dict[str, SnapshotListing] = field(default_factory=dict)
    work: dict[str, Run] = field(default_factory=dict)
    servers: dict[str, datetime] = field(default_factory=dict)
    deleting: dict[str, datetime] = field(default_factory=dict)
    service: dict[str, str] = field(default_factory=dict)
    # Restore → when its migrator started: it outlives a controller restart, like its Job.
    migrations: dict[str, datetime] = field(default_factory=dict)
    migration_starts: list[str] = field(default_factory=list)
    # Restore → (when its data checks started, at which depth, of which snapshot): they
    # outlive a restart too.
    data_checks: dict[str, tuple[datetime, str, str]] = field(default_factory=dict)
    # Restore → when its full reindex started: a thread of the controller, lost on restart.
    reindexes: dict[str, datetime] = field(default_factory=dict)
    reindex_starts: list[tuple[datetime, str]] = field(default_factory=list)

    events: list[tuple[datetime, str, EmitEvent]] = field(default_factory=list)
    created: list[tuple[datetime, str, str]] = field(default_factory=list)
    deleted: list[tuple[datetime, str]] = field(default_factory=list)
    failures: list[tuple[datetime, str]] = field(default_factory=list)
    listing_calls: list[tuple[datetime, str]] = field(default_factory=list)
    reports: list[ReportVerification] = field(default_factory=list)
    outgoing: list[str] = field(default_factory=list)
    provisioned: list[str] = field(default_factory=list)
    switchover_steps: list[RunSwitchoverStep] = field(default_factory=list)
    replica_patches: list[tuple[datetime, str, dict[str, Any]]] = field(default_factory=list)
    restore_patches: int = 0
    passes: int = 0
    violations: list[Violation] = field(default_factory=list)
    in_progress_peak: int = 0

    settings: ReconcilerSettings = DEFAULT_SETTINGS
    # Parsed models, reused while their document is unchanged (parsing dominates run time).
    _replica_models: dict[str, tuple[Any, Any, PostgresPhysicalReplica]] = field(
        default_factory=dict
    )
    _restore_models: dict[str, tuple[Any, Any, PostgresPhysicalRestore]] = field(
        default_factory=dict
    )
    _due: list[tuple[datetime, int, str]] = field(default_factory=list)
    _due_at: dict[str, datetime] = field(default_factory=dict)
    _tick: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._run_ids = 0
        self.shell = self._new_shell()

    def _new_shell(self) -> Shell:
        return Shell(
            self,
            schedule=self._schedule,
            clock=lambda: self.now,
            limit=self.limit,
            random=self.rng.random,
            new_run_id=self._run_id,
            settings=self.settings,
        )

    @property
    def queue(self) -> AdmissionQueue:
        return self.shell.admission

    # Setup --------------------------------------------------------------------------

    def add_replica(self, doc: dict[str, Any], secret: SecretCheck | None = None) -> str:
        replica = PostgresPhysicalReplica.model_validate(doc)
        key = replica.key
        self.replicas[key] = replica.to_wire()
        self.secrets[key] = secret if secret is not None else SecretCheck.valid()
        self.wake(f"replica:{key}")
        return key

    def add_snapshot(self, snap: Snapshot, *, bad: bool = False) -> None:
        self.snapshots.append(snap)
        if bad:
            self.bad_snapshots.add(snap.id)

    def set_status(self, key: str, **fields: Any) -> None:
        """What another writer (the canopy syncer, a person) does to a replica's status."""
        self.replicas[key]["status"] = merge_patch(self.replicas[key].get("status", {}), fields)
        self.wake(f"replica:{key}")

    def set_spec(self, key: str, **fields: Any) -> None:
        self.replicas[key]["spec"] = merge_patch(self.replicas[key]["spec"], fields)
        self.wake(f"replica:{key}")

    def create_restore_by_hand(self, key: str, name: str, snapshot_id: str) -> None:
        replica = self.replica(key)
        snap = next(s for s in self.snapshots if s.id == snapshot_id)
        self.restores[name] = {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalRestore",
            "metadata": {
                "name": name,
                "namespace": replica.namespace,
                "labels": {"pgro.bes.au/replica": replica.name},
                "creationTimestamp": self.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "spec": {
                "replica": {"name": replica.name},
                "snapshot": snap.id,
                "snapshotSize": snap.size_bytes,
                "storageSize": "2Gi",
            },
        }
        self._touch_restore(name)

    def delete_restore_by_hand(self, name: str) -> None:
        if name in self.restores:
            self._delete(name)

    def restart(self) -> None:
        """A controller restart: memory is lost, the queue is rebuilt from observation."""
        self.shell = self._new_shell()
        self.shell.rebuild_admission()
        self.listings.clear()
        self.reindexes.clear()
        for key in self.replicas:
            self.wake(f"replica:{key}")
        for name in self.restores:
            self.wake(f"restore:{name}")

    # Reading ------------------------------------------------------------------------

    def replica(self, key: str) -> PostgresPhysicalReplica:
        doc = self.replicas[key]
        cached = self._replica_models.get(key)
        if cached is None or cached[0] is not doc or cached[1] != doc:
            model = PostgresPhysicalReplica.model_validate(doc)
            self._replica_models[key] = (doc, copy.deepcopy(doc), model)
            return model
        return cached[2]

    def restore(self, name: str) -> PostgresPhysicalRestore:
        doc = self.restores[name]
        cached = self._restore_models.get(name)
        if cached is None or cached[0] is not doc or cached[1] != doc:
            model = PostgresPhysicalRestore.model_validate(doc)
            self._restore_models[name] = (doc, copy.deepcopy(doc), model)
            return model
        return cached[2]

    def all_restores(self) -> list[PostgresPhysicalRestore]:
        return [self.restore(n) for n in self.restores]

    def restores_of(self, key: str) -> list[PostgresPhysicalRestore]:
        return [r for r in self.all_restores() if self._restore_key(r) == key]

    def created_for(self, key: str) -> list[str]:
        return [name for _, k, name in self.created if k == key]

    def event_reasons(self, key: str | None = None) -> list[str]:
        return [e.reason for _, k, e in self.events if key is None or k == key]

    @staticmethod
    def _restore_key(restore: PostgresPhysicalRestore) -> str:
        return f"{restore.namespace}/{restore.replica_name}"

    # Running ------------------------------------------------------------------------

    def wake(self, obj: str, when: datetime | None = None) -> None:
        when = self.now if when is None else max(when, self.now)
        current = self._due_at.get(obj)
        if current is not None and current <= when:
            return
        self._due_at[obj] = when
        self._tick += 1
        heapq.heappush(self._due, (when, self._tick, obj))

    def run_until(self, until: datetime, max_passes: int = 200_000) -> None:
        budget = max_passes
        while self._due:
            when, _, obj = self._due[0]
            if when > until:
                break
            heapq.heappop(self._due)
            if self._due_at.get(obj) != when:
                continue
            del self._due_at[obj]
            self.now = max(self.now, when)
            self._finish_deletions()
            self.reconcile(obj)
            budget -= 1
            if budget <= 0:
                raise AssertionError(f"no quiescence by {self.now}: reconcile loop")
        self.now = max(self.now, until)
        self._finish_deletions()

    def run_for(self, delta: timedelta, max_passes: int = 200_000) -> None:
        self.run_until(self.now + delta, max_passes)

    def reconcile(self, obj: str) -> None:
        kind, _, ident = obj.partition(":")
        self.passes += 1
        if kind == "replica":
            self.shell.reconcile("replica", ident)
        elif ident in self.restores:
            self.shell.reconcile("restore", f"{self.restore(ident).namespace}/{ident}")
        # A restore deleted since: the shell forgets it through observe_restore (GONE).

    def _schedule(self, kind: str, key: str, delay: float) -> None:
        ident = key.partition("/")[2] if kind == "restore" else key
        self.wake(f"{kind}:{ident}", self.now + timedelta(seconds=delay))

    def _run_id(self) -> str:
        self._run_ids += 1
        return f"run-{self._run_ids}"

    def _work(self, restore: PostgresPhysicalRestore) -> RestoreWork:
        run = self.work.get(restore.name)
        if run is None:
            return RestoreWork.not_started()
        if self.now < run.started + run.duration:
            return RestoreWork.running()
        if restore.spec.snapshot in self.bad_snapshots:
            return RestoreWork.failed("no PostgreSQL data directory (PG_VERSION) in the snapshot")
        if self.restore_outage:
            return RestoreWork.failed("the node running the restore was reclaimed")
        fixes = {"reset_wal": True} if restore.spec.snapshot in self.reset_snapshots else None
        return RestoreWork.succeeded("16", run.started + run.duration, fixes)

    def _server(self, name: str) -> Server:
        started = self.servers.get(name)
        if started is None or self.ready_after is None or self.now < started + self.ready_after:
            return Server(ServerState.NOT_READY)
        return Server(ServerState.READY)

    # Effects: what the shell asks of the world -----------------------------------------

    runtime_name = "the scenario world"
    # Recorded, not run: the scenarios check that they are planned in order.
    supported_switchover_steps = frozenset(SwitchoverStep)

    def _fault(self, step: Step) -> None:
        if self.fail_step(step):
            raise StepFailed(f"injected failure of {type(step).__name__}")

    def observe_replica(self, key: str) -> ReplicaView | Gone | None:
        if key not in self.replicas:
            return GONE
        replica = self.replica(key)
        return ReplicaView(
            ReplicaObservation(
                replica=replica,
                restores=self.restores_of(key),
                secret=None if replica.spec.canopy_source is not None else self.secrets.get(key),
                listing=self.listings.get(key),
            )
        )

    def observe_restore(self, key: str) -> RestoreObservation | Gone | None:
        name = key.partition("/")[2]
        if name not in self.restores:
            return GONE
        restore = self.restore(name)
        replica_key = self._restore_key(restore)
        return RestoreObservation(
            restore=restore,
            replica=self.replica(replica_key) if replica_key in self.replicas else None,
            work=self._work(restore),
            server=self._server(name),
            data_check=self._data_check(restore),
        )

    def _data_check(self, restore: PostgresPhysicalRestore) -> DataCheckRun | None:
        started = self.data_checks.get(restore.name)
        if started is None:
            return None
        at, depth, _ = started
        if self.now - at < self.data_check_duration:
            return DataCheckRun(WorkState.RUNNING)
        damaged = restore.spec.snapshot in self.damaged_snapshots
        check = DataCheck(
            name="btree",
            status="fail" if damaged else "pass",
            detail="1 problem in 3 indexes: app.public.orders_pkey block 1: bad"
            if damaged
            else "3 indexes checked, no damage found",
        )
        return DataCheckRun(
            WorkState.SUCCEEDED,
            DataChecks(
                depth=depth,
                verdict="damaged" if damaged else "passed",
                checks=[check],
            ),
        )

    def read_replica(self, key: str) -> PostgresPhysicalReplica | None:
        return self.replica(key) if key in self.replicas else None

    def restores_in_progress(self) -> dict[str, str]:
        return {
            self._restore_key(r): r.name
            for r in self.all_restores()
            if is_in_progress(r) and not r.metadata.is_deleting
        }

    def queue_positions(self) -> dict[str, int]:
        return {key: self.replica(key).status.queue_position or 0 for key in self.replicas}

    def patch_replica_status(
        self, replica: PostgresPhysicalReplica, patch: Mapping[str, Any]
    ) -> None:
        self._fault(PatchReplicaStatus(patch))
        key = replica.key
        doc = self.replicas[key]
        doc["status"] = merge_patch(doc.get("status", {}), dict(patch))
        # The patch must leave a status the model accepts.
        PostgresPhysicalReplica.model_validate(doc)
        self.replica_patches.append((self.now, key, dict(patch)))
        self.wake(f"replica:{key}")

    def patch_restore_status(
        self, replica: PostgresPhysicalReplica, name: str, patch: Mapping[str, Any]
    ) -> None:
        self._fault(PatchRestoreStatus(name, patch))
        if name not in self.restores:
            raise AssertionError(f"patching missing restore {name}")
        doc = self.restores[name]
        doc["status"] = merge_patch(doc.get("status", {}), dict(patch))
        PostgresPhysicalRestore.model_validate(doc)
        self.restore_patches += 1
        self._touch_restore(name)

    def emit_event(self, replica: PostgresPhysicalReplica, event: EmitEvent) -> None:
        self.events.append((self.now, replica.key, event))
        if event.reason == "RestoreFailed":
            self.failures.append((self.now, replica.key))

    def ensure_replica_resources(
        self, replica: PostgresPhysicalReplica, step: EnsureReplicaResources
    ) -> None:
        self._fault(step)

    def list_snapshots(self, replica: PostgresPhysicalReplica, step: ListSnapshots) -> None:
        self._fault(step)
        key = replica.key
        self.listing_calls.append((self.now, key))
        if self.listing_error is not None:
            self.listings[key] = record_listing_failure(
                self.listings.get(key), self.listing_error, self.now
            )
        else:
            self.listings[key] = record_listing_success(
                self.snapshots, self.now, previous=self.listings.get(key), wanted=step.wanted
            )
        self.wake(f"replica:{key}")

    def create_restore(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        self._fault(CreateRestore(restore))
        key = replica.key
        self._check_creation(key, restore)
        if restore.name in self.restores:
            raise StepFailed(f"restore {restore.name} already exists")
        doc = restore.to_wire()
        doc["metadata"]["creationTimestamp"] = self.now.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.restores[restore.name] = doc
        self.created.append((self.now, key, restore.name))
        self._touch_restore(restore.name)

    def delete_restore(self, replica: PostgresPhysicalReplica, step: DeleteRestore) -> None:
        self._fault(step)
        self._check_deletion(replica.key, step.restore)
        if step.restore in self.restores:
            self._delete(step.restore)

    def point_service_at(self, replica: PostgresPhysicalReplica, step: PointServiceAt) -> None:
        self._fault(step)
        self.service[replica.key] = step.restore

    def mark_outgoing(self, replica: PostgresPhysicalReplica, step: MarkOutgoing) -> None:
        self.outgoing.append(step.restore)

    def provision_users(self, replica: PostgresPhysicalReplica, step: ProvisionUsers) -> None:
        self._fault(step)
        self.provisioned.append(step.restore)

    def notification_input(
        self, replica: PostgresPhysicalReplica, restore_name: str
    ) -> NotificationInput | None:
        return None  # the world has no notification targets

    def report_verification(
        self, replica: PostgresPhysicalReplica, step: ReportVerification
    ) -> None:
        self.reports.append(step)

    def run_switchover_step(
        self, replica: PostgresPhysicalReplica, step: RunSwitchoverStep
    ) -> None:
        self._fault(step)
        self.switchover_steps.append(step)

    def prepare_restore_storage(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: PrepareRestoreStorage,
    ) -> None:
        self._fault(step)

    def start_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: StartRestoreWork,
    ) -> None:
        self._fault(step)
        if step.restore not in self.work:
            self.work[step.restore] = Run(self.now, self.work_duration)
            self.wake(f"restore:{step.restore}", self.now + self.work_duration)

    def cleanup_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: CleanupRestoreWork,
    ) -> None:
        self._fault(step)

    def detect_postgres_version(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: DetectPostgresVersion,
    ) -> None:
        self._fault(step)

    def ensure_server(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: EnsureServer,
    ) -> None:
        self._fault(step)
        if step.restore not in self.servers:
            self.servers[step.restore] = self.now
            if self.ready_after is not None:
                self.wake(f"restore:{step.restore}", self.now + self.ready_after)

    def mark_ready_for_traffic(
        self, replica: PostgresPhysicalReplica, step: MarkReadyForTraffic
    ) -> None:
        pass

    def check_data(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: CheckData,
    ) -> None:
        self._fault(step)
        if self.service.get(replica.key) == step.restore:
            self._violation(f"checking the data of {step.restore}, which the endpoint serves")
        if step.restore not in self.data_checks:
            self.data_checks[step.restore] = (self.now, step.depth, restore.spec.snapshot)
            self.wake(f"restore:{step.restore}", self.now + self.data_check_duration)

    def reindex_after_reset(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: ReindexAfterReset,
    ) -> None:
        self._fault(step)
        if step.restore not in self.servers:
            self._violation(f"reindexing {step.restore}, which has no server")
        started = self.reindexes.get(step.restore)
        if started is None:
            self.reindexes[step.restore] = self.now
            self.reindex_starts.append((self.now, step.restore))
            self.patch_restore_status(replica, step.restore, {"fullReindex": "running"})
            self.wake(f"restore:{step.restore}", self.now + self.reindex_duration)
        elif self.now - started >= self.reindex_duration:
            self.patch_restore_status(
                replica, step.restore, {"fullReindex": "complete", "fixes": {"reindex": True}}
            )

    def run_migration(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: RunMigration,
    ) -> None:
        self._fault(step)
        if self.service.get(replica.key) == step.restore:
            self._violation(f"migrating {step.restore}, which the stable endpoint serves")
        started = self.migrations.get(step.restore)
        if started is None:
            self.migrations[step.restore] = self.now
            self.migration_starts.append(step.restore)
            self.wake(f"restore:{step.restore}", self.now + self.migration_duration)
            return
        if self.now - started < self.migration_duration:
            return
        seconds = int(self.migration_duration.total_seconds())
        result: dict[str, Any] = {
            "totalElapsedSeconds": seconds,
            "dataBytesBefore": 1000,
            "dataBytesAfter": 1500,
            "timings": [{"name": "001-a.js", "elapsedSeconds": seconds}],
        }
        if self.migration_fails:
            result["failedMigration"] = "001-a.js"
        phase = "Failed" if self.migration_fails else "Succeeded"
        self.patch_restore_status(
            replica,
            step.restore,
            {
                "migrationJob": {"name": f"{step.restore}-migrate", "phase": phase},
                "migrationResult": result,
            },
        )

    def replica_plan_applied(self, replica: PostgresPhysicalReplica) -> None:
        pass

    def _touch_restore(self, name: str) -> None:
        self.wake(f"restore:{name}")
        doc = self.restores.get(name)
        if doc is not None:
            restore = PostgresPhysicalRestore.model_validate(doc)
            self.wake(f"replica:{self._restore_key(restore)}")
        self._record_peak()

    def _delete(self, name: str) -> None:
        restore = self.restore(name)
        key = self._restore_key(restore)
        if self.deletion_delay > timedelta(0):
            if name not in self.deleting:
                self.restores[name]["metadata"]["deletionTimestamp"] = self.now.strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
                self.deleting[name] = self.now + self.deletion_delay
                self.wake(f"replica:{key}", self.now + self.deletion_delay)
        else:
            self._remove(name)
        self.wake(f"replica:{key}")
        self.wake(f"restore:{name}")

    def _remove(self, name: str) -> None:
        restore = self.restore(name)
        del self.restores[name]
        self.deleting.pop(name, None)
        self.work.pop(name, None)
        self.servers.pop(name, None)
        self.deleted.append((self.now, name))
        self.wake(f"replica:{self._restore_key(restore)}")

    def _finish_deletions(self) -> None:
        for name, when in list(self.deleting.items()):
            if when <= self.now and name in self.restores:
                self._remove(name)

    def _record_peak(self) -> None:
        downloading = sum(
            1
            for r in self.all_restores()
            if r.status.phase in (RestorePhase.RESTORING, RestorePhase.READY)
        )
        self.in_progress_peak = max(self.in_progress_peak, downloading)

    # Invariants ---------------------------------------------------------------------

    def _violation(self, what: str) -> None:
        self.violations.append(Violation(self.now, what))

    def _check_creation(self, key: str, restore: PostgresPhysicalRestore) -> None:
        replica = self.replica(key)
        mine = self.restores_of(key)
        live = [r for r in mine if is_live(r)]
        if any(r.spec.snapshot == restore.spec.snapshot for r in live):
            self._violation(f"{key}: second live restore of {restore.spec.snapshot}")
        if len(live) + 1 > 3:
            self._violation(f"{key}: {len(live) + 1} live restores")
        if replica.spec.ephemeral and restore.spec.snapshot == replica.status.verified_snapshot_id:
            self._violation(f"{key}: restores its verified snapshot {restore.spec.snapshot} again")

    def _check_deletion(self, key: str, name: str) -> None:
        replica = self.replica(key)
        if name not in self.restores:
            return
        restore = self.restore(name)
        if (
            not replica.spec.ephemeral
            and name == replica.status.current_restore
            and restore.status.phase is RestorePhase.ACTIVE
        ):
            self._violation(f"{key}: deletes serving restore {name}")
