"""deploy/canopy/tailscale: the optional Tailscale sidecar component agrees with what the
operator reads (the LocalAPI socket, the SOCKS5 proxy), is hardened like the operator's
own container, and builds onto the base with kustomize into a Deployment lightkube keeps
field for field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from lightkube import codecs

from pgro.canopy.client import DEFAULT_SOCKS5_PROXY
from pgro.canopy.tailscale import DEFAULT_SOCKET, SOCKET_ENV

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPONENT = DEPLOY / "canopy" / "tailscale" / "kustomization.yaml"

Doc = dict[str, Any]


def component() -> Doc:
    doc = yaml.safe_load(COMPONENT.read_text())
    assert isinstance(doc, dict)
    return doc


def pod_patch() -> Doc:
    [patch] = component()["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "postgres-restore-operator"}
    body = yaml.safe_load(patch["patch"])
    assert body["kind"] == "Deployment"
    spec: Doc = body["spec"]["template"]["spec"]
    return spec


def env_of(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def mounts_of(container: Doc) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_it_is_an_optional_component() -> None:
    doc = component()
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert doc["kind"] == "Component"
    # Not switched on by the canopy overlay: the sidecar needs an auth key first.
    canopy = yaml.safe_load((DEPLOY / "canopy" / "kustomization.yaml").read_text())
    assert "tailscale" not in (canopy.get("components") or [])


def test_the_operator_and_the_sidecar_share_the_localapi_socket() -> None:
    spec = pod_patch()
    [sidecar] = spec["initContainers"]
    [operator] = spec["containers"]
    assert operator["name"] == "operator"
    socket_dir = str(PurePosixPath(DEFAULT_SOCKET).parent)
    assert env_of(sidecar)["TS_SOCKET"] == DEFAULT_SOCKET
    assert env_of(operator)[SOCKET_ENV] == DEFAULT_SOCKET
    volume = mounts_of(sidecar)[socket_dir]
    assert mounts_of(operator)[socket_dir] == volume
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[volume]
    # Every volume the sidecar mounts is an emptyDir of this pod: no host path, no Secret.
    assert all("emptyDir" in volumes[name] for name in mounts_of(sidecar).values())


def test_the_sidecar_is_userspace_socks5_where_the_client_looks() -> None:
    [sidecar] = pod_patch()["initContainers"]
    env = env_of(sidecar)
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the operator
    assert env["TS_USERSPACE"] == "true"
    assert env["TS_SOCKS5_SERVER"] == urlsplit(DEFAULT_SOCKS5_PROXY).netloc == "[::1]:1055"
    assert env["TS_KUBE_SECRET"] == ""  # state stays in the pod: two pods, two nodes
    assert env["TS_AUTHKEY"] == {
        "secretKeyRef": {"name": "pgro-tailscale-auth", "key": "TS_AUTHKEY"}
    }
    assert mounts_of(sidecar)[env["TS_STATE_DIR"]] == "tailscale-state"
    probe = sidecar["startupProbe"]["exec"]["command"]
    assert f"--socket={DEFAULT_SOCKET}" in probe


def test_the_sidecar_is_hardened_like_the_operator() -> None:
    [sidecar] = pod_patch()["initContainers"]
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "memory" in sidecar["resources"]["limits"]


def test_the_component_builds_onto_the_base(tmp_path: Path) -> None:
    # A kustomization may not include a directory that contains it, so the overlay lives
    # beside a copy of deploy/.
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../deploy"], "components": ["../deploy/canopy/tailscale"]})
    )
    binary = shutil.which("kustomize")
    if binary is None:
        pytest.fail("kustomize is not on PATH: run scripts/setup.sh (it builds it once)")
    built = subprocess.run(
        [binary, "build", str(overlay)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    [deployment] = [d for d in yaml.safe_load_all(built.stdout) if d and d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["tailscale"]
    [operator] = spec["containers"]
    env = env_of(operator)
    # The base's env and mounts are kept; the component's are added.
    assert env[SOCKET_ENV] == DEFAULT_SOCKET and "OPERATOR_NAMESPACE" in env
    assert set(mounts_of(operator)) == {"/tmp", str(PurePosixPath(DEFAULT_SOCKET).parent)}
    # lightkube's typed model keeps every field (a misplaced one would be dropped).
    assert codecs.from_dict(deployment).to_dict() == deployment  # type: ignore[no-untyped-call]
