"""`pgro status --cluster` / `kubectl pgro status` against a real API server.

The same replica and restore documents are put in a cluster (as CRs with their status) and in
`pgro run`'s store (a state directory); both `pgro status` variants must print the same thing,
human and JSON, except where a user's password lives (a Secret against a file). The failures a
person meets (no kubeconfig, an unreachable server, no CRDs, an account without rights, a bad
token) each end in one line naming the fix, never a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ServiceAccount

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.kube.client import KubeApi
from pgro.runtimes.embedded.store import Store
from tests.kube.controlplane import ControlPlane

pytestmark = pytest.mark.timeout(300)

PGRO = str(Path(sys.executable).parent / "pgro")
# `kubectl pgro` runs the executable `kubectl-pgro`; the package installs it as a console
# script, which is this module's main.
KUBECTL_PGRO = [sys.executable, "-m", "pgro.cli.kubectl_plugin"]
HOSTILE = "evil[/] [bold]x[/bold] \x1b[2J"


def replica_doc(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalReplica",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"kopiaSecretRef": {"name": "kopia"}, "schedule": "0 2 * * *", **spec},
    }


def replica_status(ns: str, name: str, restore: str) -> dict[str, Any]:
    return {
        "phase": "Ready",
        "currentRestore": restore,
        "verifiedSnapshotId": "k0123456789abcdef",
        "nextScheduledRestore": "2026-12-05T02:00:00Z",
        "connectionInfo": {
            "host": f"{name}.{ns}.svc",
            "port": 5432,
            "database": "postgres",
            "username": "analytics",
            "passwordSecret": f"{name}-creds",
        },
        "conditions": [
            {
                "type": "StepsSucceeding",
                "status": "False",
                "reason": "StepFailing",
                "message": f"server said: {HOSTILE}",
                "lastTransitionTime": "2026-12-04T10:00:00Z",
            },
            {
                "type": "LastRestoreFailed",
                "status": "False",
                "reason": "RestoreSucceeded",
                "message": "ok",
                "lastTransitionTime": "2026-12-04T10:00:00Z",
            },
        ],
    }


def restore_doc(ns: str, name: str, replica: str, snapshot: str) -> dict[str, Any]:
    return {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalRestore",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replica": {"name": replica},
            "snapshot": snapshot,
            "snapshotSize": "1Gi",
            "storageSize": "2Gi",
        },
    }


RESTORE_STATUS: dict[str, Any] = {
    "phase": "Active",
    "postgresVersion": "16",
    "dataChecks": {
        "depth": "standard",
        "verdict": "passed",
        "checks": [
            {"name": "checksums", "status": "pass", "detail": "12 files"},
            {"name": "amcheck", "status": "pass", "detail": HOSTILE},
        ],
    },
}


def secret_doc(ns: str, name: str, username: str, password: str) -> dict[str, Any]:
    def b64(v: str) -> str:
        return base64.b64encode(v.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": {"username": b64(username), "password": b64(password)},
    }


Run = subprocess.CompletedProcess[str]


def pgro(*args: str, env: Mapping[str, str] | None = None, cmd: list[str] | None = None) -> Run:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*(cmd or [PGRO]), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def ok(result: Run) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def failed(result: Run) -> str:
    """The one-line error of a failed `pgro status` (exit 1, no traceback; warnings
    before it)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    *warnings, error = result.stderr.strip().splitlines()
    assert error.startswith("Error: "), result.stderr
    assert all(w.startswith("pgro status: ") for w in warnings), result.stderr
    return error


@pytest.fixture
def kubeconfig(control_plane: ControlPlane, tmp_path: Path) -> Path:
    return control_plane.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def world(admin: KubeApi, kube_namespace: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two replicas (one with extra and persistent users) and three restores, in the
    cluster with their status and in a state directory; the analytics Secrets exist, the
    extra user's does not; one Event about `orders`."""
    ns = kube_namespace
    replicas = [
        (
            replica_doc(
                ns,
                "orders",
                extraUsers=["report_writer"],
                persistentUsers=[{"name": "bi", "readSchemas": ["public"]}],
            ),
            replica_status(ns, "orders", "orders-2"),
        ),
        (replica_doc(ns, "billing", ephemeral=True), {"phase": "Pending"}),
    ]
    restores = [
        (restore_doc(ns, "orders-1", "orders", "k1"), {"phase": "Failed"}),
        (restore_doc(ns, "orders-2", "orders", f"k2 {HOSTILE}"), RESTORE_STATUS),
        (restore_doc(ns, "billing-1", "billing", "k9"), {}),
    ]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = Store(state / "state.db")
    for doc, st in replicas:
        admin.create(doc)
        admin.merge_patch(
            "PostgresPhysicalReplica", ns, doc["metadata"]["name"], {"status": st}, status=True
        )
        replica = PostgresPhysicalReplica.model_validate(doc)
        store.apply_replica(replica)
        store.patch_replica_status(replica.key, st)
    for doc, st in restores:
        admin.create(doc)
        if st:
            admin.merge_patch(
                "PostgresPhysicalRestore", ns, doc["metadata"]["name"], {"status": st}, status=True
            )
        store.create_restore(PostgresPhysicalRestore.model_validate({**doc, "status": st}))
    store.close()
    admin.create(secret_doc(ns, "orders-creds", "analytics", "orders-pw"))
    admin.create(secret_doc(ns, "orders-user-bi", "bi", "bi-pw"))
    admin.create(secret_doc(ns, "billing-creds", "analytics", "billing-pw"))
    admin.create(
        {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": "orders.0001", "namespace": ns},
            "eventTime": "2026-12-04T10:00:00.123456Z",
            "reportingController": "postgres-restore-operator",
            "reportingInstance": "test",
            "action": "Restore",
            "reason": "SwitchedOver",
            "note": "orders-2 serves",
            "type": "Normal",
            "regarding": {
                "apiVersion": "pgro.bes.au/v1alpha1",
                "kind": "PostgresPhysicalReplica",
                "name": "orders",
                "namespace": ns,
            },
            "related": {"kind": "PostgresPhysicalRestore", "name": "orders-2", "namespace": ns},
        }
    )
    yield {"ns": ns, "state": state}


def without_users(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("  user ")]


def users(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("  user ")]


def test_cluster_status_prints_what_the_state_dir_prints(
    world: dict[str, Any], kubeconfig: Path
) -> None:
    ns = world["ns"]
    from_cluster = ok(pgro("status", "--kubeconfig", str(kubeconfig), "-n", ns))
    from_state = ok(pgro("status", "--state-dir", str(world["state"])))
    assert without_users(from_cluster) == without_users(from_state)
    # The documents' text, literally (no markup, no escapes), in the cluster's order.
    assert from_cluster.splitlines()[0] == f"{ns}/billing  phase Pending"
    assert "  restore orders-2  Active  snapshot k2 evil[/] [bold]x[/bold] " in from_cluster
    assert "  [!!] StepsSucceeding=False StepFailing: server said: evil[/]" in from_cluster
    assert "  [ok] LastRestoreFailed=False RestoreSucceeded: ok" in from_cluster
    assert f"  endpoint           orders.{ns}.svc:5432" in from_cluster
    assert "\x1b" not in from_cluster
    # Where each user's password lives; no Secret is read without --show-credentials.
    assert users(from_cluster) == [
        f"  user analytics (password in Secret {ns}/billing-creds)",
        f"  user analytics (password in Secret {ns}/orders-creds)",
        f"  user report_writer (password in Secret {ns}/orders-user-report-writer-creds)",
        f"  user bi (password in Secret {ns}/orders-user-bi)",
    ]
    assert "pw" not in from_cluster


def test_cluster_status_json_matches_the_state_dir(world: dict[str, Any], kubeconfig: Path) -> None:
    ns = world["ns"]
    cluster = json.loads(ok(pgro("status", "--kubeconfig", str(kubeconfig), "-n", ns, "--json")))
    state = json.loads(ok(pgro("status", "--state-dir", str(world["state"]), "--json")))
    shared = ("name", "namespace", "status", "endpoint", "restores")
    assert [{k: e[k] for k in shared} for e in cluster] == [
        {k: e[k] for k in shared} for e in state
    ]
    assert [e["name"] for e in cluster] == ["billing", "orders"]
    orders = cluster[1]
    assert orders["restores"][1]["status"]["dataChecks"]["checks"][1]["detail"] == HOSTILE
    assert orders["events"] == [
        {
            "at": "2026-12-04T10:00:00.123456Z",
            "replica_key": f"{ns}/orders",
            "type": "Normal",
            "reason": "SwitchedOver",
            "note": "orders-2 serves",
            "related": "orders-2",
        }
    ]
    assert cluster[0]["events"] == []
    assert orders["credentials"] == [
        {"username": "analytics", "secret": f"{ns}/orders-creds"},
        {"username": "report_writer", "secret": f"{ns}/orders-user-report-writer-creds"},
        {"username": "bi", "secret": f"{ns}/orders-user-bi"},
    ]


def test_show_credentials_reads_the_secrets(world: dict[str, Any], kubeconfig: Path) -> None:
    ns = world["ns"]
    out = json.loads(
        ok(
            pgro(
                "status", "--kubeconfig", str(kubeconfig), "-n", ns, "--json", "--show-credentials"
            )
        )
    )
    assert out[1]["credentials"] == [
        {"username": "analytics", "secret": f"{ns}/orders-creds", "password": "orders-pw"},
        {
            "username": "report_writer",
            "secret": f"{ns}/orders-user-report-writer-creds",
            "missing": True,
        },
        {"username": "bi", "secret": f"{ns}/orders-user-bi", "password": "bi-pw"},
    ]
    human = ok(pgro("status", "--kubeconfig", str(kubeconfig), "-n", ns, "--show-credentials"))
    assert users(human) == [
        "  user analytics password billing-pw",
        "  user analytics password orders-pw",
        f"  user report_writer (Secret {ns}/orders-user-report-writer-creds does not exist yet)",
        "  user bi password bi-pw",
    ]


def test_kubectl_plugin_reads_the_current_kubeconfig(
    world: dict[str, Any], kubeconfig: Path
) -> None:
    ns = world["ns"]
    env = {"KUBECONFIG": str(kubeconfig)}
    plugin = ok(pgro("status", "-n", ns, env=env, cmd=KUBECTL_PGRO))
    assert plugin == ok(pgro("status", "--cluster", "-n", ns, env=env))
    assert plugin.startswith(f"{ns}/billing  phase Pending\n")
    # --state-dir still reads a state directory there.
    state = ok(pgro("status", "--state-dir", str(world["state"]), env=env, cmd=KUBECTL_PGRO))
    assert without_users(state) == without_users(plugin)
    assert "Usage: kubectl pgro status" in ok(pgro("status", "--help", cmd=KUBECTL_PGRO))
    # -A: every namespace, this one's replicas among them.
    everywhere = json.loads(ok(pgro("status", "-A", "--json", env=env, cmd=KUBECTL_PGRO)))
    assert [e["name"] for e in everywhere if e["namespace"] == ns] == ["billing", "orders"]


def test_the_contexts_namespace_is_the_default(
    world: dict[str, Any], control_plane: ControlPlane, tmp_path: Path
) -> None:
    config = control_plane.kubeconfig_dict()
    config["contexts"].append(
        {
            "name": "there",
            "context": {"cluster": "pgro-test", "user": "pgro-test", "namespace": world["ns"]},
        }
    )
    path = tmp_path / "two-contexts"
    path.write_text(yaml.safe_dump(config))
    out = json.loads(ok(pgro("status", "--kubeconfig", str(path), "--context", "there", "--json")))
    assert [e["name"] for e in out] == ["billing", "orders"]
    # The current context's namespace is `default`, where there are none.
    assert ok(pgro("status", "--kubeconfig", str(path))) == "no replicas\n"
    assert "Context 'nowhere' not found" in failed(
        pgro("status", "--kubeconfig", str(path), "--context", "nowhere")
    )


def _account(
    control_plane: ControlPlane,
    kube_client: Client,
    ns: str,
    name: str,
    rules: list[dict[str, Any]],
) -> str:
    """A ServiceAccount with a Role of `rules` in `ns` (none when empty); its token."""
    from lightkube.codecs import from_dict

    kube_client.create(ServiceAccount(metadata=ObjectMeta(name=name, namespace=ns)))
    if rules:
        kube_client.create(
            from_dict(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": name, "namespace": ns},
                    "rules": rules,
                }
            )
        )
        kube_client.create(
            from_dict(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": name, "namespace": ns},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": name,
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
                }
            )
        )
    return control_plane.service_account_token(ns, name)


READ_CRS = {
    "apiGroups": ["pgro.bes.au"],
    "resources": ["postgresphysicalreplicas", "postgresphysicalrestores"],
    "verbs": ["get", "list"],
}


def test_forbidden(
    world: dict[str, Any], control_plane: ControlPlane, kube_client: Client, tmp_path: Path
) -> None:
    ns = world["ns"]
    nobody = control_plane.kubeconfig(
        tmp_path / "nobody", token=_account(control_plane, kube_client, ns, "nobody", [])
    )
    error = failed(pgro("status", "--kubeconfig", str(nobody), "-n", ns))
    assert f"forbidden to list postgresphysicalreplicas in namespace {ns}" in error
    assert "Needs get and list on postgresphysicalreplicas and postgresphysicalrestores" in error
    error = failed(pgro("status", "--kubeconfig", str(nobody), "-A"))
    assert "or name a namespace you may read with -n NAMESPACE" in error

    # May read the CRs, not Events or Secrets: everything but those, and a warning.
    viewer_token = _account(control_plane, kube_client, ns, "viewer", [READ_CRS])
    viewer = control_plane.kubeconfig(tmp_path / "viewer", token=viewer_token)
    result = pgro("status", "--kubeconfig", str(viewer), "-n", ns, "--json")
    seen = json.loads(ok(result))
    assert [e["name"] for e in seen] == ["billing", "orders"]
    assert seen[1]["events"] == []
    assert "may not list Events here" in result.stderr
    error = failed(pgro("status", "--kubeconfig", str(viewer), "-n", ns, "--show-credentials"))
    assert f"forbidden to get Secret {ns}/billing-creds" in error
    assert "leave out --show-credentials" in error
    assert "billing-pw" not in error


def test_bad_token_unreachable_server_and_no_kubeconfig(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    bad = control_plane.kubeconfig(tmp_path / "bad", token="not-a-token")
    error = failed(pgro("status", "--kubeconfig", str(bad)))
    assert "401 Unauthorized" in error and "not-a-token" not in error

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = control_plane.kubeconfig_dict()
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    gone = tmp_path / "gone"
    gone.write_text(yaml.safe_dump(config))
    error = failed(pgro("status", "--kubeconfig", str(gone)))
    assert f"cannot reach the Kubernetes API server https://127.0.0.1:{port}" in error
    assert control_plane.admin_token not in error

    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""}
    error = failed(pgro("status", "--cluster", env=env))
    assert "no kubeconfig" in error and "--kubeconfig PATH" in error
    error = failed(pgro("status", env=env, cmd=KUBECTL_PGRO))
    assert "no kubeconfig" in error
    env["KUBECONFIG"] = str(tmp_path / "missing")
    assert "$KUBECONFIG names no existing file" in failed(pgro("status", "--cluster", env=env))
    notyaml = tmp_path / "notyaml"
    notyaml.write_text(f"token: {control_plane.admin_token}\n: : [\n")
    error = failed(pgro("status", "--kubeconfig", str(notyaml)))
    assert "cannot read the kubeconfig" in error and control_plane.admin_token not in error


@pytest.fixture(scope="module")
def bare_control_plane() -> Iterator[ControlPlane]:
    """A control plane without pgro's CRDs."""
    cp = ControlPlane().start()
    yield cp
    cp.stop()


def test_crds_not_installed_names_the_fix(bare_control_plane: ControlPlane, tmp_path: Path) -> None:
    kubeconfig = bare_control_plane.kubeconfig(tmp_path / "kubeconfig")
    error = failed(pgro("status", "--kubeconfig", str(kubeconfig), "-A"))
    assert "pgro's CRDs are not installed" in error
    assert "kubectl apply -k deploy/" in error
