"""`pgro operator`: the reconciler core applied to a Kubernetes cluster.

Watches (replicas, restores, and the Jobs, Deployments and Pods they own, label-selected)
feed caches and a keyed work queue; workers take one key at a time (never the same key on
two workers), observe from the caches, decide with `pgro.core` (pure, shared with
`pgro run`) and apply the plan step by step with the ordering contract of
`pgro.core.plan`. A periodic resync re-queues everything, so a missed event only delays.
Leadership is held on a Lease: a standby watches only its ConfigMap and decides nothing.
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from pgro.api.conditions import ConditionStatus, set_condition
from pgro.api.crds import crd_documents
from pgro.api.names import (
    LABEL_READY_FOR_TRAFFIC,
    LABEL_REPLICA,
    LABEL_RESTORE,
    REPLICA_KIND,
    RESTORE_KIND,
    admin_creds_secret_name,
    extra_user_secret_name,
    kopia_cache_pvc_name,
    replica_creds_secret_name,
    restore_job_name,
)
from pgro.api.notifications import (
    LABEL_NOTIFICATION_SECRET,
    NOTIFICATION_SECRET_OPT_IN,
    NotificationConfig,
    SecretHeaderValue,
)
from pgro.api.phases import RestorePhase
from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import (
    KopiaCredentials,
    SecretInvalid,
    decode_secret_data,
    parse_kopia_secret,
)
from pgro.api.verification import PendingVerificationReport
from pgro.core import reasons
from pgro.core import verification_reports as vr
from pgro.core.access import analytics_owned_schemas, effective_read_only
from pgro.core.observations import (
    MigrationOutcome,
    ReplicaObservation,
    RestoreObservation,
    RestoreWork,
    SecretCheck,
    Server,
    ServerState,
    VersionDetection,
    WorkState,
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
    MarkReadyForTraffic,
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
from pgro.core.queue import AdmissionQueue, promoted_keys
from pgro.core.replica_decision import decide_replica
from pgro.core.restore_machine import decide_restore
from pgro.core.restore_set import is_in_progress
from pgro.core.secrets import scrub
from pgro.core.settings import ReconcilerSettings
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
from pgro.notifications import Notifier
from pgro.observability import Health, Metrics
from pgro.postgres.health import check_health
from pgro.postgres.server import make_conninfo
from pgro.postgres.users import RoleCredentials, generate_password, provision_users
from pgro.reconciler.listing import ListingCache
from pgro.reconciler.workqueue import WorkQueue
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.canopy import CanopySettings, OperatorCanopy
from pgro.runtimes.kubernetes.config import parse_operator_config
from pgro.runtimes.kubernetes.informer import Informer
from pgro.runtimes.kubernetes.kube import KubeApi, is_conflict
from pgro.runtimes.kubernetes.leader import LeaderElector
from pgro.runtimes.kubernetes.restore_job import parse_fixes, parse_message
from pgro.runtimes.kubernetes.scripts import ADMIN_ROLE

log = logging.getLogger("pgro.operator")

CONFIGMAP_NAME: Final = "postgres-restore-operator-config"
EVENT_REPORTER: Final = "postgres-restore-operator"
QUEUE_RECONCILE_EVERY: Final = 60.0
# How long a restore's pod may take to answer SQL once its Deployment is Ready.
PROVISION_CONNECT_TIMEOUT_S: Final = 10
PROVISION_RETRY_S: Final = 10.0

# (controller, namespace, name): "replica" or "restore".
WorkKey = tuple[str, str, str]


class StepFailed(Exception):
    pass


class _BackingOff(Exception):
    """The step failed recently; its retry time has not come (not a new failure)."""


NOTIFICATION_SECRET_REFUSED: Final = "NotificationSecretRefused"  # noqa: S105 - an event reason


@dataclass(frozen=True)
class NotificationSecrets:
    """The header Secrets a notification round may use, and those it may not (with why)."""

    found: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    missing: dict[tuple[str, str], str] = field(default_factory=dict)

    def unavailable(self) -> dict[tuple[str, str], str]:
        return {**self.missing, **self.refused}


def notification_secrets(
    namespace: str,
    targets: Iterable[NotificationConfig],
    get_secret: Callable[[str, str], Mapping[str, Any] | None],
) -> NotificationSecrets:
    """Read the Secrets named by the targets' header `secretKeyRef`s, in the replica's
    namespace, but use only those labelled `pgro.bes.au/notification-secret: "true"`.

    The operator may read every Secret in the cluster and sends a header's value to a URL
    the replica's author chose: without the opt-in, write access to a replica would be
    read access to every Secret in its namespace (a confused deputy).
    """
    out = NotificationSecrets()
    for target in targets:
        for value in (target.headers or {}).values():
            if not isinstance(value, SecretHeaderValue):
                continue
            name = value.secret_key_ref.name
            key = (namespace, name)
            if key in out.found or key in out.refused or key in out.missing:
                continue
            doc = get_secret(namespace, name)
            if doc is None:
                out.missing[key] = (
                    f"Secret {namespace}/{name} not found; create it (labelled "
                    f"{NOTIFICATION_SECRET_OPT_IN}) or fix the header's secretKeyRef"
                )
            elif (doc.get("metadata", {}).get("labels") or {}).get(
                LABEL_NOTIFICATION_SECRET
            ) != "true":
                out.refused[key] = (
                    f"Secret {namespace}/{name} is not labelled {NOTIFICATION_SECRET_OPT_IN}, "
                    "so the operator does not read it for notifications (editing a replica "
                    "must not expose every Secret in the namespace); if it is meant for "
                    f"notification headers, run: kubectl label secret -n {namespace} {name} "
                    f"{LABEL_NOTIFICATION_SECRET}=true"
                )
            else:
                out.found[key] = doc
    return out


@dataclass
class OperatorOptions:
    namespace: str
    identity: str
    default_image: str
    install_crds: bool = True
    leader_election: bool = True
    workers: int = 2
    resync_s: float = 60.0
    settings: ReconcilerSettings = field(default_factory=ReconcilerSettings)
    state_dir: Path | None = None
    lease_duration_s: float = 15.0
    renew_every_s: float = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _micro(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _true_conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = obj.get("status", {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


def _restore_owner(ns: str, name: str) -> str:
    """The object a restore plan's failing steps are recorded under."""
    return f"restore {ns}/{name}"


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels: Mapping[str, str] = obj.get("metadata", {}).get("labels") or {}
    return labels


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") == "Running" and "Ready" in _true_conditions(pod)


def _termination_message(pod: Mapping[str, Any]) -> str:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated and terminated.get("message"):
            return str(terminated["message"])
    return ""


@dataclass(frozen=True)
class _PodEndpoint:
    """A restore's PostgreSQL over TCP, as the operator's admin role."""

    host: str
    password: str
    port: int = 5432

    def conninfo(self, dbname: str, user: str) -> str:
        return make_conninfo(
            host=self.host,
            port=str(self.port),
            user=user,
            password=self.password,
            dbname=dbname,
            connect_timeout=str(PROVISION_CONNECT_TIMEOUT_S),
            sslmode="prefer",
        )


class Operator:
    def __init__(
        self,
        api: KubeApi,
        options: OperatorOptions,
        *,
        clock: Callable[[], datetime] = _utcnow,
        metrics: Metrics | None = None,
        health: Health | None = None,
        canopy: CanopySettings | None = None,
    ) -> None:
        self.api = api
        self.options = options
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.config, _ = parse_operator_config(None, default_image=options.default_image)
        self.queue: WorkQueue[WorkKey] = WorkQueue()
        self.random = random.Random()  # noqa: S311 - schedule jitter, not secrets
        self.admission = AdmissionQueue(limit=self.config.max_concurrent_restores)
        self._decide_lock = threading.Lock()
        self.listing = ListingCache(
            lambda key: self.queue.add(("replica", *key.partition("/")[::2])),
            clock,
            state_dir=options.state_dir,
        )
        self.notifier = Notifier(self.metrics, clock=clock)
        self._notifying: set[tuple[str, str]] = set()
        self._ensured: dict[str, tuple[Any, ...]] = {}
        self._applied: dict[str, str] = {}
        self._provisioned: dict[str, str] = {}
        self._provisioning: set[str] = set()
        self._provision_lock = threading.Lock()
        self._bad_spec_seen: set[tuple[str, str]] = set()
        self._completed_seen: set[str] = set()
        # Steps failing in a row, per (object, step): retried 1 s, 2 s, … up to 5 minutes
        # apart and reported once per change (pgro.core.step_failures). Workers for a
        # replica and for its restores run at once and share it.
        self._step_failures = StepFailures()
        self._step_failures_lock = threading.Lock()
        self._stop = threading.Event()
        self.replicas = Informer(api, REPLICA_KIND, self._on_replica)
        self.restores = Informer(api, RESTORE_KIND, self._on_restore)
        self.jobs = Informer(api, "Job", self._on_owned, labels={LABEL_RESTORE: None})
        self.deployments = Informer(api, "Deployment", self._on_owned, labels={LABEL_RESTORE: None})
        self.pods = Informer(api, "Pod", self._on_owned, labels={LABEL_RESTORE: None})
        self.configmap = Informer(
            api,
            "ConfigMap",
            self._on_config,
            namespace=options.namespace,
            fields={"metadata.name": CONFIGMAP_NAME},
        )
        self.canopy: OperatorCanopy | None = None
        if canopy is not None:
            self.canopy = OperatorCanopy.connect(
                api,
                canopy,
                state_dir=options.state_dir or Path(tempfile.gettempdir()) / "pgro-operator",
                replicas=self.replicas.items,
            )
        self.elector = LeaderElector(
            api,
            options.namespace,
            options.identity,
            lease_duration=options.lease_duration_s,
            renew_every=options.renew_every_s,
        )

    # -- lifecycle --------------------------------------------------------------------
    def install_crds(self) -> None:
        for crd in crd_documents():
            self.api.apply(crd)
        log.info("CustomResourceDefinitions applied")

    def run(self, stop: threading.Event) -> int:
        """Run until `stop`; returns the process exit code (1 if leadership was lost)."""
        self._stop = stop
        if self.options.install_crds:
            self.install_crds()
        if self.canopy is not None:
            self.canopy.serve()
        self.configmap.start()
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heartbeat.start()
        if self.options.leader_election:
            threading.Thread(
                target=self.elector.run, args=(stop,), name="leader", daemon=True
            ).start()
            # A standby is healthy: it serves metrics and waits to take over.
            self.health.set_ready(True)
            log.info(
                "waiting for leadership (lease %s/%s)", self.options.namespace, self.elector.name
            )
            while not stop.is_set() and not self.elector.is_leader.wait(0.5):
                pass
            if stop.is_set():
                self._shutdown([])
                return 0
        return self._lead(stop)

    def _lead(self, stop: threading.Event) -> int:
        informers = [self.replicas, self.restores, self.jobs, self.deployments, self.pods]
        for informer in informers:
            informer.start()
        for informer in informers:
            while not informer.synced.wait(0.5):
                if stop.is_set() or self.elector.lost.is_set():
                    self._shutdown(informers)
                    return 1 if self.elector.lost.is_set() else 0
        self._rebuild_admission()
        if self.canopy is not None:
            self.canopy.start_syncer()
        self.health.set_ready(True)
        log.info(
            "leading: %d replicas, %d restores",
            len(self.replicas.items()),
            len(self.restores.items()),
        )
        workers = [
            threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
            for i in range(max(1, self.options.workers))
        ]
        for w in workers:
            w.start()
        self._enqueue_all()
        last_resync = last_queue = time.monotonic()
        while not stop.is_set() and not self.elector.lost.is_set():
            stop.wait(1.0)
            now = time.monotonic()
            if now - last_resync >= self.options.resync_s:
                self._enqueue_all()
                last_resync = now
            if now - last_queue >= QUEUE_RECONCILE_EVERY:
                self._reconcile_admission()
                last_queue = now
            for key in list(self._notifying):
                if not self.notifier.running(f"{key[0]}/{key[1]}"):
                    self._notifying.discard(key)
                    self.queue.add(("replica", *key))
        self.queue.close()
        for w in workers:
            w.join(timeout=30)
        self._shutdown(informers)
        return 1 if self.elector.lost.is_set() else 0

    def _shutdown(self, informers: Sequence[Informer]) -> None:
        self.health.set_ready(False)
        for informer in (*informers, self.configmap):
            informer.stop()
        if self.options.leader_election:
            self.elector.release()
        self.notifier.shutdown()
        self.listing.shutdown()
        if self.canopy is not None:
            self.canopy.stop()
        log.info("operator stopped")

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            self.health.beat()
            self._stop.wait(5.0)

    # -- events from the caches -------------------------------------------------------
    def _on_replica(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        self.queue.add(("replica", meta.get("namespace", ""), meta.get("name", "")))

    def _on_restore(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        ns = meta.get("namespace", "")
        self.queue.add(("restore", ns, meta.get("name", "")))
        replica = (obj.get("spec", {}).get("replica") or {}).get("name")
        if replica:
            self.queue.add(("replica", ns, replica))

    def _on_owned(self, obj: dict[str, Any]) -> None:
        ns = obj.get("metadata", {}).get("namespace", "")
        labels = _labels(obj)
        if labels.get(LABEL_RESTORE):
            self.queue.add(("restore", ns, labels[LABEL_RESTORE]))
        if labels.get(LABEL_REPLICA):
            self.queue.add(("replica", ns, labels[LABEL_REPLICA]))

    def _on_config(self, obj: dict[str, Any]) -> None:
        current = self.configmap.get(self.options.namespace, CONFIGMAP_NAME)
        data = current.get("data") if current is not None else None
        config, warnings = parse_operator_config(data, default_image=self.options.default_image)
        for warning in warnings:
            log.warning("ConfigMap %s: %s", CONFIGMAP_NAME, warning)
        if current is None:
            log.warning("ConfigMap %s is gone: operator defaults apply", CONFIGMAP_NAME)
        self.config = config
        with self._decide_lock:
            self.admission = self.admission.with_limit(config.max_concurrent_restores)

    def _enqueue_all(self) -> None:
        # Forget what was ensured and applied, so each resync re-checks it: a deleted
        # credentials Secret or Service, or a Deployment edited by hand, is put right.
        self._ensured.clear()
        self._applied.clear()
        for obj in self.replicas.items():
            self._on_replica(obj)
        for obj in self.restores.items():
            meta = obj.get("metadata", {})
            self.queue.add(("restore", meta.get("namespace", ""), meta.get("name", "")))

    # -- the admission queue ----------------------------------------------------------
    def _restore_models(self, raws: Iterable[Mapping[str, Any]]) -> list[PostgresPhysicalRestore]:
        out = []
        for raw in raws:
            try:
                out.append(PostgresPhysicalRestore.model_validate(raw))
            except ValidationError as exc:
                meta = raw.get("metadata", {})
                log.warning(
                    "restore %s/%s does not validate: %s",
                    meta.get("namespace"),
                    meta.get("name"),
                    exc.errors()[0].get("msg"),
                )
        return out

    def _in_progress(self) -> dict[str, str]:
        return {
            f"{r.namespace}/{r.replica_name}": r.name
            for r in self._restore_models(self.restores.items())
            if is_in_progress(r)
        }

    def _rebuild_admission(self) -> None:
        positions = {}
        for raw in self.replicas.items():
            meta = raw.get("metadata", {})
            pos = (raw.get("status") or {}).get("queuePosition") or 0
            positions[f"{meta.get('namespace')}/{meta.get('name')}"] = int(pos)
        with self._decide_lock:
            self.admission = AdmissionQueue.rebuild(
                self.config.max_concurrent_restores, self._in_progress(), positions, self.clock()
            )

    def _reconcile_admission(self) -> None:
        in_progress = self._in_progress()
        with self._decide_lock:
            self.admission = self.admission.reconcile(in_progress, self.clock())
            self.metrics.queue_depth.set(len(self.admission.waiting))
            self.metrics.active_count.set(len(self.admission.slots))

    # -- workers ----------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            started = time.monotonic()
            controller, ns, name = key
            try:
                self.metrics.reconciliations.labels(controller).inc()
                if controller == "replica":
                    self.reconcile_replica(ns, name)
                else:
                    self.reconcile_restore(ns, name)
            except Exception:
                self.metrics.reconciliation_errors.labels(controller).inc()
                log.exception("reconciling %s %s/%s failed", controller, ns, name)
                self.queue.add(key, delay=30.0)
            finally:
                self.metrics.reconciliation_duration.observe(time.monotonic() - started)
                self.queue.done(key)

    def _requeue(self, key: WorkKey, after: timedelta | None, wake: Iterable[str]) -> None:
        for replica_key in wake:
            ns, _, name = replica_key.partition("/")
            self.queue.add(("replica", ns, name))
        if after is not None:
            self.queue.add(key, delay=max(1.0, after.total_seconds()))

    # -- replicas ---------------------------------------------------------------------
    def _parse_replica(self, raw: Mapping[str, Any]) -> PostgresPhysicalReplica | None:
        try:
            return PostgresPhysicalReplica.model_validate(raw)
        except ValidationError as exc:
            meta = raw.get("metadata", {})
            seen = (meta.get("uid", ""), str(meta.get("generation")))
            problem = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
            )
            if seen not in self._bad_spec_seen:
                self._bad_spec_seen.add(seen)
                log.error(
                    "replica %s/%s is invalid: %s", meta.get("namespace"), meta.get("name"), problem
                )
                self._event_raw(
                    raw, "Warning", "InvalidSpec", f"The replica is invalid: {problem}", None
                )
            return None

    def kopia_credentials(self, replica: PostgresPhysicalReplica) -> KopiaCredentials:
        """The replica's kopia Secret, validated. SecretInvalid/LookupError say why not."""
        ref = replica.spec.kopia_secret_ref
        if ref is None:
            raise SecretInvalid("the replica has no kopiaSecretRef")
        secret = self.api.get("Secret", replica.namespace, ref.name)
        if secret is None:
            raise LookupError(
                f"no Secret {ref.name!r} in namespace {replica.namespace}; create it or fix "
                "spec.kopiaSecretRef.name"
            )
        return parse_kopia_secret(decode_secret_data(secret))

    def _secret_check(
        self, replica: PostgresPhysicalReplica
    ) -> tuple[SecretCheck | None, KopiaCredentials | None]:
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                return SecretCheck.invalid(
                    "the replica's credentials come from canopy, but the operator has no "
                    "CANOPY_BASE_URL",
                    reasons.CANOPY_NOT_CONFIGURED,
                ), None
            return self.canopy.secret_check(replica)
        if replica.spec.kopia_secret_ref is None:
            return None, None
        try:
            creds = self.kopia_credentials(replica)
        except LookupError as exc:
            return SecretCheck.not_found(exc.args[0] if exc.args else str(exc)), None
        except SecretInvalid as exc:
            return SecretCheck.invalid(str(exc)), None
        return SecretCheck.valid(), creds

    def reconcile_replica(self, ns: str, name: str) -> None:
        raw = self.replicas.get(ns, name)
        if raw is None:
            # Gone without a pass seeing it deleting (no finalizers: a namespace deletion
            # removes it at once): its slot or place in line is given back here, not
            # after the queue's grace period.
            self.notifier.cancel(f"{ns}/{name}")
            self._release(f"{ns}/{name}", None)
            with self._step_failures_lock:
                self._step_failures.forget(lambda _, f: f.replica_key == f"{ns}/{name}")
            return
        replica = self._parse_replica(raw)
        if replica is None:
            return
        statuses = self.notifier.take_status(replica.key)
        if statuses:
            raw = self.api.merge_patch(
                REPLICA_KIND,
                ns,
                name,
                {"status": {"notifications": [s.to_wire() for s in statuses]}},
                status=True,
            )
            replica = PostgresPhysicalReplica.model_validate(raw)
        restores = self._restore_models(
            r
            for r in self.restores.items()
            if r.get("metadata", {}).get("namespace") == ns
            and (r.get("spec", {}).get("replica") or {}).get("name") == name
        )
        secret, creds = self._secret_check(replica)
        listing = self.listing.listing_for(f"{ns}/{name}", creds) if creds is not None else None
        obs = ReplicaObservation(replica=replica, restores=restores, secret=secret, listing=listing)
        with self._decide_lock:
            plan = decide_replica(
                obs, self.admission, self.clock(), self.random.random, self.options.settings
            )
            self.admission = plan.queue
        retry = self._apply(plan.steps, replica, None, creds)
        # Stopped at a failing step: the next pass is its retry, not the plan's wake-up
        # time (which may have passed already, and was retried every second before).
        after = plan.requeue_after if retry is None else retry
        self._requeue(("replica", ns, name), after, plan.wake)
        if self.canopy is not None and replica.spec.canopy_source is not None:
            self._deliver_reports(ns, name)

    # -- restores ---------------------------------------------------------------------
    def _work(self, restore: PostgresPhysicalRestore) -> RestoreWork:
        job_name = restore_job_name(restore.name)
        job = self.jobs.get(restore.namespace, job_name)
        if job is None:
            return RestoreWork.not_started()
        conditions = _true_conditions(job)
        pods = self.pods.select(restore.namespace, **{"job-name": job_name})
        pods.sort(key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
        if "Complete" in conditions:
            message = next(
                (
                    _termination_message(p)
                    for p in reversed(pods)
                    if p.get("status", {}).get("phase") == "Succeeded"
                ),
                "",
            )
            version, _ = parse_message(message)
            completed = _parse_time(job.get("status", {}).get("completionTime"))
            return RestoreWork(
                WorkState.SUCCEEDED,
                name=job_name,
                postgres_version=version,
                completed_at=completed,
                fixes=parse_fixes(message),
            )
        if "Failed" in conditions:
            messages = [_termination_message(p) for p in pods]
            reason = next((parse_message(m)[1] for m in reversed(messages) if m), "")
            if not reason:
                cond = conditions["Failed"]
                reason = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
            return RestoreWork(WorkState.FAILED, name=job_name, reason=reason)
        return RestoreWork(WorkState.RUNNING, name=job_name)

    def _ready_pod(self, restore: PostgresPhysicalRestore) -> dict[str, Any] | None:
        pods = [
            p
            for p in self.pods.select(restore.namespace, **{LABEL_RESTORE: restore.name})
            if "job-name" not in _labels(p) and _pod_ready(p) and p.get("status", {}).get("podIP")
        ]
        return pods[0] if pods else None

    def _server(self, restore: PostgresPhysicalRestore) -> Server:
        deployment = self.deployments.get(restore.namespace, restore.name)
        if deployment is None or (deployment.get("status", {}).get("readyReplicas") or 0) < 1:
            return Server(ServerState.NOT_READY)
        pod = self._ready_pod(restore)
        if pod is None:
            return Server(ServerState.NOT_READY)
        uid = restore.metadata.uid or restore.name
        if self._provisioned.get(uid) == pod["metadata"]["uid"]:
            return Server(ServerState.READY)
        return Server(ServerState.NOT_READY, "provisioning users")

    def reconcile_restore(self, ns: str, name: str) -> None:
        raw = self.restores.get(ns, name)
        if raw is None:
            self._forget_deleted_restores()
            held = self.admission.key_bound_to(ns, name)
            if held is not None:
                self._release(held, name)
            with self._step_failures_lock:
                self._step_failures.forget(lambda k, _: k[0] == _restore_owner(ns, name))
            return
        models = self._restore_models([raw])
        if not models:
            return
        restore = models[0]
        replica_raw = self.replicas.get(ns, restore.replica_name)
        replica = self._parse_replica(replica_raw) if replica_raw is not None else None
        work = self._work(restore)
        if work.state is WorkState.SUCCEEDED and (restore.metadata.uid or "") not in (
            self._completed_seen
        ):
            self._completed_seen.add(restore.metadata.uid or "")
            if restore.effective_phase in (RestorePhase.PENDING, RestorePhase.RESTORING):
                self.metrics.completed.inc()
        detection = None
        if work.state is WorkState.SUCCEEDED:
            detection = VersionDetection(WorkState.SUCCEEDED, work.postgres_version)
        elif restore.effective_phase is RestorePhase.READY and not restore.status.postgres_version:
            detection = VersionDetection(
                WorkState.FAILED,
                reason="the restore Job finished without reporting the PostgreSQL version",
            )
        obs = RestoreObservation(
            restore=restore,
            replica=replica,
            work=work,
            server=self._server(restore),
            version_detection=detection,
            migration=MigrationOutcome.unsupported("the operator")
            if restore.spec.migrate_to
            else None,
        )
        with self._decide_lock:
            plan = decide_restore(
                obs,
                self.admission,
                self.clock(),
                lambda: str(uuid.uuid4()),
                self.options.settings,
            )
            self.admission = plan.queue
        retry = self._apply(plan.steps, replica, restore, None) if replica is not None else None
        after = plan.requeue_after if retry is None else retry
        self._requeue(("restore", ns, name), after, plan.wake)

    def _release(self, replica_key: str, restore: str | None) -> None:
        with self._decide_lock:
            before = self.admission
            self.admission = before.release(replica_key, restore)
            woken = promoted_keys(before, self.admission)
        for key in woken:
            woken_ns, _, woken_name = key.partition("/")
            self.queue.add(("replica", woken_ns, woken_name))

    def _forget_deleted_restores(self) -> None:
        """Drop what was remembered about restores that no longer exist (keyed by uid)."""
        gone = {
            uid
            for uid in (*self._provisioned, *self._applied, *self._completed_seen)
            if not any((r.get("metadata") or {}).get("uid") == uid for r in self.restores.items())
        }
        for uid in gone:
            self._provisioned.pop(uid, None)
            self._applied.pop(uid, None)
            self._completed_seen.discard(uid)

    # -- applying plans ---------------------------------------------------------------
    def _apply(
        self,
        steps: Sequence[Step],
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore | None,
        creds: KopiaCredentials | None,
    ) -> timedelta | None:
        """Apply a plan. A step that failed recently is not tried again before its backoff
        ends, and the rest of the plan waits with it. Returns when to look again if the
        plan stopped at a failing step (None: it ran to its end)."""
        owner = (
            _restore_owner(restore.namespace, restore.name)
            if restore is not None
            else f"replica {replica.key}"
        )
        # The conditions as this plan leaves them (None: as observed).
        conditions: list[Mapping[str, Any]] | None = None
        recovered: list[str] = []

        def apply(step: Step) -> None:
            nonlocal conditions
            key: StepKey = (owner, step_name(step))
            with self._step_failures_lock:
                if self._step_failures.backing_off(key, self._seconds()):
                    raise _BackingOff
            self._apply_step(step, replica, restore, creds)
            if isinstance(step, PatchReplicaStatus) and "conditions" in step.patch:
                conditions = list(step.patch["conditions"] or [])
            with self._step_failures_lock:
                gone = self._step_failures.succeeded(key)
            if gone is not None:
                log.info("%s for %s succeeded after %d failures", key[1], owner, gone.failures)
                recovered.append(f"{key[1]} for {owner} succeeded")

        def failed(step: Step, exc: Exception) -> None:
            if isinstance(exc, _BackingOff):
                return  # the rest of the plan waits, as after the failure itself
            if not step.best_effort:
                self.metrics.reconciliation_errors.labels("restore" if restore else "replica").inc()
            detail = scrub(str(exc), creds.secret_values() if creds else [])
            message = f"{step_name(step)} for {owner} failed: {detail}"
            with self._step_failures_lock:
                outcome = self._step_failures.failed(
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
            level = logging.WARNING if step.best_effort else logging.ERROR
            log.log(level, "%s; %s", message, RETRY_NOTE)
            self._event(
                replica,
                "Warning",
                EVENT_STEP_FAILED,
                message,
                restore.name if restore is not None else None,
            )

        complete = apply_in_order(steps, apply, failed)
        with self._step_failures_lock:
            if complete:
                for (_, name), _ in self._step_failures.settle(
                    owner, (step_name(s) for s in steps)
                ):
                    recovered.append(f"{name} for {owner} is no longer planned")
            retry = None if complete else self._step_failures.retry_in(owner, self._seconds())
        self._show_step_failures(replica, conditions, complete, recovered)
        return None if retry is None else timedelta(seconds=retry)

    def _seconds(self) -> float:
        return self.clock().timestamp()

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
        with self._step_failures_lock:
            failing = self._step_failures.failing(replica.key)
        if conditions is None:
            conditions = [
                c.to_wire() for c in (replica.status.conditions if replica.status else [])
            ]
        have = next((c for c in conditions if c.get("type") == STEPS_CONDITION), None)
        want: tuple[ConditionStatus, str, str]
        if failing:
            want = ("False", STEP_FAILING, failing[0].message)
        elif complete and have is not None and have.get("status") == "False":
            want = ("True", RECOVERED, recovered[-1] if recovered else "every step succeeds again")
        else:
            return
        if (
            have is not None
            and (have.get("status"), have.get("reason"), have.get("message")) == want
        ):
            return
        self._set_steps_condition(replica, *want)

    def _set_steps_condition(
        self, replica: PostgresPhysicalReplica, status: ConditionStatus, reason: str, message: str
    ) -> None:
        # Read afresh: the informer's copy may not hold the plan's own status patch yet,
        # and the whole list is written back.
        try:
            raw = self.api.get(REPLICA_KIND, replica.namespace, replica.name)
            if raw is None:
                return
            fresh = PostgresPhysicalReplica.model_validate(raw)
            current = fresh.status.conditions if fresh.status else []
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
            patch = PatchReplicaStatus({"conditions": [c.to_wire() for c in updated]})
            self._apply_step(patch, fresh, None, None)
        except Exception as exc:
            log.warning(
                "%s: the %s condition was not written: %s", replica.key, STEPS_CONDITION, exc
            )

    def _apply_step(
        self,
        step: Step,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore | None,
        creds: KopiaCredentials | None,
    ) -> None:
        ns = replica.namespace
        match step:
            case PatchReplicaStatus(patch=patch):
                if patch:
                    self.api.merge_patch(
                        REPLICA_KIND, ns, replica.name, {"status": dict(patch)}, status=True
                    )
            case PatchRestoreStatus(restore=name, patch=patch):
                if patch:
                    self.api.merge_patch(
                        RESTORE_KIND, ns, name, {"status": dict(patch)}, status=True
                    )
                    if patch.get("phase") == RestorePhase.FAILED and (
                        restore is None or restore.effective_phase is not RestorePhase.FAILED
                    ):
                        self.metrics.failed.inc()
            case EmitEvent(type=type_, reason=reason, note=note, related=related):
                self._event(replica, str(type_), reason, note, related)
            case EnsureReplicaResources(
                analytics_username=analytics,
                extra_usernames=extras,
                service_annotations=annotations,
            ):
                self._ensure_resources(replica, analytics, extras, annotations)
            case ListSnapshots():
                if creds is None:
                    raise StepFailed("no usable kopia Secret to list snapshots with")
                access = None
                if replica.spec.canopy_source is not None and self.canopy is not None:
                    access = self.canopy.listing_access(replica, creds)
                self.listing.request(replica.key, creds, access)
            case CreateRestore(restore=new):
                self.api.create(new.to_wire())
                self.metrics.started.inc()
                log.info("restore %s/%s created (snapshot %s)", ns, new.name, new.spec.snapshot)
            case DeleteRestore(restore=name, pods_first=pods_first):
                if pods_first:
                    for pod in self.pods.select(ns, **{LABEL_RESTORE: name}):
                        self.api.delete("Pod", ns, pod["metadata"]["name"])
                if self.api.delete(RESTORE_KIND, ns, name):
                    log.info("restore %s/%s deleted", ns, name)
            case PointServiceAt(restore=name):
                self._point_service_at(replica, name)
            case PrepareRestoreStorage():
                assert restore is not None
                self._prepare_storage(replica, restore)
            case StartRestoreWork(run_id=run_id):
                assert restore is not None
                self._start_work(replica, restore, run_id)
            case CleanupRestoreWork():
                assert restore is not None
                self.api.delete("Job", ns, restore_job_name(restore.name))
            case DetectPostgresVersion():
                pass  # the restore Job's termination message carries it (see _work)
            case EnsureServer():
                assert restore is not None
                self._ensure_server(replica, restore)
            case MarkReadyForTraffic(restore=name):
                self._label_ready(ns, name)
            case RunSwitchoverStep(kind=kind):
                self._unsupported_switchover_step(replica, kind)
            case SendNotifications(restore=name):
                self._send_notifications(replica, name)
            case ReportVerification(restore=name, outcome=outcome):
                if outcome is VerificationOutcome.SUCCESS:
                    self._report_health(replica, name)
            case _:
                # The outgoing mark (best effort). RunMigration never comes: the restore
                # is observed as unable to migrate (MigrationOutcome.unsupported).
                log.debug("%s: %s is not handled by the operator", replica.key, type(step).__name__)

    # -- step helpers -----------------------------------------------------------------
    def _event(
        self,
        replica: PostgresPhysicalReplica,
        type_: str,
        reason: str,
        note: str,
        related: str | None,
    ) -> None:
        self._event_raw(replica.to_wire(), type_, reason, note, related)

    def _event_raw(
        self,
        regarding: Mapping[str, Any],
        type_: str,
        reason: str,
        note: str,
        related: str | None,
    ) -> None:
        meta = regarding.get("metadata", {})
        ns = meta.get("namespace", "default")
        ref = {
            "apiVersion": regarding.get("apiVersion"),
            "kind": regarding.get("kind"),
            "name": meta.get("name"),
            "namespace": ns,
            "uid": meta.get("uid"),
        }
        event: dict[str, Any] = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "eventTime": _micro(self.clock()),
            "reportingController": EVENT_REPORTER,
            "reportingInstance": self.options.identity,
            "action": "Restore",
            "reason": reason,
            "note": note[:1024],
            "type": type_,
            "regarding": {k: v for k, v in ref.items() if v},
        }
        if related:
            event["related"] = {
                "apiVersion": regarding.get("apiVersion"),
                "kind": RESTORE_KIND,
                "name": related,
                "namespace": ns,
            }
        try:
            self.api.create(event)
        except Exception as exc:
            log.warning("event %s for %s/%s not recorded: %s", reason, ns, meta.get("name"), exc)

    def _ensure_resources(
        self,
        replica: PostgresPhysicalReplica,
        analytics: str,
        extras: Sequence[str],
        annotations: Mapping[str, str] | None,
    ) -> None:
        wanted = (
            analytics,
            tuple(extras),
            tuple(sorted((annotations or {}).items())),
            annotations is None,
        )
        uid = replica.metadata.uid or replica.key
        if self._ensured.get(uid) == wanted:
            return
        ns = replica.namespace
        created = self.api.create_if_missing(
            workloads.credentials_secret(replica, generate_password())
        )
        if created:
            log.info("%s: created Secret %s", replica.key, replica_creds_secret_name(replica.name))
        self.api.create_if_missing(workloads.admin_secret(replica, generate_password()))
        for username in extras:
            self.api.create_if_missing(
                workloads.extra_user_secret(replica, username, generate_password())
            )
        service = workloads.stable_service(replica)
        if not self.api.create_if_missing(service) and annotations is not None:
            current = self.api.get("Service", ns, replica.name) or {}
            have = current.get("metadata", {}).get("annotations") or {}
            missing = {k: v for k, v in annotations.items() if have.get(k) != v}
            if missing:
                self.api.merge_patch(
                    "Service", ns, replica.name, {"metadata": {"annotations": missing}}
                )
        self._ensured[uid] = wanted

    def _label_ready(self, ns: str, restore: str) -> int:
        labelled = 0
        for pod in self.pods.select(ns, **{LABEL_RESTORE: restore}):
            if "job-name" in _labels(pod) or pod.get("status", {}).get("phase") != "Running":
                continue
            labelled += 1
            if _labels(pod).get(LABEL_READY_FOR_TRAFFIC) != "true":
                self.api.merge_patch(
                    "Pod", ns, pod["metadata"]["name"], workloads.pod_ready_for_traffic_patch()
                )
        return labelled

    def _point_service_at(self, replica: PostgresPhysicalReplica, name: str) -> None:
        ns = replica.namespace
        if self._label_ready(ns, name) == 0:
            raise StepFailed(f"restore {name} has no running PostgreSQL pod to switch to")
        self.api.merge_patch(
            "Service",
            ns,
            replica.name,
            {"spec": {"selector": workloads.stable_service_selector(name)}},
        )
        self.metrics.switchovers.inc()
        restore = self.restores.get(ns, name)
        created = _parse_time((restore or {}).get("metadata", {}).get("creationTimestamp"))
        if created is not None:
            self.metrics.duration.observe((self.clock() - created).total_seconds())
        log.info("%s: Service %s now selects restore %s", replica.key, replica.name, name)

    def _prepare_storage(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        self.api.create_if_missing(workloads.data_pvc(replica, restore))
        cache = workloads.kopia_cache_pvc(replica, restore.spec.snapshot_size)
        if self.api.create_if_missing(cache):
            return
        current = (
            self.api.get(
                "PersistentVolumeClaim", replica.namespace, kopia_cache_pvc_name(replica.name)
            )
            or {}
        )
        requests = current.get("spec", {}).get("resources", {}).get("requests", {})
        want = cache["spec"]["resources"]["requests"]["storage"]
        try:
            grow = parse_quantity(str(want)) > parse_quantity(str(requests.get("storage", "0")))
        except ValueError:
            grow = False
        if grow:
            try:
                self.api.merge_patch(
                    "PersistentVolumeClaim",
                    replica.namespace,
                    kopia_cache_pvc_name(replica.name),
                    {"spec": {"resources": {"requests": {"storage": want}}}},
                )
            except Exception as exc:
                log.warning("%s: the kopia cache volume cannot grow: %s", replica.key, exc)

    def _start_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        run_id: str | None = None,
    ) -> None:
        canopy = None
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                raise StepFailed("canopy replicas need the operator's CANOPY_BASE_URL")
            if run_id and restore.status.run_id != run_id:
                # This pass persisted the run id; the object in hand predates it.
                restore = restore.model_copy(
                    update={"status": restore.status.model_copy(update={"run_id": run_id})}
                )
            # Also writes the restore's broker token Secret, bound to this run id.
            canopy = self.canopy.job_settings(replica, restore)
        job = workloads.restore_job(replica, restore, self.config, canopy=canopy)
        if self.api.create_if_missing(job):
            log.info(
                "restore %s/%s: Job %s started",
                restore.namespace,
                restore.name,
                job["metadata"]["name"],
            )

    def _ensure_server(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        version = restore.status.postgres_version
        if not version:
            raise StepFailed(f"restore {restore.name} has no PostgreSQL version yet")
        uid = restore.metadata.uid or restore.name
        deployment = workloads.postgres_deployment(replica, restore, self.config, None, version)
        service = workloads.restore_service(restore)
        digest = repr((deployment, service))
        if self._applied.get(uid) != digest:
            self.api.apply(deployment)
            self.api.create_if_missing(service)
            self._applied[uid] = digest
        if restore.effective_phase is RestorePhase.READY:
            self._maybe_provision(replica, restore)

    # -- users ------------------------------------------------------------------------
    def _secret_value(self, ns: str, name: str, key: str) -> str:
        secret = self.api.get("Secret", ns, name)
        if secret is None:
            raise StepFailed(f"Secret {ns}/{name} not found")
        data = decode_secret_data(secret)
        if key not in data:
            raise StepFailed(f"Secret {ns}/{name} has no key {key}")
        return data[key].decode()

    def _maybe_provision(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        pod = self._ready_pod(restore)
        if pod is None:
            return
        uid = restore.metadata.uid or restore.name
        pod_uid = pod["metadata"]["uid"]
        with self._provision_lock:
            if self._provisioned.get(uid) == pod_uid or uid in self._provisioning:
                return
            self._provisioning.add(uid)
        thread = threading.Thread(
            target=self._provision,
            args=(replica, restore, pod["status"]["podIP"], pod_uid),
            name=f"provision-{restore.name}",
            daemon=True,
        )
        thread.start()

    def _provision(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        host: str,
        pod_uid: str,
    ) -> None:
        uid = restore.metadata.uid or restore.name
        ns = replica.namespace
        passwords: list[str] = []
        try:
            admin_password = self._secret_value(
                ns, admin_creds_secret_name(replica.name), "password"
            )
            passwords.append(admin_password)
            analytics = RoleCredentials(
                replica.spec.analytics_username,
                self._secret_value(ns, replica_creds_secret_name(replica.name), "password"),
            )
            passwords.append(analytics.password)
            extras = []
            for user in replica.spec.extra_users:
                password = self._secret_value(
                    ns, extra_user_secret_name(replica.name, user.name), "password"
                )
                passwords.append(password)
                extras.append((user, RoleCredentials(user.name, password)))

            def conninfo(dbname: str) -> str:
                return make_conninfo(
                    host=host,
                    port="5432",
                    user=ADMIN_ROLE,
                    password=admin_password,
                    dbname=dbname,
                    connect_timeout=str(PROVISION_CONNECT_TIMEOUT_S),
                    sslmode="prefer",
                )

            report = provision_users(
                conninfo,
                analytics=analytics,
                extra_users=extras,
                read_only=effective_read_only(replica, restore),
                other_managed_roles=[ADMIN_ROLE],
                persistent_schemas=analytics_owned_schemas(replica, restore),
            )
            with self._provision_lock:
                self._provisioned[uid] = pod_uid
            log.info(
                "restore %s/%s: users provisioned (%s, %d extra)",
                ns,
                restore.name,
                report.analytics.name,
                len(report.extra_users),
            )
            for note in report.catalog_notes:
                log.warning("restore %s/%s: %s", ns, restore.name, note)
        except Exception as exc:
            # The server may still be recovering; the readiness timeout bounds the retries.
            retry_in = PROVISION_RETRY_S
            log.warning(
                "restore %s/%s: provisioning users failed, retrying in %.0fs: %s",
                ns,
                restore.name,
                retry_in,
                scrub(str(exc), passwords),
            )
        else:
            retry_in = 0.0
        finally:
            with self._provision_lock:
                self._provisioning.discard(uid)
        self.queue.add(("restore", ns, restore.name), delay=retry_in)

    # -- canopy reports -----------------------------------------------------------------
    def _patch_reports(
        self, raw: Mapping[str, Any], reports: Sequence[PendingVerificationReport]
    ) -> bool:
        """Write the report list only if the replica did not change since `raw` was read
        (a decision on another worker may have just added a report): False on a conflict,
        and the next pass recomputes."""
        meta = raw["metadata"]
        try:
            self.api.merge_patch(
                REPLICA_KIND,
                meta["namespace"],
                meta["name"],
                {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "status": vr.status_patch(reports),
                },
                status=True,
            )
        except Exception as exc:
            if is_conflict(exc):
                self.queue.add(("replica", meta["namespace"], meta["name"]), delay=1.0)
                return False
            raise
        return True

    def _deliver_reports(self, ns: str, name: str) -> None:
        assert self.canopy is not None
        raw = self.api.get(REPLICA_KIND, ns, name)
        if raw is None:
            return
        replica = PostgresPhysicalReplica.model_validate(raw)
        courier = self.canopy.courier
        step = courier.step(replica)
        if step.reports is not None and not self._patch_reports(raw, step.reports):
            return
        for dropped in step.dropped:
            self._event(
                replica,
                "Warning",
                reasons.EVENT_VERIFICATION_REPORT_REJECTED,
                f"The {dropped.report.outcome} report on restore {dropped.report.restore} "
                f"was dropped: {dropped.why}",
                dropped.report.restore,
            )
        courier.settled(step)
        waiting = (
            step.reports
            if step.reports is not None
            else (replica.status.pending_verification_reports)
        )
        if courier.busy():
            self.queue.add(("replica", ns, name), delay=1.0)
        retries = [r.next_attempt_at for r in waiting if r.next_attempt_at is not None]
        if retries:
            delay = (min(retries) - self.clock()).total_seconds()
            self.queue.add(("replica", ns, name), delay=max(1.0, delay))

    def _report_health(self, replica: PostgresPhysicalReplica, restore_name: str) -> None:
        """Sizes and checks from the restored server, added to its waiting report while
        the server still runs (an ephemeral replica tears it down on the next pass)."""
        raw_restore = self.restores.get(replica.namespace, restore_name)
        if raw_restore is None:
            return
        pod = self._ready_pod(PostgresPhysicalRestore.model_validate(raw_restore))
        if pod is None:
            return
        password = self._secret_value(
            replica.namespace, admin_creds_secret_name(replica.name), "password"
        )
        health = check_health(_PodEndpoint(pod["status"]["podIP"], password), ADMIN_ROLE)
        details: dict[str, Any] = {"checks": [c.as_dict() for c in health.checks]}
        if health.sizes:
            details["sizes"] = dict(health.sizes)
        raw = self.api.get(REPLICA_KIND, replica.namespace, replica.name)
        if raw is None:
            return
        pending = PostgresPhysicalReplica.model_validate(raw).status.pending_verification_reports
        target = next((r for r in pending if r.restore == restore_name), None)
        if target is not None:
            self._patch_reports(raw, vr.with_details(pending, target.key, health_details=details))

    # -- switchover extras ------------------------------------------------------------
    def _unsupported_switchover_step(
        self, replica: PostgresPhysicalReplica, kind: SwitchoverStep
    ) -> None:
        patch, message = unsupported_switchover_step(kind, "the pgro operator")
        if patch:
            self.api.merge_patch(
                REPLICA_KIND, replica.namespace, replica.name, {"status": patch}, status=True
            )
        self._event(replica, "Warning", UNSUPPORTED_SWITCHOVER_EVENT, message, None)

    def _send_notifications(self, replica: PostgresPhysicalReplica, restore_name: str) -> None:
        if not replica.spec.notifications:
            return
        ns = replica.namespace
        fresh_raw = self.api.get(REPLICA_KIND, ns, replica.name)
        restore_raw = self.restores.get(ns, restore_name) or self.api.get(
            RESTORE_KIND, ns, restore_name
        )
        if fresh_raw is None or restore_raw is None:
            return
        fresh = PostgresPhysicalReplica.model_validate(fresh_raw)
        restore = PostgresPhysicalRestore.model_validate(restore_raw)
        info = fresh.status.connection_info
        if info is None:
            log.info("%s: no connectionInfo yet, notifications skipped", replica.key)
            return
        secrets = notification_secrets(
            ns, fresh.spec.notifications, lambda n, name: self.api.get("Secret", n, name)
        )
        for reason in secrets.refused.values():
            log.warning("%s: notification header %s", replica.key, reason)
            self._event(fresh, "Warning", NOTIFICATION_SECRET_REFUSED, reason, None)
        password = self._secret_value(ns, replica_creds_secret_name(replica.name), "password")
        self.notifier.notify(
            replica.key,
            fresh,
            restore_name,
            restore.spec.snapshot,
            restore.status.postgres_version,
            info.to_wire(),
            password,
            secrets.found,
            secrets.unavailable(),
        )
        self._notifying.add((ns, replica.name))
