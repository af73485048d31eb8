"""The narrow interface a runtime implements for the reconciler shell.

The shell (`pgro.reconciler.shell`) decides and orchestrates; an `Effects` only observes
and acts, one step at a time. `pgro run` (local processes and SQLite), `pgro operator`
(Kubernetes objects) and the scenario tests' simulated world each implement it, so all
three run the same orchestration.

Every apply method is idempotent (a plan may be applied twice, or partly) and raises to
say the step failed: the shell then stops the plan (unless the step is best effort),
backs the step off and reports it. A method never reports a failure itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import ReplicaObservation, RestoreObservation
from pgro.core.plan import (
    CheckData,
    CleanupRestoreWork,
    DeleteRestore,
    DetectPostgresVersion,
    EmitEvent,
    EnsureReplicaResources,
    EnsureServer,
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
)


class Gone:
    """The object no longer exists: the shell forgets what it held for it."""

    def __repr__(self) -> str:
        return "GONE"


GONE: Final = Gone()


@dataclass(frozen=True)
class ReplicaView:
    """One replica as observed for a decision.

    `secrets`: values that must never appear in a step's error (the kopia Secret's, the
    repository password); the shell scrubs them from every failure it reports.
    """

    observation: ReplicaObservation
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class NotificationInput:
    """What a notification round needs that only the runtime can read."""

    replica: PostgresPhysicalReplica  # re-read: holds the switchover's connectionInfo
    restore: PostgresPhysicalRestore
    password: str | None  # the analytics role's, for targets with includePassword
    secrets: Mapping[tuple[str, str], Mapping[str, Any]]  # header Secrets by (ns, name)
    unavailable: Mapping[tuple[str, str], str]  # header Secrets not used, with why


class StepUnavailable(Exception):
    """The runtime cannot do this step (yet): a failure with a message naming why."""


class Effects(Protocol):
    """Observe and act; see the module docstring for the contract."""

    # How messages name the runtime ("pgro run", "the pgro operator").
    runtime_name: str
    # The pre-switchover steps this runtime can run; others are reported as unsupported.
    supported_switchover_steps: frozenset[SwitchoverStep]

    # -- observing ------------------------------------------------------------------------
    def observe_replica(self, key: str) -> ReplicaView | Gone | None:
        """None: it exists but cannot be decided on now (an invalid spec, already reported)."""
        ...

    def observe_restore(self, key: str) -> RestoreObservation | Gone | None: ...

    def read_replica(self, key: str) -> PostgresPhysicalReplica | None:
        """The replica as stored now, including this pass's own writes."""
        ...

    def restores_in_progress(self) -> Mapping[str, str]:
        """replica key → the restore holding (or entitled to) an admission slot."""
        ...

    def queue_positions(self) -> Mapping[str, int]:
        """replica key → its `status.queuePosition` (0: none), to rebuild the line."""
        ...

    # -- status and events ----------------------------------------------------------------
    def patch_replica_status(
        self, replica: PostgresPhysicalReplica, patch: Mapping[str, Any]
    ) -> None: ...

    def patch_restore_status(
        self, replica: PostgresPhysicalReplica, name: str, patch: Mapping[str, Any]
    ) -> None: ...

    def emit_event(self, replica: PostgresPhysicalReplica, event: EmitEvent) -> None: ...

    # -- the replica's resources ----------------------------------------------------------
    def ensure_replica_resources(
        self, replica: PostgresPhysicalReplica, step: EnsureReplicaResources
    ) -> None: ...

    def list_snapshots(self, replica: PostgresPhysicalReplica, step: ListSnapshots) -> None:
        """Start a listing; its outcome is observed by a later pass (asynchronously)."""
        ...

    def create_restore(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> None: ...

    def delete_restore(self, replica: PostgresPhysicalReplica, step: DeleteRestore) -> None: ...

    def provision_users(self, replica: PostgresPhysicalReplica, step: ProvisionUsers) -> None:
        """Raise when a role cannot be provisioned: the switchover waits for it."""
        ...

    def point_service_at(self, replica: PostgresPhysicalReplica, step: PointServiceAt) -> None:
        """Raise when the restore has no running server to switch to."""
        ...

    def mark_outgoing(self, replica: PostgresPhysicalReplica, step: MarkOutgoing) -> None: ...

    def notification_input(
        self, replica: PostgresPhysicalReplica, restore_name: str
    ) -> NotificationInput | None:
        """None: nothing to send (no targets, or the restore is gone)."""
        ...

    def report_verification(
        self, replica: PostgresPhysicalReplica, step: ReportVerification
    ) -> None: ...

    def run_switchover_step(
        self, replica: PostgresPhysicalReplica, step: RunSwitchoverStep
    ) -> None: ...

    # -- a restore's work -----------------------------------------------------------------
    def prepare_restore_storage(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: PrepareRestoreStorage,
    ) -> None: ...

    def start_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: StartRestoreWork,
    ) -> None: ...

    def cleanup_restore_work(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: CleanupRestoreWork,
    ) -> None: ...

    def detect_postgres_version(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: DetectPostgresVersion,
    ) -> None: ...

    def ensure_server(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: EnsureServer,
    ) -> None: ...

    def mark_ready_for_traffic(
        self, replica: PostgresPhysicalReplica, step: MarkReadyForTraffic
    ) -> None: ...

    def run_migration(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: RunMigration,
    ) -> None: ...

    def check_data(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: CheckData,
    ) -> None: ...

    def reindex_after_reset(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        step: ReindexAfterReset,
    ) -> None:
        """Start the full reindex after a WAL reset in the background (see the step)."""
        ...

    # -- after a replica's plan -----------------------------------------------------------
    def replica_plan_applied(self, replica: PostgresPhysicalReplica) -> None:
        """Runtime follow-up once a replica's plan ran (e.g. delivering canopy reports)."""
        ...
