"""How fast the core decides, and whether a fleet with nothing to do writes anything.

Builds 1,000 replicas with 3 restores each (the serving Active restore, the one it
replaced, still inside its grace period, and a Failed restore not yet due for cleanup),
settles them with one pass whose status patches are applied, then times, in the same run:

- baseline: reading the objects (`model_validate` of each replica and its restores from
  wire form), which every runtime pays before deciding anything;
- replica decisions: `decide_replica` for every replica;
- restore decisions: `decide_restore` for every restore;
- shell passes: `Shell.reconcile` for every replica and restore, as every runtime runs them
  (observe, decide under the queue lock, apply the plan through the exhaustive dispatch,
  backoff bookkeeping, metrics), over effects that serve the same observations from memory
  and count every step they are asked to apply.

Prints decisions per second, the ratio of a decision to reading its objects, the shell's
cost over the bare decisions, and the number of status patches (and, through the shell,
steps of any kind that write) the steady-state passes produced (target: zero).

    .venv/bin/python -m benchmarks.reconcile [--replicas 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
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
from pgro.reconciler.effects import ReplicaView
from pgro.reconciler.shell import Shell

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# When the steady-state passes run: settled, before the Failed restore's cleanup (300 s
# after its creation) and before the schedule is due.
LATER = NOW + timedelta(minutes=1)


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


class FleetEffects:
    """The settled fleet served from memory; every step the shell applies is counted.

    Reading and idempotent steps (ensure resources, ensure the server, mark ready) are what
    a settled replica's plan holds; anything else here would be a write in a runtime."""

    runtime_name = "the benchmark"
    supported_switchover_steps: frozenset[Any] = frozenset()
    IDEMPOTENT = frozenset({"ensure_replica_resources", "ensure_server", "mark_ready_for_traffic"})

    def __init__(
        self, replicas: dict[str, ReplicaObservation], restores: dict[str, RestoreObservation]
    ) -> None:
        self.replicas = replicas
        self.restores = restores
        self.calls: Counter[str] = Counter()

    def observe_replica(self, key: str) -> ReplicaView:
        return ReplicaView(self.replicas[key])

    def observe_restore(self, key: str) -> RestoreObservation:
        return self.restores[key]

    def read_replica(self, key: str) -> PostgresPhysicalReplica:
        return self.replicas[key].replica

    def restores_in_progress(self) -> dict[str, str]:
        return {}

    def queue_positions(self) -> dict[str, int]:
        return {}

    def replica_plan_applied(self, replica: PostgresPhysicalReplica) -> None:
        pass

    def writes(self) -> int:
        return sum(n for name, n in self.calls.items() if name not in self.IDEMPOTENT)

    def __getattr__(self, name: str) -> Callable[..., None]:
        def count(*args: Any) -> None:
            self.calls[name] += 1

        return count


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
        for obs in replica_obs:
            plan = decide_replica(obs, queue, LATER, rng.random)
            steady_replica_patches += sum(
                1 for s in plan.steps if isinstance(s, PatchReplicaStatus)
            )

    def restore_pass() -> None:
        nonlocal steady_restore_patches
        for obs in restore_obs:
            plan = decide_restore(obs, queue, LATER, lambda: "run")
            steady_restore_patches += sum(
                1 for s in plan.steps if isinstance(s, PatchRestoreStatus | PatchReplicaStatus)
            )

    effects = FleetEffects(
        {obs.replica.key: obs for obs in replica_obs},
        {f"{obs.restore.namespace}/{obs.restore.name}": obs for obs in restore_obs},
    )
    shell = Shell(
        effects,
        schedule=lambda kind, key, delay: None,
        clock=lambda: LATER,
        limit=2,
        random=rng.random,
        new_run_id=lambda: "run",
    )

    def shell_pass() -> None:
        for key in effects.replicas:
            shell.reconcile("replica", key)
        for key in effects.restores:
            shell.reconcile("restore", key)

    baseline = _timed(args.rounds, read_objects)
    replica_time = _timed(args.rounds, replica_pass)
    restore_time = _timed(args.rounds, restore_pass)
    shell_time = _timed(args.rounds, shell_pass)
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
        f"shell passes (replicas and restores): {(n_replicas + n_restores) / shell_time:,.0f}/s "
        f"({shell_time / (replica_time + restore_time):.2f}× the bare decisions); "
        f"writing steps applied: {effects.writes()} over {args.rounds} passes (target: 0; "
        f"idempotent steps: {sum(effects.calls.values()) - effects.writes()})"
    )
    print(
        f"steady-state status patches: {steady_replica_patches} replica, "
        f"{steady_restore_patches} restore over {args.rounds} passes (target: 0)"
    )


if __name__ == "__main__":
    main()
