"""The reconciler shell's effects on a Kubernetes cluster: each step as API calls on the
`workloads` builders. Two memos keep a steady replica from writing (`_ensured`, `_applied`;
docs/kubernetes.md "Steady state"). Every method raises on failure; the shell reports it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import Any, Final

from pgro.api import names
from pgro.api.phases import RestorePhase
from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core import full_reindex, plan
from pgro.core.observations import RestoreObservation
from pgro.core.plan import EmitEvent, EventType, SwitchoverStep, VerificationOutcome
from pgro.core.redaction import Redacted
from pgro.core.secrets import scrub
from pgro.kube.client import KubeApi
from pgro.pipeline.app_migration import AppMigration
from pgro.pipeline.background import BackgroundTasks
from pgro.pipeline.full_reindex import BackgroundReindex
from pgro.pipeline.locale_repair import remaining_collations
from pgro.pipeline.redaction_step import ConninfoFor, RedactionRetries, RedactionStep
from pgro.pipeline.schema_migration import SchemaMigration
from pgro.postgres import restore_info
from pgro.postgres.health import check_health
from pgro.postgres.users import generate_password
from pgro.reconciler.effects import Gone, NotificationInput, ReplicaView, StepUnavailable
from pgro.reconciler.listing import ReplicaListings
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.canopy import OperatorCanopy
from pgro.runtimes.kubernetes.config import OperatorConfig
from pgro.runtimes.kubernetes.events import event_document
from pgro.runtimes.kubernetes.housekeeping import (
    grow_cache_under_pressure,
    retain_failed_job_logs,
    sweep_orphan_pods,
)
from pgro.runtimes.kubernetes.migration_job import KubeMigrator
from pgro.runtimes.kubernetes.notification_secrets import (
    NOTIFICATION_SECRET_REFUSED,
    notification_secrets,
)
from pgro.runtimes.kubernetes.observe import (
    Meta,
    Observer,
    authored_version,
    secret_value,
    split_key,
)
from pgro.runtimes.kubernetes.provisioning import (
    PodEndpoint,
    Provisioner,
    ensure_persistent_user_secrets,
    provision_switching_restore,
)
from pgro.runtimes.kubernetes.reports import ReportDelivery
from pgro.runtimes.kubernetes.schema_copy import KubeCopy
from pgro.runtimes.kubernetes.scripts import ADMIN_ROLE

log = logging.getLogger("pgro.operator")

RUNTIME_NAME: Final = "the pgro operator"
# How often a running persistent-schema copy is looked at (as in pgro run).
SCHEMA_COPY_POLL_S: Final = 2.0
# How often a running migration Job is looked at (the core's own requeue while Migrating).
MIGRATION_POLL_S: Final = 15.0


class StepFailedError(Exception):
    """A step cannot be done now; the message says why and what fixes it."""


@dataclass(frozen=True)
class _Applied:
    uid: str
    digest: str
    generation: int | None


@dataclass(eq=False)
class KubeEffects:
    api: KubeApi
    observer: Observer
    _: KW_ONLY
    config: Callable[[], OperatorConfig]
    listing: ReplicaListings
    canopy: OperatorCanopy | None
    provisioner: Provisioner
    reports: ReportDelivery
    clock: Callable[[], datetime]
    identity: str
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ensured: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    _applied: dict[str, _Applied] = field(default_factory=dict)
    # The full reindexes after pg_resetwal running in this operator, by restore key.
    reindexes: BackgroundReindex = field(default_factory=BackgroundReindex)
    runtime_name: str = field(default=RUNTIME_NAME, init=False)
    # The redactions running on threads of the operator, and their failed attempts.
    redactions: BackgroundTasks[Redacted] = field(default_factory=lambda: BackgroundTasks())
    redaction_retries: RedactionRetries = field(default_factory=RedactionRetries)
    # The schema build does not run in the operator yet.
    supported_switchover_steps: frozenset[SwitchoverStep] = field(
        default=frozenset({SwitchoverStep.SCHEMA_MIGRATION, SwitchoverStep.REDACTION}),
        init=False,
    )

    # -- observing ------------------------------------------------------------------------
    def observe_replica(self, key: str) -> ReplicaView | Gone | None:
        view = self.observer.observe_replica(key)
        if isinstance(view, Gone):
            with self._lock:
                self._ensured.pop(key, None)
        return view

    def observe_restore(self, key: str) -> RestoreObservation | Gone | None:
        obs = self.observer.observe_restore(key)
        if isinstance(obs, Gone):
            with self._lock:
                self._applied.pop(key, None)
            self.provisioner.forget(key)
        elif obs is not None:
            # A failed restore Job's TTL, extended once for its log (housekeeping.py).
            retain_failed_job_logs(self.api, self.observer, obs)
            # A kopia-cache volume under pressure, grown once (housekeeping.py, §2.12).
            grow_cache_under_pressure(self.api, self.observer, obs)
        return obs

    def read_replica(self, key: str) -> PostgresPhysicalReplica | None:
        # From the API, not the cache: it must hold this pass's own status patches. Read
        # only when a condition changes or a notification round starts, never per pass.
        raw = self.api.get(names.REPLICA_KIND, *split_key(key))
        return None if raw is None else PostgresPhysicalReplica.model_validate(raw)

    def restores_in_progress(self) -> Mapping[str, str]:
        return self.observer.restores_in_progress()

    def queue_positions(self) -> Mapping[str, int]:
        return self.observer.queue_positions()

    # -- status and events ----------------------------------------------------------------
    def patch_replica_status(
        self, replica: PostgresPhysicalReplica, patch: Mapping[str, Any]
    ) -> None:
        written = self.api.merge_patch(
            names.REPLICA_KIND,
            replica.namespace,
            replica.name,
            {"status": dict(patch)},
            status=True,
        )
        self.observer.wrote("replica", replica.key, replica.key, written)

    def patch_restore_status(
        self, replica: PostgresPhysicalReplica, name: str, patch: Mapping[str, Any]
    ) -> None:
        written = self.api.merge_patch(
            names.RESTORE_KIND, replica.namespace, name, {"status": dict(patch)}, status=True
        )
        self.observer.wrote("restore", f"{replica.namespace}/{name}", replica.key, written)

    def emit_event(self, replica: PostgresPhysicalReplica, event: EmitEvent) -> None:
        self.api.create(
            event_document(replica.to_wire(), event, instance=self.identity, now=self.clock())
        )

    def emit_quietly(self, regarding: Mapping[str, Any], event: EmitEvent) -> None:
        """An event outside any plan (an invalid spec, a refused Secret): not recording
        it is logged, never a failure of what the pass was doing."""
        try:
            self.api.create(
                event_document(regarding, event, instance=self.identity, now=self.clock())
            )
        except Exception as exc:
            meta = Meta.of(regarding)
            log.warning(
                "event %s for %s/%s not recorded: %s", event.reason, meta.namespace, meta.name, exc
            )

    # -- the replica's resources ----------------------------------------------------------
    def ensure_replica_resources(
        self, replica: PostgresPhysicalReplica, step: plan.EnsureReplicaResources
    ) -> None:
        annotations = step.service_annotations
        wanted = (
            authored_version(replica),
            step.analytics_username,
            tuple(step.extra_usernames),
            tuple(sorted((annotations or {}).items())),
            annotations is None,
        )
        with self._lock:
            if self._ensured.get(replica.key) == wanted:
                return
        ns = replica.namespace
        if self.api.create_if_missing(workloads.credentials_secret(replica, generate_password())):
            log.info(
                "%s: created Secret %s", replica.key, names.replica_creds_secret_name(replica.name)
            )
        self.api.create_if_missing(workloads.admin_secret(replica, generate_password()))
        for username in step.extra_usernames:
            self.api.create_if_missing(
                workloads.extra_user_secret(replica, username, generate_password())
            )
        ensure_persistent_user_secrets(self.api, replica)
        if not self.api.create_if_missing(workloads.stable_service(replica)) and annotations:
            current = self.api.get("Service", ns, replica.name) or {}
            have = current.get("metadata", {}).get("annotations") or {}
            missing = {k: v for k, v in annotations.items() if have.get(k) != v}
            if missing:
                self.api.merge_patch(
                    "Service", ns, replica.name, {"metadata": {"annotations": missing}}
                )
        with self._lock:
            self._ensured[replica.key] = wanted

    def list_snapshots(self, replica: PostgresPhysicalReplica, step: plan.ListSnapshots) -> None:
        creds = self.observer.kopia_credentials(replica.key)
        if creds is None:
            raise StepFailedError("no usable kopia Secret to list snapshots with")
        access = None
        if replica.spec.canopy_source is not None and self.canopy is not None:
            access = self.canopy.listing_access(replica, creds)
        self.listing.request(replica.key, creds, step.wanted, access)

    def create_restore(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        created = self.api.create(restore.to_wire())
        self.observer.wrote("restore", f"{restore.namespace}/{restore.name}", replica.key, created)
        log.info(
            "restore %s/%s created (snapshot %s)",
            restore.namespace,
            restore.name,
            restore.spec.snapshot,
        )

    def delete_restore(self, replica: PostgresPhysicalReplica, step: plan.DeleteRestore) -> None:
        ns = replica.namespace
        if step.pods_first:
            for pod in self.observer.pods_of(ns, step.restore):
                self.api.delete("Pod", ns, pod.meta.name)
        self.observer.deleted("restore", f"{ns}/{step.restore}")
        if self.api.delete(names.RESTORE_KIND, ns, step.restore):
            log.info("restore %s/%s deleted", ns, step.restore)

    def provision_users(self, replica: PostgresPhysicalReplica, step: plan.ProvisionUsers) -> None:
        restore = self.observer.restore(replica.namespace, step.restore)
        pod = self.observer.ready_pod(restore) if restore is not None else None
        if restore is None or pod is None or pod.ip is None:
            raise StepFailedError(
                f"restore {step.restore} has no ready PostgreSQL pod to provision the users on"
            )
        done = provision_switching_restore(self.api, replica, restore, pod.ip)
        log.info("%s: login roles of %s provisioned: %s", replica.key, step.restore, done.summary())
        for event in done.events():
            self.emit_event(replica, event)

    def point_service_at(self, replica: PostgresPhysicalReplica, step: plan.PointServiceAt) -> None:
        if self._label_ready(replica.namespace, step.restore) == 0:
            raise StepFailedError(
                f"restore {step.restore} has no running PostgreSQL pod to switch to"
            )
        self.api.merge_patch(
            "Service",
            replica.namespace,
            replica.name,
            {"spec": {"selector": workloads.stable_service_selector(step.restore)}},
        )
        log.info("%s: Service %s now selects restore %s", replica.key, replica.name, step.restore)

    def mark_outgoing(self, replica: PostgresPhysicalReplica, step: plan.MarkOutgoing) -> None:
        # Best effort, on the superseded restore's pod while it still runs.
        restore = self.observer.restore(replica.namespace, step.restore)
        pod = self.observer.ready_pod(restore) if restore is not None else None
        if pod is None or pod.ip is None:
            log.info("%s: restore %s has no running pod to mark", replica.key, step.restore)
            return
        password = secret_value(
            self.api, replica.namespace, names.admin_creds_secret_name(replica.name), "password"
        )
        restore_info.mark_outgoing(
            PodEndpoint(pod.ip, password).conninfo(restore_info.DATABASE),
            label=f"{replica.namespace}/{step.restore}",
            scrub=lambda text: scrub(text, [password]),
        )

    def run_switchover_step(
        self, replica: PostgresPhysicalReplica, step: plan.RunSwitchoverStep
    ) -> None:
        if step.kind is SwitchoverStep.REDACTION:
            self._redact(replica, step)
            return
        if step.kind is not SwitchoverStep.SCHEMA_MIGRATION:
            # Never called: the shell reports the steps not in supported_switchover_steps.
            raise StepUnavailable(f"{step.kind} is not supported by {RUNTIME_NAME} yet")
        ns = replica.namespace
        source = self.observer.restore(ns, step.source_restore) if step.source_restore else None
        if source is None:
            raise StepFailedError(f"the serving restore {step.source_restore} is gone")
        copy = KubeCopy(
            self.api, self.observer, replica, source.name, step.restore, self.config().placement
        )
        try:
            SchemaMigration(
                replica,
                step,
                copy,
                patch=lambda patch: self.patch_replica_status(replica, patch),
                event=lambda event: self.emit_event(replica, event),
                source_snapshot_bytes=parse_quantity(source.spec.snapshot_size),
                now=self.clock(),
            ).run()
        except Exception as exc:
            # A driver's error may quote its connection string.
            raise StepFailedError(scrub(str(exc), copy.secrets)) from None
        # The copy runs in its Job; it is looked at from the next pass, soon.
        self.observer.requeue("replica", replica.key, SCHEMA_COPY_POLL_S)

    def _redact(self, replica: PostgresPhysicalReplica, step: plan.RunSwitchoverStep) -> None:
        """On a thread of the operator, over TCP to the switching restore's ready pod as the
        admin role (as the provisioning); the manifest is fetched from the operator."""
        password = secret_value(
            self.api, replica.namespace, names.admin_creds_secret_name(replica.name), "password"
        )

        def conninfo_for() -> ConninfoFor | None:
            restore = self.observer.restore(replica.namespace, step.restore)
            pod = self.observer.ready_pod(restore) if restore is not None else None
            if pod is None or pod.ip is None:
                return None
            return PodEndpoint(pod.ip, password).conninfo

        RedactionStep(
            replica,
            step,
            self.redactions,
            self.redaction_retries,
            conninfo_for,
            patch=lambda patch: self.patch_replica_status(replica, patch),
            event=lambda event: self.emit_event(replica, event),
            wake=lambda delay: self.observer.requeue("replica", replica.key, delay),
            scrub=lambda text: scrub(text, [password]),
        ).run()

    def notification_input(
        self, replica: PostgresPhysicalReplica, restore_name: str
    ) -> NotificationInput | None:
        ns = replica.namespace
        fresh = self.read_replica(replica.key)
        restore = self.observer.restore(ns, restore_name)
        if restore is None:
            raw = self.api.get(names.RESTORE_KIND, ns, restore_name)
            restore = None if raw is None else PostgresPhysicalRestore.model_validate(raw)
        if fresh is None or restore is None:
            return None
        secrets = notification_secrets(
            ns, fresh.spec.notifications, lambda n, name: self.api.get("Secret", n, name)
        )
        for reason in secrets.refused.values():
            log.warning("%s: notification header %s", replica.key, reason)
            self.emit_quietly(
                fresh.to_wire(), EmitEvent(EventType.WARNING, NOTIFICATION_SECRET_REFUSED, reason)
            )
        password = secret_value(
            self.api, ns, names.replica_creds_secret_name(replica.name), "password"
        )
        return NotificationInput(
            replica=fresh,
            restore=restore,
            password=password,
            secrets=secrets.found,
            unavailable=secrets.unavailable(),
        )

    def report_verification(
        self, replica: PostgresPhysicalReplica, step: plan.ReportVerification
    ) -> None:
        """Sizes and checks from the restored server, added to its waiting report while
        the server still runs (an ephemeral replica tears it down on the next pass)."""
        if step.outcome is not VerificationOutcome.SUCCESS:
            return
        restore = self.observer.restore(replica.namespace, step.restore)
        pod = self.observer.ready_pod(restore) if restore is not None else None
        if pod is None or pod.ip is None:
            return
        password = secret_value(
            self.api, replica.namespace, names.admin_creds_secret_name(replica.name), "password"
        )
        endpoint = PodEndpoint(pod.ip, password)
        health = check_health(endpoint, ADMIN_ROLE)
        remaining_collations(health, endpoint.conninfo)
        details: dict[str, Any] = {"checks": [c.as_dict() for c in health.checks]}
        if health.sizes:
            details["sizes"] = dict(health.sizes)
        self.reports.add_health(replica.namespace, replica.name, step.restore, details)

    # -- a restore's work -----------------------------------------------------------------
    def prepare_restore_storage(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.PrepareRestoreStorage,
    ) -> None:
        self.api.create_if_missing(workloads.data_pvc(replica, restore))
        cache = workloads.kopia_cache_pvc(replica, restore.spec.snapshot_size)
        if self.api.create_if_missing(cache):
            return
        name = names.kopia_cache_pvc_name(replica.name)
        current = self.api.get("PersistentVolumeClaim", replica.namespace, name) or {}
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
                    name,
                    {"spec": {"resources": {"requests": {"storage": want}}}},
                )
            except Exception as exc:
                # Not every storage class can expand: the restore goes on with the smaller
                # cache (kopia evicts), so this is no failure of the step.
                log.warning("%s: the kopia cache volume cannot grow: %s", replica.key, exc)

    def start_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.StartRestoreWork,
    ) -> None:
        canopy = None
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                raise StepFailedError(
                    "canopy replicas need the operator's CANOPY_BASE_URL; set it in the "
                    "operator's environment"
                )
            if step.run_id and restore.status.run_id != step.run_id:
                # This pass persisted the run id; the object in hand predates it.
                restore = restore.model_copy(
                    update={"status": restore.status.model_copy(update={"run_id": step.run_id})}
                )
            # Also writes the restore's broker token Secret, bound to this run id.
            canopy = self.canopy.job_settings(replica, restore)
        job = workloads.restore_job(replica, restore, self.config(), canopy=canopy)
        if self.api.create_if_missing(job):
            log.info(
                "restore %s/%s: Job %s started",
                restore.namespace,
                restore.name,
                job["metadata"]["name"],
            )

    def check_data(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.CheckData,
    ) -> None:
        """Start `<restore>-data-check` once; the observer reads its verdict."""
        job = workloads.data_check_job(replica, restore, self.config(), step.depth)
        if self.api.create_if_missing(job):
            log.info(
                "restore %s/%s: Job %s started (data checks at %s depth)",
                restore.namespace,
                restore.name,
                job["metadata"]["name"],
                step.depth,
            )
        else:
            # The cache can lag: a verdict is looked for again soon.
            self.observer.requeue("restore", f"{restore.namespace}/{restore.name}", 10)

    def cleanup_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.CleanupRestoreWork,
    ) -> None:
        self.api.delete("Job", restore.namespace, names.restore_job_name(restore.name))

    def detect_postgres_version(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.DetectPostgresVersion,
    ) -> None:
        # The restore Job's termination message normally carries the version (observed in
        # `Observer.work`); this Job reads it from the volume (`Observer.version_detection`).
        # Left to its TTL once done: the restore's status holds the result by then.
        name = names.version_detect_job_name(restore.name)
        if self.observer.caches.jobs.get(restore.namespace, name) is not None:
            return
        if self.api.create_if_missing(workloads.version_detect_job(restore, self.config())):
            log.info(
                "restore %s/%s: no PostgreSQL version reported; Job %s started to read it "
                "from the data volume",
                restore.namespace,
                restore.name,
                name,
            )

    def ensure_server(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.EnsureServer,
    ) -> None:
        version = restore.status.postgres_version
        if not version:
            raise StepFailedError(f"restore {restore.name} has no PostgreSQL version yet")
        key = f"{restore.namespace}/{restore.name}"
        deployment = workloads.postgres_deployment(replica, restore, self.config(), None, version)
        service = workloads.restore_service(restore)
        digest = repr((deployment, service))
        uid = restore.metadata.uid or ""
        cached = self.observer.caches.deployments.get(restore.namespace, restore.name)
        if (
            cached is not None
            and restore.effective_phase is RestorePhase.ACTIVE
            and not workloads.made_by_pgro(cached)
        ):
            # Adoption of a reference install (docs/migrating-from-the-reference.md): this
            # serving Deployment was made by the reference operator. Applying pgro's
            # definition would change its pod template, and so restart the database its
            # clients are connected to. It is kept as it is: its pods already carry the
            # labels pgro selects on (`pgro.bes.au/restore`; MarkReadyForTraffic re-stamps
            # ready-for-traffic on the pod, not the template), and the next restore
            # replaces it with pgro's own. Only Active: a restore that is not serving yet
            # gets pgro's Deployment (its provisioning needs pgro's `setup`).
            self.api.create_if_missing(service)
            return
        live = Meta.of(cached).generation if cached is not None else None
        with self._lock:
            held = self._applied.get(key)
        current = (
            held is not None
            and (held.uid, held.digest) == (uid, digest)
            and live is not None
            and (held.generation is None or live <= held.generation)
        )
        if not current:
            applied = self.api.apply(deployment)
            self.api.create_if_missing(service)
            with self._lock:
                self._applied[key] = _Applied(uid, digest, Meta.of(applied).generation)
        # Migrating too: a pod recreated, or an operator restarted, mid-migration is
        # provisioned again before the migration is looked at (the observer reports the
        # server ready only once provisioned).
        if restore.effective_phase in (RestorePhase.READY, RestorePhase.MIGRATING):
            pod = self.observer.ready_pod(restore)
            if pod is not None:
                self.provisioner.start(replica, restore, pod)

    def reindex_after_reset(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.ReindexAfterReset,
    ) -> None:
        """On a thread of the operator, over SQL to the restore's ready pod as the admin
        role (as the provisioning): the pod's image has the server, the operator the plan."""
        key = f"{restore.namespace}/{restore.name}"
        if self.reindexes.running(key):
            return
        pod = self.observer.ready_pod(restore)
        if pod is None or pod.ip is None:
            return  # planned again on the next pass, once the pod serves
        password = secret_value(
            self.api, replica.namespace, names.admin_creds_secret_name(replica.name), "password"
        )
        endpoint = PodEndpoint(pod.ip, password)

        def warn(note: str) -> None:
            event = EmitEvent(
                EventType.WARNING, full_reindex.EVENT_INCOMPLETE, note[:1000], restore.name
            )
            self.emit_quietly(replica.to_wire(), event)

        self.reindexes.start(
            key,
            endpoint.conninfo,
            lambda patch: self.patch_restore_status(replica, restore.name, patch),
            warn,
            scrub=lambda text: scrub(text, [password]),
        )

    def mark_ready_for_traffic(
        self, replica: PostgresPhysicalReplica, step: plan.MarkReadyForTraffic
    ) -> None:
        self._label_ready(replica.namespace, step.restore)

    def _label_ready(self, ns: str, restore: str) -> int:
        """Stamp the ready-for-traffic label on the restore's running PostgreSQL pods
        (those lacking it); returns how many run."""
        running = [p for p in self.observer.server_pods(ns, restore) if p.running]
        for pod in running:
            if pod.meta.labels.get(names.LABEL_READY_FOR_TRAFFIC) != "true":
                self.api.merge_patch(
                    "Pod", ns, pod.meta.name, workloads.pod_ready_for_traffic_patch()
                )
        return len(running)

    def run_migration(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: plan.RunMigration,
    ) -> None:
        migrator = KubeMigrator(self.api, self.observer, replica, restore, self.config().placement)
        try:
            AppMigration(
                replica,
                restore,
                migrator,
                patch=lambda patch: self.patch_restore_status(replica, restore.name, patch),
                event=lambda event: self.emit_event(replica, event),
            ).run()
        except Exception as exc:
            # A driver's error may quote its connection string.
            raise StepFailedError(scrub(str(exc), migrator.secrets)) from None
        # The Job's own changes wake the restore sooner (the Jobs watch selects its label).
        self.observer.requeue("restore", f"{restore.namespace}/{restore.name}", MIGRATION_POLL_S)

    # -- after a replica's plan -----------------------------------------------------------
    def replica_plan_applied(self, replica: PostgresPhysicalReplica) -> None:
        self.reports.deliver(replica)
        sweep_orphan_pods(self.api, self.observer, replica)
