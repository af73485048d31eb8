"""`postgresExtraConfig` through the operator (features.md §2.10) on the fake node: the restore
Job writes the accepted settings into postgresql.conf, the pod's server runs with them, and
the keys pgro keeps are named in one `ExtraConfigIgnored` Warning."""

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

pytestmark = pytest.mark.timeout(900)

EXTRA_CONFIG = "work_mem = '64MB'\nlisten_addresses = '*'\nlc_messages = 'de_DE.UTF-8'\n"


def test_extra_config_is_applied_and_pgros_keys_are_ignored_with_an_event(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    creds, _ = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(_replica(ns, "orders", "kopia", postgresExtraConfig=EXTRA_CONFIG))
    replica = wait_for(
        "the restore to become Active",
        lambda: _active(admin, ns, "orders"),
        240,
        context=lambda: _diagnostics(operator, fake_node),
    )
    restore = replica["status"]["currentRestore"]
    password = _secret_value(admin, ns, "orders-creds", "password")
    with psycopg.connect(
        host=_pod_ip(admin, ns, restore),
        port=5432,
        user="analytics",
        password=password,
        dbname="postgres",
        connect_timeout=5,
    ) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("64MB",)
        # Rejected, so pgro's own value holds (the pod's command line sets the listener).
        assert conn.execute("SHOW lc_messages").fetchone() == ("C",)

    events = [e.to_dict() for e in admin.client.list(CoreEvent, namespace=ns)]
    ignored = [
        e
        for e in events
        if e.get("reason") == "ExtraConfigIgnored"
        and e.get("involvedObject", {}).get("name") == "orders"
    ]
    assert len(ignored) == 1, ignored
    assert ignored[0]["type"] == "Warning"
    assert "listen_addresses, lc_messages" in ignored[0]["message"]
