"""The operator starts with exactly the configuration `deploy/` ships.

The shipped operator once could not start at all: `deploy/operator.yaml` sets
`METRICS_ADDR=[::]:8080` and the metrics server could only bind IPv4 (issue 18, item 16).
Tests started the operator with their own flags (`--metrics-addr 127.0.0.1:P`), so nothing
noticed. Here the environment is read from the files instead: the Containerfile's `ENV`
lines of the final stage, then the Deployment's container `env` (a `fieldRef` resolved the
way the kubelet does), and the container's `args` after the image's `ENTRYPOINT`.

Only what cannot exist outside a pod is substituted, each for a stated reason:
- the in-cluster ServiceAccount credentials become `KUBECONFIG` with a token of the same
  ServiceAccount (same RBAC);
- the port of `METRICS_ADDR` becomes a free one (the host part, `[::]`, is kept);
- `PATH` points at this checkout's `pgro` and kopia instead of the image's.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, codecs
from lightkube.resources.coordination_v1 import Lease

from pgro.kopia.repository import find_kopia
from pgro.postgres.server import free_port
from tests.kube.controlplane import ControlPlane
from tests.kube.operator_proc import (
    OPERATOR_NAMESPACE,
    REPO_ROOT,
    SERVICE_ACCOUNT,
    apply_deploy_rbac,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

DEPLOY_OPERATOR = REPO_ROOT / "deploy" / "operator.yaml"
CONTAINERFILE = REPO_ROOT / "Containerfile"
POD_NAME = "postgres-restore-operator-5d9c7b8f6-deploy"
LEASE = "pgro-operator-leader"


def image_env_and_entrypoint(containerfile: Path) -> tuple[dict[str, str], list[str]]:
    """`ENV` and `ENTRYPOINT` of the Containerfile's final stage (what the pod inherits)."""
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    logical: list[str] = []
    pending = ""
    for raw in containerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        instruction, _, rest = line.partition(" ")
        match instruction.upper():
            case "FROM":
                env, entrypoint = {}, []  # a new stage starts from its base image
            case "ENV":
                for word in shlex.split(rest):
                    name, sep, value = word.partition("=")
                    assert sep, f"Containerfile: ENV {word!r} is not NAME=value"
                    env[name] = value
            case "ENTRYPOINT":
                entrypoint = yaml.safe_load(rest)
    assert entrypoint, "Containerfile: the final stage has no ENTRYPOINT"
    return env, entrypoint


@dataclass(frozen=True)
class ShippedContainer:
    namespace: str
    args: list[str]
    env: dict[str, str]
    port: int


def shipped_operator_container() -> ShippedContainer:
    docs = [d for d in yaml.safe_load_all(DEPLOY_OPERATOR.read_text()) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    namespace = deployment["metadata"]["namespace"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        resolved = {"metadata.namespace": namespace, "metadata.name": POD_NAME}.get(field or "")
        assert resolved is not None, (
            f"deploy/operator.yaml: env {item['name']} comes from {item.get('valueFrom')}, "
            "which this test cannot resolve yet: teach it how the kubelet fills it in"
        )
        env[item["name"]] = resolved
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
    return ShippedContainer(namespace, list(container.get("args", [])), env, port)


def test_the_shipped_environment_is_read_as_expected() -> None:
    """Guards the parsing below: if these move, the test must follow them."""
    image_env, entrypoint = image_env_and_entrypoint(CONTAINERFILE)
    assert entrypoint == ["pgro"]
    assert image_env["HOME"] == "/tmp"
    shipped = shipped_operator_container()
    assert shipped.namespace == OPERATOR_NAMESPACE
    assert shipped.args == ["operator"]
    assert shipped.env["METRICS_ADDR"] == "[::]:8080"
    assert shipped.env["OPERATOR_NAMESPACE"] == OPERATOR_NAMESPACE
    assert shipped.env["POD_NAME"] == POD_NAME
    assert shipped.port == 8080


@pytest.fixture
def shipped_operator(
    control_plane: ControlPlane, scratch_root: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    with control_plane.client() as client:
        apply_deploy_rbac(client)
        # The shipped ConfigMap too: the operator reads it live.
        for doc in yaml.safe_load_all(DEPLOY_OPERATOR.read_text()):
            if doc and doc["kind"] == "ConfigMap":
                try:
                    client.create(codecs.from_dict(doc))
                except ApiError as exc:
                    if exc.status.code != 409:
                        raise
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT)
    workdir = scratch_root / "operator-deploy-env"
    workdir.mkdir(exist_ok=True)
    kubeconfig = control_plane.kubeconfig(workdir / "kubeconfig", token=token)

    image_env, entrypoint = image_env_and_entrypoint(CONTAINERFILE)
    shipped = shipped_operator_container()
    env = {**image_env, **shipped.env}
    # Substitutions, each for something that cannot exist outside a pod:
    host, _, shipped_port = env["METRICS_ADDR"].rpartition(":")
    assert shipped_port == str(shipped.port)
    port = free_port()
    env["METRICS_ADDR"] = f"{host}:{port}"
    env["KUBECONFIG"] = str(kubeconfig)
    venv_bin = Path(sys.executable).parent  # this checkout's `pgro` (the image's is on PATH)
    env["PATH"] = os.pathsep.join(
        [str(venv_bin), str(Path(find_kopia()).parent), "/usr/local/bin", "/usr/bin", "/bin"]
    )
    log_path = workdir / "operator.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(venv_bin / entrypoint[0]), *entrypoint[1:], *shipped.args],
            env=env,  # exactly this: nothing inherited from the test process
            cwd=env.get("HOME", "/tmp"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    yield proc, port, log_path
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - http:// only
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_the_operator_starts_with_the_shipped_environment(
    shipped_operator: tuple[subprocess.Popen[bytes], int, Path], control_plane: ControlPlane
) -> None:
    proc, port, log_path = shipped_operator

    def context() -> str:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        return f"operator exit code: {proc.poll()}\n{tail}"

    def up(path: str, host: str) -> Any:
        if proc.poll() is not None:
            raise AssertionError(f"the shipped operator exited\n{context()}")
        return _get(f"http://{host}:{port}{path}")[0] == 200

    # `[::]` serves IPv6 and IPv4 alike (probes and Prometheus use the pod's IPv4 address).
    for host in ("127.0.0.1", "[::1]"):

        def ready(h: str = host) -> Any:
            return up("/readyz", h)

        wait_for(f"/readyz on {host}", ready, 60, context=context)
        assert _get(f"http://{host}:{port}/livez")[0] == 200
        code, body = _get(f"http://{host}:{port}/metrics")
        assert code == 200
        assert "postgres_restore_reconciliations_total" in body

    # It leads (the Lease names this pod), i.e. it got past start-up and acts.
    def holder() -> Any:
        if proc.poll() is not None:
            raise AssertionError(f"the shipped operator exited\n{context()}")
        with control_plane.client() as client:
            lease = client.get(Lease, LEASE, namespace=OPERATOR_NAMESPACE)
        return lease.spec is not None and lease.spec.holderIdentity == POD_NAME

    wait_for("the shipped operator to hold the leader Lease", holder, 90, context=context)
    # And it stays up.
    time.sleep(3)
    assert proc.poll() is None, f"the shipped operator exited\n{context()}"
