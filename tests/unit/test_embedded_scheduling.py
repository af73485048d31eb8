"""`pgro run` reconciles an object when it is due or something it depends on changed, not
on every tick: the runtime in process, ticked by hand, with real kopia and PgBouncer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgro.pgbouncer.endpoint import StableEndpoint
from pgro.postgres.account import RunAccount
from pgro.runtimes.embedded.runtime import RunOptions, Runtime
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest


def _endpoint(name: str, run_dir: Path, account: RunAccount, port: int, host: str) -> Any:
    return StableEndpoint(name, run_dir, account, port=port, listen_host=host)


@pytest.fixture
def manifest(scratch: Path) -> Path:
    return write_manifest(scratch / "m.yaml", *_replicas())


@pytest.fixture
def runtime(scratch: Path, manifest: Path) -> Iterator[Runtime]:
    rt = Runtime(RunOptions([manifest], scratch / "state"), _endpoint)
    rt.load()
    rt.shell.rebuild_admission()
    try:
        yield rt
    finally:
        rt.shutdown()


def passes(rt: Runtime) -> float:
    value = rt.metrics.registry.get_sample_value(
        "postgres_restore_reconciliations_total", {"controller": "replica"}
    )
    return value or 0.0


def condition(rt: Runtime, key: str, type_: str) -> tuple[str, str]:
    replica = rt.store.replica(key)
    assert replica is not None
    found = next(c for c in replica.status.conditions if c.type == type_)
    return (found.status, found.reason)


def test_idle_replicas_cost_no_pass_until_a_change_or_a_listing_makes_them_due(
    runtime: Runtime, manifest: Path, scratch: Path
) -> None:
    rt = runtime
    for _ in range(3):
        rt.tick()
    assert condition(rt, "default/a", "KopiaSecretValid") == ("False", "SecretNotFound")
    # Settled: nothing is due before the credentials' requeue (60 s), nothing is written.
    before, writes = passes(rt), rt.store.writes
    for _ in range(20):
        rt.tick()
    assert (passes(rt), rt.store.writes) == (before, writes)

    # The Secret appears (a reload): both replicas are reconciled on the next tick.
    repo = {
        "filesystemPath": str(scratch / "no-repo"),
        "repositoryPassword": "scheduling-test-password",
    }
    write_manifest(manifest, secret_doc("kopia", repo), *_replicas())
    rt.reload_requested.set()
    rt.tick()
    assert passes(rt) >= before + 2
    assert condition(rt, "default/a", "KopiaSecretValid")[0] == "True"

    # Their listing runs off the loop; when it ends, the replicas are due at once (not
    # at a requeue time), and the next tick records the failure.
    deadline = time.monotonic() + 60
    while rt.listings.get("default/a") is None or rt.listings.get("default/b") is None:
        assert time.monotonic() < deadline, "the listing did not finish"
        time.sleep(0.1)
    rt.tick()
    for key in ("default/a", "default/b"):
        assert condition(rt, key, "SnapshotAvailable")[0] == "False"


def _replicas() -> list[dict[str, Any]]:
    return [replica_doc("a", secret="kopia"), replica_doc("b", secret="kopia")]
