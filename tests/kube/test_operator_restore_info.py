"""`_pgro.restore_info` through the operator (features.md §2.7) on the fake node: the row is
written when the operator provisions a restore's pod, before it serves, and the superseded
restore is marked `outgoing` after a switchover (the reference's `switchover.rs` asserts)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgro.api.names import LABEL_REPLICA
from pgro.api.secret import KopiaCredentials
from pgro.kube.client import KubeApi
from tests.kube.node import FakeNode
from tests.kube.operator_proc import (
    OperatorProcess,
    wait_for,
)
from tests.kube.test_operator import (
    API,
    _active,
    _diagnostics,
    _pod_ip,
    _replica,
    _s3_secret,
    _secret_value,
)

pytestmark = pytest.mark.timeout(900)

ROW = "SELECT snapshot_id, stage, fixes FROM _pgro.restore_info WHERE id = 1"


def _row(ip: str, user: str, password: str) -> tuple[Any, ...]:
    with psycopg.connect(
        host=ip, port=5432, user=user, password=password, dbname="postgres", connect_timeout=5
    ) as conn:
        found = conn.execute(ROW).fetchone()
    assert found is not None
    return tuple(found)


def _manual_restore(ns: str, replica: dict[str, Any], snapshot: str) -> dict[str, Any]:
    """A restore made by hand, owned by the replica (the reference's tests do this)."""
    return {
        "apiVersion": API,
        "kind": "PostgresPhysicalRestore",
        "metadata": {
            "name": "orders-manual",
            "namespace": ns,
            "labels": {LABEL_REPLICA: "orders"},
            "ownerReferences": [
                {
                    "apiVersion": API,
                    "kind": "PostgresPhysicalReplica",
                    "name": "orders",
                    "uid": replica["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replica": {"name": "orders"},
            "snapshot": snapshot,
            "snapshotSize": "50Mi",
            "storageSize": "1Gi",
        },
    }


def test_restore_info_is_written_before_serving_and_the_superseded_restore_marked_outgoing(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    # The old restore must still run when the mark is read.
    admin.create(_replica(ns, "orders", "kopia", switchoverGracePeriod="30m"))
    replica = wait_for(
        "the first restore",
        lambda: _active(admin, ns, "orders"),
        240,
        context=lambda: _diagnostics(operator, fake_node),
    )
    first = replica["status"]["currentRestore"]
    restore = admin.get("PostgresPhysicalRestore", ns, first)
    assert restore is not None
    admin_password = _secret_value(admin, ns, "orders-admin-creds", "password")
    first_ip = _pod_ip(admin, ns, first)
    assert _row(first_ip, "postgres", admin_password) == (
        snapshot,
        "ready",
        restore["status"]["fixes"],
    )
    # The analytics user reads it with its own login.
    analytics = _secret_value(admin, ns, "orders-creds", "password")
    assert _row(first_ip, "analytics", analytics)[:2] == (snapshot, "ready")

    admin.create(_manual_restore(ns, replica, snapshot))
    wait_for(
        "the switchover to orders-manual",
        lambda: (
            (_active(admin, ns, "orders") or {}).get("status", {}).get("currentRestore")
            == "orders-manual"
        ),
        240,
        context=lambda: _diagnostics(operator, fake_node),
    )
    old = admin.get("PostgresPhysicalRestore", ns, first)
    assert old is not None and old["status"]["phase"] == "Active"  # not swept yet
    wait_for(
        "the outgoing mark on the old restore",
        lambda: _row(first_ip, "postgres", admin_password)[1] == "outgoing",
        30,
        context=lambda: _diagnostics(operator, fake_node),
    )
    assert _row(_pod_ip(admin, ns, "orders-manual"), "postgres", admin_password)[:2] == (
        snapshot,
        "ready",
    )
