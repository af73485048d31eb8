"""`pgro.reconciler.effects.Effects` for `pgro run`: objects in the store (store.py), a
restore's directory, worker and server (work.py), a replica's PgBouncer and users
(endpoints.py), listings (`ReplicaListings`). A step that fails raises."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgro.api.data_checks import DataChecks
from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import KopiaCredentials
from pgro.clock import utcnow
from pgro.core import full_reindex, reasons
from pgro.core.observations import Endpoint as ConnectionEndpoint
from pgro.core.observations import (
    MigrationOutcome,
    ReplicaObservation,
    RestoreObservation,
    SecretCheck,
    VersionDetection,
    WorkState,
)
from pgro.core.plan import (
    CheckData,
    CleanupRestoreWork,
    DeleteRestore,
    DetectPostgresVersion,
    EmitEvent,
    EnsureReplicaResources,
    EnsureServer,
    EventType,
    ListSnapshots,
    MarkOutgoing,
    MarkReadyForTraffic,
    PointServiceAt,
    PrepareRestoreStorage,
    ProvisionUsers,
    ReindexAfterReset,
    ReportVerification,
    RunMigration,
    RunSwitchoverStep,
    StartRestoreWork,
    SwitchoverStep,
    VerificationOutcome,
)
from pgro.core.redaction import Redacted
from pgro.core.restore_set import is_in_progress
from pgro.core.step_failures import EVENT_STEP_FAILED
from pgro.core.verify_depth import parse_depth
from pgro.pipeline.app_migration import AppMigration
from pgro.pipeline.background import BackgroundTasks
from pgro.pipeline.full_reindex import BackgroundReindex, ReindexOutcomes
from pgro.pipeline.locale_repair import remaining_collations
from pgro.pipeline.migrator_command import MigratorCommand
from pgro.pipeline.redaction_step import ConninfoFor, RedactionRetries, RedactionStep
from pgro.pipeline.schema_migration import SchemaMigration
from pgro.pipeline.switchover_users import provision_switchover_users
from pgro.postgres import restore_info
from pgro.postgres.health import check_health
from pgro.reconciler.effects import GONE, Gone, NotificationInput, ReplicaView, StepUnavailable
from pgro.reconciler.listing import ReplicaListings
from pgro.reconciler.shell import Schedule
from pgro.runtimes.embedded.canopy import EmbeddedCanopy
from pgro.runtimes.embedded.endpoints import Endpoints
from pgro.runtimes.embedded.manifest import Manifest, ManifestError, kopia_credentials
from pgro.runtimes.embedded.migrator import LocalMigrator
from pgro.runtimes.embedded.persistent_credentials import (
    forget_removed_users,
    persistent_credentials,
)
from pgro.runtimes.embedded.schema_copy import EmbeddedCopy
from pgro.runtimes.embedded.store import Store
from pgro.runtimes.embedded.work import Restores

log = logging.getLogger("pgro.run")

RUNTIME_NAME = "pgro run"
NO_MIGRATOR = (
    "migrateTo runs the application's migrate command, and this pgro run has none: start it "
    "with --migrator CMD (docs/upgrade-rehearsals.md)"
)
# How often a running persistent-schema copy is looked at.
SCHEMA_COPY_POLL_S = 2.0


@dataclass(eq=False)
class EmbeddedEffects:
    store: Store
    restores: Restores
    endpoints: Endpoints
    listings: ReplicaListings
    canopy: EmbeddedCanopy | None
    schedule: Schedule
    listen_host: str
    manifest: Manifest = field(default_factory=Manifest)  # as last loaded; replaced on reload
    # `--migrator`: the application's migrate command for `migrateTo` restores; None: refused.
    migrator: MigratorCommand | None = None
    # The full reindexes after pg_resetwal running in this process, and what they recorded
    # (written to the store on the reconcile thread: the store's connection is not shared).
    reindexes: BackgroundReindex = field(default_factory=BackgroundReindex)
    _reindex_outcomes: ReindexOutcomes = field(default_factory=lambda: ReindexOutcomes())
    runtime_name: str = field(default=RUNTIME_NAME, init=False)
    # The redactions running on threads of pgro run, and their failed attempts.
    redactions: BackgroundTasks[Redacted] = field(default_factory=lambda: BackgroundTasks())
    redaction_retries: RedactionRetries = field(default_factory=RedactionRetries)
    # The schema build does not run in pgro run yet.
    supported_switchover_steps: frozenset[SwitchoverStep] = field(
        default=frozenset({SwitchoverStep.SCHEMA_MIGRATION, SwitchoverStep.REDACTION}),
        init=False,
    )

    # -- credentials ----------------------------------------------------------------------
    def _credentials(
        self, replica: PostgresPhysicalReplica
    ) -> tuple[SecretCheck | None, tuple[str, ...]]:
        """The replica's kopia Secret as the decision sees it, and the values no step error
        may show (the repository's password and keys)."""
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                return SecretCheck.invalid(
                    "the replica's credentials come from canopy, but this pgro run has no "
                    "--canopy-url",
                    reasons.CANOPY_NOT_CONFIGURED,
                ), ()
            repo = self.canopy.book.repository(replica.key)
            secrets = (repo.repository_password,) if repo is not None else ()
            return self.canopy.secret_check(replica), secrets
        try:
            creds = kopia_credentials(self.manifest, replica)
        except ManifestError as exc:
            if exc.reason == "SecretNotFound":
                return SecretCheck.not_found(str(exc)), ()
            if exc.reason == "SecretInvalid":
                return SecretCheck.invalid(str(exc)), ()
            return None, ()
        return SecretCheck.valid(), tuple(creds.secret_values())

    def _canopy(self) -> EmbeddedCanopy:
        if self.canopy is None:
            raise RuntimeError("canopy replicas need pgro run --canopy-url")
        return self.canopy

    # -- observing ------------------------------------------------------------------------
    def observe_replica(self, key: str) -> ReplicaView | Gone | None:
        replica = self.store.replica(key)
        if replica is None:
            return GONE
        port = self.endpoints.port(key)
        secret, secrets = self._credentials(replica)
        return ReplicaView(
            ReplicaObservation(
                replica=replica,
                restores=self.store.restores(key),
                secret=secret,
                listing=self.listings.get(key),
                endpoint=ConnectionEndpoint(self.listen_host, port) if port else None,
            ),
            secrets=secrets,
        )

    def observe_restore(self, key: str) -> RestoreObservation | Gone | None:
        restore = self.store.restore(key)
        if restore is None:
            return GONE
        work = self.restores.observe(restore)
        return RestoreObservation(
            restore=restore,
            replica=self.store.replica(f"{restore.namespace}/{restore.replica_name}"),
            work=work,
            server=self.restores.server(restore),
            # The worker's outcome carries the version: no detection step of its own.
            version_detection=VersionDetection(WorkState.SUCCEEDED, work.postgres_version)
            if work.state is WorkState.SUCCEEDED
            else None,
            migration=MigrationOutcome.unsupported(NO_MIGRATOR)
            if restore.spec.migrate_to and self.migrator is None
            else None,
        )

    def read_replica(self, key: str) -> PostgresPhysicalReplica | None:
        return self.store.replica(key)

    def restores_in_progress(self) -> dict[str, str]:
        return {
            f"{r.namespace}/{r.replica_name}": r.name
            for r in self.store.restores()
            if is_in_progress(r)
        }

    def queue_positions(self) -> dict[str, int]:
        return {r.key: r.status.queue_position or 0 for r in self.store.replicas()}

    # -- status and events ----------------------------------------------------------------
    def patch_replica_status(
        self, replica: PostgresPhysicalReplica, patch: Mapping[str, Any]
    ) -> None:
        self.store.patch_replica_status(replica.key, patch)

    def patch_restore_status(
        self, replica: PostgresPhysicalReplica, name: str, patch: Mapping[str, Any]
    ) -> None:
        self.store.patch_restore_status(f"{replica.namespace}/{name}", patch)

    def emit_event(self, replica: PostgresPhysicalReplica, event: EmitEvent) -> None:
        self.store.add_event(replica.key, str(event.type), event.reason, event.note, event.related)
        if event.reason != EVENT_STEP_FAILED:  # the shell logged that one already
            level = logging.WARNING if str(event.type) == "Warning" else logging.INFO
            log.log(level, "%s %s: %s", replica.key, event.reason, event.note)

    # -- the replica's resources ----------------------------------------------------------
    def ensure_replica_resources(
        self, replica: PostgresPhysicalReplica, step: EnsureReplicaResources
    ) -> None:
        forget_removed_users(self.store, self.endpoints.credentials, replica)
        self._route(replica, replica.status.current_restore)

    def _route(self, replica: PostgresPhysicalReplica, restore: str | None) -> None:
        if restore is None:
            self.endpoints.route(replica, None)
            return
        backend = self.restores.server_endpoint(f"{replica.namespace}/{restore}")
        if backend is None:
            # Not adopted yet (after a restart): leave PgBouncer routed as it is rather than
            # refuse logins; taking the server on schedules this replica again.
            self.endpoints.hold(replica)
            return
        self.endpoints.route(replica, backend)

    def list_snapshots(self, replica: PostgresPhysicalReplica, step: ListSnapshots) -> None:
        if replica.spec.canopy_source is None:
            creds = kopia_credentials(self.manifest, replica)
            self.listings.request(replica.key, creds, step.wanted)
            return
        canopy = self._canopy()
        # Shared by repository; kopia reaches it through a proxy living as long as the listing.
        key = canopy.repository(replica).through("")
        access = lambda: canopy.listing_through(replica, canopy.repository(replica))  # noqa: E731
        self.listings.request(replica.key, key, step.wanted, access)

    def create_restore(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None:
        if not self.store.create_restore(restore):
            raise RuntimeError(f"restore {restore.name} already exists")

    def delete_restore(self, replica: PostgresPhysicalReplica, step: DeleteRestore) -> None:
        target = self.store.restore(f"{replica.namespace}/{step.restore}")
        if target is not None:
            self.restores.delete(target)

    def provision_users(self, replica: PostgresPhysicalReplica, step: ProvisionUsers) -> None:
        key = f"{replica.namespace}/{step.restore}"
        backend = self.restores.server_endpoint(key)
        restore = self.store.restore(key)
        if backend is None or restore is None:
            raise RuntimeError(f"restore {step.restore} has no running server to provision")
        users = self.endpoints.users(replica)
        done = provision_switchover_users(
            lambda db: backend.conninfo(db, "postgres"),
            replica,
            restore,
            analytics=users[replica.spec.analytics_username],
            extra_users=[users[u.name] for u in replica.spec.extra_users],
            persistent_users=persistent_credentials(self.endpoints.credentials, replica),
        )
        log.info("%s: login roles of %s provisioned: %s", replica.key, step.restore, done.summary())
        for event in done.events():
            self.emit_event(replica, event)

    def point_service_at(self, replica: PostgresPhysicalReplica, step: PointServiceAt) -> None:
        if self.restores.server_endpoint(f"{replica.namespace}/{step.restore}") is None:
            raise RuntimeError(f"restore {step.restore} has no running server to switch to")
        self._route(replica, step.restore)

    def mark_outgoing(self, replica: PostgresPhysicalReplica, step: MarkOutgoing) -> None:
        # Best effort, on the superseded restore's server while it still runs.
        backend = self.restores.server_endpoint(f"{replica.namespace}/{step.restore}")
        if backend is None:
            log.info("%s: restore %s has no running server to mark", replica.key, step.restore)
            return
        restore_info.mark_outgoing(
            backend.conninfo(restore_info.DATABASE, "postgres"), label=step.restore
        )

    def notification_input(
        self, replica: PostgresPhysicalReplica, restore_name: str
    ) -> NotificationInput | None:
        # Re-read: connectionInfo was written by the status patch just before this step.
        fresh = self.store.replica(replica.key)
        restore = self.store.restore(f"{replica.namespace}/{restore_name}")
        if fresh is None or restore is None:
            return None
        analytics = self.endpoints.credentials.ensure(replica.key, fresh.spec.analytics_username)
        return NotificationInput(fresh, restore, analytics.password, self.manifest.secrets, {})

    def report_verification(
        self, replica: PostgresPhysicalReplica, step: ReportVerification
    ) -> None:
        # Adds what only the running server tells (sizes, checks); EmbeddedCanopy delivers.
        if self.canopy is None:
            return
        fresh = self.store.replica(replica.key)
        if fresh is None:
            return
        details: dict[str, Any] = {}
        backend = self.restores.server_endpoint(f"{replica.namespace}/{step.restore}")
        if step.outcome is VerificationOutcome.SUCCESS and backend is not None:
            health = check_health(backend, "postgres")
            remaining_collations(health, lambda dbname: backend.conninfo(dbname, "postgres"))
            details["checks"] = [c.as_dict() for c in health.checks]
            if health.sizes:
                details["sizes"] = dict(health.sizes)
        self.canopy.add_details(fresh, step.restore, details or None)

    def run_switchover_step(
        self, replica: PostgresPhysicalReplica, step: RunSwitchoverStep
    ) -> None:
        if step.kind is SwitchoverStep.REDACTION:
            self._redact(replica, step)
            return
        if step.kind is not SwitchoverStep.SCHEMA_MIGRATION:
            # Never called: the shell reports the steps not in supported_switchover_steps.
            raise StepUnavailable(f"{step.kind} is not supported by {RUNTIME_NAME} yet")
        source = self.store.restore(f"{replica.namespace}/{step.source_restore}")
        if source is None:
            raise RuntimeError(f"the serving restore {step.source_restore} is gone")
        copy = EmbeddedCopy(
            self.restores, replica.namespace, replica.name, source.name, step.restore
        )
        SchemaMigration(
            replica,
            step,
            copy,
            patch=lambda patch: self.patch_replica_status(replica, patch),
            event=lambda event: self.emit_event(replica, event),
            source_snapshot_bytes=parse_quantity(source.spec.snapshot_size),
            now=utcnow(),
        ).run()
        # The copy is watched from the next pass: soon, not at the idle requeue.
        self.schedule("replica", replica.key, SCHEMA_COPY_POLL_S)

    def _redact(self, replica: PostgresPhysicalReplica, step: RunSwitchoverStep) -> None:
        """On a thread of pgro run, over the switching restore's socket as its superuser."""
        key = f"{replica.namespace}/{step.restore}"

        def conninfo_for() -> ConninfoFor | None:
            endpoint = self.restores.server_endpoint(key)
            if endpoint is None:
                return None
            return lambda dbname: endpoint.conninfo(dbname, "postgres")

        RedactionStep(
            replica,
            step,
            self.redactions,
            self.redaction_retries,
            conninfo_for,
            patch=lambda patch: self.patch_replica_status(replica, patch),
            event=lambda event: self.emit_event(replica, event),
            wake=lambda delay: self.schedule("replica", replica.key, delay),
        ).run()

    # -- a restore's work -----------------------------------------------------------------
    def prepare_restore_storage(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: PrepareRestoreStorage,
    ) -> None:
        self.restores.prepare_storage(restore)

    def start_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: StartRestoreWork,
    ) -> None:
        proxy: dict[str, Any] | None = None
        creds: KopiaCredentials
        if replica.spec.canopy_source is not None:
            # The run id from the step: this pass persisted it, `restore` predates that.
            creds, proxy = self._canopy().restore_job(replica, restore, step.run_id)
        else:
            creds = kopia_credentials(self.manifest, replica)
        self.restores.start(replica, restore, creds, proxy)

    def cleanup_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: CleanupRestoreWork,
    ) -> None:
        self.restores.cleanup(restore)

    def detect_postgres_version(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: DetectPostgresVersion,
    ) -> None:
        pass  # the worker's outcome carries the version (see observe_restore)

    def ensure_server(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: EnsureServer,
    ) -> None:
        if self.restores.ensure_server(replica, restore, self.endpoints.users(replica)):
            # The endpoint may have waited for this server (see _route).
            self.schedule("replica", replica.key, 0.0)

    def mark_ready_for_traffic(
        self, replica: PostgresPhysicalReplica, step: MarkReadyForTraffic
    ) -> None:
        pass  # the endpoint routes by restore: there is no label to put back

    def check_data(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: CheckData,
    ) -> None:
        """pgro run checks the data in the restore worker, before the server first starts,
        and records them with the work. A restore whose worker recorded none (restored by
        a pgro before the checks existed) is noted, not checked: its server serves now."""
        checks = DataChecks(
            depth=parse_depth(step.depth),
            verdict="not_run",
            message=(
                "the restore worker recorded no data checks (a restore from before pgro "
                "checked the data); restore the snapshot again to check it"
            ),
        )
        self.patch_restore_status(replica, restore.name, {"dataChecks": checks.to_wire()})

    def reindex_after_reset(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: ReindexAfterReset,
    ) -> None:
        """On a thread of pgro run, over the server's socket as its superuser. What the
        thread recorded is written here, on the next pass (planned while it runs)."""
        key = f"{restore.namespace}/{restore.name}"
        patches, warnings = self._reindex_outcomes.take(key)
        for patch in patches:
            self.store.patch_restore_status(key, patch)
        for note in warnings:
            self.emit_event(
                replica,
                EmitEvent(EventType.WARNING, full_reindex.EVENT_INCOMPLETE, note, restore.name),
            )
        if self.reindexes.running(key) or self._reindex_outcomes.finished(key):
            return
        endpoint = self.restores.server_endpoint(key)
        if endpoint is None:
            return  # planned again once the server runs

        def record(patch: Mapping[str, Any]) -> None:
            self._reindex_outcomes.put(key, patch)
            self.schedule("restore", key, 0.0)

        self.reindexes.start(
            key,
            lambda dbname: endpoint.conninfo(dbname, "postgres"),
            record,
            lambda note: self._reindex_outcomes.warn(key, note),
        )

    def run_migration(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: RunMigration,
    ) -> None:
        if self.migrator is None:
            raise StepUnavailable(NO_MIGRATOR)  # observe_restore has failed it already
        key = f"{restore.namespace}/{restore.name}"
        endpoint = self.restores.server_endpoint(key)
        if endpoint is None:
            raise RuntimeError(f"restore {restore.name} has no running server to migrate")
        analytics = self.endpoints.users(replica)[replica.spec.analytics_username]
        migrator = LocalMigrator(
            self.migrator,
            restore,
            self.restores.directory(restore),
            endpoint,
            self.restores.account,
            analytics.username,
            analytics.password,
            self.restores.runners,
        )
        AppMigration(
            replica,
            restore,
            migrator,
            patch=lambda patch: self.store.patch_restore_status(key, patch),
            event=lambda event: self.emit_event(replica, event),
        ).run()

    def replica_plan_applied(self, replica: PostgresPhysicalReplica) -> None:
        pass  # canopy reports are delivered by EmbeddedCanopy.poll, every pass
