"""The operator reads a notification header's Secret only when the Secret opts in.

Without the opt-in, anyone who may edit a PostgresPhysicalReplica could name any Secret
of its namespace in a header `secretKeyRef` and have the operator (which may read every
Secret) send its value to a URL of their choice: a confused deputy (issue 18, item 10).

`notification_secrets` is tested directly; a notification round runs through the
operator's shell and effects against a small in-memory API (no cluster needed) and a
real HTTP listener on 127.0.0.1, so what arrives at the webhook is what the operator
really sends.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from pgro.api.names import replica_creds_secret_name
from pgro.api.notifications import LABEL_NOTIFICATION_SECRET
from pgro.api.replica import PostgresPhysicalReplica
from pgro.kube.client import KubeApi
from pgro.runtimes.kubernetes.notification_secrets import (
    NOTIFICATION_SECRET_REFUSED,
    notification_secrets,
)
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from tests.fixtures.manifests import replica_doc
from tests.fixtures.webhook import webhook_receiver

NS = "team-a"
REPLICA = "analytics"
RESTORE = "analytics-20260304050607"
OTHER_TEAMS_SECRET = "OTHER-TEAM-DB-PASSWORD-4242"
HOOK_TOKEN = "hook-token-7a6b5c4d3e2f"


def secret(
    name: str, value: str, *, labelled: bool | str = False, key: str = "token"
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if labelled:
        meta["labels"] = {LABEL_NOTIFICATION_SECRET: "true" if labelled is True else labelled}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "data": {key: base64.b64encode(value.encode()).decode()},
    }


def hooked_replica(url: str, *secret_names: str) -> dict[str, Any]:
    """The replica, with one webhook whose headers come from the named Secrets."""
    headers = {
        f"X-H{i}": {"secretKeyRef": {"name": name, "key": "token"}}
        for i, name in enumerate(secret_names)
    }
    connection = {
        "host": "analytics.team-a.svc",
        "port": 5432,
        "database": "postgres",
        "username": "analytics",
        "passwordSecret": replica_creds_secret_name(REPLICA),
    }
    return replica_doc(
        REPLICA,
        namespace=NS,
        metadata={"uid": "u-1"},
        status={"connectionInfo": connection},
        schedule="0 3 * * *",
        ephemeral=None,
        notifications=[{"target": "webhook", "url": url, "headers": headers}],
    )


def targets(*secret_names: str) -> Any:
    return PostgresPhysicalReplica.model_validate(
        hooked_replica("http://hooks.test/x", *secret_names)
    ).spec.notifications


# -- the resolution function ------------------------------------------------------------


def test_only_labelled_secrets_are_used() -> None:
    store = {
        "hook": secret("hook", HOOK_TOKEN, labelled=True),
        "db-creds": secret("db-creds", OTHER_TEAMS_SECRET),
        "half": secret("half", "x", labelled="yes"),
    }
    asked: list[tuple[str, str]] = []

    def get(ns: str, name: str) -> Mapping[str, Any] | None:
        asked.append((ns, name))
        return store.get(name)

    got = notification_secrets(NS, targets("hook", "db-creds", "half", "absent", "hook"), get)
    assert set(got.found) == {(NS, "hook")}
    assert set(got.refused) == {(NS, "db-creds"), (NS, "half")}
    assert set(got.missing) == {(NS, "absent")}
    # Each Secret looked up once, and only in the replica's namespace.
    assert sorted(asked) == sorted({(NS, n) for n in ("hook", "db-creds", "half", "absent")})
    reason = got.refused[(NS, "db-creds")]
    assert "Secret team-a/db-creds is not labelled pgro.bes.au/notification-secret=true" in reason
    assert "kubectl label secret -n team-a db-creds pgro.bes.au/notification-secret=true" in reason
    assert OTHER_TEAMS_SECRET not in reason
    assert "create it" in got.missing[(NS, "absent")]
    assert got.unavailable() == {**got.refused, **got.missing}


def test_plain_headers_read_no_secret() -> None:
    spec = hooked_replica("http://hooks.test/x")
    spec["spec"]["notifications"][0]["headers"] = {"X-Plain": "v"}
    got = notification_secrets(
        NS,
        PostgresPhysicalReplica.model_validate(spec).spec.notifications,
        lambda ns, name: pytest.fail("no Secret should be read"),
    )
    assert got.found == {} and got.refused == {} and got.missing == {}


# -- the operator, end to end over real HTTP ---------------------------------------------


class MemoryApi:
    """The few KubeApi calls `_send_notifications` makes, over dicts."""

    def __init__(self, objects: dict[tuple[str, str, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.created: list[dict[str, Any]] = []

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace or "", name))

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.created.append(obj)
        return obj


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, str]]]]:
    with webhook_receiver() as (port, received):
        yield f"http://127.0.0.1:{port}/hook", received


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def run_notifications(url: str, header_secret: dict[str, Any]) -> tuple[MemoryApi, Any]:
    name = header_secret["metadata"]["name"]
    objects = {
        ("PostgresPhysicalReplica", NS, REPLICA): hooked_replica(url, name),
        ("PostgresPhysicalRestore", NS, RESTORE): {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalRestore",
            "metadata": {"name": RESTORE, "namespace": NS},
            "spec": {
                "replica": {"name": REPLICA},
                "snapshot": "k1a2b3c4",
                "snapshotSize": "1Gi",
                "storageSize": "2Gi",
            },
            "status": {"postgresVersion": "16"},
        },
        ("Secret", NS, replica_creds_secret_name(REPLICA)): secret(
            replica_creds_secret_name(REPLICA), "analytics-pw", key="password"
        ),
        ("Secret", NS, name): header_secret,
    }
    api = MemoryApi(objects)
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="img"),
        clock=lambda: datetime(2026, 3, 4, tzinfo=UTC),
    )
    try:
        model = PostgresPhysicalReplica.model_validate(
            objects[("PostgresPhysicalReplica", NS, REPLICA)]
        )
        op.shell._notify(model, RESTORE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            statuses = op.notifier.take_status(model.key)
            if statuses is not None:
                return api, statuses
            time.sleep(0.02)
        raise AssertionError("the notification round did not finish")
    finally:
        op.notifier.shutdown()


def test_an_unlabelled_secret_is_not_sent_and_a_warning_names_it(
    hook: tuple[str, list[dict[str, str]]],
) -> None:
    url, received = hook
    api, [status] = run_notifications(url, secret("db-creds", OTHER_TEAMS_SECRET))
    # Nothing reached the URL: not the Secret's value, not even the request.
    assert received == []
    assert status.success is False
    assert status.last_error is not None
    assert "Secret team-a/db-creds is not labelled" in status.last_error
    [event] = [e for e in api.created if e.get("reason") == NOTIFICATION_SECRET_REFUSED]
    assert event["type"] == "Warning"
    assert event["regarding"]["name"] == REPLICA
    assert "team-a/db-creds" in event["note"]
    assert (
        "kubectl label secret -n team-a db-creds pgro.bes.au/notification-secret=true"
        in (event["note"])
    )
    assert OTHER_TEAMS_SECRET not in repr(api.created)


def test_a_labelled_secret_is_sent(hook: tuple[str, list[dict[str, str]]]) -> None:
    url, received = hook
    api, [status] = run_notifications(url, secret("hook", HOOK_TOKEN, labelled=True))
    assert status.success is True
    assert [r["x-h0"] for r in received] == [HOOK_TOKEN]
    assert not [e for e in api.created if e.get("reason") == NOTIFICATION_SECRET_REFUSED]
