"""What a decision asks a runtime to do: ordered steps, and how status changes are drafted.

The contract, shared by both runtimes:

- A plan's `steps` run **in order**. When a step that is not `best_effort` fails, the
  runtime stops there and runs the decision again later; the remaining steps are not
  applied. This is how a plan says "marker before destructive step": the status patch
  that records `verifiedSnapshotId` comes before the restore's deletion, so the deletion
  never happens without the marker.
- `best_effort` steps (events, notifications, reports, cosmetic marks) may fail without
  stopping the plan; the runtime logs the failure.
- Every step is idempotent: applying a plan twice, or a later plan after a partial one,
  converges. Decisions never assume their previous plan was applied.
- Status patches are JSON merge patches of `status` in wire form (camelCase, RFC 3339);
  a key with value None removes the field. They hold only what changed, and a decision
  with nothing to change emits none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Generic, TypeVar

from pydantic import BaseModel

from pgro.api.conditions import Condition, ConditionStatus, set_condition
from pgro.api.restore import PostgresPhysicalRestore


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class SwitchoverStep(StrEnum):
    """Work the replica runs on a Switching restore before the Service moves to it."""

    REDACTION = "redaction"
    SCHEMA_MIGRATION = "schema-migration"
    SCHEMA_BUILD = "schema-build"


class VerificationOutcome(StrEnum):
    SUCCESS = "Success"
    FAILURE = "Failure"


@dataclass(frozen=True)
class Step:
    @property
    def best_effort(self) -> bool:
        return False


# Replica-side steps ---------------------------------------------------------------


@dataclass(frozen=True)
class PatchReplicaStatus(Step):
    """Merge-patch the replica's `status` (the status subresource on Kubernetes)."""

    patch: Mapping[str, Any]


@dataclass(frozen=True)
class EnsureReplicaResources(Step):
    """Create what a replica owns if missing: `<replica>-creds` (never rotated), the
    extra-user Secrets, and the stable endpoint (a Service on Kubernetes).

    `service_annotations` None means "leave the endpoint's annotations alone" — the
    reference merge-patched `null`, wiping every annotation each pass. A mapping is
    merged in; keys absent from it are not removed (no record says who set them).
    """

    analytics_username: str
    extra_usernames: tuple[str, ...]
    service_annotations: Mapping[str, str] | None


@dataclass(frozen=True)
class ListSnapshots(Step):
    """List the repository's snapshots; the runtime records the outcome with
    `record_listing_success(snapshots, listed_at, previous=…, wanted=step.wanted)` /
    `record_listing_failure` and runs the decision again.

    `wanted`: the canopy desired snapshot this listing is taken to find (None for other
    replicas). Passing it on is what lets the decision tell a listing taken after canopy's
    offer from an older one, and back off while the snapshot is still missing."""

    wanted: str | None = None


@dataclass(frozen=True)
class CreateRestore(Step):
    """Create this restore object (labels, owner reference and spec filled in). A name
    conflict is a failure like any other: the next pass observes what exists."""

    restore: PostgresPhysicalRestore


@dataclass(frozen=True)
class DeleteRestore(Step):
    """Delete a restore; its database goes with it. `pods_first`: delete its pods before
    the object, so a pod orphaned by the cascade cannot keep the volume bound."""

    restore: str
    pods_first: bool = False


@dataclass(frozen=True)
class RunSwitchoverStep(Step):
    """Start (or keep running, or restart after a failure) a pre-switchover step on
    `restore`. The runner records the outcome in status (`redactionPhase`,
    `schemaMigrationPhase`, the restore's `schemaBuildResult`) and emits the step's own
    events (`RedactionFailed`, `SchemaMigrationPartial`, `SchemaMigrationTimedOut`),
    since only it sees the step finish."""

    kind: SwitchoverStep
    restore: str
    source_restore: str | None = None
    schemas: tuple[str, ...] = ()
    budget: timedelta | None = None


@dataclass(frozen=True)
class ProvisionUsers(Step):
    """Provision the switching restore's login roles again, right before the endpoint moves
    to it: the persistent users (`spec.persistentUsers`: roles, grants, `search_path`) and the
    grants of every managed role on the objects the persistent-schema migration created (its
    dump carries no privileges). A failure holds the switchover; the serving restore keeps
    serving and the next pass retries."""

    restore: str


@dataclass(frozen=True)
class PointServiceAt(Step):
    """Switch over: make the stable endpoint serve `restore` (label its running pod
    ready-for-traffic, then set the Service selector to that restore)."""

    restore: str


@dataclass(frozen=True)
class MarkOutgoing(Step):
    """Mark the superseded restore's database `stage = 'outgoing'`."""

    restore: str

    @property
    def best_effort(self) -> bool:
        return True


@dataclass(frozen=True)
class SendNotifications(Step):
    """Run the replica's notification targets for a completed switchover; the runtime
    writes `status.notifications` itself with what happened."""

    restore: str

    @property
    def best_effort(self) -> bool:
        return True


@dataclass(frozen=True)
class ReportVerification(Step):
    """Canopy only: report a restore's verdict (the report hook)."""

    restore: str
    outcome: VerificationOutcome
    reason: str = ""

    @property
    def best_effort(self) -> bool:
        return True


@dataclass(frozen=True)
class EmitEvent(Step):
    """An event regarding the replica (`related` names a restore, when there is one)."""

    type: EventType
    reason: str
    note: str
    related: str | None = None

    @property
    def best_effort(self) -> bool:
        return True


# Restore-side steps -----------------------------------------------------------------


@dataclass(frozen=True)
class PatchRestoreStatus(Step):
    restore: str
    patch: Mapping[str, Any]


@dataclass(frozen=True)
class PrepareRestoreStorage(Step):
    """Create the restore's data volume (never resized) and make sure the replica's
    kopia cache is large enough. Never waits for the volume to bind."""

    restore: str


@dataclass(frozen=True)
class StartRestoreWork(Step):
    """Start downloading the snapshot and preparing PGDATA (a Job on Kubernetes, a
    local process when embedded). Idempotent: a running piece of work is left alone."""

    restore: str
    run_id: str | None = None


@dataclass(frozen=True)
class CleanupRestoreWork(Step):
    """Drop the finished work's leftovers (the succeeded Job) to free the volume."""

    restore: str


@dataclass(frozen=True)
class DetectPostgresVersion(Step):
    """Read `PG_VERSION` from the restored data; the outcome comes back as a
    `VersionDetection` observation."""

    restore: str


@dataclass(frozen=True)
class EnsureServer(Step):
    """Run PostgreSQL on the restored data, re-applying its definition so upgrades of
    pgro reach running restores (a Deployment on Kubernetes, a process when embedded)."""

    restore: str


@dataclass(frozen=True)
class MarkReadyForTraffic(Step):
    """Re-label the running server ready-for-traffic (a replaced pod may lack it)."""

    restore: str

    @property
    def best_effort(self) -> bool:
        return True


@dataclass(frozen=True)
class RunMigration(Step):
    """`migrateTo`: start the application's migrator against the restore (once), or read
    its result back when it ended (`pgro.pipeline.app_migration.AppMigration`)."""

    restore: str


@dataclass(frozen=True)
class CheckData(Step):
    """Run the checks that read the restore's data at `depth` on its ready server (once),
    or read their verdict back when they ended; the runtime's observation carries it."""

    restore: str
    depth: str


@dataclass(frozen=True)
class ReindexAfterReset(Step):
    """Start, on the restore's running server and in the background, the full reindex due
    after `pg_resetwal` (unless it is running already), and return at once: it never gates
    readiness nor the switchover. The runner records `status.fullReindex` (`running`, then
    `complete`, `partial: …` or `failed: …`), `fixes.reindex` when something was rebuilt, and
    moves `_pgro.restore_info.stage` `reindexing` → `ready`. A runner lost with its process
    (pgro or the operator restarted) leaves `running`, and the next pass starts it again."""

    restore: str

    @property
    def best_effort(self) -> bool:
        return True


# Every step a decision can plan. Plans hold only these, and the shell's dispatch matches
# each (ending in `assert_never`): a step type added here without a handler, or planned
# without being added here, is a type error.
PlanStep = (
    PatchReplicaStatus
    | EnsureReplicaResources
    | ListSnapshots
    | CreateRestore
    | DeleteRestore
    | RunSwitchoverStep
    | ProvisionUsers
    | PointServiceAt
    | MarkOutgoing
    | SendNotifications
    | ReportVerification
    | EmitEvent
    | PatchRestoreStatus
    | PrepareRestoreStorage
    | StartRestoreWork
    | CleanupRestoreWork
    | DetectPostgresVersion
    | EnsureServer
    | MarkReadyForTraffic
    | RunMigration
    | CheckData
    | ReindexAfterReset
)


_S = TypeVar("_S", bound=Step)


def apply_in_order(
    steps: Sequence[_S],
    apply: Callable[[_S], None],
    failed: Callable[[_S, Exception], None],
) -> bool:
    """Apply a plan with the contract above: in order, stopping at the first failing step
    that is not best effort. `failed` hears of every failure (best effort or not) and
    logs it. Returns whether the plan ran to its end."""
    for step in steps:
        try:
            apply(step)
        except Exception as exc:
            failed(step, exc)
            if not step.best_effort:
                return False
    return True


UNSUPPORTED_SWITCHOVER_EVENT: Final = "SwitchoverStepUnsupported"


def unsupported_switchover_step(kind: SwitchoverStep, runtime: str) -> tuple[dict[str, Any], str]:
    """(status patch, event note) for a runtime that cannot run `kind` yet: the phase the
    step owns reads `failed: ...`, so the replica shows why its switchover waits."""
    message = f"{kind.value} is not supported by {runtime} yet"
    field_name = {
        SwitchoverStep.REDACTION: "redactionPhase",
        SwitchoverStep.SCHEMA_MIGRATION: "schemaMigrationPhase",
    }.get(kind)
    patch = {field_name: f"failed: {message}"} if field_name is not None else {}
    return patch, message


_M = TypeVar("_M", bound=BaseModel)


def _normalise(value: object) -> object:
    # Status times are whole seconds on the wire; keep drafts comparable with them.
    if isinstance(value, datetime):
        return value.replace(microsecond=0)
    return value


def _merge_diff(before: Any, after: Any) -> Any:
    if isinstance(before, dict) and isinstance(after, dict):
        diff = {k: _merge_diff(before.get(k), v) for k, v in after.items() if before.get(k) != v}
        diff.update(dict.fromkeys(k for k in before if k not in after))
        return diff
    return after


@dataclass
class StatusDraft(Generic[_M]):
    """Changes to a status model, collected during a decision.

    `set` records a field only when it differs from the base, so the patch holds only
    real changes and a pass that changes nothing yields no patch at all.
    """

    base: _M
    now: datetime
    observed_generation: int | None = None
    changes: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        if name in self.changes:
            return self.changes[name]
        return getattr(self.base, name)

    def set(self, **fields: Any) -> None:
        for name, value in fields.items():
            value = _normalise(value)
            if getattr(self.base, name) == value:
                self.changes.pop(name, None)
            else:
                self.changes[name] = value

    def condition(self, type: str, status: ConditionStatus, reason: str, message: str) -> None:
        current: Sequence[Condition] = self.get("conditions")
        updated = set_condition(
            current, type, status, reason, message, self.now, self.observed_generation
        )
        self.set(conditions=updated)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def result(self) -> _M:
        return self.base.model_copy(update=self.changes)

    def patch(self) -> dict[str, Any]:
        """The merge patch for the changed fields, in wire form.

        Nested objects are diffed too, so a key that disappears from one is sent as null
        (a merge patch would otherwise keep the stale key); lists are sent whole.
        """
        if not self.changes:
            return {}
        fields = type(self.base).model_fields
        names = set(self.changes)
        before = self.base.model_dump(mode="json", by_alias=True, include=names, exclude_none=True)
        after = self.result().model_dump(
            mode="json", by_alias=True, include=names, exclude_none=True
        )
        patch: dict[str, Any] = {}
        for name in self.changes:
            alias = fields[name].alias or name
            patch[alias] = _merge_diff(before.get(alias), after.get(alias))
        return patch

    def take(self) -> dict[str, Any]:
        """The patch so far; later changes are drafted against the patched state."""
        patch = self.patch()
        self.base = self.result()
        self.changes = {}
        return patch
