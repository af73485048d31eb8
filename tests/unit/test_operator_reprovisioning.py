"""The operator provisions a restore's server again, on the same data volume, when its pod is
recreated or the operator restarted (what it provisioned is held in memory). On a `migrateTo`
restore the migration step handed the application's objects to the analytics user
(`pgro.postgres.app_migration.hand_over`); a second provisioning that reset the analytics
user (first-time provisioning hands a restored analytics role's objects to the superuser)
would take them back. So once the restore's status shows it was provisioned before (it moved
past `Ready`, or ran a migration), `keep_analytics_ownership` is passed. And a restore that
is `Migrating` gets provisioned at all: before, only `Ready` restores were, so one whose
operator restarted mid-migration waited for "provisioning users" forever.

The SQL side is recorded (a pod at port 5432 cannot run here); what keeping ownership does
in PostgreSQL is tested against real servers in tests/integration/test_users.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import ServerState
from pgro.core.plan import EnsureServer
from pgro.kube.client import KubeApi
from pgro.postgres import restore_info
from pgro.runtimes.kubernetes import provisioning
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from pgro.runtimes.kubernetes.provisioning import Provisioner, provisioned_before
from tests.fixtures.kube_api import Clock, MemoryApi, b64
from tests.fixtures.manifests import replica, replica_doc, restore, restore_doc
from tests.fixtures.waiting import wait_for

NS = "team-a"
REPLICA = "orders"
RESTORE = f"{REPLICA}-20260101-000000"
MIGRATE_TO = {"version": "2.31.0", "versionId": "77777777-7777-7777-7777-777777777777"}
RESULT = {
    "totalElapsedSeconds": 4,
    "dataBytesBefore": 100,
    "dataBytesAfter": 120,
    "timings": [{"name": "1700000000000-addThing", "elapsedSeconds": 3}],
}


@dataclass
class _Analytics:
    name: str


@dataclass
class _Report:
    analytics: _Analytics
    extra_users: list[str] = field(default_factory=list)
    catalog_notes: list[str] = field(default_factory=list)


@dataclass
class _Recorder:
    """What provisioning was asked to do, per call."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def provision_users(self, conninfo_for: Any, **kwargs: Any) -> _Report:
        self.calls.append(kwargs)
        return _Report(_Analytics(kwargs["analytics"].username))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(provisioning, "provision_users", rec.provision_users)
    monkeypatch.setattr(restore_info, "record_restore", lambda *a, **k: [])
    # The server repairs over SQL (issue 13) are tested in tests/unit/test_kube_locale.py.
    monkeypatch.setattr(
        provisioning, "repair_server", lambda *a, **k: provisioning.ServerRepairs({})
    )
    return rec


def _secret_value(namespace: str, name: str, key: str) -> str:
    return f"pw-of-{name}"


def _restore(status: dict[str, Any]) -> PostgresPhysicalRestore:
    return restore(RESTORE, REPLICA, namespace=NS, status=status, migrateTo=MIGRATE_TO)


# (status, provisioned before)
CASES: list[tuple[dict[str, Any], bool]] = [
    # The first provisioning: the restore job just succeeded.
    ({"phase": "Ready", "postgresVersion": "16"}, False),
    # The migration step runs once the server was provisioned.
    ({"phase": "Migrating"}, True),
    ({"phase": "Migrating", "migrationJob": {"name": "x-migrate", "phase": "Running"}}, True),
    # Back in Ready with the result, on its way to Switching.
    (
        {
            "phase": "Ready",
            "migrationJob": {"name": "x-migrate", "phase": "Succeeded"},
            "migrationResult": RESULT,
        },
        True,
    ),
    ({"phase": "Ready", "migrationResult": RESULT}, True),
    ({"phase": "Switching"}, True),
    ({"phase": "Active"}, True),
]


@pytest.mark.parametrize(("status", "before"), CASES)
def test_provisioned_before_is_read_from_the_status(status: dict[str, Any], before: bool) -> None:
    assert provisioned_before(_restore(status)) is before


@pytest.mark.parametrize(("status", "before"), CASES)
def test_a_second_provisioning_keeps_what_the_analytics_user_owns(
    recorder: _Recorder, status: dict[str, Any], before: bool
) -> None:
    requeued: list[tuple[str, float]] = []
    orders = replica(REPLICA, namespace=NS, analyticsUsername="analytics")
    Provisioner(_secret_value, lambda k, d: requeued.append((k, d)))._provision(
        orders, _restore(status), "10.0.0.7", "pod-uid-2"
    )
    assert requeued == [(f"{NS}/{RESTORE}", 0.0)]  # it succeeded
    [call] = recorder.calls
    assert call["keep_analytics_ownership"] is before


# -- through the operator: a Migrating restore whose pod is not provisioned --------------


def _server_pod(uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{RESTORE}-abc",
            "namespace": NS,
            "uid": uid,
            "labels": {"pgro.bes.au/restore": RESTORE},
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.9",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


@pytest.fixture
def world() -> Iterator[tuple[Operator, MemoryApi]]:
    api = MemoryApi()
    doc = replica_doc(
        REPLICA,
        namespace=NS,
        metadata={"uid": "u-1", "generation": 1},
        ephemeral=None,
        analyticsUsername="analytics",
    )
    api.objects[("PostgresPhysicalReplica", NS, REPLICA)] = doc
    for secret in (f"{REPLICA}-admin-creds", f"{REPLICA}-creds"):
        api.objects[("Secret", NS, secret)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret, "namespace": NS},
            "data": {"password": b64(f"pw-of-{secret}")},
        }
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="pgro:test"),
        clock=Clock(),
    )
    op.replicas._put((NS, REPLICA), doc)
    try:
        yield op, api
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def test_a_migrating_restore_on_a_new_pod_is_provisioned_keeping_ownership(
    world: tuple[Operator, MemoryApi], recorder: _Recorder
) -> None:
    """The operator restarted (or the pod was recreated) while the restore was Migrating:
    the pod it finds was never provisioned by this operator."""
    op, _ = world
    doc = restore_doc(
        RESTORE,
        REPLICA,
        namespace=NS,
        metadata={"uid": "uid-r"},
        status={
            "phase": "Migrating",
            "postgresVersion": "16",
            "migrationJob": {"name": f"{RESTORE}-migrate", "phase": "Running"},
        },
        migrateTo=MIGRATE_TO,
    )
    op.restores._put((NS, RESTORE), doc)
    op.pods._put((NS, f"{RESTORE}-abc"), _server_pod("pod-new"))
    op.deployments._put(
        (NS, RESTORE),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": RESTORE, "namespace": NS, "generation": 1},
            "status": {"readyReplicas": 1},
        },
    )
    replica_model = op.observer.replica(f"{NS}/{REPLICA}")
    assert isinstance(replica_model, PostgresPhysicalReplica)
    restore_model = PostgresPhysicalRestore.model_validate(doc)
    assert op.observer.server(restore_model).state is ServerState.NOT_READY

    op.effects.ensure_server(replica_model, restore_model, EnsureServer(RESTORE))

    wait_for(
        "the pod to be provisioned", lambda: op.provisioner.provisioned(restore_model, "pod-new")
    )
    [call] = recorder.calls
    assert call["keep_analytics_ownership"] is True
    assert op.observer.server(restore_model).state is ServerState.READY
