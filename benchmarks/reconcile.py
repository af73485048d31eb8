"""How fast the core decides, and whether a fleet with nothing to do writes anything.

Builds 1,000 replicas with 3 restores each (the serving Active restore, the one it
replaced, still inside its grace period, and a Failed restore not yet due for cleanup),
settles them with one pass whose status patches are applied, then times, in the same run:

- baseline: reading the objects (`model_validate` of each replica and its restores from
  wire form), which every runtime pays before deciding anything;
- replica decisions: `decide_replica` for every replica;
- restore decisions: `decide_restore` for every restore.

Prints decisions per second, the ratio of a decision to reading its objects, and the
number of status patches the steady-state passes produced (target: zero).

    .venv/bin/python -m benchmarks.reconcile [--replicas 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import (
    ReplicaObservation,
    RestoreObservation,
    RestoreWork,
    SecretCheck,
    Server,
    ServerState,
)
from pgro.core.plan import PatchReplicaStatus, PatchRestoreStatus
from pgro.core.queue import AdmissionQueue
from pgro.core.replica_decision import decide_replica
from pgro.core.restore_machine import decide_restore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


def _restore_doc(
    replica: str, namespace: str, name: str, snapshot: str, status: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalRestore",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"pgro.bes.au/replica": replica},
        },
        "spec": {
            "replica": {"name": replica},
            "snapshot": snapshot,
            "snapshotSize": 50 * 1024**3,
            "storageSize": "55Gi",
        },
        "status": status,
    }


def build_fleet(count: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    fleet = []
    for index in range(count):
        name, namespace = "canopy-replica", f"site-{index:04d}"
        current, previous, failed = (f"{name}-2026030{d}-000000" for d in (3, 2, 1))
        replica = {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalReplica",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{index}"},
            "spec": {
                "kopiaSecretRef": {"name": "kopia"},
                "schedule": "H H * * *",
                "scheduleJitter": "10m",
                "switchoverGracePeriod": "1d",
                "persistentSchemas": ["reports"],
            },
            "status": {
                "currentRestore": current,
                "previousRestore": previous,
                "lastRestoreCompletedAt": _stamp(NOW - timedelta(hours=1)),
                "schemaMigrationPhase": "complete",
            },
        }
        restores = [
            _restore_doc(
                name,
                namespace,
                current,
                "k3",
                {"phase": "Active", "postgresVersion": "16", "activatedAt": _stamp(NOW)},
            ),
            _restore_doc(name, namespace, previous, "k2", {"phase": "Active"}),
            _restore_doc(
                name,
                namespace,
                failed,
                "k1",
                {"phase": "Failed", "createdAt": _stamp(NOW - timedelta(seconds=10))},
            ),
        ]
        fleet.append((replica, restores))
    return fleet


def _timed(rounds: int, run: Callable[[], None]) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    rng = random.Random(1)
    queue = AdmissionQueue()
    fleet = build_fleet(args.replicas)

    # Settle: a first pass writes identity, schedule and conditions; apply its patches.
    settle_patches = 0
    for replica_doc, restore_docs in fleet:
        replica = PostgresPhysicalReplica.model_validate(replica_doc)
        observed = [PostgresPhysicalRestore.model_validate(d) for d in restore_docs]
        plan = decide_replica(
            ReplicaObservation(replica, observed, SecretCheck.valid()), queue, NOW, rng.random
        )
        queue = plan.queue
        for step in plan.status_patches:
            replica_doc["status"] = _merge(replica_doc["status"], dict(step.patch))
            settle_patches += 1

    replicas = [PostgresPhysicalReplica.model_validate(r) for r, _ in fleet]
    restores = [[PostgresPhysicalRestore.model_validate(d) for d in ds] for _, ds in fleet]
    replica_obs = [
        ReplicaObservation(replica, mine, SecretCheck.valid())
        for replica, mine in zip(replicas, restores, strict=True)
    ]
    restore_obs = [
        RestoreObservation(
            restore,
            replica,
            work=RestoreWork.succeeded("16"),
            server=Server(ServerState.READY),
        )
        for replica, mine in zip(replicas, restores, strict=True)
        for restore in mine
    ]

    def read_objects() -> None:
        for replica_doc, restore_docs in fleet:
            PostgresPhysicalReplica.model_validate(replica_doc)
            for doc in restore_docs:
                PostgresPhysicalRestore.model_validate(doc)

    steady_replica_patches = 0
    steady_restore_patches = 0

    def replica_pass() -> None:
        nonlocal steady_replica_patches
        later = NOW + timedelta(minutes=5)
        for obs in replica_obs:
            plan = decide_replica(obs, queue, later, rng.random)
            steady_replica_patches += sum(
                1 for s in plan.steps if isinstance(s, PatchReplicaStatus)
            )

    def restore_pass() -> None:
        nonlocal steady_restore_patches
        later = NOW + timedelta(minutes=5)
        for obs in restore_obs:
            plan = decide_restore(obs, queue, later, lambda: "run")
            steady_restore_patches += sum(
                1 for s in plan.steps if isinstance(s, PatchRestoreStatus | PatchReplicaStatus)
            )

    baseline = _timed(args.rounds, read_objects)
    replica_time = _timed(args.rounds, replica_pass)
    restore_time = _timed(args.rounds, restore_pass)
    n_replicas = len(replica_obs)
    n_restores = len(restore_obs)

    print(f"fleet: {n_replicas} replicas, {n_restores} restores; median of {args.rounds} rounds")
    print(f"settling pass: {settle_patches} status patches (first sight of each replica)")
    print(
        f"baseline, reading the objects: {baseline * 1000:.1f} ms "
        f"({(n_replicas + n_restores) / baseline:,.0f} objects/s)"
    )
    print(
        f"replica decisions: {n_replicas / replica_time:,.0f}/s "
        f"({replica_time / n_replicas * 1e6:.1f} µs each; "
        f"{replica_time / baseline:.2f}× the baseline for the whole fleet)"
    )
    print(
        f"restore decisions: {n_restores / restore_time:,.0f}/s "
        f"({restore_time / n_restores * 1e6:.1f} µs each)"
    )
    print(
        f"steady-state status patches: {steady_replica_patches} replica, "
        f"{steady_restore_patches} restore over {args.rounds} passes (target: 0)"
    )


if __name__ == "__main__":
    main()
