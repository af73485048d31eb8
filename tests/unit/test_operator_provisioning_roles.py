"""The operator's server-up provisioning (`Provisioner._provision`) keeps the persistent users'
passwords once the restore has served: it runs again on every new pod or restarted server of
a restore, after the switchover set those passwords (features.md §2.5), and must not
neutralise them. Before its first switchover a restore keeps none: a restored role of that
name must not log in with the source's password. A persistent user named like a reserved role
(the bootstrap superuser, analytics, an extra user) is never kept: that role's restored
password goes, as every other one does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pgro.api.names import extra_user_secret_name, replica_creds_secret_name
from pgro.postgres import restore_info
from pgro.runtimes.kubernetes import provisioning
from pgro.runtimes.kubernetes.provisioning import Provisioner
from pgro.runtimes.kubernetes.scripts import ADMIN_ROLE
from tests.fixtures.manifests import replica, restore

NS = "team-a"


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
    """Stands in for the SQL side (a pod at port 5432 cannot run here): what the
    provisioning was asked to do."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    requeued: list[tuple[str, float]] = field(default_factory=list)

    def provision_users(self, conninfo_for: Any, **kwargs: Any) -> _Report:
        self.calls.append(kwargs)
        return _Report(_Analytics(kwargs["analytics"].username))

    def requeue(self, key: str, delay: float) -> None:
        self.requeued.append((key, delay))


def _secret_value(namespace: str, name: str, key: str) -> str:
    assert (namespace, key) == (NS, "password")
    return f"pw-of-{name}"


def _provision(monkeypatch: pytest.MonkeyPatch, phase: str = "Active", **spec: Any) -> _Recorder:
    recorder = _Recorder()
    monkeypatch.setattr(provisioning, "provision_users", recorder.provision_users)
    monkeypatch.setattr(restore_info, "record_restore", lambda *a, **k: [])
    # The server repairs over SQL (issue 13) are tested in tests/unit/test_kube_locale.py.
    monkeypatch.setattr(
        provisioning, "repair_server", lambda *a, **k: provisioning.ServerRepairs({})
    )
    orders = replica("orders", namespace=NS, **spec)
    restoring = restore("orders-20260101-000000", "orders", namespace=NS, status={"phase": phase})
    Provisioner(_secret_value, recorder.requeue)._provision(
        orders, restoring, "10.0.0.7", "pod-uid-1"
    )
    return recorder


def test_server_up_provisioning_keeps_the_persistent_users_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = _provision(
        monkeypatch,
        analyticsUsername="analytics",
        extraUsers=["etl"],
        persistentUsers=[
            {"name": "tupaia_read"},
            {"name": "bi", "secretName": "bi-login"},
            # Reserved names: these roles' restored passwords are never kept.
            {"name": "postgres"},
            {"name": "analytics"},
            {"name": "etl"},
        ],
    )
    [call] = recorder.calls
    assert call["other_managed_roles"] == [ADMIN_ROLE, "tupaia_read", "bi"]
    assert call["analytics"].password == f"pw-of-{replica_creds_secret_name('orders')}"
    [(extra, creds)] = call["extra_users"]
    assert extra.name == "etl"
    assert creds.password == f"pw-of-{extra_user_secret_name('orders', 'etl')}"
    assert recorder.requeued == [(f"{NS}/orders-20260101-000000", 0.0)]


@pytest.mark.parametrize("phase", ["Restoring", "Ready", "Switching"])
def test_a_restore_that_never_served_keeps_no_persistent_password(
    monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    recorder = _provision(monkeypatch, phase, persistentUsers=[{"name": "tupaia_read"}])
    [call] = recorder.calls
    assert call["other_managed_roles"] == [ADMIN_ROLE]


def test_without_persistent_users_only_the_admin_role_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = _provision(monkeypatch)
    [call] = recorder.calls
    assert call["other_managed_roles"] == [ADMIN_ROLE]
    assert recorder.requeued == [(f"{NS}/orders-20260101-000000", 0.0)]
