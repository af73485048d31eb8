"""One step, to the one effect that applies it.

The `match` is exhaustive over `PlanStep` and ends in `assert_never`: a step type added to
the plan without a handler here is a mypy error, never a silently dropped step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_never

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
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
    PlanStep,
    PointServiceAt,
    PrepareRestoreStorage,
    ProvisionUsers,
    ReindexAfterReset,
    ReportVerification,
    RunMigration,
    RunSwitchoverStep,
    SendNotifications,
    StartRestoreWork,
)
from pgro.reconciler.effects import Effects

# The shell's own handlers for the two steps it orchestrates itself.
SwitchoverHandler = Callable[[PostgresPhysicalReplica, RunSwitchoverStep], None]
NotifyHandler = Callable[[PostgresPhysicalReplica, str], None]


class NotARestorePlan(Exception):
    """A restore-side step reached the shell without the restore it belongs to."""


def _need(restore: PostgresPhysicalRestore | None, step: PlanStep) -> PostgresPhysicalRestore:
    if restore is None:
        raise NotARestorePlan(f"{type(step).__name__} is planned by the restore decision only")
    return restore


def dispatch(
    effects: Effects,
    step: PlanStep,
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore | None,
    *,
    switchover_unsupported: SwitchoverHandler,
    notify: NotifyHandler,
) -> None:
    """Apply one step. The two orchestrated steps (an unsupported switchover step, a
    notification round) are the shell's own and come in as handlers."""
    match step:
        case PatchReplicaStatus(patch=patch):
            if patch:
                effects.patch_replica_status(replica, patch)
        case PatchRestoreStatus(restore=name, patch=patch):
            if patch:
                effects.patch_restore_status(replica, name, patch)
        case EmitEvent():
            effects.emit_event(replica, step)
        case EnsureReplicaResources():
            effects.ensure_replica_resources(replica, step)
        case ListSnapshots():
            effects.list_snapshots(replica, step)
        case CreateRestore(restore=new):
            effects.create_restore(replica, new)
        case DeleteRestore():
            effects.delete_restore(replica, step)
        case ProvisionUsers():
            effects.provision_users(replica, step)
        case PointServiceAt():
            effects.point_service_at(replica, step)
        case MarkOutgoing():
            effects.mark_outgoing(replica, step)
        case SendNotifications(restore=name):
            notify(replica, name)
        case ReportVerification():
            effects.report_verification(replica, step)
        case RunSwitchoverStep(kind=kind):
            if kind in effects.supported_switchover_steps:
                effects.run_switchover_step(replica, step)
            else:
                switchover_unsupported(replica, step)
        case PrepareRestoreStorage():
            effects.prepare_restore_storage(replica, _need(restore, step), step)
        case StartRestoreWork():
            effects.start_restore_work(replica, _need(restore, step), step)
        case CleanupRestoreWork():
            effects.cleanup_restore_work(replica, _need(restore, step), step)
        case DetectPostgresVersion():
            effects.detect_postgres_version(replica, _need(restore, step), step)
        case EnsureServer():
            effects.ensure_server(replica, _need(restore, step), step)
        case MarkReadyForTraffic():
            effects.mark_ready_for_traffic(replica, step)
        case RunMigration():
            effects.run_migration(replica, _need(restore, step), step)
        case CheckData():
            effects.check_data(replica, _need(restore, step), step)
        case ReindexAfterReset():
            effects.reindex_after_reset(replica, _need(restore, step), step)
        case _:
            assert_never(step)
