"""`pgro operator`: the reconciler shell run on a Kubernetes cluster. This module holds the
lifecycle: leadership, the watches, the work queue and its workers, the live ConfigMap
(docs/kubernetes.md "Controller design").
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from pgro import __version__
from pgro.api.crds import crd_documents
from pgro.api.names import (
    ANNOTATION_VERSION,
    LABEL_REPLICA,
    LABEL_RESTORE,
    REPLICA_KIND,
    RESTORE_KIND,
)
from pgro.canopy.settings import CanopySettings
from pgro.clock import utcnow
from pgro.core.plan import EmitEvent, EventType
from pgro.core.settings import ReconcilerSettings
from pgro.event_publisher import EventPublisher
from pgro.kube.client import KubeApi
from pgro.kube.informer import Informer, by_label
from pgro.kube.leader import LeaderElector
from pgro.notifications import Notifier
from pgro.observability import Health, Metrics
from pgro.reconciler.listing import ReplicaListings
from pgro.reconciler.shell import Shell, WorkKind
from pgro.reconciler.workqueue import WorkQueue
from pgro.runtimes.kubernetes.canopy import OperatorCanopy
from pgro.runtimes.kubernetes.config import (
    EVENT_USE_PORT_FORWARD_UNSUPPORTED,
    USE_PORT_FORWARD_UNSUPPORTED,
    parse_operator_config,
)
from pgro.runtimes.kubernetes.effects import KubeEffects
from pgro.runtimes.kubernetes.observe import (
    BY_REPLICA,
    JOB_NAME,
    Caches,
    Meta,
    Observer,
    replica_of,
    secret_value,
)
from pgro.runtimes.kubernetes.privileges import warn_about_excess_permissions
from pgro.runtimes.kubernetes.provisioning import Provisioner, RepairRecorder
from pgro.runtimes.kubernetes.reports import ReportDelivery

log = logging.getLogger("pgro.operator")

CONFIGMAP_NAME: Final = "postgres-restore-operator-config"
# The shortest delay the queue is asked for: a plan asking "at once" is not run in a loop.
MIN_REQUEUE_S: Final = 1.0

# ("replica" or "restore", "namespace/name").
WorkKey = tuple[WorkKind, str]


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
    # `PGRO_LOG_LEVEL`, validated (`config.parse_postgres_log_level`).
    postgres_log_level: str | None = None
    # `POD_NAME`: annotated with pgro's version at start (`pgro.bes.au/version`).
    pod_name: str | None = None


class Operator:
    def __init__(
        self,
        api: KubeApi,
        options: OperatorOptions,
        *,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
        health: Health | None = None,
        canopy: CanopySettings | None = None,
    ) -> None:
        self.api = api
        self.options = options
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.config, _ = parse_operator_config(
            None,
            default_image=options.default_image,
            postgres_log_level=options.postgres_log_level,
        )
        self.queue: WorkQueue[WorkKey] = WorkQueue()
        self.random = random.Random()  # noqa: S311 - schedule jitter, not secrets
        self.listing = ReplicaListings(
            lambda key: self.queue.add(("replica", key)),
            clock,
            options.state_dir or Path(tempfile.gettempdir()) / "pgro-operator-kopia",
        )
        self.notifier = Notifier(self.metrics, clock=clock)
        self.event_publisher = EventPublisher(
            lambda ns, name: api.get("Secret", ns, name), clock=clock
        )
        self._stop = threading.Event()
        self.replicas = Informer(api, REPLICA_KIND, self._on_replica)
        self.restores = Informer(
            api, RESTORE_KIND, self._on_restore, indexers={BY_REPLICA: replica_of}
        )
        self.jobs = Informer(api, "Job", self._on_owned, labels={LABEL_RESTORE: None})
        self.deployments = Informer(api, "Deployment", self._on_owned, labels={LABEL_RESTORE: None})
        # The replica label, not the restore's: every pod pgro makes carries it (a restore's
        # carry both), and the orphan pod sweep looks for pods with no restore label too.
        self.pods = Informer(
            api,
            "Pod",
            self._on_owned,
            labels={LABEL_REPLICA: None},
            indexers={LABEL_RESTORE: by_label(LABEL_RESTORE), JOB_NAME: by_label(JOB_NAME)},
        )
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
        if self.canopy is not None:
            self.canopy.courier.metrics = self.metrics
        self.provisioner = Provisioner(
            lambda ns, name, key: secret_value(api, ns, name, key),
            lambda key, delay: self._schedule("restore", key, delay),
            record_repairs=RepairRecorder(
                api,
                lambda kind, key, replica, written: self.observer.wrote(
                    kind, key, replica, written
                ),
                lambda raw, event: self.effects.emit_quietly(raw, event),
            ),
        )
        self.observer = Observer(
            api,
            Caches(self.replicas, self.restores, self.jobs, self.deployments, self.pods),
            listing=self.listing,
            canopy=self.canopy,
            provisioned=self.provisioner.provisioned,
            emit_raw=lambda raw, event: self.effects.emit_quietly(raw, event),
            requeue=self._schedule,
        )
        self.effects = KubeEffects(
            api,
            self.observer,
            config=lambda: self.config,
            listing=self.listing,
            canopy=self.canopy,
            provisioner=self.provisioner,
            reports=ReportDelivery(
                api,
                self.canopy,
                clock=clock,
                requeue=lambda key, delay: self._schedule("replica", key, delay),
                emit=lambda raw, event: self.effects.emit_quietly(raw, event),
            ),
            clock=clock,
            identity=options.identity,
        )
        self.shell = Shell(
            self.effects,
            schedule=self._schedule,
            clock=clock,
            limit=self.config.max_concurrent_restores,
            random=self.random.random,
            new_run_id=lambda: str(uuid.uuid4()),
            settings=options.settings,
            metrics=self.metrics,
            notifier=self.notifier,
            event_publisher=self.event_publisher,
        )
        self.elector = LeaderElector(
            api,
            options.namespace,
            options.identity,
            lease_duration=options.lease_duration_s,
            renew_every=options.renew_every_s,
        )

    def _schedule(self, kind: WorkKind, key: str, delay: float) -> None:
        self.queue.add((kind, key), delay=max(MIN_REQUEUE_S, delay))

    # -- lifecycle --------------------------------------------------------------------
    def install_crds(self) -> None:
        for crd in crd_documents():
            self.api.apply(crd)
        log.info("CustomResourceDefinitions applied")

    def run(self, stop: threading.Event) -> int:
        """Run until `stop`; returns the process exit code (1 if leadership was lost)."""
        self._stop = stop
        self.annotate_own_pod()
        # A reference install's ClusterRole left bound to the shared ServiceAccount.
        warn_about_excess_permissions(self.api)
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

    def annotate_own_pod(self) -> None:
        """`pgro.bes.au/version` on the operator's own pod (as the reference stamps it), so
        `kubectl get pods -o yaml` shows which pgro runs. Best effort: outside a pod, or
        without the rights, it is one warning."""
        name = self.options.pod_name
        if not name:
            return
        patch = {"metadata": {"annotations": {ANNOTATION_VERSION: __version__}}}
        try:
            self.api.merge_patch("Pod", self.options.namespace, name, patch)
        except Exception as exc:
            log.warning(
                "pod %s/%s not annotated %s=%s: %s",
                self.options.namespace,
                name,
                ANNOTATION_VERSION,
                __version__,
                exc,
            )
            return
        log.info(
            "pod %s/%s annotated %s=%s",
            self.options.namespace,
            name,
            ANNOTATION_VERSION,
            __version__,
        )

    def _lead(self, stop: threading.Event) -> int:
        informers = [self.replicas, self.restores, self.jobs, self.deployments, self.pods]
        for informer in informers:
            informer.start()
        for informer in informers:
            while not informer.synced.wait(0.5):
                if stop.is_set() or self.elector.lost.is_set():
                    self._shutdown(informers)
                    return 1 if self.elector.lost.is_set() else 0
        self.shell.rebuild_admission()
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
        last_resync = time.monotonic()
        while not stop.is_set() and not self.elector.lost.is_set():
            stop.wait(1.0)
            now = time.monotonic()
            if now - last_resync >= self.options.resync_s:
                self._enqueue_all()
                last_resync = now
            self.shell.tick()
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
        self.event_publisher.shutdown()
        self.listing.shutdown()
        if self.canopy is not None:
            self.canopy.stop()
        log.info("operator stopped")

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            self.health.beat()
            self._stop.wait(5.0)

    def _worker(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self.shell.reconcile(*item)  # never raises
            finally:
                self.queue.done(item)

    # -- events from the caches -------------------------------------------------------
    def _on_replica(self, obj: dict[str, Any]) -> None:
        meta = Meta.of(obj)
        self.queue.add(("replica", f"{meta.namespace}/{meta.name}"))

    def _on_restore(self, obj: dict[str, Any]) -> None:
        meta = Meta.of(obj)
        self.queue.add(("restore", f"{meta.namespace}/{meta.name}"))
        replica = replica_of(obj)
        if replica:
            self.queue.add(("replica", f"{meta.namespace}/{replica}"))

    def _on_owned(self, obj: dict[str, Any]) -> None:
        meta = Meta.of(obj)
        if meta.labels.get(LABEL_RESTORE):
            self.queue.add(("restore", f"{meta.namespace}/{meta.labels[LABEL_RESTORE]}"))
        if meta.labels.get(LABEL_REPLICA):
            self.queue.add(("replica", f"{meta.namespace}/{meta.labels[LABEL_REPLICA]}"))

    def _on_config(self, obj: dict[str, Any]) -> None:
        current = self.configmap.get(self.options.namespace, CONFIGMAP_NAME)
        data = current.get("data") if current is not None else None
        config, warnings = parse_operator_config(
            data,
            default_image=self.options.default_image,
            postgres_log_level=self.options.postgres_log_level,
        )
        for warning in warnings:
            log.warning("ConfigMap %s: %s", CONFIGMAP_NAME, warning)
        if current is None:
            log.warning("ConfigMap %s is gone: operator defaults apply", CONFIGMAP_NAME)
        if current is not None and config.use_port_forward and not self.config.use_port_forward:
            self.effects.emit_quietly(
                {"apiVersion": "v1", "kind": "ConfigMap", **current},
                EmitEvent(
                    EventType.WARNING,
                    EVENT_USE_PORT_FORWARD_UNSUPPORTED,
                    USE_PORT_FORWARD_UNSUPPORTED,
                ),
            )
        self.config = config
        self.shell.set_limit(config.max_concurrent_restores)

    def _enqueue_all(self) -> None:
        # From the caches: no request. The passes re-check what the memos allow (see
        # `effects`): nothing is re-created or re-applied unless it changed.
        for obj in self.replicas.items():
            self._on_replica(obj)
        for obj in self.restores.items():
            meta = Meta.of(obj)
            self.queue.add(("restore", f"{meta.namespace}/{meta.name}"))
