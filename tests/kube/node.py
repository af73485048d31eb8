"""FakeNode: a kubelet-lite that plays one Node and runs its Pods as local processes.

It binds unscheduled Pods to itself (no scheduler runs), then runs their containers for real on
this machine and reports Pod status through `pods/status` the way kubelet does, so the real
Job, ReplicaSet/Deployment, PV binder and garbage-collector controllers act on it. (Not the
EndpointSlice controller: the apiserver refuses loopback pod IPs in EndpointSlices; see
`FakeNode.service_endpoints`.)

How a container becomes a process (the node's "images"):

- command `pgro ...` (any image): `python -m pgro.cli.main ...` with the test interpreter, so
  the checkout under test is what runs in the pod. It runs as root whatever
  the securityContext says: the interpreter lives under /root, which other accounts cannot
  traverse. pgro, as root, runs PostgreSQL as the `postgres` account itself.
- image `postgres:<major>`: any command, with PATH starting with a wrapper dir and
  `/usr/lib/postgresql/<major>/bin`; no command means the image's entrypoint behaviour
  (`postgres` + args). A major that is not installed gives Waiting reason `ErrImagePull`.
- image `ghcr.io/beyondessential/tamanu-central:v<version>` (the `migrateTo` Job's; test-only):
  `python tests/fixtures/fake_migrator.py` with the test interpreter, as root like `pgro`,
  with the container's command and args appended (the Job gives `migrate`) and
  `PGRO_MIGRATE_VERSION=<version>` added to its env (the version's suffix picks the fake's
  mode, see its docstring).
- anything else: Waiting reason `ErrImagePull` (the pod stays Pending).

Mapping the container's view onto the host:

- Volumes: PVC → `<root>/pvc/<namespace>/<claim>` (or the bound PV's hostPath); emptyDir
  (`medium: Memory` too: a plain directory, `sizeLimit` not enforced), secret and configMap
  volumes → `<root>/pods/<uid>/<volume>`, one directory every container of the pod shares.
  A PVC that is not bound yet is provisioned on first use: the node creates a hostPath PV
  pre-bound to it (like a WaitForFirstConsumer provisioner) and the real PV controller binds
  them; a released PV is deleted with its directory (reclaim policy Delete). The postgres
  pod's `locales` emptyDir is such a directory too: its `setup` builds private locales there
  (`PGRO_LOCALES`, mapped like any mount) and opens databases with `LOCPATH` pointing at it,
  so the host's own /usr/lib/locale is never written (docs/locale-and-collation.md).
- Paths: in env `value`s, command, args, workingDir and exec probes, every occurrence of a
  mountPath (or the terminationMessagePath) at a path boundary becomes the host path (longest
  mountPath first), e.g. `/pgdata/x`, `--dir=/pgdata`, `sh -c "ls /tmp/kopia/cache"`. Paths a
  program computes itself (not from its env or argv) are not mapped.
- `$(VAR)` references in command/args/env values are expanded as kubelet does.
- Service names: fake pods have no cluster DNS (and Services no working ClusterIP). In env
  `value`s, a Service of the pod's namespace named as a host (`<svc>`, `<svc>.<namespace>`,
  `<svc>.<namespace>.svc[.cluster.local]`) is replaced by the pod IP of a ready pod behind it
  (`FakeNode.service_endpoints`), looked up once as the container starts: when it is the
  whole value, or a URL's host (after `://` or `@`, before `:`, `/`, `?` or the end). Ports
  stay as written (pgro's Services forward a port to the same port). With no ready pod
  behind it the name stays, and does not resolve. Done before `$(VAR)` expansion, so only
  what the spec wrote is mapped, never a referenced value.
- Users: uid/gid 999 (the postgres image's account) is the host's `postgres`; other numbers are
  used as is; no runAsUser means root. A pod's `fsGroup` (or runAsUser) makes each volume's
  top directory group-owned (or owned) by that account, setgid (not recursive).
- Network: each pod gets its own loopback address 127.0.0.N (N from 10, skipping addresses
  another session's node holds) as podIP. In the
  postgres image, `postgres` is a wrapper that adds `-c listen_addresses=<podIP>` (unless an
  empty listen_addresses was given: socket-only servers stay so) and
  `-c unix_socket_directories=<per-pod dir>`; `pg_ctl` finds that wrapper too, and `PGHOST`
  defaults to the per-pod socket dir, so several servers on port 5432 coexist and in-pod
  clients without a host reach their own pod's server. `localhost` is the host's, not the
  pod's: use the pod IP (fieldRef status.podIP) or the socket. Two containers of one pod can
  still meet on 127.0.0.1 (a sidecar and its client) if the listener takes an ephemeral port
  and tells the other through a shared volume: fake pods share the host's loopback.
- Probes: exec, tcpSocket and httpGet; every 1 s whatever periodSeconds says, the first one
  after min(initialDelaySeconds, 1 s). Readiness drives the Ready condition; liveness and
  startup probes restart the container.
- Native sidecars (init containers with `restartPolicy: Always`) start in their place among
  the init containers, and the next one waits until the sidecar runs (and passed its startup
  probe); they keep running (restarted when they exit) beside the regular containers. Once
  every regular container has exited for good they are stopped, in reverse order, and the pod
  phase is the regular containers' verdict. On pod deletion they are stopped after the
  regular containers.
- Restarts (`Always`/`OnFailure`, native sidecars) happen 1 s after the exit: no CrashLoopBackOff
  growth. Stop signal: SIGINT for the postgres image (its STOPSIGNAL), else SIGTERM; SIGKILL
  after the grace period.

Test hook: `lose_termination_messages(namespace, container)` makes the node report that
container's exits without a termination message, as when an evicted pod's is lost;
`lost_messages` lists the (namespace, pod, container) it dropped one of.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import IO, Any

import msgspec
from lightkube import ALL_NS, ApiError, Client, KubeConfig
from lightkube.models.core_v1 import ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import (
    ConfigMap,
    Node,
    PersistentVolume,
    PersistentVolumeClaim,
    Pod,
    Secret,
    Service,
)
from lightkube.types import PatchType

Json = dict[str, Any]

NODE_NAME = "pgro-test-node"
IMAGE_POSTGRES_UID = 999  # uid and gid of `postgres` in the official postgres image
PG_ROOT = Path("/usr/lib/postgresql")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TICK = 0.2  # how often a pod's containers are looked at
PROBE_PERIOD = 1.0
RESTART_DELAY = 1.0
TERMINATION_MESSAGE_MAX = 4096
FIELD_MANAGER = "pgro-fake-node"
PROVISIONED_LABEL = "pgro.test/fake-node"
MARKER_ENV = "PGRO_FAKE_NODE_CONTAINER"

PGRO_MODULE = ("-m", "pgro.cli.main")  # the `pgro` console script, in the test interpreter
# The migrateTo Job's image, run as the test-only fake migrator.
MIGRATOR_IMAGE = re.compile(r"ghcr\.io/beyondessential/tamanu-central:v(.+)")
FAKE_MIGRATOR = Path(__file__).resolve().parents[1] / "fixtures" / "fake_migrator.py"

_POSTGRES_WRAPPER = """#!/bin/sh
# FakeNode: this pod's postgres listens on the pod IP and keeps its socket in a per-pod dir.
real={real}
case "$1" in
  --single|--boot|--describe-config|--check|-C|-V|--version|-'?'|--help) exec "$real" "$@" ;;
esac
[ -n "$PGRO_FAKE_NODE_SOCKET_DIR" ] || exec "$real" "$@"
tcp=1
prev=
for a in "$@"; do
  case "$a" in
    listen_addresses=|listen_addresses=\\'\\'|listen_addresses=\\"\\") tcp=0 ;;
    -clisten_addresses=|--listen_addresses=|--listen-addresses=) tcp=0 ;;
  esac
  if [ "$prev" = "-h" ] && [ -z "$a" ]; then tcp=0; fi
  prev=$a
done
if [ "$tcp" = 1 ]; then
  exec "$real" "$@" -c "listen_addresses=$PGRO_FAKE_NODE_POD_IP" \\
    -c "unix_socket_directories=$PGRO_FAKE_NODE_SOCKET_DIR"
fi
exec "$real" "$@" -c "unix_socket_directories=$PGRO_FAKE_NODE_SOCKET_DIR"
"""

log = logging.getLogger("pgro.tests.fakenode")


class _Waiting(Exception):
    """A container (or the pod sandbox) cannot start yet: a kubelet Waiting reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(obj: Mapping[str, Any] | None, *keys: str, default: Any = None) -> Any:
    cur: Any = obj
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur or cur[k] is None:
            return default
        cur = cur[k]
    return cur


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: `$$` is `$`, unknown references stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


_PATH_CHARS = r"A-Za-z0-9_.\-~+@%"


class PathMap:
    """Container paths (mountPaths, the termination message file) → host paths."""

    def __init__(self, mounts: Mapping[str, str]) -> None:
        self.mounts = {k.rstrip("/") or "/": v for k, v in mounts.items()}
        keys = sorted(self.mounts, key=len, reverse=True)
        self._re = (
            re.compile(
                rf"(?<![{_PATH_CHARS}/])({'|'.join(map(re.escape, keys))})"
                rf"(?=/|$|[^{_PATH_CHARS}])"
            )
            if keys
            else None
        )

    def rewrite(self, text: str) -> str:
        if self._re is None:
            return text
        return self._re.sub(lambda m: self.mounts[m.group(1)], text)


class _ServiceHosts:
    """Service names used as hosts in a pod's env values → a ready pod's IP behind the
    Service (the module docstring's "Service names" rule). Services are listed only when a
    value could name one."""

    def __init__(self, runner: _PodRunner) -> None:
        self.runner = runner
        self._loaded = False
        self._pattern: re.Pattern[str] | None = None
        self._names: dict[str, str] = {}
        self._ips: dict[str, str | None] = {}

    def _load(self) -> re.Pattern[str] | None:
        if not self._loaded:
            self._loaded = True
            ns = self.runner.namespace
            assert self.runner.client is not None
            for svc in self.runner.client.list(Service, namespace=ns):
                name = svc.metadata.name if svc.metadata else None
                if not name:
                    continue
                for form in (name, f"{name}.{ns}", f"{name}.{ns}.svc"):
                    self._names[form] = name
                self._names[f"{name}.{ns}.svc.cluster.local"] = name
            if self._names:
                hosts = "|".join(map(re.escape, sorted(self._names, key=len, reverse=True)))
                self._pattern = re.compile(rf"(://|@)({hosts})(?=$|[:/?])")
        return self._pattern

    def _ip(self, service: str) -> str | None:
        if service not in self._ips:
            endpoints = self.runner.node.service_endpoints(self.runner.namespace, service)
            self._ips[service] = endpoints[0][0] if endpoints else None
        return self._ips[service]

    def rewrite(self, text: str) -> str:
        if not text:
            return text
        pattern = self._load()
        if pattern is None:
            return text

        def host(m: re.Match[str]) -> str:
            ip = self._ip(self._names[m.group(2)])
            return m.group(0) if ip is None else f"{m.group(1)}{ip}"

        # A bare name must be the whole value (`ab` in `xab` or `ab c` is not a host).
        whole = self._names.get(text)
        if whole is not None:
            return self._ip(whole) or text
        return pattern.sub(host, text)


_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE]|)$")
_SUFFIX: dict[str, Decimal | int] = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3,
    "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20,
    "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_quantity(q: str | int | float) -> Decimal:
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"bad quantity {q!r}")
    num, suffix = m.groups()
    if suffix[:1] in ("e", "E"):
        return Decimal(num + suffix)
    return Decimal(num) * _SUFFIX[suffix]


@dataclass
class _Launch:
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    cwd: str
    stop_signal: int
    paths: PathMap
    postgres_major: str | None


@dataclass
class _ProbeState:
    successes: int = 0
    failures: int = 0


@dataclass
class _Container:
    spec: Json
    kind: str  # "init", "sidecar" (init container with restartPolicy Always) or "main"
    restart: bool | None  # restart after an exit: always, never, None = after a failure
    restart_count: int = 0
    proc: subprocess.Popen[bytes] | None = None
    launch: _Launch | None = None
    state: Json = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Json = field(default_factory=dict)
    exited: Json | None = None  # the terminated state a restart will replace
    ready: bool = False
    started: bool = False
    done: bool = False  # terminated for good (no restart will follow)
    succeeded: bool = False  # an init container that exited 0
    restart_at: float = 0.0
    started_mono: float = 0.0
    next_probe: float = 0.0
    probes: dict[str, _ProbeState] = field(default_factory=dict)
    container_id: str = ""
    stopping_since: float | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _PodRunner(threading.Thread):
    """Runs one pod from binding to its final delete."""

    def __init__(self, node: FakeNode, pod: Json, slot: int) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"fakenode-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node = node
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir: Path = node.root / "pods" / self.uid
        self.socket_dir: Path = node.root / "sock" / str(slot)
        self.host_network = bool(_get(pod, "spec", "hostNetwork"))
        self.pod_ip = "127.0.0.1" if self.host_network else node._address(slot)
        self.start_time = _now()
        self.restart_policy: str = _get(pod, "spec", "restartPolicy", default="Always")
        never = self.restart_policy == "Never"
        main_restart = {"Always": True, "OnFailure": None}.get(self.restart_policy, False)
        self.containers: list[_Container] = [
            _Container(c, "sidecar", True)
            if c.get("restartPolicy") == "Always"
            else _Container(c, "init", not never)
            for c in _get(pod, "spec", "initContainers", default=[])
        ] + [
            _Container(c, "main", main_restart) for c in _get(pod, "spec", "containers", default=[])
        ]
        self.volumes: dict[str, Path] | None = None
        self.sandbox_wait: _Waiting | None = None
        self.conditions: dict[str, Json] = {}
        self.initialized = not any(c.kind != "main" for c in self.containers)
        self.phase = "Pending"
        self.terminal = False
        self.wake = threading.Event()
        self.deleting = False
        self.gone = False
        self.last_status: Json | None = None
        self._lock = threading.Lock()
        self.client: Client | None = None

    # --- called from the watcher ---------------------------------------------------------

    def update(self, pod: Json) -> None:
        with self._lock:
            self.pod = pod
            if _get(pod, "metadata", "deletionTimestamp"):
                self.deleting = True
        self.wake.set()

    def vanished(self) -> None:
        self.gone = True
        self.deleting = True
        self.wake.set()

    # --- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.client = self.node._client()
            self._run()
        except Exception:
            self.node._error(f"pod {self.namespace}/{self.pod_name}: {traceback.format_exc()}")
            self._kill(self.containers, 0)
        finally:
            if self.client is not None:
                self.client.close()

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o711)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o1777)
        self._write_status()
        while not (self.deleting or self.node._stopping.is_set()):
            if self.volumes is None:
                try:
                    self.volumes = self._setup_volumes()
                    self.sandbox_wait = None
                except _Waiting as w:
                    if self.sandbox_wait is None or str(self.sandbox_wait) != str(w):
                        self.node._log(f"{self.namespace}/{self.pod_name}: waiting: {w}")
                    self.sandbox_wait = w
            if self.volumes is not None and not self.terminal:
                self._step()
            self._write_status()
            self.wake.wait(1.0 if self.terminal else TICK)
            self.wake.clear()
        self._terminate()

    # --- volumes ---------------------------------------------------------------------------

    def _fs_owner(self) -> tuple[int | None, int | None]:
        psc = _get(self.pod, "spec", "securityContext", default={})
        uid, fs_group = psc.get("runAsUser"), psc.get("fsGroup")
        host_uid = self.node._map_uid(uid) if uid else None
        host_gid = self.node._map_gid(fs_group) if fs_group is not None else None
        return host_uid, host_gid

    def _own(self, path: Path) -> None:
        uid, gid = self._fs_owner()
        if uid is None and gid is None:
            return
        os.chown(path, uid if uid is not None else -1, gid if gid is not None else -1)
        if gid is not None:
            path.chmod(path.stat().st_mode & 0o7777 | 0o2070)

    def _setup_volumes(self) -> dict[str, Path]:
        assert self.client is not None
        out: dict[str, Path] = {}
        for vol in _get(self.pod, "spec", "volumes", default=[]):
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                out[name] = self._pvc_volume(vol["persistentVolumeClaim"]["claimName"])
            elif "emptyDir" in vol:
                p = self.dir / name
                p.mkdir(exist_ok=True)
                p.chmod(0o777)  # kubelet's emptyDir mode
                out[name] = p
            elif "secret" in vol or "configMap" in vol:
                out[name] = self._data_volume(name, vol)
            elif "hostPath" in vol:
                p = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") == "DirectoryOrCreate":
                    p.mkdir(parents=True, exist_ok=True)
                out[name] = p
            else:
                kind = next((k for k in vol if k != "name"), "?")
                msg = f"fake node: volume {name!r} of type {kind} is not supported"
                if self.sandbox_wait is None or self.sandbox_wait.message != msg:
                    self.node._error(f"pod {self.namespace}/{self.pod_name}: {msg}")
                raise _Waiting("ContainerCreating", msg)
        for p in out.values():
            if p.is_relative_to(self.node.root):
                self._own(p)
        return out

    def _pvc_volume(self, claim: str) -> Path:
        assert self.client is not None
        try:
            pvc = self.client.get(PersistentVolumeClaim, claim, namespace=self.namespace).to_dict()
        except ApiError as e:
            if e.status.code == 404:
                raise _Waiting(
                    "ContainerCreating", f'persistentvolumeclaim "{claim}" not found'
                ) from None
            raise
        if _get(pvc, "metadata", "deletionTimestamp"):
            raise _Waiting("ContainerCreating", f'persistentvolumeclaim "{claim}" is being deleted')
        volume_name = _get(pvc, "spec", "volumeName")
        if not volume_name:
            self.node._provision(self.client, pvc)
            raise _Waiting("ContainerCreating", f'persistentvolumeclaim "{claim}" is not bound yet')
        if _get(pvc, "status", "phase") != "Bound":
            raise _Waiting("ContainerCreating", f'persistentvolumeclaim "{claim}" is not bound yet')
        pv = self.client.get(PersistentVolume, volume_name).to_dict()
        host = _get(pv, "spec", "hostPath", "path") or _get(pv, "spec", "local", "path")
        path = Path(host) if host else self.node.pvc_path(self.namespace, claim)
        if not path.exists():
            self.node._make_pvc_dir(path)
        return path

    def _data_volume(self, name: str, vol: Json) -> Path:
        assert self.client is not None
        kind = "secret" if "secret" in vol else "configMap"
        src = vol[kind]
        ref = src.get("secretName") if kind == "secret" else src.get("name")
        res: type[Secret] | type[ConfigMap] = Secret if kind == "secret" else ConfigMap
        target = self.dir / name
        target.mkdir(exist_ok=True)
        target.chmod(0o755)
        try:
            obj = self.client.get(res, ref, namespace=self.namespace).to_dict()
        except ApiError as e:
            if e.status.code == 404 and src.get("optional"):
                return target
            if e.status.code == 404:
                raise _Waiting("ContainerCreating", f'{kind.lower()} "{ref}" not found') from None
            raise
        data: dict[str, bytes] = {}
        for k, v in (obj.get("data") or {}).items():
            data[k] = base64.b64decode(v) if kind == "secret" else v.encode()
        for k, v in (obj.get("binaryData") or {}).items():
            data[k] = base64.b64decode(v)
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        mode = src.get("defaultMode", 0o644)
        for item in items:
            if item["key"] not in data:
                if src.get("optional"):
                    continue
                raise _Waiting(
                    "ContainerCreating", f"couldn't find key {item['key']} in {kind} {ref}"
                )
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            path.chmod(item.get("mode", mode))
            _, gid = self._fs_owner()
            if gid is not None:
                os.chown(path, -1, gid)
        return target

    # --- containers ------------------------------------------------------------------------

    def _regular(self) -> list[_Container]:
        return [c for c in self.containers if c.kind == "main"]

    def _sidecars(self) -> list[_Container]:
        return [c for c in self.containers if c.kind == "sidecar"]

    def _step(self) -> None:
        now = time.monotonic()
        if not self.initialized:
            for c in self.containers:
                if c.kind == "main":
                    break
                if c.kind == "sidecar":
                    self._supervise(c)
                    if not (c.running() and c.started):
                        return
                    continue
                if c.succeeded:
                    continue
                self._supervise(c)
                if not c.succeeded:
                    if c.done:  # failed with restartPolicy Never: the pod fails
                        self._finish("Failed")
                    return
            self.initialized = True
        for c in self._sidecars() + self._regular():
            self._supervise(c)
        for c in self.containers:
            if c.running() and c.stopping_since is None and now >= c.next_probe:
                self._probe(c)
        regular = self._regular()
        if regular and all(c.done for c in regular):
            failed = any(_get(c.state, "terminated", "exitCode") != 0 for c in regular)
            self._finish("Failed" if failed else "Succeeded")

    def _supervise(self, c: _Container) -> None:
        """Start `c` when due, notice its exit, schedule a restart."""
        if c.done:
            return
        if c.proc is not None and c.proc.poll() is not None:
            self._after_exit(c, self._record_exit(c))
        if not c.done and c.proc is None and time.monotonic() >= c.restart_at:
            self._start(c)

    def _after_exit(self, c: _Container, code: int) -> None:
        if c.kind == "init" and code == 0:
            c.succeeded = c.done = True
        elif c.restart if c.restart is not None else code != 0:
            c.restart_at = time.monotonic() + RESTART_DELAY
        else:
            c.done = True

    def _start(self, c: _Container) -> None:
        try:
            launch = self._prepare(c)
        except _Waiting as w:
            if _get(c.state, "waiting", "message") != w.message:
                self.node._log(f"{self.namespace}/{self.pod_name} [{c.name}]: {w}")
            c.state = {"waiting": {"reason": w.reason, "message": w.message}}
            c.restart_at = time.monotonic() + 1.0
            return
        if c.exited is not None:
            c.last_state, c.exited = c.exited, None
            c.restart_count += 1
        c.launch = launch
        c.container_id = f"fake://{self.uid[:8]}-{c.name}-{c.restart_count}"
        term = self._termination_file(c)
        term.write_bytes(b"")
        os.chown(term, launch.uid, launch.gid)
        logf = self._log_file(c).open("ab")
        argv = [*self.node._setpriv(launch.uid, launch.gid, launch.groups), *launch.argv]
        env = {**launch.env, MARKER_ENV: self._marker(c)}
        self.node._log(
            f"{self.namespace}/{self.pod_name} [{c.name}]: start uid={launch.uid} "
            f"argv={launch.argv!r}"
        )
        started_at = _now()
        try:
            # setpriv would fail to exec it (exit 127); a runtime reports StartError (128)
            if shutil.which(launch.argv[0], path=launch.env.get("PATH")) is None:
                raise FileNotFoundError(
                    f'exec: "{launch.argv[0]}": executable file not found in $PATH'
                )
            c.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            c.proc = None
            c.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(e),
                    "startedAt": started_at,
                    "finishedAt": _now(),
                    "containerID": c.container_id,
                }
            }
            c.exited = c.state
            self._after_exit(c, 128)
            return
        finally:
            logf.close()
        c.state = {"running": {"startedAt": started_at}}
        c.started_mono = time.monotonic()
        c.probes = {}
        c.stopping_since = None
        c.started = "startupProbe" not in c.spec
        c.ready = "readinessProbe" not in c.spec
        delays = [
            float(_get(c.spec, p, "initialDelaySeconds", default=0))
            for p in ("startupProbe", "readinessProbe", "livenessProbe")
            if p in c.spec
        ]
        c.next_probe = c.started_mono + min([1.0, *delays])

    def _record_exit(self, c: _Container) -> int:
        assert c.proc is not None
        rc = c.proc.returncode
        code = rc if rc >= 0 else 128 - rc
        self._kill_leftovers(c)
        self.node._log(f"{self.namespace}/{self.pod_name} [{c.name}]: exited with {code}")
        message = self._termination_message(c, code)
        term: Json = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": _get(c.state, "running", "startedAt", default=_now()),
            "finishedAt": _now(),
            "containerID": c.container_id,
        }
        if rc < 0:
            term["signal"] = -rc
        if message:
            term["message"] = message
        c.state = c.exited = {"terminated": term}
        c.proc = None
        c.ready = False
        c.started = False
        return code

    def _termination_message(self, c: _Container, code: int) -> str:
        with self.node._lock:
            if (self.namespace, c.name) in self.node._lose_messages:
                self.node.lost_messages.append((self.namespace, self.pod_name, c.name))
                return ""
        try:
            data = self._termination_file(c).read_bytes()[:TERMINATION_MESSAGE_MAX]
        except OSError:
            data = b""
        if (
            not data
            and code != 0
            and c.spec.get("terminationMessagePolicy") == ("FallbackToLogsOnError")
        ):
            try:
                lines = self._log_file(c).read_bytes().splitlines()[-80:]
            except OSError:
                lines = []
            data = b"\n".join(lines)[-2048:]
        return data.decode(errors="replace")

    def _termination_file(self, c: _Container) -> Path:
        return self.dir / f"{c.name}.termination-log"

    def _log_file(self, c: _Container) -> Path:
        return self.dir / f"{c.name}.log"

    def _marker(self, c: _Container) -> str:
        return f"{self.node.root}/{self.uid}/{c.name}/"

    def _kill_leftovers(self, c: _Container) -> None:
        """What a container runtime does when the main process exits: nothing else survives."""
        self.node._kill_marked(self._marker(c).encode())

    # --- preparing a launch ----------------------------------------------------------------

    def _user(self, c: _Container) -> tuple[int, int, list[int]]:
        psc = _get(self.pod, "spec", "securityContext", default={})
        csc = c.spec.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        uid = 0 if uid is None else int(uid)
        if gid is None:
            gid = IMAGE_POSTGRES_UID if uid == IMAGE_POSTGRES_UID else 0
        groups = [int(g) for g in psc.get("supplementalGroups") or []]
        if psc.get("fsGroup") is not None:
            groups.append(int(psc["fsGroup"]))
        return (
            self.node._map_uid(uid),
            self.node._map_gid(int(gid)),
            sorted({self.node._map_gid(g) for g in groups}),
        )

    def _paths(self, c: _Container) -> PathMap:
        assert self.volumes is not None
        mounts: dict[str, str] = {}
        for m in c.spec.get("volumeMounts") or []:
            host = self.volumes.get(m["name"])
            if host is None:
                raise _Waiting("CreateContainerConfigError", f"volume {m['name']!r} not found")
            if m.get("subPath"):
                host = host / m["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = str(host)
        term_path = c.spec.get("terminationMessagePath") or "/dev/termination-log"
        mounts[term_path] = str(self._termination_file(c))
        return PathMap(mounts)

    def _env(self, c: _Container, paths: PathMap) -> dict[str, str]:
        assert self.client is not None
        env: dict[str, str] = {}
        cache: dict[tuple[str, str], Json | None] = {}

        def fetch(kind: str, name: str) -> Json | None:
            assert self.client is not None
            if (kind, name) not in cache:
                res: type[Secret] | type[ConfigMap] = Secret if kind == "Secret" else ConfigMap
                try:
                    cache[(kind, name)] = self.client.get(
                        res, name, namespace=self.namespace
                    ).to_dict()
                except ApiError as e:
                    if e.status.code != 404:
                        raise
                    cache[(kind, name)] = None
            return cache[(kind, name)]

        def data_of(kind: str, obj: Json) -> dict[str, str]:
            if kind == "Secret":
                return {
                    k: base64.b64decode(v).decode(errors="replace")
                    for k, v in (obj.get("data") or {}).items()
                }
            return dict(obj.get("data") or {})

        for src in c.spec.get("envFrom") or []:
            kind, ref = (
                ("Secret", src["secretRef"])
                if "secretRef" in src
                else ("ConfigMap", src["configMapRef"])
            )
            obj = fetch(kind, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise _Waiting(
                    "CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found'
                )
            for k, v in data_of(kind, obj).items():
                env[src.get("prefix", "") + k] = v

        services = _ServiceHosts(self)
        for e in c.spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(services.rewrite(paths.rewrite(e.get("value") or "")), env)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind = "Secret" if "secretKeyRef" in vf else "ConfigMap"
                ref = vf["secretKeyRef"] if kind == "Secret" else vf["configMapKeyRef"]
                obj = fetch(kind, ref["name"])
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise _Waiting(
                        "CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found'
                    )
                data = data_of(kind, obj)
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise _Waiting(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}",
                    )
                env[name] = data[ref["key"]]
            elif "fieldRef" in vf:
                env[name] = self._field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self._resource_field(c, vf["resourceFieldRef"])
        return env

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": self.pod_name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": self.node.name,
            "spec.serviceAccountName": _get(self.pod, "spec", "serviceAccountName", default=""),
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path])
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        raise _Waiting("CreateContainerConfigError", f"fake node: fieldPath {path} not supported")

    def _resource_field(self, c: _Container, ref: Json) -> str:
        target = c
        if ref.get("containerName"):
            target = next((x for x in self.containers if x.name == ref["containerName"]), c)
        kind, _, resource = ref["resource"].partition(".")
        value = _get(target.spec, "resources", kind, resource)
        if value is None and kind == "requests":
            value = _get(target.spec, "resources", "limits", resource)
        if value is None:
            value = self.node.allocatable.get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(int((parse_quantity(value) / divisor).to_integral_value(ROUND_CEILING)))

    def _prepare(self, c: _Container) -> _Launch:
        spec = c.spec
        command = [str(x) for x in spec.get("command") or []]
        args = [str(x) for x in spec.get("args") or []]
        image = str(spec.get("image") or "")
        paths = self._paths(c)
        user_env = self._env(c, paths)
        uid, gid, groups = self._user(c)
        major: str | None = None
        if command and os.path.basename(command[0]) == "pgro":
            argv = [sys.executable, *PGRO_MODULE, *command[1:], *args]
            uid, gid, groups = 0, 0, []
            base = {"PATH": f"{self.node.tools_dir}:{SYSTEM_PATH}", "HOME": "/root"}
            if os.environ.get("PGRO_CACHE_DIR"):
                base["PGRO_CACHE_DIR"] = os.environ["PGRO_CACHE_DIR"]
            stop = signal.SIGTERM
        elif migrator := MIGRATOR_IMAGE.fullmatch(image):
            argv = [sys.executable, str(FAKE_MIGRATOR), *command, *args]
            uid, gid, groups = 0, 0, []  # the interpreter lives under /root, as for pgro
            base = {
                "PATH": SYSTEM_PATH,
                "HOME": "/root",
                "PGRO_MIGRATE_VERSION": migrator.group(1),
            }
            stop = signal.SIGTERM
        else:
            m = re.fullmatch(
                r"(?:docker\.io/)?(?:library/)?postgres:(\d+)(?:[.\-][\w.\-]*)?", image
            )
            if not m:
                raise _Waiting(
                    "ErrImagePull",
                    f'fake node: cannot run image "{image}" (it runs postgres:<major> images '
                    f"and `pgro` commands)",
                )
            major = m.group(1)
            if not (PG_ROOT / major / "bin" / "postgres").exists():
                installed = sorted(p.name for p in PG_ROOT.glob("*") if (p / "bin").is_dir())
                raise _Waiting(
                    "ErrImagePull",
                    f'fake node: image "{image}": PostgreSQL {major} is not installed here '
                    f"(installed: {', '.join(installed) or 'none'})",
                )
            if command:
                argv = command + args
            elif args and not args[0].startswith("-"):
                argv = args
            else:
                argv = ["postgres", *args]
            wrapper_bin = self.node._postgres_image_bin(major)
            base = {
                "PATH": f"{wrapper_bin}:{PG_ROOT / major / 'bin'}:{SYSTEM_PATH}",
                "PG_MAJOR": major,
                "LANG": "C.UTF-8",
                "PGHOST": str(self.socket_dir),
                "PGRO_FAKE_NODE_POD_IP": self.pod_ip,
                "PGRO_FAKE_NODE_SOCKET_DIR": str(self.socket_dir),
            }
            stop = signal.SIGINT  # the postgres image's STOPSIGNAL: fast shutdown
        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            home = "/"
        env = {"HOSTNAME": self.pod_name, "HOME": home, **base, **user_env}
        # argv[0] of a pgro container is the interpreter: not a container path
        argv = [expand(paths.rewrite(a), env) for a in argv]
        cwd = paths.rewrite(spec.get("workingDir") or "/")
        return _Launch(argv, env, uid, gid, groups, cwd, stop, paths, major)

    # --- probes ----------------------------------------------------------------------------

    def _probe(self, c: _Container) -> None:
        c.next_probe = time.monotonic() + PROBE_PERIOD
        if not c.started:
            ok = self._run_probe(c, c.spec["startupProbe"])
            st = c.probes.setdefault("startup", _ProbeState())
            if ok:
                c.started = True
            else:
                st.failures += 1
                if st.failures >= int(c.spec["startupProbe"].get("failureThreshold", 3)):
                    self._probe_kill(c, "startup")
            return
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.spec.get(kind)
            if not probe:
                continue
            ok = self._run_probe(c, probe)
            st = c.probes.setdefault(kind, _ProbeState())
            if ok:
                st.successes, st.failures = st.successes + 1, 0
            else:
                st.successes, st.failures = 0, st.failures + 1
            if kind == "readinessProbe":
                if ok and st.successes >= int(probe.get("successThreshold", 1)):
                    c.ready = True
                elif not ok and (
                    not c.ready or st.failures >= int(probe.get("failureThreshold", 3))
                ):
                    c.ready = False
            elif not ok and st.failures >= int(probe.get("failureThreshold", 3)):
                self._probe_kill(c, "liveness")
                return

    def _probe_kill(self, c: _Container, which: str) -> None:
        self.node._log(f"{self.namespace}/{self.pod_name} [{c.name}]: {which} probe failed")
        self._kill([c], int(_get(self.pod, "spec", "terminationGracePeriodSeconds", default=30)))

    def _run_probe(self, c: _Container, probe: Json) -> bool:
        timeout = max(float(probe.get("timeoutSeconds", 1)), 1.0)
        try:
            if "exec" in probe:
                return self._exec_probe(c, probe["exec"].get("command") or [], timeout)
            if "tcpSocket" in probe:
                port = self._port(c, probe["tcpSocket"]["port"])
                with socket.create_connection((self.pod_ip, port), timeout=timeout):
                    return True
            if "httpGet" in probe:
                g = probe["httpGet"]
                url = f"http://{self.pod_ip}:{self._port(c, g['port'])}{g.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return bool(200 <= r.status < 400)
        except OSError:
            return False
        self.node._error(f"pod {self.namespace}/{self.pod_name}: unsupported probe {probe}")
        return False

    def _port(self, c: _Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise OSError(f"no port named {port}")

    def _exec_probe(self, c: _Container, command: Sequence[str], timeout: float) -> bool:
        launch = c.launch
        if launch is None or not command:
            return False
        argv = [launch.paths.rewrite(str(a)) for a in command]
        if os.path.basename(argv[0]) == "pgro":
            argv = [sys.executable, *PGRO_MODULE, *argv[1:]]
        elif os.path.basename(argv[0]) == "pg_isready":
            # -h localhost inside a pod means the pod; on this host it is the pod IP.
            argv = [
                self.pod_ip
                if i > 0
                and argv[i - 1] in ("-h", "--host")
                and a in ("localhost", "127.0.0.1", "::1")
                else a
                for i, a in enumerate(argv)
            ]
        full = [*self.node._setpriv(launch.uid, launch.gid, launch.groups, pdeathsig=False), *argv]
        try:
            r = subprocess.run(
                full,
                env=launch.env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    # --- stopping --------------------------------------------------------------------------

    def _kill(self, containers: Sequence[_Container], grace: float) -> None:
        """Stop signal to each main process, SIGKILL for everything left after `grace`."""
        live = [c for c in containers if c.running()]
        for c in live:
            assert c.proc is not None and c.launch is not None
            c.stopping_since = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, c.launch.stop_signal)
        deadline = time.monotonic() + grace
        while any(c.running() for c in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in live:
            assert c.proc is not None
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
            self._kill_leftovers(c)

    def _stop_sidecars(self, grace: float) -> list[_Container]:
        """Stop the running native sidecars as kubelet does once the regular containers are
        gone: one at a time in reverse order of the spec, within one grace period. Returns
        those stopped (their exits are not recorded yet)."""
        live = [c for c in self._sidecars() if c.running()]
        deadline = time.monotonic() + grace
        for c in reversed(live):
            self._kill([c], max(0.0, deadline - time.monotonic()))
        return live

    def _finish(self, phase: str) -> None:
        """The regular containers are done: `phase` is theirs, whatever the sidecars do on
        their way out (SIGTERM, then SIGKILL after the grace period)."""
        for c in self._stop_sidecars(self._grace()):
            self._record_exit(c)
        for c in self.containers:
            c.done = True
        self.phase = phase
        self.terminal = True
        self.node._log(f"{self.namespace}/{self.pod_name}: {phase}")

    def _grace(self) -> float:
        pod_grace = _get(self.pod, "metadata", "deletionGracePeriodSeconds")
        if pod_grace is None:
            pod_grace = _get(self.pod, "spec", "terminationGracePeriodSeconds", default=30)
        if self.gone:
            return 0
        if self.node._stopping.is_set():
            return min(float(pod_grace), 5.0)
        return float(pod_grace)

    def _terminate(self) -> None:
        # Regular (and init) containers first; native sidecars outlive them, as in kubelet.
        live = [c for c in self.containers if c.running()]
        grace = self._grace()
        deadline = time.monotonic() + grace
        self._kill([c for c in live if c.kind != "sidecar"], grace)
        self._stop_sidecars(max(0.0, deadline - time.monotonic()))
        for c in live:
            self._record_exit(c)
        if not self.terminal:
            regular = self._regular()
            ok = bool(regular) and all(
                _get(c.state, "terminated", "exitCode") == 0 for c in regular
            )
            self.phase = "Succeeded" if ok else "Failed"
            self.terminal = True
            for c in self.containers:
                c.done = True
        # Volumes go before the final delete, as kubelet reclaims them first.
        for path in (self.volumes or {}).values():
            if path.is_relative_to(self.dir) and path != self.dir:
                shutil.rmtree(path, ignore_errors=True)
        # A stopping node says nothing more: a dead kubelet does not report its pods either.
        if not self.gone and self.deleting:
            self._write_status()
            self._final_delete()
        self.node._log(f"{self.namespace}/{self.pod_name}: stopped")

    def _final_delete(self) -> None:
        """kubelet's last word: delete with grace 0 so the API object goes away."""
        assert self.client is not None
        try:
            current = self.client.get(Pod, self.pod_name, namespace=self.namespace)
            if current.metadata is None or current.metadata.uid != self.uid:
                return
            self.client.delete(Pod, self.pod_name, namespace=self.namespace, grace_period=0)
        except ApiError as e:
            if e.status.code != 404:
                raise

    # --- status ----------------------------------------------------------------------------

    def _condition(self, kind: str, status: bool, reason: str = "", message: str = "") -> Json:
        value = "True" if status else "False"
        prev = self.conditions.get(kind)
        cond: Json = {
            "type": kind,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": (
                prev["lastTransitionTime"] if prev and prev["status"] == value else _now()
            ),
        }
        # None, not absent: a strategic merge patch keeps the old reason otherwise
        cond["reason"] = reason or None
        cond["message"] = message or None
        self.conditions[kind] = cond
        return cond

    def _container_status(self, c: _Container) -> Json:
        state, last = c.state, c.last_state
        if "running" in state or c.done or self.terminal:
            pass
        elif "terminated" in state:  # exited, restart pending: kubelet's back-off state
            state, last = (
                {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {RESTART_DELAY:g}s restarting failed "
                        f"container={c.name} pod={self.pod_name}_{self.namespace}({self.uid})",
                    }
                },
                state,
            )
        elif self.volumes is None:
            state = {"waiting": {"reason": "ContainerCreating"}}
        elif c.kind == "main" and not self.initialized:
            state = {"waiting": {"reason": "PodInitializing"}}
        s: Json = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": f"fake://{c.spec.get('image', '')}",
            "ready": c.ready and c.running(),
            "restartCount": c.restart_count,
            "started": c.running() and c.started,
            "state": state,
            "lastState": last,
        }
        if c.container_id and "waiting" not in state:
            s["containerID"] = c.container_id
        return s

    def _status(self) -> Json:
        regular = self._regular()
        inits = [c for c in self.containers if c.kind != "main"]
        if self.terminal:
            phase = self.phase
        elif (
            not self.initialized
            or self.volumes is None
            or any("waiting" in c.state and c.restart_count == 0 for c in regular)
        ):
            phase = "Pending"
        else:
            phase = "Running"
        unready = [c.name for c in regular + self._sidecars() if not (c.ready and c.running())]
        incomplete = [
            c.name for c in inits if not (c.succeeded or (c.kind == "sidecar" and c.started))
        ]
        conds = [
            self._condition("PodReadyToStartContainers", self.volumes is not None),
            self._condition(
                "Initialized",
                self.initialized,
                "" if self.initialized else "ContainersNotInitialized",
                ""
                if self.initialized
                else f"containers with incomplete status: [{' '.join(incomplete)}]",
            ),
        ]
        if self.terminal:
            ready_reason, ready_msg = "PodCompleted", ""
            ready = False
        else:
            ready = not unready
            ready_reason = "" if ready else "ContainersNotReady"
            ready_msg = "" if ready else f"containers with unready status: [{' '.join(unready)}]"
        conds += [
            self._condition("ContainersReady", ready, ready_reason, ready_msg),
            self._condition("Ready", ready, ready_reason, ready_msg),
            self._condition("PodScheduled", True),
        ]
        status: Json = {
            "phase": phase,
            "conditions": conds,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "containerStatuses": [self._container_status(c) for c in regular],
        }
        if inits:
            status["initContainerStatuses"] = [self._container_status(c) for c in inits]
        return status

    def _write_status(self) -> None:
        assert self.client is not None
        status = self._status()
        if status == self.last_status:
            return
        try:
            self.client.patch(
                Pod.Status,
                self.pod_name,
                {"status": status},
                namespace=self.namespace,
                patch_type=PatchType.STRATEGIC,
            )
            self.last_status = status
        except ApiError as e:
            if e.status.code == 404:
                self.gone = True
                self.deleting = True
                return
            raise


def _warm_model_types() -> None:
    """Decode each API type the node's threads use once, in the calling thread.

    msgspec builds a model's type information on first use, and two threads doing that at
    once for overlapping lightkube models (a test's Job and the watch thread's Pod list, both
    holding a PodSpec) crashed the interpreter with a segfault.
    """
    from lightkube.core.decoders import decode_list
    from lightkube.models.meta_v1 import Status
    from lightkube.resources.apps_v1 import Deployment, ReplicaSet, StatefulSet
    from lightkube.resources.batch_v1 import CronJob, Job
    from lightkube.resources.core_v1 import Event, Namespace, ServiceAccount
    from lightkube.resources.discovery_v1 import EndpointSlice

    for res in (
        Pod, Node, PersistentVolume, PersistentVolumeClaim, Secret, ConfigMap, Service,
        Namespace, ServiceAccount, Event, EndpointSlice, Job, CronJob, Deployment, ReplicaSet,
        StatefulSet,
    ):  # fmt: skip
        decode_list(b'{"items": []}', res)
        # Building the type information comes first; required fields may then be missing.
        for t in (res, Pod.Binding, Status):
            with contextlib.suppress(msgspec.ValidationError):
                msgspec.json.decode(b"{}", type=t)


class FakeNode:
    """One Node that runs the Pods bound to it as local processes (see the module docstring).

    `config` is an admin lightkube KubeConfig; `root` a directory the `postgres` account can
    traverse (mode 0711 all the way). `namespaces` limits which Pods it binds and runs.
    Construct it in the thread that runs the tests (see `_warm_model_types`).
    """

    def __init__(
        self,
        config: KubeConfig,
        root: Path,
        *,
        name: str = NODE_NAME,
        namespaces: Sequence[str] | None = None,
        postgres_account: str = "postgres",
    ) -> None:
        self.config = config
        self.root = root
        self.name = name
        self.namespaces = set(namespaces) if namespaces else None
        self.allocatable = {
            "cpu": "64",
            "memory": "256Gi",
            "pods": "1000",
            "ephemeral-storage": "1Ti",
        }
        pw = pwd.getpwnam(postgres_account)
        self.postgres_uid, self.postgres_gid = pw.pw_uid, pw.pw_gid
        self.errors: list[str] = []
        self._runners: dict[str, _PodRunner] = {}
        self._by_name: dict[tuple[str, str], list[_PodRunner]] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_client: Client | None = None
        self._slots = 0
        self._address_locks: list[IO[str]] = []
        self._node_log: IO[str] | None = None
        self._lose_messages: set[tuple[str, str]] = set()
        self.lost_messages: list[tuple[str, str, str]] = []
        self.tools_dir = root / "tools"
        self._setpriv_path = shutil.which("setpriv")
        _warm_model_types()

    # --- public ----------------------------------------------------------------------------

    def start(self) -> FakeNode:
        for d in (self.root, self.root / "pods", self.root / "pvc", self.root / "sock"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o711)
        self._node_log = (self.root / "node.log").open("a", buffering=1)
        self._setup_tools()
        with self._client() as c:
            self._register(c)
        for target, name in ((self._watch_loop, "watch"), (self._housekeeping, "housekeeping")):
            t = threading.Thread(target=target, name=f"fakenode-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._log(f"node {self.name} started in {self.root}")
        return self

    def stop(self) -> None:
        """Stop every pod's processes (grace at most 5 s) and the node's threads."""
        self._stopping.set()
        if self._watch_client is not None:
            self._watch_client.close()
        with self._lock:
            runners = list(self._runners.values())
        for r in runners:
            r.wake.set()
        for r in runners:
            r.join(30)
            if r.is_alive():
                self._error(f"pod {r.namespace}/{r.pod_name}: runner did not stop in 30 s")
        for t in self._threads:
            t.join(10)
        self._kill_marked(f"{self.root}/".encode())
        self._log("node stopped")
        for f in self._address_locks:
            f.close()
        self._address_locks.clear()
        if self._node_log is not None:
            self._node_log.close()
            self._node_log = None

    def __enter__(self) -> FakeNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check(self) -> None:
        """Raise if the node hit something it cannot do or crashed (not a pod's failure)."""
        if self.errors:
            raise AssertionError("fake node errors:\n" + "\n".join(self.errors))

    def lose_termination_messages(self, namespace: str, container: str) -> None:
        """From now on, containers called `container` in `namespace` exit without a
        termination message (whatever they wrote). Namespaces are per test: no undo."""
        with self._lock:
            self._lose_messages.add((namespace, container))

    def pvc_path(self, namespace: str, claim: str) -> Path:
        return self.root / "pvc" / namespace / claim

    def pod_dir(self, namespace: str, name: str) -> Path | None:
        r = self._latest(namespace, name)
        return r.dir if r else None

    def pod_ip(self, namespace: str, name: str) -> str | None:
        r = self._latest(namespace, name)
        return r.pod_ip if r else None

    def socket_dir(self, namespace: str, name: str) -> Path | None:
        r = self._latest(namespace, name)
        return r.socket_dir if r else None

    def pods(self) -> list[tuple[str, str, str]]:
        """(namespace, name, uid) of every pod this node ran, oldest first."""
        with self._lock:
            return [(r.namespace, r.pod_name, r.uid) for r in self._runners.values()]

    def logs(self, pod_name: str, namespace: str | None = None, *, tail: int = 100) -> str:
        """The last `tail` lines of each container of the newest pod called `pod_name`."""
        with self._lock:
            matches = [
                rs[-1]
                for (ns, n), rs in self._by_name.items()
                if n == pod_name and (namespace is None or ns == namespace)
            ]
        if not matches:
            return f"(no pod named {pod_name!r} ran on {self.name})"
        out: list[str] = []
        for r in matches:
            for c in r.containers:
                path = r._log_file(c)
                try:
                    lines = path.read_text(errors="replace").splitlines()[-tail:]
                except OSError:
                    lines = ["(no output)"]
                out.append(f"--- {r.namespace}/{r.pod_name} [{c.name}] {path}")
                out.extend(lines)
        return "\n".join(out)

    def describe(self, *, tail: int = 40) -> str:
        """Every pod this node ran: phase, IP, container states, and the logs of containers
        that are not running fine, then the node's own log. For assertion messages."""
        with self._lock:
            runners = [rs[-1] for rs in self._by_name.values()]
        out = [f"=== fake node {self.name} ({self.root})"]
        for r in runners:
            out.append(f"pod {r.namespace}/{r.pod_name} phase={r.phase} ip={r.pod_ip}")
            if r.sandbox_wait is not None:
                out.append(f"  sandbox waiting: {r.sandbox_wait}")
            for c in r.containers:
                state = next(iter(c.state), "?")
                detail = c.state.get(state) or {}
                out.append(
                    f"  [{c.kind} {c.name}] {state} {detail.get('reason', '')} "
                    f"exit={detail.get('exitCode', '')} restarts={c.restart_count} "
                    f"ready={c.ready} {detail.get('message', '')}"
                )
                if not (c.running() and c.ready):
                    try:
                        lines = r._log_file(c).read_text(errors="replace").splitlines()[-tail:]
                    except OSError:
                        lines = []
                    out.extend(f"    | {line}" for line in lines)
        if self.errors:
            out.append("node errors:")
            out.extend(self.errors)
        out.append("--- node log")
        out.append(self.node_log(tail))
        return "\n".join(out)

    def node_log(self, tail: int = 200) -> str:
        try:
            return "\n".join(
                (self.root / "node.log").read_text(errors="replace").splitlines()[-tail:]
            )
        except OSError:
            return ""

    def service_endpoints(self, namespace: str, service: str) -> list[tuple[str, int]]:
        """(pod IP, target port) of the ready pods behind a Service: where its ClusterIP
        would forward. Computed here from the selector, because the EndpointSlice controller
        cannot publish them: the apiserver refuses loopback addresses in EndpointSlices."""
        out: set[tuple[str, int]] = set()
        with self._client() as c:
            svc = c.get(Service, service, namespace=namespace).to_dict()
            selector = _get(svc, "spec", "selector")
            if not selector:
                return []
            for p in c.list(Pod, namespace=namespace, labels=selector):
                pod = p.to_dict()
                conds = {
                    x["type"]: x["status"] for x in _get(pod, "status", "conditions", default=[])
                }
                ip = _get(pod, "status", "podIP")
                if (
                    _get(pod, "spec", "nodeName") != self.name
                    or conds.get("Ready") != "True"
                    or not ip
                    or _get(pod, "metadata", "deletionTimestamp")
                ):
                    continue
                for port in _get(svc, "spec", "ports", default=[]):
                    target = port.get("targetPort", port["port"])
                    if not str(target).isdigit():
                        target = next(
                            (
                                cp["containerPort"]
                                for ct in pod["spec"]["containers"]
                                for cp in ct.get("ports") or []
                                if cp.get("name") == target
                            ),
                            None,
                        )
                    if target is not None:
                        out.add((ip, int(target)))
        return sorted(out)

    # --- shared helpers (used by runners) ------------------------------------------------

    def _client(self) -> Client:
        return Client(self.config, field_manager=FIELD_MANAGER)

    def _log(self, message: str) -> None:
        log.info("%s", message)
        f = self._node_log
        if f is not None:
            with contextlib.suppress(ValueError):
                f.write(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {message}\n")

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
        self._log(f"ERROR {message}")

    def _address(self, slot: int) -> str:
        return f"127.0.{slot // 240}.{10 + slot % 240}"

    def _next_slot(self) -> int:
        """The next pod address no other fake node (another pytest session on this machine)
        holds and nothing listens on: each address is reserved with a lock file kept open
        for the node's lifetime (the kernel drops the lock when the process dies)."""
        lock_dir = Path(tempfile.gettempdir()) / "pgro-fake-node-addresses"
        lock_dir.mkdir(exist_ok=True)
        with self._lock:
            while True:
                slot = self._slots
                self._slots += 1
                address = self._address(slot)
                f = (lock_dir / address).open("a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.close()
                    continue
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((address, 5432))
                    except OSError:  # a leftover server
                        f.close()
                        continue
                self._address_locks.append(f)
                return slot

    def _map_uid(self, uid: int) -> int:
        return self.postgres_uid if uid == IMAGE_POSTGRES_UID else uid

    def _map_gid(self, gid: int) -> int:
        return self.postgres_gid if gid == IMAGE_POSTGRES_UID else gid

    def _setpriv(
        self, uid: int, gid: int, groups: Sequence[int], *, pdeathsig: bool = True
    ) -> list[str]:
        """argv prefix: switch to uid/gid, and die with the runner thread if pytest dies."""
        if self._setpriv_path is None:
            raise RuntimeError("setpriv (util-linux) is needed by the fake node")
        argv = [self._setpriv_path]
        if pdeathsig:
            argv.append("--pdeathsig=KILL")
        if uid != 0 or gid != 0:
            argv += [f"--reuid={uid}", f"--regid={gid}"]
            argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        return [*argv, "--"]

    def _setup_tools(self) -> None:
        """A dir on the pgro containers' PATH with kopia (cached under /root otherwise)."""
        self.tools_dir.mkdir(exist_ok=True)
        self.tools_dir.chmod(0o755)
        cache = Path(os.environ.get("PGRO_CACHE_DIR") or Path.home() / ".cache" / "pgro")
        kopia = shutil.which("kopia") or str(cache / "bin" / "kopia")
        if os.access(kopia, os.X_OK) and not (self.tools_dir / "kopia").exists():
            shutil.copy2(kopia, self.tools_dir / "kopia")

    def _postgres_image_bin(self, major: str) -> Path:
        d = self.root / "images" / f"postgres-{major}"
        with self._lock:
            if not (d / "pg_ctl").exists():
                d.mkdir(parents=True, exist_ok=True)
                for p in (self.root / "images", d):
                    p.chmod(0o755)
                wrapper = d / "postgres"
                wrapper.write_text(
                    _POSTGRES_WRAPPER.format(real=PG_ROOT / major / "bin" / "postgres")
                )
                wrapper.chmod(0o755)
                # pg_ctl starts the `postgres` next to itself: a copy here finds the wrapper.
                shutil.copy2(PG_ROOT / major / "bin" / "pg_ctl", d / "pg_ctl.tmp")
                (d / "pg_ctl.tmp").rename(d / "pg_ctl")
        return d

    def _make_pvc_dir(self, path: Path) -> None:
        for parent in reversed(path.parents):
            if parent.is_relative_to(self.root) and not parent.exists():
                # Two pods of a new namespace may provision their volumes at once.
                parent.mkdir(exist_ok=True)
                parent.chmod(0o711)
        path.mkdir(exist_ok=True)
        path.chmod(0o755)

    def _provision(self, client: Client, pvc: Json) -> None:
        """Create a hostPath PV pre-bound to `pvc`; the PV controller binds the pair."""
        meta = pvc["metadata"]
        path = self.pvc_path(meta["namespace"], meta["name"])
        self._make_pvc_dir(path)
        spec = pvc.get("spec") or {}
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "labels": {PROVISIONED_LABEL: self.name},
                "annotations": {"pv.kubernetes.io/provisioned-by": FIELD_MANAGER},
            },
            "spec": {
                "capacity": {
                    "storage": _get(spec, "resources", "requests", "storage", default="1Gi")
                },
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": spec.get("storageClassName") or "",
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            client.create(PersistentVolume.from_dict(pv))  # type: ignore[call-overload]
            self._log(f"provisioned PV pvc-{meta['uid']} for {meta['namespace']}/{meta['name']}")
        except ApiError as e:
            if e.status.code != 409:
                raise

    def _kill_marked(self, marker: bytes) -> None:
        """SIGKILL every process whose environment carries a container marker under `marker`
        (daemons a container started, e.g. `pg_ctl start`, leave its process group)."""
        needle = f"{MARKER_ENV}=".encode() + marker
        for _ in range(3):
            found = False
            for pid in self._marked_pids(needle):
                found = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not found:
                return
            time.sleep(0.05)

    @staticmethod
    def _marked_pids(needle: bytes) -> Iterator[int]:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if any(v.startswith(needle) for v in env.split(b"\0")):
                yield int(entry)

    # --- node registration, watch, housekeeping --------------------------------------------

    def _register(self, c: Client) -> None:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        try:
            c.create(Node(metadata=ObjectMeta(name=self.name, labels=labels)))
        except ApiError as e:
            if e.status.code != 409:
                raise
        now = _now()
        conds = [
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        status = {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r, m in conds
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "osImage": "pgro FakeNode",
                "containerRuntimeVersion": "fake://1",
                "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        c.patch(Node.Status, self.name, {"status": status}, patch_type=PatchType.MERGE)

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch_client = self._client()
                pods = self._watch_client.list(Pod, namespace=ALL_NS)
                items = list(pods)
                for p in items:
                    self._on_pod("ADDED", p.to_dict())
                for kind, obj in self._watch_client.watch(
                    Pod, namespace=ALL_NS, resource_version=pods.resourceVersion
                ):
                    if self._stopping.is_set():
                        return
                    self._on_pod(kind, obj.to_dict())
            except Exception:
                if self._stopping.is_set():
                    return
                self._error(f"pod watch: {traceback.format_exc()}")
                time.sleep(1)
            finally:
                if self._watch_client is not None:
                    self._watch_client.close()

    def _on_pod(self, kind: str, pod: Json) -> None:
        meta = pod["metadata"]
        if self.namespaces is not None and meta["namespace"] not in self.namespaces:
            return
        uid = meta["uid"]
        with self._lock:
            runner = self._runners.get(uid)
        if kind == "DELETED":
            if runner is not None:
                runner.vanished()
            return
        node_name = _get(pod, "spec", "nodeName")
        if not node_name:
            if not meta.get("deletionTimestamp") and not _get(pod, "spec", "schedulingGates"):
                self._bind(pod)
            return
        if node_name != self.name:
            return
        if runner is not None:
            runner.update(pod)
            return
        if _get(pod, "status", "phase") in ("Succeeded", "Failed"):
            # finished before this node started: nothing to run, only the final delete
            if meta.get("deletionTimestamp"):
                assert self._watch_client is not None
                try:
                    self._watch_client.delete(
                        Pod, meta["name"], namespace=meta["namespace"], grace_period=0
                    )
                except ApiError as e:
                    if e.status.code != 404:
                        raise
            return
        with self._lock:
            if self._stopping.is_set():
                return
            runner = _PodRunner(self, pod, self._next_slot())
            if meta.get("deletionTimestamp"):
                runner.deleting = True
            self._runners[uid] = runner
            self._by_name.setdefault((meta["namespace"], meta["name"]), []).append(runner)
        self._log(f"{meta['namespace']}/{meta['name']}: running as {runner.pod_ip}")
        runner.start()

    def _bind(self, pod: Json) -> None:
        assert self._watch_client is not None
        meta = pod["metadata"]
        binding = Pod.Binding(
            metadata=ObjectMeta(name=meta["name"], namespace=meta["namespace"]),
            target=ObjectReference(apiVersion="v1", kind="Node", name=self.name),
        )
        try:
            self._watch_client.create(binding, meta["name"], namespace=meta["namespace"])
        except msgspec.ValidationError:
            pass  # bound: the apiserver answers with a Status, which lightkube cannot decode
        except ApiError as e:
            if e.status.code in (404, 409):
                return
            raise
        self._log(f"{meta['namespace']}/{meta['name']}: bound to {self.name}")

    def _latest(self, namespace: str, name: str) -> _PodRunner | None:
        with self._lock:
            rs = self._by_name.get((namespace, name))
            return rs[-1] if rs else None

    def _housekeeping(self) -> None:
        """Released PVs this node provisioned are deleted with their data (reclaim Delete);
        runners of pods gone from the API are forgotten."""
        while not self._stopping.wait(2.0):
            try:
                with self._client() as c:
                    for pv in c.list(PersistentVolume, labels={PROVISIONED_LABEL: self.name}):
                        d = pv.to_dict()
                        if _get(d, "status", "phase") not in ("Released", "Failed"):
                            continue
                        ref = _get(d, "spec", "claimRef", default={})
                        path = Path(_get(d, "spec", "hostPath", "path", default="/"))
                        c.delete(PersistentVolume, d["metadata"]["name"])
                        try:
                            # a new claim of the same name uses the same directory
                            c.get(
                                PersistentVolumeClaim, str(ref["name"]), namespace=ref["namespace"]
                            )
                        except ApiError as e:
                            if e.status.code == 404 and path.is_relative_to(self.root / "pvc"):
                                shutil.rmtree(path, ignore_errors=True)
                        self._log(f"deleted released PV {d['metadata']['name']}")
                with self._lock:
                    for uid, r in list(self._runners.items()):
                        if r.gone and not r.is_alive():
                            del self._runners[uid]
            except Exception:
                if self._stopping.is_set():
                    return
                self._error(f"housekeeping: {traceback.format_exc()}")
