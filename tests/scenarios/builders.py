"""Small builders for the core decision tests (unit and scenario)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import ReplicaObservation, SecretCheck, SnapshotListing
from pgro.core.queue import AdmissionQueue
from pgro.core.replica_decision import ReplicaPlan, decide_replica
from pgro.core.schedule import schedule_input_hash
from pgro.core.snapshot import Snapshot, SnapshotSource
from tests.fixtures import manifests

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
GIB = 1024**3


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def replica(status: dict[str, Any] | None = None, **spec: Any) -> PostgresPhysicalReplica:
    defaults: dict[str, Any] = {
        "ephemeral": None,
        "schedule": "0 */6 * * *",
        "scheduleJitter": "0s",
    }
    return manifests.replica(
        "fiji",
        namespace="analytics",
        metadata={"uid": "u-1", "generation": 3},
        status=status or {},
        **{**defaults, **spec},
    )


def restore(
    name: str,
    snapshot: str = "k1",
    phase: str | None = None,
    *,
    size: int = GIB,
    deleting: bool = False,
    **status: Any,
) -> PostgresPhysicalRestore:
    if phase is not None:
        status["phase"] = phase
    metadata: dict[str, Any] = {"labels": {"pgro.bes.au/replica": "fiji"}}
    if deleting:
        metadata["deletionTimestamp"] = stamp(NOW)
    return manifests.restore(
        name,
        "fiji",
        namespace="analytics",
        metadata=metadata,
        status=status,
        snapshot=snapshot,
        snapshotSize=size,
        storageSize="2Gi",
    )


def snap(id: str, start: datetime, size: int = GIB, host: str = "prod") -> Snapshot:
    return Snapshot(
        id=id,
        description="",
        source=SnapshotSource(host=host, user_name="postgres", path="/data"),
        tags=MappingProxyType({}),
        start_time=stamp(start),
        size_bytes=size,
    )


def listing(*snapshots: Snapshot, at: datetime = NOW) -> SnapshotListing:
    return SnapshotListing(listed_at=at, snapshots=tuple(snapshots))


def settled_status(**fields: Any) -> dict[str, Any]:
    """A status a previous pass already wrote, so only the tested change shows."""
    base: dict[str, Any] = {
        "serviceName": "fiji",
        "connectionInfo": {
            "host": "fiji.analytics.svc.cluster.local",
            "port": 5432,
            "database": "postgres",
            "username": "analytics",
            "passwordSecret": "fiji-creds",
        },
        "queuePosition": 0,
        "nextScheduledRestore": stamp(NOW + timedelta(hours=6)),
        "scheduleInputHash": schedule_input_hash("0 */6 * * *", timedelta(0)),
        "conditions": [
            {
                "type": "KopiaSecretValid",
                "status": "True",
                "reason": "SecretValid",
                "message": "All required keys present",
                "lastTransitionTime": stamp(NOW - timedelta(days=1)),
                "observedGeneration": 3,
            },
            {
                "type": "ScheduleValid",
                "status": "True",
                "reason": "ValidSchedule",
                "message": "Schedule '0 */6 * * *' is valid",
                "lastTransitionTime": stamp(NOW - timedelta(days=1)),
                "observedGeneration": 3,
            },
        ],
    }
    base.update(fields)
    return base


def decide(
    the_replica: PostgresPhysicalReplica,
    restores: list[PostgresPhysicalRestore] | None = None,
    *,
    the_listing: SnapshotListing | None = None,
    secret: SecretCheck | None = None,
    queue: AdmissionQueue | None = None,
    now: datetime = NOW,
    draw: float = 0.5,
) -> ReplicaPlan:
    obs = ReplicaObservation(
        replica=the_replica,
        restores=restores or [],
        secret=secret if secret is not None else SecretCheck.valid(),
        listing=the_listing,
    )
    return decide_replica(obs, queue or AdmissionQueue(), now, lambda: draw)
