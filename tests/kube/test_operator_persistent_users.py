"""Persistent users in the operator (features.md §2.5) on the fake node: the Secret the
operator creates for each, the role it provisions on the restore before the Service moves,
and the Secret's removal with the user."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from lightkube.resources.core_v1 import Event as CoreEvent

from pgro.api.names import LABEL_PERSISTENT_USER, LABEL_REPLICA
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

pytestmark = pytest.mark.timeout(900)

PU = "tupaia_read"
SECRET = "orders-user-tupaia-read"


def test_persistent_user_gets_a_secret_and_logs_in_on_the_serving_restore(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, _ = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    persistent = [{"name": PU, "readSchemas": ["public", "nonexistent"], "searchPath": ["public"]}]
    admin.create(_replica(ns, "orders", "kopia", persistentUsers=persistent))

    replica: dict[str, Any] = wait_for(
        "the first restore to become Active",
        lambda: _active(admin, ns, "orders"),
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    restore_name = replica["status"]["currentRestore"]

    secret = admin.get("Secret", ns, SECRET)
    assert secret is not None
    labels = secret["metadata"]["labels"]
    assert labels[LABEL_REPLICA] == "orders" and labels[LABEL_PERSISTENT_USER] == PU
    [owner] = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("PostgresPhysicalReplica", "orders")
    assert owner["uid"] == replica["metadata"]["uid"]
    assert _secret_value(admin, ns, SECRET, "username") == PU
    password = _secret_value(admin, ns, SECRET, "password")
    assert len(password) == 32

    # The role logs in on the serving restore, reads unqualified names through its
    # search_path, and cannot write.
    with psycopg.connect(
        host=_pod_ip(admin, ns, restore_name),
        port=5432,
        user=PU,
        password=password,
        dbname="myapp",
        connect_timeout=5,
        autocommit=True,
    ) as conn:
        rows = conn.execute("SELECT count(*) FROM test_data").fetchone()
        assert rows is not None and rows[0] > 0
        role = conn.execute("SELECT rolsuper, rolinherit FROM pg_roles WHERE rolname = %s", [PU])
        assert role.fetchone() == (False, False)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
            conn.execute("INSERT INTO test_data DEFAULT VALUES")

    events = [
        e
        for e in admin.client.list(CoreEvent, namespace=ns)
        if e.reason == "PersistentUserSchemaMissing"
    ]
    assert events and f"{PU}/nonexistent" in (events[0].message or "")
    assert password not in operator.log_tail(10_000) + str(events)

    # Removed from the spec: its Secret goes; the replica's other Secrets stay.
    admin.merge_patch("PostgresPhysicalReplica", ns, "orders", {"spec": {"persistentUsers": None}})
    wait_for(
        "the persistent user's Secret to be deleted",
        lambda: admin.get("Secret", ns, SECRET) is None,
        60,
        context=lambda: _diagnostics(operator, fake_node),
    )
    assert admin.get("Secret", ns, "orders-creds") is not None
