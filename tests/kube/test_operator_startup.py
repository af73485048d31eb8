"""What the operator says about itself at start-up (features.md §2.18-2.19): its pod carries
`pgro.bes.au/version`; a ConfigMap asking for `usePortForward` is refused with a warning and
an event on the ConfigMap; an unknown `PGRO_LOG_LEVEL` is ignored with a warning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgro import __version__
from pgro.kube.client import KubeApi
from tests.kube.controlplane import ControlPlane
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
    OperatorProcess,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

POD = "postgres-restore-operator-7f9c-startup"
CONFIGMAP = "postgres-restore-operator-config"


def _own_pod() -> dict[str, Any]:
    # A pod standing in for the operator's own: gated, so no node runs it.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD, "namespace": OPERATOR_NAMESPACE},
        "spec": {
            "schedulingGates": [{"name": "pgro.bes.au/test-never-scheduled"}],
            # The namespace enforces the restricted Pod Security profile, as deploy/ does.
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "operator",
                    "image": "ghcr.io/beyondessential/pgro:test",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def started(
    control_plane: ControlPlane, admin: KubeApi, scratch_root: Path
) -> Iterator[OperatorProcess]:
    admin.create(_own_pod())
    # An earlier test may have left the shipped ConfigMap (test_operator_deploy_env applies
    # it): this one's own, asking for usePortForward, replaces it.
    admin.delete("ConfigMap", OPERATOR_NAMESPACE, CONFIGMAP)
    admin.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP, "namespace": OPERATOR_NAMESPACE},
            "data": {"usePortForward": "true"},
        }
    )
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    workdir = scratch_root / "operator-startup"
    workdir.mkdir(exist_ok=True)
    kubeconfig = control_plane.kubeconfig(workdir / "kubeconfig", token=token)
    op = OperatorProcess(workdir, kubeconfig, "op-startup").start(
        env_extra={"POD_NAME": POD, "PGRO_LOG_LEVEL": "verbose"}
    )
    try:
        wait_for(
            "the operator to be ready",
            lambda: op.http("/readyz")[0] == 200,
            60,
            context=op.log_tail,
        )
        yield op
    finally:
        op.stop()
        admin.delete("ConfigMap", OPERATOR_NAMESPACE, CONFIGMAP)
        admin.delete("Pod", OPERATOR_NAMESPACE, POD)


def test_the_operator_pod_carries_the_version(admin: KubeApi, started: OperatorProcess) -> None:
    def annotated() -> str | None:
        pod = admin.get("Pod", OPERATOR_NAMESPACE, POD)
        annotations = (pod or {}).get("metadata", {}).get("annotations") or {}
        return annotations.get("pgro.bes.au/version")

    # With the shipped RBAC (the operator runs as its ServiceAccount).
    assert wait_for("the version annotation", annotated, 30, context=started.log_tail) == (
        __version__
    )


def test_use_port_forward_is_refused_with_a_warning_and_an_event(
    admin: KubeApi, started: OperatorProcess
) -> None:
    def refused() -> list[dict[str, Any]]:
        events = admin.list("Event", namespace=OPERATOR_NAMESPACE).items
        return [e for e in events if e.get("reason") == "UsePortForwardUnsupported"]

    events = wait_for("the UsePortForwardUnsupported event", refused, 30, context=started.log_tail)
    assert len(events) == 1  # once per change, not on every ConfigMap event
    event = events[0]
    assert event["type"] == "Warning"
    assert event["regarding"]["kind"] == "ConfigMap"
    assert event["regarding"]["name"] == CONFIGMAP
    assert "usePortForward: 'true' is not supported" in event["note"]
    log = started.log_tail(400)
    assert "usePortForward: 'true' is not supported and is ignored" in log


def test_an_unknown_log_level_is_ignored_with_a_warning(started: OperatorProcess) -> None:
    log = started.log_tail(400)
    assert "PGRO_LOG_LEVEL: 'verbose' is not a PostgreSQL log_min_messages level" in log
    assert started.alive()
