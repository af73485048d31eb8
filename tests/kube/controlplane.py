"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

No kubelet and no scheduler: `tests.kube.node.FakeNode` plays the node. The binaries come from
`scripts/build-kube.sh` (cached in `$PGRO_CACHE_DIR/bin`, default `~/.cache/pgro/bin`); flags,
timings and pitfalls are in docs/kube-test-env.md.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import yaml
from lightkube import Client, KubeConfig
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ServiceAccount

BUILD_HINT = "build them with `scripts/build-kube.sh` (about 8 minutes once, then cached)"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")

# Everything kube-controller-manager runs by default, minus what needs a real node: the node
# lifecycle controller would mark the fake node NotReady (it posts no heartbeats) and evict its
# pods; node IPAM and the node TTL controller only manage Node objects. The workload (Job,
# Deployment, ReplicaSet), garbage-collector, namespace, PV binder / PVC protection,
# EndpointSlice, ServiceAccount and ttl-after-finished controllers stay on.
CONTROLLERS = "*,-node-lifecycle-controller,-node-ipam-controller,-ttl-controller"


class ControlPlaneError(RuntimeError):
    pass


def default_bin_dir() -> Path:
    cache = os.environ.get("PGRO_CACHE_DIR") or str(Path.home() / ".cache" / "pgro")
    return Path(cache) / "bin"


def missing_binaries(bin_dir: Path | None = None) -> list[Path]:
    bin_dir = bin_dir or default_bin_dir()
    return [bin_dir / b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text[-lines:])


class _Process:
    """A server in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._logf: IO[bytes] = log.open("ab")
        # SIGKILL when the thread that started it dies (pytest killed, stop() never called).
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig=KILL", "--"] if setpriv else []
        self.proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # The group too: nothing a server forked may outlive it.
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._logf.close()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def failure(self) -> str:
        return (
            f"{self.name} exited with status {self.proc.returncode}; "
            f"last lines of {self.log}:\n{_tail(self.log)}"
        )


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in a temp dir on 127.0.0.1.

    `crds` are created (and waited for until Established) before the controller-manager starts,
    because its garbage collector rediscovers resource types only every 30 s: owner references
    to custom resources installed later are honoured only after that delay (or after
    `restart_controller_manager()`).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        bin_dir: Path | None = None,
        crds: Sequence[Mapping[str, Any]] = (),
        startup_timeout: float = 90.0,
    ) -> None:
        self.bin_dir = bin_dir or default_bin_dir()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pgro-kube-"))
        self.crds = list(crds)
        self.startup_timeout = startup_timeout
        self.admin_token = secrets.token_hex(16)
        self.api_port = 0
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._kcm: _Process | None = None
        self.startup_seconds: dict[str, float] = {}

    # --- public ------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def logs(self) -> dict[str, Path]:
        return {n: self.workdir / f"{n}.log" for n in ("etcd", "apiserver", "controller-manager")}

    def start(self) -> ControlPlane:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ControlPlaneError(
                f"Kubernetes test binaries missing: {', '.join(map(str, missing))}; {BUILD_HINT}"
            )
        t0 = time.monotonic()
        try:
            self._pki()
            etcd_client, etcd_peer, self.api_port = _free_port(), _free_port(), _free_port()
            self._start_etcd(etcd_client, etcd_peer)
            self._start_apiserver(etcd_client)
            self._wait("kube-apiserver /readyz", self._readyz, [self._etcd, self._apiserver])
            self.startup_seconds["apiserver_ready"] = time.monotonic() - t0
            if self.crds:
                self.install_crds(self.crds)
            self._write_admin_kubeconfig()
            self._start_controller_manager()
            # The serviceaccount controller creating `default` proves the controller-manager
            # runs and talks to the apiserver.
            self._wait(
                "kube-controller-manager (the `default` ServiceAccount in namespace default)",
                lambda: self._get(
                    "/api/v1/namespaces/default/serviceaccounts/default", ok_codes=(200,)
                ),
                [self._etcd, self._apiserver, self._kcm],
            )
            self.startup_seconds["controller_manager_ready"] = time.monotonic() - t0
        except BaseException:
            self.stop(remove=False)
            raise
        return self

    def stop(self, *, remove: bool = True) -> None:
        """Controller-manager, then apiserver (it needs etcd to exit promptly), then etcd."""
        for attr in ("_kcm", "_apiserver", "_etcd"):
            p: _Process | None = getattr(self, attr)
            if p is not None:
                p.stop()
                setattr(self, attr, None)
        if remove and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def kubeconfig_dict(self, *, token: str | None = None) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "pgro-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "pgro-test", "user": {"token": token or self.admin_token}}],
            "contexts": [
                {"name": "pgro-test", "context": {"cluster": "pgro-test", "user": "pgro-test"}}
            ],
            "current-context": "pgro-test",
        }

    def kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """Write a kubeconfig for the admin token (or `token`) to `path` (mode 0600)."""
        path.write_text(yaml.safe_dump(self.kubeconfig_dict(token=token)))
        path.chmod(0o600)
        return path

    def lightkube_config(self, token: str | None = None) -> KubeConfig:
        return KubeConfig.from_dict(self.kubeconfig_dict(token=token))

    def client(self, token: str | None = None, **kwargs: Any) -> Client:
        """A lightkube client, admin unless `token` is given. The caller closes it."""
        return Client(self.lightkube_config(token), **kwargs)

    def service_account_token(
        self, namespace: str, name: str, expiration_seconds: int = 3600
    ) -> str:
        """A bound token for an existing ServiceAccount (TokenRequest API).

        The caller creates the ServiceAccount first. The apiserver refuses expirations under
        600 s. The audience is the apiserver's own (its issuer).
        """
        with self.client() as c:
            req = ServiceAccount.Token(
                metadata=ObjectMeta(name=name, namespace=namespace),
                spec=TokenRequestSpec(audiences=[], expirationSeconds=expiration_seconds),
            )
            result = c.create(req, name, namespace=namespace)
        token = result.status.token if result.status else None
        if not token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        return token

    def install_crds(self, crds: Sequence[Mapping[str, Any]], timeout: float = 30.0) -> None:
        """Create CRDs (ignoring ones that exist) and wait until each is Established and served.

        If the controller-manager already runs, restart it afterwards so its garbage collector
        knows the new types at once (see the class docstring).
        """
        for crd in crds:
            code, body = self._request(
                "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
            )
            if code not in (201, 409):
                raise ControlPlaneError(f"creating CRD {crd['metadata']['name']}: {code} {body}")
        for crd in crds:
            name = crd["metadata"]["name"]
            spec = crd["spec"]
            version = next(v["name"] for v in spec["versions"] if v.get("served", True))
            plural_path = f"/apis/{spec['group']}/{version}/{spec['names']['plural']}"

            def established(name: str = name, path: str = plural_path) -> bool:
                code, body = self._request(
                    "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
                )
                # `conditions` is null until the API server has looked at the CRD.
                conds = (body.get("status") or {}).get("conditions") or [] if code == 200 else []
                ok = any(c["type"] == "Established" and c["status"] == "True" for c in conds)
                # The endpoint can 404 for a moment after Established; wait until it serves.
                return ok and self._request("GET", path)[0] == 200

            self._wait(
                f"CRD {name} Established and served", established, [self._apiserver], timeout
            )
        if self._kcm is not None:
            self.restart_controller_manager()

    def restart_controller_manager(self) -> None:
        if self._kcm is not None:
            self._kcm.stop()
        self._start_controller_manager()

    def check_alive(self) -> None:
        for p in (self._etcd, self._apiserver, self._kcm):
            if p is not None and not p.alive():
                raise ControlPlaneError(p.failure())

    # --- internals ---------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        r = subprocess.run(
            ["openssl", *args], cwd=self.workdir, capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")

    def _pki(self) -> None:
        if shutil.which("openssl") is None:
            raise ControlPlaneError("openssl is needed to create the test PKI")
        d = self.workdir

        def ec_key(name: str) -> None:
            self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name)

        def sign(name: str, subject: str, ext: str) -> None:
            ec_key(f"{name}.key")
            self._openssl(
                "req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr"
            )
            (d / f"{name}.ext").write_text(ext)
            self._openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "7", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            )  # fmt: skip

        ec_key("ca.key")
        self._openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "7",
            "-subj", "/CN=pgro-test-ca",
        )  # fmt: skip
        sign(
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n",
        )
        sign(
            "admin",
            "/O=system:masters/CN=pgro-test-admin",
            "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n",
        )
        ec_key("sa.key")
        self._openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        tokens = d / "tokens.csv"
        tokens.write_text(f"{self.admin_token},pgro-test-admin,pgro-test-admin,system:masters\n")
        tokens.chmod(0o600)

    def _start_etcd(self, client_port: int, peer_port: int) -> None:
        c, p = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        self._etcd = _Process(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=pgro-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={c}",
                f"--advertise-client-urls={c}",
                f"--listen-peer-urls={p}",
                f"--initial-advertise-peer-urls={p}",
                f"--initial-cluster=pgro-test={p}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            self.logs["etcd"],
        )

    def _start_apiserver(self, etcd_port: int) -> None:
        d = self.workdir
        self._apiserver = _Process(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={d / 'apiserver.crt'}",
                f"--tls-private-key-file={d / 'apiserver.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                # Without it every Pod would get a projected token volume the fake node
                # would have to serve.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
            ],
            self.logs["apiserver"],
        )

    def _write_admin_kubeconfig(self) -> None:
        d = self.workdir
        conf = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(d / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(d / "admin.crt"),
                        "client-key": str(d / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }
        path = d / "admin.kubeconfig"
        path.write_text(yaml.safe_dump(conf))
        path.chmod(0o600)

    def _start_controller_manager(self) -> None:
        d = self.workdir
        self._kcm = _Process(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={d / 'admin.kubeconfig'}",
                f"--controllers={CONTROLLERS}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={d / 'sa.key'}",
                f"--root-ca-file={d / 'ca.crt'}",
                "--secure-port=0",
            ],
            self.logs["controller-manager"],
        )

    def _http(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.Client(
            base_url=self.server,
            verify=ctx,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=10,
        )

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        try:
            with self._http() as h:
                r = h.request(method, path, json=body)
        except httpx.HTTPError:
            return 0, {}
        try:
            data = r.json()
        except ValueError:
            data = {}
        return r.status_code, data if isinstance(data, dict) else {}

    def _get(self, path: str, ok_codes: tuple[int, ...]) -> bool:
        return self._request("GET", path)[0] in ok_codes

    def _readyz(self) -> bool:
        try:
            with self._http() as h:
                return h.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(
        self,
        what: str,
        check: Callable[[], bool],
        procs: Sequence[_Process | None],
        timeout: float | None = None,
    ) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            for p in procs:
                if p is not None and not p.alive():
                    raise ControlPlaneError(f"waiting for {what}: {p.failure()}")
            if check():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {p.log}:\n{_tail(p.log, 15)}" for p in procs if p is not None
                )
                raise ControlPlaneError(f"timed out waiting for {what}\n{tails}")
            time.sleep(0.1)
