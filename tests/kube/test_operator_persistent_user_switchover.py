"""Reference `persistent_users.rs::persistent_user_survives_switchover` through the operator
on the fake node: the persistent user's Secret keeps its password across a switchover, and
with it the user logs in to the new restore, reads unqualified names through its
`searchPath`, and cannot write.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgro.api.secret import KopiaCredentials
from pgro.kube.client import KubeApi
from tests.kube.node import FakeNode
from tests.kube.operator_proc import OperatorProcess, wait_for
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

PU = "tupaia_read"
SECRET = "orders-user-tupaia-read"


def _login(admin: KubeApi, ns: str, restore: str, password: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=_pod_ip(admin, ns, restore),
        port=5432,
        user=PU,
        password=password,
        dbname="myapp",
        connect_timeout=5,
        autocommit=True,
    )


def test_the_persistent_users_password_survives_a_switchover(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, snapshot = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    persistent = [{"name": PU, "readSchemas": ["public"], "searchPath": ["public"]}]
    admin.create(
        _replica(ns, "orders", "kopia", persistentUsers=persistent, switchoverGracePeriod="5m")
    )
    first: dict[str, Any] = wait_for(
        "the first restore to become Active",
        lambda: _active(admin, ns, "orders"),
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    old = first["status"]["currentRestore"]
    password = _secret_value(admin, ns, SECRET, "password")
    with _login(admin, ns, old, password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (PU,)

    # A second restore made by hand, as the reference's switchover tests do.
    admin.create(_manual_restore(ns, first, snapshot))

    def switched() -> dict[str, Any] | None:
        replica = _active(admin, ns, "orders")
        if replica and replica["status"]["currentRestore"] == "orders-manual":
            return replica
        return None

    wait_for(
        "the switchover to orders-manual",
        switched,
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    # The Secret is the same one, with the same password.
    assert _secret_value(admin, ns, SECRET, "password") == password
    with _login(admin, ns, "orders-manual", password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (PU,)
        rows = conn.execute("SELECT count(*) FROM test_data").fetchone()  # unqualified
        assert rows is not None and rows[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
            conn.execute("INSERT INTO test_data DEFAULT VALUES")
    assert password not in operator.log_tail(10_000)
