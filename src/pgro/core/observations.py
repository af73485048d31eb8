"""What a runtime observes and hands to the decisions, in terms both runtimes can map to.

Kubernetes: a Job's status, a Deployment's `readyReplicas`, a Secret GET. Embedded: a
local process's exit, a server answering `pg_isready`, a Secret read from a manifest. The
decisions only ever see these abstractions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from pgro.api.data_checks import DataChecks
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.snapshot import Snapshot


class SecretState(StrEnum):
    VALID = "valid"
    NOT_FOUND = "not-found"
    INVALID = "invalid"


@dataclass(frozen=True)
class SecretCheck:
    """The runtime's check of the `kopiaSecretRef` Secret. `detail` is secret-free text
    (e.g. `missing key: bucket`, or the lookup error)."""

    state: SecretState
    detail: str = ""
    # The condition reason when the runtime knows better than the default for the state
    # (canopy replicas: `CanopyNotConfigured`, `SecretInvalid`, ...).
    reason: str | None = None

    @classmethod
    def valid(cls) -> SecretCheck:
        return cls(SecretState.VALID)

    @classmethod
    def not_found(cls, detail: str) -> SecretCheck:
        return cls(SecretState.NOT_FOUND, detail)

    @classmethod
    def invalid(cls, detail: str, reason: str | None = None) -> SecretCheck:
        return cls(SecretState.INVALID, detail, reason)


@dataclass(frozen=True)
class SnapshotListing:
    """The latest listing of a replica's repository, or of its failure.

    The runtime keeps the latest one per replica and builds it with `record_listing_*`,
    which carry the streaks the backoffs need (failed listings; listings that lacked the
    wanted snapshot). Losing it (a restart) is harmless: the next decision that needs a
    listing asks for one.
    """

    listed_at: datetime
    snapshots: tuple[Snapshot, ...] | None = None
    error: str | None = None
    consecutive_failures: int = 0
    # The snapshot this listing was taken to find (`ListSnapshots.wanted`, canopy's desired
    # snapshot), and how many listings in a row taken for it did not hold it: a listing
    # taken for it is newer than canopy's offer, and the streak sets the re-list backoff.
    wanted: str | None = None
    missing_streak: int = 0

    @property
    def failed(self) -> bool:
        return self.snapshots is None

    def holds(self, snapshot_id: str) -> bool:
        return self.snapshots is not None and any(s.id == snapshot_id for s in self.snapshots)


def record_listing_success(
    snapshots: Sequence[Snapshot],
    listed_at: datetime,
    previous: SnapshotListing | None = None,
    wanted: str | None = None,
) -> SnapshotListing:
    """`previous`: the replica's listing before this one; `wanted`: the step's `wanted`."""
    listing = SnapshotListing(listed_at=listed_at, snapshots=tuple(snapshots), wanted=wanted)
    if wanted is None or listing.holds(wanted):
        return listing
    streak = previous.missing_streak if previous is not None and previous.wanted == wanted else 0
    return replace(listing, missing_streak=streak + 1)


def record_listing_failure(
    previous: SnapshotListing | None, error: str, listed_at: datetime
) -> SnapshotListing:
    """`error` must be secret-free: it is shown in a condition message. What the previous
    listing was taken for, and its missing streak, carry over: a failed listing neither
    found the wanted snapshot nor showed it missing."""
    if previous is None:
        return SnapshotListing(listed_at=listed_at, error=error, consecutive_failures=1)
    streak = previous.consecutive_failures if previous.failed else 0
    return SnapshotListing(
        listed_at=listed_at,
        error=error,
        consecutive_failures=streak + 1,
        wanted=previous.wanted,
        missing_streak=previous.missing_streak,
    )


@dataclass(frozen=True)
class Endpoint:
    """Where the replica's stable endpoint answers, for `status.connectionInfo`."""

    host: str
    port: int


@dataclass(frozen=True)
class ReplicaObservation:
    replica: PostgresPhysicalReplica
    # The restores labelled for this replica, in any order.
    restores: Sequence[PostgresPhysicalRestore]
    # None for canopy replicas, or when the runtime has not been able to check yet.
    secret: SecretCheck | None
    listing: SnapshotListing | None = None
    # None: the Kubernetes Service `<replica>.<namespace>.svc.cluster.local:5432`.
    endpoint: Endpoint | None = None


class WorkState(StrEnum):
    NOT_STARTED = "not-started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class RestoreWork:
    """The download-and-prepare work of one restore (a Job; a local process).

    `name` is what `status.restoreJob.name` shows; `postgres_version` is the major
    version found in the data, when the work could report it; `reason` says why a
    failed piece of work failed (e.g. the snapshot holds no PostgreSQL data directory).
    """

    state: WorkState
    name: str | None = None
    postgres_version: str | None = None
    reason: str = ""
    completed_at: datetime | None = None
    fixes: Mapping[str, bool] | None = None
    # The checks that read the data, when the work ran them (pgro run's worker).
    data_checks: DataChecks | None = None

    @classmethod
    def not_started(cls) -> RestoreWork:
        return cls(WorkState.NOT_STARTED)

    @classmethod
    def running(cls) -> RestoreWork:
        return cls(WorkState.RUNNING)

    @classmethod
    def succeeded(
        cls,
        postgres_version: str | None,
        completed_at: datetime | None = None,
        fixes: Mapping[str, bool] | None = None,
        data_checks: DataChecks | None = None,
    ) -> RestoreWork:
        return cls(
            WorkState.SUCCEEDED,
            postgres_version=postgres_version,
            completed_at=completed_at,
            fixes=fixes,
            data_checks=data_checks,
        )

    @classmethod
    def failed(cls, reason: str, data_checks: DataChecks | None = None) -> RestoreWork:
        return cls(WorkState.FAILED, reason=reason, data_checks=data_checks)


class ServerState(StrEnum):
    """PostgreSQL on the restored data: `READY` is the only health signal (Kubernetes:
    `readyReplicas > 0`; embedded: `pg_isready` and no pending quick reindex)."""

    NOT_READY = "not-ready"
    READY = "ready"
    # It cannot come up (embedded: the process exited). Kubernetes never reports this
    # and relies on the readiness timeout, as the reference does.
    FAILED = "failed"


@dataclass(frozen=True)
class Server:
    state: ServerState = ServerState.NOT_READY
    reason: str = ""


@dataclass(frozen=True)
class VersionDetection:
    """Reading the major version from the data when the work could not report it."""

    state: WorkState
    postgres_version: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class MigrationOutcome:
    """`migrateTo` when the runtime cannot run migrations at all (`reason` says why and
    what to configure), which fails the restore. A runtime that can run them reports
    nothing here: the runner records `status.migrationResult` itself."""

    failed: bool = True
    reason: str = ""

    @classmethod
    def unsupported(cls, reason: str) -> MigrationOutcome:
        return cls(failed=True, reason=reason)


@dataclass(frozen=True)
class DataCheckRun:
    """The run of a restore's data checks (the operator's `<restore>-data-check` Job):
    `result` once it ended with a verdict, `reason` when it ended without one."""

    state: WorkState
    result: DataChecks | None = None
    reason: str = ""


@dataclass(frozen=True)
class RestoreObservation:
    restore: PostgresPhysicalRestore
    # None when the replica is gone (its restores are then being cascaded away).
    replica: PostgresPhysicalReplica | None
    work: RestoreWork = RestoreWork(WorkState.NOT_STARTED)
    server: Server = Server()
    version_detection: VersionDetection | None = None
    migration: MigrationOutcome | None = None
    # None where the runtime runs the checks inside the restore work (pgro run's worker,
    # whose `RestoreWork.data_checks` carries them).
    data_check: DataCheckRun | None = None
