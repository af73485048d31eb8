"""Fixtures: a real control plane per session, a fresh namespace per test, the fake node.

The control plane and the node are session-scoped: starting them takes about 4 s, and every
test works in its own namespace, so nothing leaks between tests. The node is one per session
like a real node: it watches pods cluster-wide, and the pods of a test's namespace are stopped
when the namespace is deleted (the namespace controller deletes them, the node kills their
processes and confirms the deletion).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import ApiError, Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from pgro.api.crds import crd_documents
from pgro.kube.client import KubeApi
from tests.kube.controlplane import BUILD_HINT, ControlPlane, ControlPlaneError, missing_binaries
from tests.kube.node import FakeNode
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
    OperatorProcess,
    apply_deploy_rbac,
    wait_for,
)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager on loopback (fails if not built)."""
    missing = missing_binaries()
    if missing:
        pytest.fail(
            f"Kubernetes test binaries missing ({', '.join(map(str, missing))}): {BUILD_HINT}",
            pytrace=False,
        )
    cp = ControlPlane()
    try:
        cp.start()
    except ControlPlaneError as e:
        pytest.fail(f"the test control plane did not start: {e}", pytrace=False)
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def kube_client(control_plane: ControlPlane) -> Iterator[Client]:
    """An admin lightkube client (system:masters)."""
    with control_plane.client(field_manager="pgro-tests") as c:
        yield c


@pytest.fixture
def kube_namespace(kube_client: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 't'}-{secrets.token_hex(3)}"
    kube_client.create(Namespace(metadata=ObjectMeta(name=name)))
    yield name
    try:
        kube_client.delete(Namespace, name)
    except ApiError as e:
        if e.status.code != 404:
            raise


@pytest.fixture(scope="session")
def fake_node(control_plane: ControlPlane, scratch_root: Path) -> Iterator[FakeNode]:
    """The node `pgro-test-node`, running pods in `<scratch_root>/fake-node` (mode 0711, so the
    postgres account reaches its volumes). Fails the session's last test if the node itself
    hit an error (an unsupported volume type, a crash), not when a pod fails."""
    root = scratch_root / "fake-node"
    root.mkdir()
    os.chmod(root, 0o711)
    node = FakeNode(control_plane.lightkube_config(), root).start()
    yield node
    node.stop()
    node.check()


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[KubeApi]:
    """The cluster admin's client, with pgro's CRDs and the shipped RBAC installed."""
    client: Client = control_plane.client()
    control_plane.install_crds(crd_documents())
    apply_deploy_rbac(client)
    yield KubeApi(client)


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane,
    admin: KubeApi,
    scratch_root: Path,
    fake_node: FakeNode,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess]:
    """One `pgro operator` per test module, as its service account, named after the module
    (`test_operator_restore_info` → `op-restore-info`)."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_operator_")
    name = name.replace("_", "-")
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    workdir = scratch_root / f"operator-{name}"
    workdir.mkdir(exist_ok=True)
    kubeconfig = control_plane.kubeconfig(workdir / "kubeconfig", token=token)
    op = OperatorProcess(workdir, kubeconfig, f"op-{name}").start()
    wait_for(
        "the operator to be ready", lambda: op.http("/readyz")[0] == 200, 60, context=op.log_tail
    )
    yield op
    op.stop()
