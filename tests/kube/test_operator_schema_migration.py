"""The persistent-schema migration through the operator (features.md §2.1) on the fake node:
rows the analytics user writes into a persistent schema on the serving restore are on the
next restore when the Service moves to it, copied by the `<replica>-schema-migration` Job
(the `postgres:15` image, run for real)."""

from __future__ import annotations

import psycopg
import pytest
from lightkube.resources.core_v1 import Event as CoreEvent

from pgro.api.secret import KopiaCredentials
from pgro.kube.client import KubeApi
from tests.kube.node import FakeNode
from tests.kube.operator_proc import (
    OperatorProcess,
    wait_for,
)
from tests.kube.test_operator import (
    _active,
    _diagnostics,
    _pod_ip,
    _replica,
    _s3_secret,
    _secret_value,
)
from tests.kube.test_operator_restore_info import _manual_restore

pytestmark = pytest.mark.timeout(900)

JOB = "orders-schema-migration"


def _connect(ip: str, password: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=ip,
        port=5432,
        user="analytics",
        password=password,
        dbname="myapp",  # the snapshot's main database, where the copy works
        connect_timeout=5,
    )


def test_rows_in_a_persistent_schema_are_carried_to_the_next_restore(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(
        _replica(
            ns,
            "orders",
            "kopia",
            persistentSchemas=["persistent_data"],
            switchoverGracePeriod="30m",
        )
    )
    replica = wait_for(
        "the first restore",
        lambda: _active(admin, ns, "orders"),
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    first = replica["status"]["currentRestore"]
    # The first restore has nothing to copy from.
    assert replica["status"].get("schemaMigrationPhase") is None

    # Users write into the persistent schema on the serving restore, as analytics.
    analytics = _secret_value(admin, ns, "orders-creds", "password")
    with _connect(_pod_ip(admin, ns, first), analytics) as conn:
        conn.execute("CREATE SCHEMA persistent_data")
        conn.execute("CREATE TABLE persistent_data.t (id int PRIMARY KEY, note text)")
        conn.execute(
            "INSERT INTO persistent_data.t SELECT g, 'row ' || g FROM generate_series(1, 42) g"
        )

    admin.create(_manual_restore(ns, replica, snapshot))
    wait_for(
        "the switchover to orders-manual",
        lambda: (
            (_active(admin, ns, "orders") or {}).get("status", {}).get("currentRestore")
            == "orders-manual"
        ),
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    replica = _active(admin, ns, "orders") or {}
    status = replica["status"]
    assert status["schemaMigrationPhase"] == "complete"
    assert status.get("schemaMigrationJob") is None
    assert status.get("persistentSchemasMissing") is None
    assert status["persistentSchemaDataSize"]  # what the serving restore grew by

    # The rows are on the new restore, owned by the analytics user who reads them.
    with _connect(_pod_ip(admin, ns, "orders-manual"), analytics) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT note) FROM persistent_data.t")
        assert rows.fetchone() == (42, 42)
        owner = conn.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'persistent_data'"
        ).fetchall()
        assert owner == [("analytics",)]

    # The Job is deleted once its result is read; its result came from the copy itself.
    job = admin.get("Job", ns, JOB)
    assert job is None or job["metadata"].get("deletionTimestamp")
    reasons = [e.reason for e in admin.client.list(CoreEvent, namespace=ns)]
    assert "SchemaMigrationStarted" in reasons and "SchemaMigrationCompleted" in reasons
    assert "SwitchoverStepUnsupported" not in reasons
    admin_password = _secret_value(admin, ns, "orders-admin-creds", "password")
    assert admin_password not in operator.log_tail(20_000)
