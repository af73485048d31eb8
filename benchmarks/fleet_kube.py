"""Fleet scale on the real control plane: `pgro operator` with 1,000 replicas and 3,000 restores.

    PATH=$HOME/.cache/pgro/bin:$PATH .venv/bin/python -m benchmarks.fleet_kube            # full
    PATH=$HOME/.cache/pgro/bin:$PATH .venv/bin/python -m benchmarks.fleet_kube --replicas 100

It starts the `tests/kube` control plane (etcd, kube-apiserver, kube-controller-manager; no
node: nothing here needs a pod to run), seeds a fleet in a steady state, starts `pgro
operator` as its own process with the deploy/ ServiceAccount's RBAC and the CLI's defaults
(resync 60 s, lease 15 s, renew 5 s), and reports:

- the operator's RSS (`VmRSS`, `VmHWM` from /proc) once it has reconciled everything;
- the time from its start to every replica reconciled once: the seeded replicas' schedules
  are due, so each pass must list the repository and then records the newest snapshot in
  `status.latestAvailableSnapshot` and advances `nextScheduledRestore` (the visible marker);
- the API requests per minute it makes in the steady state, from the API server's audit log
  (only the operator's ServiceAccount is audited): watches, LIST/GET, writes, leader-election
  Lease traffic apart, each (verb, resource) with its rate and how many distinct objects it
  touched; plus the API server's own `apiserver_request_total` over the same window (every
  client: the controller-manager too);
- leader failover: a second operator stands by; the leader is killed (SIGKILL, no Lease
  release); the time until the standby holds the Lease, makes its first reconcile pass, and
  has made as many replica passes as there are replicas.

The fleet (what stays quiet once reconciled): per replica a kopia Secret (all point at the
same filesystem repository, so every replica shares one listing), a `PostgresPhysicalReplica`
with a daily schedule whose `nextScheduledRestore` has just passed, and three Active restores:
the current one holding the newest snapshot, two superseded ones kept by a 720 h
`switchoverGracePeriod`. Restores are created and their status written with the status
subresource, as the operator would have left them.

The controller-manager runs without its Deployment and ReplicaSet controllers: no node runs
pods here, and its 20-request/s client would spend about ten minutes creating 3,000
ReplicaSets and Pods that stay Pending, which measures the controller-manager, not pgro.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.fleet_common import (
    FleetRepo,
    add_common_arguments,
    build_repository,
    cpu_per_minute,
    load_average,
    read_proc,
    report,
    run_at_commit,
    start_result,
    wait_for,
)

API_GROUP = "pgro.bes.au"
API_VERSION = "v1alpha1"
LABEL_REPLICA = f"{API_GROUP}/replica"
SCHEDULE = "0 3 * * *"
JITTER = "0s"
GRACE = "720h"
OPERATOR_USER = "system:serviceaccount:pgro-system:postgres-restore-operator"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
READ_VERBS = {"get", "list"}

AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: ["{OPERATOR_USER}"]
  - level: None
"""


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _schedule_hash() -> str:
    from pgro.api.duration import parse_duration
    from pgro.core.schedule import schedule_input_hash

    return schedule_input_hash(SCHEDULE, parse_duration(JITTER))


# -- the control plane ---------------------------------------------------------------------


def _prepare_harness(workdir: Path) -> Path | None:
    """Settings the harness has no parameter for: an audit log for the operator's user, a
    Service IP range large enough for the fleet, and no Deployment/ReplicaSet controllers.
    Returns the audit log's path (None if the harness could not be adjusted: then only the
    API server's metrics are reported)."""
    import tests.kube.controlplane as cp

    if hasattr(cp, "CONTROLLERS"):
        cp.CONTROLLERS += ",-deployment-controller,-replicaset-controller"
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    audit_log = workdir / "audit.log"
    base = getattr(cp, "_Process", None)
    if base is None:
        return None

    class _Audited(base):  # type: ignore[misc, valid-type]
        def __init__(self, name: str, argv: list[str], log: Path) -> None:
            if name == "kube-apiserver":
                # The harness's /24 holds 253 ClusterIPs; the fleet has a Service per
                # replica and per Active restore. (No traffic goes to these addresses.)
                argv = [
                    "--service-cluster-ip-range=10.0.0.0/16"
                    if a.startswith("--service-cluster-ip-range=")
                    else a
                    for a in argv
                ]
                argv = [
                    *argv,
                    f"--audit-policy-file={policy}",
                    f"--audit-log-path={audit_log}",
                    "--audit-log-format=json",
                ]
            super().__init__(name, argv, log)

    setattr(cp, "_Process", _Audited)  # noqa: B010 - the harness has no parameter for it
    return audit_log


class Admin:
    """Raw JSON calls as the admin (fast, and independent of the operator's client code)."""

    def __init__(self, server: str, ca_file: Path, token: str) -> None:
        self.http = httpx.Client(
            base_url=server,
            verify=ssl.create_default_context(cafile=str(ca_file)),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            limits=httpx.Limits(max_connections=16),
        )

    def call(self, method: str, path: str, body: Any = None, ctype: str | None = None) -> Any:
        headers = {"Content-Type": ctype} if ctype else None
        for attempt in range(20):
            r = self.http.request(
                method, path, content=json.dumps(body) if body is not None else None,
                headers=headers,
            )  # fmt: skip
            if r.status_code == 404 and attempt < 19 and method == "POST":
                time.sleep(0.5)  # a new CRD's endpoint can 404 for a moment
                continue
            if r.status_code >= 300:
                raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
            return r.json() if r.content else None
        raise AssertionError("unreachable")

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body, "application/json")

    def patch_status(self, path: str, status: dict[str, Any]) -> Any:
        return self.call(
            "PATCH", path + "/status", {"status": status}, "application/merge-patch+json"
        )

    def metrics(self) -> dict[tuple[str, str, str], float]:
        """`apiserver_request_total` summed by (verb, resource, subresource)."""
        text = self.http.get("/metrics").text
        out: dict[tuple[str, str, str], float] = defaultdict(float)
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_text, value = line[len("apiserver_request_total{") :].rsplit("} ", 1)
            labels = dict(part.split("=", 1) for part in labels_text.split('",') if "=" in part)
            clean = {k: v.strip('"') for k, v in labels.items()}
            key = (clean.get("verb", ""), clean.get("resource", ""), clean.get("subresource", ""))
            out[key] += float(value)
        return out


def _crd_path(ns: str, plural: str) -> str:
    return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}/{plural}"


def seed_fleet(
    admin: Admin, repo: FleetRepo, replicas: int, restores_per: int, namespaces: int, jobs: int
) -> list[tuple[str, str]]:
    """Namespaces, Secrets, replicas and their Active restores, status written as the
    operator leaves it. Returns the replicas' (namespace, name)."""
    now = _now()
    schedule_hash = _schedule_hash()
    names = [(f"fleet-{i % namespaces:02d}", f"db-{i:04d}") for i in range(replicas)]
    for ns in sorted({ns for ns, _ in names}):
        admin.post("/api/v1/namespaces", {"metadata": {"name": ns}})
    secret_data = {k: base64.b64encode(v.encode()).decode() for k, v in repo.secret_data().items()}

    def one(item: tuple[str, str]) -> None:
        ns, name = item
        admin.post(
            f"/api/v1/namespaces/{ns}/secrets",
            {"metadata": {"name": f"{name}-kopia"}, "data": secret_data},
        )
        replica = admin.post(
            _crd_path(ns, "postgresphysicalreplicas"),
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "PostgresPhysicalReplica",
                "metadata": {"name": name},
                "spec": {
                    "kopiaSecretRef": {"name": f"{name}-kopia"},
                    "schedule": SCHEDULE,
                    "scheduleJitter": JITTER,
                    "switchoverGracePeriod": GRACE,
                },
            },
        )
        owner = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "PostgresPhysicalReplica",
            "name": name,
            "uid": replica["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        restore_names = [f"{name}-r{j}" for j in range(restores_per)]
        for j, rname in enumerate(restore_names):
            # r0 serves the newest snapshot; the others are superseded, older ones.
            created = now - timedelta(hours=2 * (j + 1))
            admin.post(
                _crd_path(ns, "postgresphysicalrestores"),
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": "PostgresPhysicalRestore",
                    "metadata": {
                        "name": rname,
                        "labels": {LABEL_REPLICA: name},
                        "ownerReferences": [owner],
                    },
                    "spec": {
                        "replica": {"name": name},
                        "snapshot": repo.new_snapshot if j == 0 else repo.old_snapshot,
                        "snapshotSize": "40Mi",
                        "storageSize": "1Gi",
                    },
                },
            )
            admin.patch_status(
                f"{_crd_path(ns, 'postgresphysicalrestores')}/{rname}",
                {
                    "phase": "Active",
                    "postgresVersion": "15",
                    "createdAt": _ts(created),
                    "restoredAt": _ts(created + timedelta(minutes=2)),
                    "activatedAt": _ts(created + timedelta(minutes=3)),
                    "pvc": f"{rname}-data",
                    "deployment": rname,
                },
            )
        admin.patch_status(
            f"{_crd_path(ns, 'postgresphysicalreplicas')}/{name}",
            {
                "phase": "Ready",
                "currentRestore": restore_names[0],
                "previousRestore": restore_names[1] if restores_per > 1 else None,
                "serviceName": name,
                "lastRestoreCompletedAt": _ts(now - timedelta(hours=2) + timedelta(minutes=3)),
                # Due: the first pass lists the repository, finds the newest snapshot served
                # already, and advances the schedule to tomorrow.
                "nextScheduledRestore": _ts(now - timedelta(minutes=5)),
                "scheduleInputHash": schedule_hash,
                "latestAvailableSnapshot": repo.old_snapshot,
            },
        )

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, names))
    return names


# -- the operator --------------------------------------------------------------------------


class Operator:
    """`pgro operator` as its own process, with the CLI's defaults."""

    def __init__(self, workdir: Path, kubeconfig: Path, identity: str, port: int) -> None:
        self.identity = identity
        self.port = port
        self.dir = workdir / identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "operator.log"
        env = dict(os.environ, TMPDIR=str(self.dir))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "pgro.cli.main", "operator",
                    "--kubeconfig", str(kubeconfig),
                    "--namespace", "pgro-system",
                    "--metrics-addr", f"127.0.0.1:{port}",
                    "--identity", identity,
                    "--image", "ghcr.io/beyondessential/pgro:bench",
                ],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()

    def metric(self, name: str, labels: str = "") -> float:
        try:
            body = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return -1.0
        wanted = f"{name}{{{labels}}}" if labels else name
        return sum(float(ln.split()[-1]) for ln in body.splitlines() if ln.startswith(wanted + " "))

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reconciled(admin: Admin, repo: FleetRepo, seeded_at: datetime) -> Callable[[], int]:
    """How many replicas carry the marker of a pass that used a fresh listing."""

    def count() -> int:
        items = admin.call("GET", f"/apis/{API_GROUP}/{API_VERSION}/postgresphysicalreplicas")
        done = 0
        for item in items["items"]:
            status = item.get("status") or {}
            nxt = status.get("nextScheduledRestore")
            if (
                status.get("latestAvailableSnapshot") == repo.new_snapshot
                and nxt
                and datetime.fromisoformat(nxt.replace("Z", "+00:00")) > seeded_at
            ):
                done += 1
        return done

    return count


# -- the audit log -------------------------------------------------------------------------


def read_audit(path: Path, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The operator's requests received in [start, end), one entry per request."""
    seen: set[str] = set()
    out = []
    with path.open() as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("auditID") in seen:
                continue
            received = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00"))
            if not start <= received < end:
                continue
            seen.add(ev["auditID"])
            out.append(ev)
    return out


def summarise_requests(events: Iterable[dict[str, Any]], minutes: float) -> dict[str, Any]:
    rows: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    objects: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    totals: Counter[str] = Counter()
    for ev in events:
        ref = ev.get("objectRef") or {}
        verb = ev.get("verb", "")
        resource = ref.get("resource", "")
        key = (verb, resource, ref.get("subresource", ""))
        code = str((ev.get("responseStatus") or {}).get("code", ""))
        rows[key][code] += 1
        if ref.get("name"):
            objects[key].add(f"{ref.get('namespace', '')}/{ref['name']}")
        if resource == "leases":
            totals["lease"] += 1
        elif verb == "watch":
            totals["watch"] += 1
        elif verb in READ_VERBS:
            totals["list_get"] += 1
        elif verb in WRITE_VERBS:
            totals["write"] += 1
        else:
            totals["other"] += 1
    per_min = {k: round(v / minutes, 1) for k, v in sorted(totals.items())}
    table = [
        {
            "verb": verb,
            "resource": resource + (f"/{sub}" if sub else ""),
            "per_min": round(sum(codes.values()) / minutes, 1),
            "codes": dict(codes),
            "distinct_objects": len(objects[(verb, resource, sub)]),
        }
        for (verb, resource, sub), codes in sorted(
            rows.items(), key=lambda kv: -sum(kv[1].values())
        )
    ]
    return {"per_min": per_min, "by_request": table}


def metrics_delta(
    before: dict[tuple[str, str, str], float],
    after: dict[tuple[str, str, str], float],
    minutes: float,
) -> list[dict[str, Any]]:
    rows = []
    for key, value in after.items():
        d = value - before.get(key, 0.0)
        if d > 0:
            verb, resource, sub = key
            rows.append(
                {
                    "verb": verb,
                    "resource": resource + (f"/{sub}" if sub else ""),
                    "per_min": round(d / minutes, 1),
                }
            )
    return sorted(rows, key=lambda r: -float(r["per_min"]))


# -- the run -------------------------------------------------------------------------------


def _log_problems(log: Path) -> dict[str, int]:
    """ERROR and WARNING lines of the operator's JSON log, by their first 60 characters."""
    seen: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        level = str(rec.get("level") or rec.get("levelname") or "").upper()
        if level in ("ERROR", "WARNING"):
            seen[f"{level} {str(rec.get('message') or rec.get('msg') or '')[:60]}"] += 1
    return dict(seen.most_common(8))


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.kube.controlplane import ControlPlane
    from tests.kube.operator_proc import OPERATOR_NAMESPACE, SERVICE_ACCOUNT, apply_deploy_rbac

    from pgro.api.crds import crd_documents

    work, result = start_result(args, "pgro-fleet-kube-")
    result["restores"] = args.replicas * args.restores_per_replica
    t = time.monotonic()
    repo = build_repository(work / "repo")
    result["repository_seconds"] = round(time.monotonic() - t, 1)
    audit_log = _prepare_harness(work)
    cp = ControlPlane(work / "control-plane", crds=crd_documents())
    (work / "control-plane").mkdir(exist_ok=True)
    operators: list[Operator] = []
    try:
        cp.start()
        admin = Admin(cp.server, cp.ca_file, cp.admin_token)
        with cp.client() as client:
            apply_deploy_rbac(client)
        token = cp.service_account_token(OPERATOR_NAMESPACE, SERVICE_ACCOUNT, 3 * 3600)
        kubeconfig = cp.kubeconfig(work / "operator.kubeconfig", token=token)

        t = time.monotonic()
        seed_fleet(
            admin, repo, args.replicas, args.restores_per_replica, args.namespaces, args.jobs
        )
        seeded_at = _now()
        result["seed_seconds"] = round(time.monotonic() - t, 1)
        print(f"seeded {args.replicas} replicas in {result['seed_seconds']} s", flush=True)

        # -- first operator: start-up, then the steady state
        op_a = Operator(work, kubeconfig, "fleet-a", _free_port())
        operators.append(op_a)
        count = reconciled(admin, repo, seeded_at)
        samples: list[tuple[float, int]] = []

        def all_done() -> bool:
            if op_a.proc.poll() is not None:
                raise RuntimeError(f"the operator exited; see {op_a.log}")
            n = count()
            samples.append((time.monotonic() - op_a.started, n))
            return bool(n >= args.replicas)

        _, took = wait_for("every replica reconciled once", all_done, args.reconcile_timeout, 2)
        start_rd = read_proc(op_a.proc.pid)
        result["startup"] = {
            "seconds_to_all_replicas_reconciled": round(took, 1),
            "progress": [(round(s, 1), n) for s, n in samples[:: max(1, len(samples) // 12)]],
            "rss_mb_then": _mb(start_rd.rss_kb),
            "hwm_mb_then": _mb(start_rd.hwm_kb),
            "cpu_s_then": round(start_rd.cpu_s, 1),
            "kopia_children_cpu_s_then": round(start_rd.children_cpu_s, 1),
            "reconciliations": {
                c: op_a.metric("postgres_restore_reconciliations_total", f'controller="{c}"')
                for c in ("replica", "restore")
            },
            "reconciliation_errors": op_a.metric("postgres_restore_reconciliation_errors_total"),
            "log_errors_and_warnings": _log_problems(op_a.log),
        }
        print(f"all replicas reconciled after {took:.1f} s", flush=True)

        time.sleep(args.settle)
        window_start = _now()
        m_before = admin.metrics()
        r_before = read_proc(op_a.proc.pid)
        rec_before = op_a.metric("postgres_restore_reconciliations_total", 'controller="replica"')
        rss_samples = [r_before.rss_kb]
        end_at = time.monotonic() + args.steady
        while time.monotonic() < end_at:
            time.sleep(min(10.0, max(0.0, end_at - time.monotonic())))
            rss_samples.append(read_proc(op_a.proc.pid).rss_kb)
        r_after = read_proc(op_a.proc.pid)
        m_after = admin.metrics()
        window_end = _now()
        rec_after = op_a.metric("postgres_restore_reconciliations_total", 'controller="replica"')
        minutes = (window_end - window_start).total_seconds() / 60
        steady: dict[str, Any] = {
            "window_minutes": round(minutes, 2),
            "load_average_at_end": load_average(),
            "rss_mb": _mb(r_after.rss_kb),
            "rss_mb_max_sampled": _mb(max(rss_samples)),
            "hwm_mb": _mb(r_after.hwm_kb),
            **cpu_per_minute(r_before, r_after),
            "replica_passes_per_min": round((rec_after - rec_before) / minutes, 1),
            "apiserver_request_total_all_clients": metrics_delta(m_before, m_after, minutes),
        }
        if audit_log is not None and audit_log.exists():
            time.sleep(1)  # the audit backend flushes
            events = read_audit(audit_log, window_start, window_end)
            steady["operator_requests"] = summarise_requests(events, minutes)
            startup_events = read_audit(audit_log, seeded_at, window_start)
            steady["startup_requests_total"] = summarise_requests(startup_events, 1.0)
        result["steady"] = steady
        print(json.dumps(steady.get("operator_requests", {}).get("per_min", {})), flush=True)

        # -- failover: a standby takes over from a leader killed without releasing its Lease
        if not args.no_failover:
            op_b = Operator(work, kubeconfig, "fleet-b", _free_port())
            operators.append(op_b)
            wait_for("the standby ready", op_b.ready, 120, 0.5)
            time.sleep(3)  # a few campaign rounds: it sees the Lease held
            killed = time.monotonic()
            op_a.stop(signal.SIGKILL)

            def holder() -> bool:
                lease = admin.call(
                    "GET",
                    "/apis/coordination.k8s.io/v1/namespaces/pgro-system/leases/"
                    "pgro-operator-leader",
                )
                return bool(lease["spec"].get("holderIdentity") == "fleet-b")

            _, lease_s = wait_for("the standby holding the Lease", holder, 120, 0.2)

            def passes() -> float:
                return op_b.metric("postgres_restore_reconciliations_total", 'controller="replica"')

            _, first_s = wait_for(
                "the standby's first replica pass", lambda: passes() > 0, 300, 0.2
            )
            _, all_s = wait_for(
                "the standby's passes over every replica",
                lambda: passes() >= args.replicas,
                args.reconcile_timeout,
                0.5,
            )
            b = read_proc(op_b.proc.pid)
            result["failover"] = {
                "lease_taken_after_kill_s": round(lease_s, 1),
                "first_replica_pass_after_kill_s": round(lease_s + first_s, 1),
                "replica_passes_ge_replicas_after_kill_s": round(lease_s + first_s + all_s, 1),
                "new_leader_rss_mb": _mb(b.rss_kb),
                "new_leader_hwm_mb": _mb(b.hwm_kb),
                "note": "lease 15 s, renew 5 s (the CLI defaults); SIGKILL releases nothing",
            }
            del killed
    finally:
        for op in operators:
            op.stop()
        cp.stop(remove=False)
    return result


def main(argv: list[str] | None = None) -> int:
    run_at_commit("benchmarks.fleet_kube", sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, settle=30.0)
    p.add_argument("--replicas", type=int, default=1000)
    p.add_argument("--restores-per-replica", type=int, default=3)
    p.add_argument("--namespaces", type=int, default=10)
    p.add_argument("--jobs", type=int, default=6, help="parallel requests while seeding")
    p.add_argument("--reconcile-timeout", type=float, default=600.0)
    p.add_argument("--no-failover", action="store_true")
    args = p.parse_args(argv)
    return report(run(args), args.json)


if __name__ == "__main__":
    threading.current_thread().name = "fleet-kube"
    sys.exit(main())
