"""A steady operator sends the API server nothing: the resync re-reads its caches only.

Before, every resync (60 s) forgot what had been ensured and applied, so each replica
re-created its Secrets and Service (409s), GETs its Service, re-applied every restore's
Deployment and GOT its kopia Secret on every pass: at 1,000 replicas, thousands of
requests a minute doing nothing. A real `Operator` runs here against an in-memory API
whose store is the informers' caches (as the watches would leave them), with a real
kopia repository to list, and every request it makes is recorded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.kube.client import KubeApi
from pgro.reconciler.effects import ReplicaView
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from tests.fixtures.kube_api import Clock, MemoryApi, b64
from tests.fixtures.manifests import replica_doc, restore_doc

NS = "team-a"
REPLICA = "analytics"
KEY = f"{NS}/{REPLICA}"
PASSWORD = "steady-repo-pw"


@pytest.fixture
def steady(tmp_path: Path) -> Iterator[tuple[Operator, MemoryApi, Clock]]:
    repo = tmp_path / "repo"
    creds = KopiaCredentials(FilesystemLocation(str(repo)), PASSWORD)
    KopiaRepository(creds, tmp_path / "kopia-state").create()  # empty: nothing to restore
    api = MemoryApi()
    replica = replica_doc(
        REPLICA,
        namespace=NS,
        metadata={"uid": "u-1", "generation": 1},
        schedule="0 3 * * *",
        ephemeral=None,
    )
    api.objects[("PostgresPhysicalReplica", NS, REPLICA)] = replica
    api._bump(replica)
    api.objects[("Secret", NS, "kopia")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kopia", "namespace": NS},
        "data": {"repositoryPassword": b64(PASSWORD), "filesystemPath": b64(str(repo))},
    }
    clock = Clock()
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(
            namespace="pgro-system", identity="t", default_image="img", state_dir=tmp_path
        ),
        clock=clock,
    )
    op.replicas._put((NS, REPLICA), replica)  # the informer, synced at once
    try:
        yield op, api, clock
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def settle(op: Operator, api: MemoryApi) -> None:
    """Passes until the replica is reconciled, its repository listed and the listing's
    outcome written (the listing runs on its own thread)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        before = len(api.calls)
        op.shell.reconcile_replica(KEY)
        if op.listing.get(KEY) is not None and len(api.calls) == before:
            return
        time.sleep(0.05)
    raise AssertionError(f"the replica did not settle; requests: {api.calls[-10:]}")


def test_a_resync_of_a_steady_replica_sends_no_request(
    steady: tuple[Operator, MemoryApi, Clock],
) -> None:
    op, api, clock = steady
    settle(op, api)
    # The first passes did the work: the Secrets and the Service exist, the listing's
    # outcome is in status.
    assert ("Service", NS, REPLICA) in api.objects
    assert ("Secret", NS, f"{REPLICA}-creds") in api.objects
    assert "GET Secret kopia" in api.calls
    api.calls.clear()

    # Ten resyncs a minute apart (well within the relist interval).
    for _ in range(10):
        clock.now += timedelta(seconds=20)
        op._enqueue_all()
        while (item := op.queue.get(timeout=0.01)) is not None:
            op.shell.reconcile(*item)
            op.queue.done(item)
    assert api.calls == []


def test_a_changed_replica_reads_its_kopia_secret_and_recreates_a_deleted_secret(
    steady: tuple[Operator, MemoryApi, Clock],
) -> None:
    op, api, _ = steady
    settle(op, api)
    creds = ("Secret", NS, f"{REPLICA}-creds")
    del api.objects[creds]  # by hand: no watch on Secrets tells the operator
    api.calls.clear()
    op.shell.reconcile_replica(KEY)
    assert api.calls == []
    assert creds not in api.objects

    # Someone annotates the replica (its resourceVersion moves): the kopia Secret is read
    # again, so a rotated one is used without a restart, and what pgro creates is
    # ensured again.
    api.merge_patch(
        "PostgresPhysicalReplica", NS, REPLICA, {"metadata": {"annotations": {"a": "b"}}}
    )
    api.calls.clear()
    op.shell.reconcile_replica(KEY)
    assert "GET Secret kopia" in api.calls
    assert f"POST Secret {REPLICA}-creds" in api.calls
    assert creds in api.objects
    api.calls.clear()
    op.shell.reconcile_replica(KEY)
    assert api.calls == []

    # A status write (pgro's own, or the canopy syncer's) moves the resourceVersion too,
    # but is no reason to read the Secret again or re-create what the replica owns: at
    # 1,000 replicas that was three requests per replica after each of its own writes.
    api.merge_patch(
        "PostgresPhysicalReplica", NS, REPLICA, {"status": {"queuePosition": 0}}, status=True
    )
    api.calls.clear()
    op.shell.reconcile_replica(KEY)
    assert not [c for c in api.calls if c.startswith(("GET Secret", "POST"))], api.calls


def test_an_active_restores_deployment_is_applied_again_only_when_it_changed(
    steady: tuple[Operator, MemoryApi, Clock],
) -> None:
    op, api, _ = steady
    name = f"{REPLICA}-20260304050607"
    restore = restore_doc(
        name,
        REPLICA,
        namespace=NS,
        metadata={"uid": "r-1"},
        status={"phase": "Active", "postgresVersion": "16", "deployment": name},
    )
    api.objects[("PostgresPhysicalRestore", NS, name)] = restore
    op.restores._put((NS, name), restore)
    key = f"{NS}/{name}"

    def watched() -> None:
        """The Deployment as the watch would show it now."""
        op.deployments._put((NS, name), copy.deepcopy(api.objects[("Deployment", NS, name)]))

    op.shell.reconcile_restore(key)
    assert f"APPLY Deployment {name}" in api.calls
    watched()
    api.calls.clear()
    for _ in range(5):
        op.shell.reconcile_restore(key)
    assert api.calls == []

    # Edited by hand: its generation moves past pgro's apply, and pgro's fields come back.
    api.objects[("Deployment", NS, name)]["metadata"]["generation"] = 2
    watched()
    op.shell.reconcile_restore(key)
    assert api.calls[0] == f"APPLY Deployment {name}"
    watched()
    api.calls.clear()
    op.shell.reconcile_restore(key)
    assert api.calls == []

    # Deleted by hand: the watch drops it from the cache, and it is applied again.
    op.deployments._put((NS, name), None)
    op.shell.reconcile_restore(key)
    assert api.calls[0] == f"APPLY Deployment {name}"


def test_a_restore_the_cache_shows_before_the_operators_write_is_not_restored_twice(
    steady: tuple[Operator, MemoryApi, Clock],
) -> None:
    """The race that ran a second restore Job over a starting server: the Job's deletion
    reached the Job watch before the restore's new phase reached the restore watch, so a
    pass saw the restore Restoring with no Job, and started the Job again."""
    op, api, _ = steady
    name = f"{REPLICA}-20260304050607"
    job = f"{name}-restore"
    restore = restore_doc(
        name,
        REPLICA,
        namespace=NS,
        metadata={"uid": "r-1"},
        status={"phase": "Restoring", "createdAt": "2026-03-04T05:06:07Z"},
    )
    api.objects[("PostgresPhysicalRestore", NS, name)] = restore
    api._bump(restore)
    op.restores._put((NS, name), copy.deepcopy(restore))  # the watch's copy: it lags
    op.jobs._put(
        (NS, job),
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": job, "namespace": NS},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]},
        },
    )
    op.pods._put(
        (NS, f"{job}-x1"),
        {
            "metadata": {"name": f"{job}-x1", "namespace": NS, "labels": {"job-name": job}},
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [{"state": {"terminated": {"message": "15"}}}],
            },
        },
    )
    key = f"{NS}/{name}"
    op.shell.reconcile_restore(key)
    assert api.objects[("PostgresPhysicalRestore", NS, name)]["status"]["phase"] == "Ready"
    assert f"DELETE Job {job}" in api.calls

    # The Job watch shows the deletion; the restore watch still shows Restoring.
    op.jobs._put((NS, job), None)
    op.pods._put((NS, f"{job}-x1"), None)
    api.calls.clear()
    op.shell.reconcile_restore(key)
    assert api.calls == []  # put off: no second Job
    assert op.queue._due[("restore", key)] > time.monotonic()

    # The restore watch catches up: the restore goes on from Ready.
    op.restores._put((NS, name), copy.deepcopy(api.objects[("PostgresPhysicalRestore", NS, name)]))
    op.shell.reconcile_restore(key)
    assert not [c for c in api.calls if c.startswith("POST Job")]


def test_a_replica_waits_for_the_watch_to_show_the_restore_it_created(
    steady: tuple[Operator, MemoryApi, Clock],
) -> None:
    """A pass deciding before the restore watch shows the restore the last pass created
    would find no restore and could create a second one."""
    op, api, _ = steady
    settle(op, api)
    name = f"{REPLICA}-20260304050607"
    replica = PostgresPhysicalReplica.model_validate(op.replicas.get(NS, REPLICA))
    created = PostgresPhysicalRestore.model_validate(
        restore_doc(name, REPLICA, namespace=NS, metadata={"uid": "r-1"})
    )
    op.effects.create_restore(replica, created)  # as the CreateRestore step does
    assert op.effects.observe_replica(KEY) is None  # put off: the watch lags
    assert op.queue._due[("replica", KEY)] > time.monotonic()

    op.restores._put((NS, name), api.objects[("PostgresPhysicalRestore", NS, name)])
    view = op.effects.observe_replica(KEY)
    assert isinstance(view, ReplicaView)
    assert [r.name for r in view.observation.restores] == [name]
