"""`pgro operator` as a real child process, authenticated as the deploy/ ServiceAccount."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from lightkube import ApiError, Client, codecs

from pgro.kopia.repository import find_kopia
from pgro.postgres.server import free_port
from tests.fixtures import waiting

REPO_ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "pgro-system"
SERVICE_ACCOUNT = "postgres-restore-operator"


def apply_deploy_rbac(client: Client, *extra: str) -> None:
    """The namespace, ServiceAccount and RBAC exactly as deploy/ ships them (`extra`:
    more files under deploy/, such as canopy/rbac.yaml)."""
    for name in ("namespace.yaml", "rbac.yaml", *extra):
        for doc in yaml.safe_load_all((REPO_ROOT / "deploy" / name).read_text()):
            if not doc:
                continue
            try:
                client.create(codecs.from_dict(doc))
            except ApiError as exc:
                if exc.status.code != 409:
                    raise


class OperatorProcess:
    def __init__(self, workdir: Path, kubeconfig: Path, identity: str) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.identity = identity
        self.port = free_port()
        self.log_path = workdir / f"operator-{identity}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, env_extra: dict[str, str] | None = None) -> OperatorProcess:
        env = dict(os.environ)
        env.update(env_extra or {})
        env["PGRO_KOPIA"] = find_kopia()
        env["TMPDIR"] = str(self.workdir)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pgro.cli.main",
                "operator",
                "--kubeconfig",
                str(self.kubeconfig),
                "--namespace",
                OPERATOR_NAMESPACE,
                "--metrics-addr",
                f"127.0.0.1:{self.port}",
                "--identity",
                self.identity,
                "--image",
                "ghcr.io/beyondessential/pgro:test",
                "--resync",
                "3",
                "--lease-duration",
                "6",
                "--renew-every",
                "1",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def metric(self, name: str, labels: str = "") -> float:
        code, body = self.http("/metrics")
        if code != 200:
            return -1.0
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# An API error (a resource type not served yet, say) means "not yet" while the control plane
# and the operator settle.
wait_for = functools.partial(waiting.wait_for, interval=0.5, ignore=(ApiError,))
