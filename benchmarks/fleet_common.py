"""What the fleet-scale benchmarks share: one real kopia repository, process readings, waits.

Both benchmarks (`fleet_kube`, `fleet_embedded`) need replicas whose snapshots list fast and
whose schedules are not due, so they use one filesystem repository for every replica. It is
built the way the test fixtures build theirs (`tests/fixtures/clusters.build_debian_cluster`,
a real PostgreSQL cluster, then `kopia snapshot create`), with two snapshots: an older one and
the newest, which every replica's serving (or verified) restore already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_PASSWORD = "fleet-benchmark-password"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class FleetRepo:
    path: Path
    password: str
    old_snapshot: str
    new_snapshot: str

    def secret_data(self) -> dict[str, str]:
        """The kopia Secret's keys for this filesystem repository."""
        return {"filesystemPath": str(self.path), "repositoryPassword": self.password}


def build_repository(base: Path) -> FleetRepo:
    """A filesystem kopia repository with two snapshots of a real PostgreSQL cluster."""
    from tests.fixtures.clusters import build_debian_cluster

    from pgro.api.secret import FilesystemLocation, KopiaCredentials
    from pgro.kopia.repository import KopiaRepository
    from pgro.postgres.account import resolve_run_account
    from pgro.postgres.initdb import newest_binaries

    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o711)
    account = resolve_run_account()
    binaries = newest_binaries()
    creds = KopiaCredentials(
        location=FilesystemLocation(str(base / "repository")), repository_password=REPO_PASSWORD
    )
    kopia = KopiaRepository(creds, base / "kopia-state")
    kopia.create()
    try:
        cluster = base / "cluster"
        build_debian_cluster(cluster, binaries, account, base)
        source = "postgres@fleet-db:/var/lib/postgresql"
        old = kopia.snapshot_create(
            cluster,
            tags={"kind": "fleet"},
            override_source=source,
            start_time=datetime.now(UTC) - timedelta(days=1),
        )
        new = kopia.snapshot_create(cluster, tags={"kind": "fleet"}, override_source=source)
    finally:
        kopia.close()
    return FleetRepo(base / "repository", REPO_PASSWORD, old, new)


@dataclass(frozen=True)
class ProcReading:
    """One look at a process: memory (kB) and CPU seconds, its own and its reaped children's."""

    at: float
    rss_kb: int
    hwm_kb: int
    cpu_s: float
    children_cpu_s: float


def read_proc(pid: int) -> ProcReading:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {
        line.split(":", 1)[0]: line.split(":", 1)[1].split()[0]
        for line in status.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: the fields after it start past the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ProcReading(
        at=time.monotonic(),
        rss_kb=int(fields.get("VmRSS", 0)),
        hwm_kb=int(fields.get("VmHWM", 0)),
        cpu_s=(utime + stime) / CLOCK_TICKS,
        children_cpu_s=(cutime + cstime) / CLOCK_TICKS,
    )


def cpu_per_minute(before: ProcReading, after: ProcReading) -> dict[str, float]:
    minutes = (after.at - before.at) / 60
    return {
        "process_cpu_s_per_min": round((after.cpu_s - before.cpu_s) / minutes, 3),
        "children_cpu_s_per_min": round(
            (after.children_cpu_s - before.children_cpu_s) / minutes, 3
        ),
    }


def load_average() -> str:
    """/proc/loadavg's 1, 5 and 15 minute figures: the two cores are shared, so say how busy."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0
) -> tuple[Any, float]:
    """Poll `check` until it returns something truthy; (its value, seconds waited)."""
    started = time.monotonic()
    deadline = started + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last, time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


AT_ENV = "PGRO_BENCH_AT"
ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit whose pgro is measured, for labelling figures: the one given with `--at`,
    else the checkout's HEAD (plus `+dirty` when src/ has uncommitted changes)."""
    import subprocess

    at = os.environ.get(AT_ENV)
    if at:
        return at

    def git(*args: str) -> str:
        r = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return r.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "src") else "")


def run_at_commit(module: str, argv: list[str]) -> None:
    """`--at COMMIT`: measure the pgro of another commit without touching the checkout.

    `git archive` copies that commit's src/ to a temp dir, and this process is replaced by
    one whose PYTHONPATH puts it first, so the benchmark, the operator or `pgro run` it
    starts, and everything they import from `pgro` come from that commit (the benchmark
    and the test harness stay this checkout's). Returns only if `--at` was not given."""
    import subprocess
    import sys

    if "--at" not in argv:
        return
    i = argv.index("--at")
    commit = argv[i + 1]
    rest = argv[:i] + argv[i + 2 :]
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", commit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"pgro-at-{full}"
    if not (dest / "src" / "pgro").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", full, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    env = dict(os.environ, PYTHONPATH=f"{dest / 'src'}{os.pathsep}{ROOT}", **{AT_ENV: full})
    print(f"measuring pgro at {full} ({dest / 'src'})", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", module, *rest], env)  # noqa: S606


def add_common_arguments(parser: argparse.ArgumentParser, settle: float) -> None:
    """The options both fleet benchmarks take."""
    parser.add_argument("--at", metavar="COMMIT", help="measure the pgro of this commit")
    parser.add_argument("--settle", type=float, default=settle, help="seconds after start-up")
    parser.add_argument("--steady", type=float, default=180.0, help="steady-state window, seconds")
    parser.add_argument("--workdir", help="keep everything here (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="write the result here too")


def report(result: dict[str, Any], json_path: Path | None) -> int:
    """Print the result as JSON (and write it to `json_path`)."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
    return 0


def start_result(args: argparse.Namespace, prefix: str) -> tuple[Path, dict[str, Any]]:
    """The benchmark's work directory (traversable by the run account) and the head of
    its result: which pgro is measured, on what, under what load."""
    import pgro

    work = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o711)
    return work, {
        "commit": git_commit(),
        "load_average_at_start": load_average(),
        "pgro_source": str(Path(pgro.__file__).parent),
        "replicas": args.replicas,
        "workdir": str(work),
    }
