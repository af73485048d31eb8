"""The operator's persistent-schema copy (features.md §2.1) against an in-memory API: the
`<replica>-schema-migration` Job it starts, and how the Job and its pod's termination
message read as the copy's state. The test plays the Job controller and the watches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.core.observations import WorkState
from pgro.core.plan import SwitchoverStep
from pgro.kube.client import KubeApi
from pgro.pipeline.schema_transfer import SCRIPT
from pgro.runtimes.kubernetes.config import Placement
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from pgro.runtimes.kubernetes.schema_copy import NO_RESULT, KubeCopy
from tests.fixtures.kube_api import Clock, MemoryApi, b64
from tests.fixtures.manifests import replica_doc, restore_doc

NS = "team-a"
REPLICA = "analytics"
SOURCE = f"{REPLICA}-20260303050607"
TARGET = f"{REPLICA}-20260304050607"
JOB = f"{REPLICA}-schema-migration"
ADMIN_PASSWORD = "s3cret-admin-pw"
IPS = {SOURCE: "10.0.0.5", TARGET: "10.0.0.6"}


def _server_pod(restore: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{restore}-abc",
            "namespace": NS,
            "uid": f"pod-{restore}",
            "labels": {"pgro.bes.au/restore": restore},
        },
        "status": {
            "phase": "Running",
            "podIP": IPS[restore],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


@pytest.fixture
def world() -> Iterator[tuple[Operator, MemoryApi]]:
    api = MemoryApi()
    replica = replica_doc(
        REPLICA,
        namespace=NS,
        metadata={"uid": "u-1", "generation": 1},
        ephemeral=None,
        persistentSchemas=["persistent_data"],
    )
    api.objects[("PostgresPhysicalReplica", NS, REPLICA)] = replica
    api.objects[("Secret", NS, f"{REPLICA}-admin-creds")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{REPLICA}-admin-creds", "namespace": NS},
        "data": {"username": b64("postgres"), "password": b64(ADMIN_PASSWORD)},
    }
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="pgro:test"),
        clock=Clock(),
    )
    op.replicas._put((NS, REPLICA), replica)
    for name, version in ((SOURCE, "16"), (TARGET, "15")):
        doc = restore_doc(
            name,
            REPLICA,
            namespace=NS,
            metadata={"uid": f"uid-{name}"},
            status={
                "phase": "Active" if name == SOURCE else "Switching",
                "postgresVersion": version,
            },
        )
        op.restores._put((NS, name), doc)
        op.pods._put((NS, f"{name}-abc"), _server_pod(name))
    try:
        yield op, api
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def _copy(op: Operator, api: MemoryApi, placement: Placement | None = None) -> KubeCopy:
    replica = op.observer.replica(f"{NS}/{REPLICA}")
    assert isinstance(replica, PostgresPhysicalReplica)
    return KubeCopy(
        cast(KubeApi, api),
        op.observer,
        replica,
        SOURCE,
        TARGET,
        placement or Placement(),
    )


def _job(uid: str = "job-1", condition: str | None = None) -> dict[str, Any]:
    status = {"conditions": [{"type": condition, "status": "True"}]} if condition else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": JOB,
            "namespace": NS,
            "uid": uid,
            "creationTimestamp": "2026-03-04T05:10:00Z",
            "labels": {"pgro.bes.au/restore": TARGET, "pgro.bes.au/replica": REPLICA},
        },
        "status": status,
    }


def _job_pod(job_uid: str, n: int, message: str = "") -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 0}
    if message:
        terminated["message"] = message
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{JOB}-{n}",
            "namespace": NS,
            "creationTimestamp": f"2026-03-04T05:10:0{n}Z",
            "labels": {"job-name": JOB},
            "ownerReferences": [{"kind": "Job", "name": JOB, "uid": job_uid}],
        },
        "status": {"containerStatuses": [{"name": "migrate", "state": {"terminated": terminated}}]},
    }


def test_the_operator_runs_the_schema_migration_step(world: tuple[Operator, MemoryApi]) -> None:
    op, _ = world
    assert SwitchoverStep.SCHEMA_MIGRATION in op.effects.supported_switchover_steps
    assert SwitchoverStep.SCHEMA_BUILD not in op.effects.supported_switchover_steps


def test_the_copy_job_reaches_both_pods_as_admin_without_a_password_in_it(
    world: tuple[Operator, MemoryApi],
) -> None:
    op, api = world
    copy = _copy(op, api, Placement(node_selector={"pool": "db"}))
    name = copy.start(
        source_db="app", target_db="app", owner="analytics", schemas=["persistent_data", 'a"b']
    )
    assert name == JOB
    job = api.objects[("Job", NS, JOB)]
    meta, spec = job["metadata"], job["spec"]
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    assert meta["ownerReferences"][0]["kind"] == "PostgresPhysicalReplica"
    assert meta["labels"] == {
        "pgro.bes.au/replica": REPLICA,
        "pgro.bes.au/component": "schema-migration",
        "pgro.bes.au/restore": TARGET,  # what the Jobs watch selects on
        "app.kubernetes.io/managed-by": "pgro",
    }
    template = spec["template"]
    # Not on the pod: the restore's own Service selects that label.
    assert "pgro.bes.au/restore" not in template["metadata"]["labels"]
    assert template["metadata"]["labels"]["pgro.bes.au/component"] == "schema-migration"
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (0, 300)
    pod = template["spec"]
    assert pod["nodeSelector"] == {"pool": "db"}
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == 999
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    # pg_dump must be at least the source's major: the serving restore runs 16 here.
    assert container["image"] == "postgres:16"
    assert container["command"] == [
        "sh",
        "-c",
        SCRIPT,
        "sh",
        '--schema="persistent_data"',
        '--schema="a""b"',
    ]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["terminationMessagePath"] == "/dev/termination-log"
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": f"{REPLICA}-admin-creds", "key": "password"}
    }
    source, target = env["PGRO_SOURCE"]["value"], env["PGRO_TARGET"]["value"]
    assert "host='10.0.0.5'" in source and "dbname='app'" in source
    assert "host='10.0.0.6'" in target and "user='postgres'" in target
    assert "password" not in source + target
    assert env["PGRO_OWNER"]["value"] == "analytics"
    assert env["PGRO_RESULT"]["value"] == "/dev/termination-log"
    [mount] = container["volumeMounts"]
    assert env["PGRO_WORK"]["value"] == mount["mountPath"]
    assert {"name": mount["name"], "emptyDir": {}} in pod["volumes"]
    assert ADMIN_PASSWORD not in json.dumps(job)


def test_a_job_left_by_an_earlier_attempt_is_deleted_with_its_pod_first(
    world: tuple[Operator, MemoryApi],
) -> None:
    op, api = world
    api.objects[("Job", NS, JOB)] = _job("old")
    api.objects[("Pod", NS, f"{JOB}-1")] = _job_pod("old", 1)
    api.calls.clear()
    _copy(op, api).start(source_db="app", target_db="app", owner="analytics", schemas=["s"])
    writes = [c for c in api.calls if not c.startswith(("GET", "LIST"))]
    assert writes == [f"DELETE Job {JOB}", f"DELETE Pod {JOB}-1", f"POST Job {JOB}"]


def test_the_job_reads_as_the_copy_state(world: tuple[Operator, MemoryApi]) -> None:
    op, api = world
    copy = _copy(op, api)
    assert copy.observe().state is WorkState.NOT_STARTED

    # Created, not yet in the watch's cache: running, never "vanished".
    api.objects[("Job", NS, JOB)] = _job()
    running = copy.observe()
    assert running.state is WorkState.RUNNING
    assert running.started_at == datetime(2026, 3, 4, 5, 10, tzinfo=UTC)

    # The cache still shows the failed Job of an earlier attempt: the API has this one.
    op.jobs._put((NS, JOB), _job("old", condition="Failed"))
    assert copy.observe().state is WorkState.RUNNING

    api.objects[("Job", NS, JOB)] = _job(condition="Complete")
    op.jobs._put((NS, JOB), api.objects[("Job", NS, JOB)])
    api.objects[("Pod", NS, f"{JOB}-1")] = _job_pod("job-1", 1, "success\n")
    # A pod of an earlier Job of the same name is not this one's.
    api.objects[("Pod", NS, f"{JOB}-2")] = _job_pod("old", 2, "failed: stale")
    done = copy.observe()
    assert (done.state, done.result) == (WorkState.SUCCEEDED, "success")

    api.objects[("Pod", NS, f"{JOB}-1")] = _job_pod("job-1", 1, "partial: 2 statement error(s)")
    assert copy.observe().result == "partial: 2 statement error(s)"

    # Complete without a message: no result is no success.
    api.objects[("Pod", NS, f"{JOB}-1")] = _job_pod("job-1", 1)
    assert copy.observe().state is WorkState.FAILED

    api.objects[("Job", NS, JOB)] = _job(condition="Failed")
    api.objects[("Pod", NS, f"{JOB}-1")] = _job_pod(
        "job-1", 1, "failed: pg_dump: connection refused"
    )
    failed = copy.observe()
    assert (failed.state, failed.failure) == (WorkState.FAILED, "pg_dump: connection refused")

    del api.objects[("Pod", NS, f"{JOB}-1")]
    assert copy.observe().failure == NO_RESULT


def test_discarding_deletes_the_job(world: tuple[Operator, MemoryApi]) -> None:
    op, api = world
    api.objects[("Job", NS, JOB)] = _job()
    _copy(op, api).discard()
    assert ("Job", NS, JOB) not in api.objects
    assert f"DELETE Job {JOB}" in api.calls


def test_a_restore_without_a_ready_pod_is_named(world: tuple[Operator, MemoryApi]) -> None:
    op, api = world
    op.pods._put((NS, f"{TARGET}-abc"), None)
    with pytest.raises(RuntimeError, match=f"restore {TARGET} has no ready PostgreSQL pod"):
        _copy(op, api).conninfo_for(TARGET)
