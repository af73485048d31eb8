"""What `pgro verify --depth full` costs over the same data checks done by hand (issue 16).

Builds a real cluster with data checksums (`initdb -k`; pgbench data, scale 36 ≈ 550 MB,
its WAL in the snapshot), snapshots it into a filesystem kopia repository, then times,
alternately and in the same run:

- baseline: what an expert types as root, with the tools' defaults: `kopia repository
  connect` + `kopia snapshot restore --parallel=N`, `chown -R` to the postgres account,
  `pg_checksums --check -D`, `pg_ctl start -w` on a private port and socket,
  `pg_amcheck --all --heapallindexed --install-missing` (amcheck created where it is
  missing; every btree index with heapallindexed, every heap and TOAST relation),
  `pg_ctl stop -m fast`, `rm -rf`;
- baseline-j: the same with `pg_amcheck --jobs=N` (the CPUs pgro's checks use), a stricter
  baseline than the tools' defaults;
- pgro: `pgro verify -f MANIFEST --json --depth full --parallel=N` (the real CLI process),
  which also reads every page of every table once more (its full read);
- and, in the same rounds, `pgro verify --depth standard` (the default) and `--depth quick`.

Each pgro verdict must say `replica_healthy: true`. Prints the median wall time of each,
the ratios full/baseline (target: at most 1.10) and standard/quick, and the median of each
step of pgro's `timings` per depth.

    .venv/bin/python -m benchmarks.verify_depth [--scale 36] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tests.fixtures.manifests import fs_manifest

from benchmarks import verify_overhead
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import init_cluster, newest_binaries
from pgro.postgres.server import free_port

PASSWORD = "bench-repo-password"
DEPTHS = ("quick", "standard", "full")


def as_account(account: RunAccount) -> dict[str, object]:
    return {} if account.is_current_user else account.popen_kwargs()


def initdb_with_checksums(binaries: PostgresBinaries, pgdata: Path, account: RunAccount) -> None:
    init_cluster(binaries, pgdata, account, checksums=True)


def build_repository(
    base: Path, binaries: PostgresBinaries, account: RunAccount, scale: int
) -> tuple[Path, str, int, int]:
    """verify_overhead's cluster, with data checksums, so pg_checksums has work."""
    return verify_overhead.build_repository(
        base, binaries, account, scale, initdb=initdb_with_checksums
    )


def baseline(
    repo: Path,
    snapshot_id: str,
    work: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
    parallel: int,
    amcheck_jobs: int | None,
) -> tuple[float, dict[str, float]]:
    sock = Path(tempfile.mkdtemp(prefix="pgro-bench-"))
    if os.geteuid() == 0:
        os.chown(sock, account.uid, account.gid)
    kwargs = as_account(account)
    started = time.monotonic()
    laps: dict[str, float] = {}
    mark = started

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        laps[name] = round(now - mark, 3)
        mark = now

    target = work / "data"
    pgdata = verify_overhead.restore_by_hand(
        repo, snapshot_id, target, binaries, account, parallel, lap
    )
    subprocess.run(  # type: ignore[call-overload]
        [binaries.tool("pg_checksums"), "--check", "-D", str(pgdata)],
        check=True,
        capture_output=True,
        **kwargs,
    )
    lap("checksums")
    port = free_port()
    pg_ctl = binaries.tool("pg_ctl")
    subprocess.run(  # type: ignore[call-overload]
        [
            pg_ctl,
            "-D",
            str(pgdata),
            "-w",
            "-l",
            str(target / "pg.log"),
            "start",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=''",
        ],
        check=True,
        capture_output=True,
        **kwargs,
    )
    lap("start")
    proc = subprocess.run(
        [
            binaries.tool("pg_amcheck"),
            "-h",
            str(sock),
            "-p",
            str(port),
            "-U",
            "postgres",
            "--all",
            "--heapallindexed",
            "--install-missing",
            *([f"--jobs={amcheck_jobs}"] if amcheck_jobs else []),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"pg_amcheck failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lap("amcheck")
    subprocess.run(  # type: ignore[call-overload]
        [pg_ctl, "-D", str(pgdata), "-w", "-m", "fast", "stop"],
        check=True,
        capture_output=True,
        **kwargs,
    )
    lap("stop")
    shutil.rmtree(target)
    shutil.rmtree(work / "kopia")
    lap("cleanup")
    elapsed = time.monotonic() - started
    shutil.rmtree(sock)
    return elapsed, laps


def pgro(manifest: Path, work: Path, parallel: int, depth: str) -> tuple[float, dict[str, float]]:
    exe = str(Path(sys.executable).parent / "pgro")
    started = time.monotonic()
    proc = subprocess.run(
        [
            exe,
            "verify",
            "-f",
            str(manifest),
            "--json",
            "--quiet",
            f"--depth={depth}",
            f"--parallel={parallel}",
            "--work-dir",
            str(work),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"pgro verify --depth {depth} failed:\n{proc.stdout}\n{proc.stderr}")
    verdict = json.loads(proc.stdout)
    if verdict.get("replica_healthy") is not True:
        raise SystemExit(f"pgro verify --depth {depth} did not say healthy:\n{proc.stdout}")
    checks = {c["name"]: c["status"] for c in verdict["health_details"]["checks"]}
    if depth != "quick" and checks.get("checksums") != "pass":
        # The cluster is made with data checksums: both sides must have checked them.
        raise SystemExit(f"pgro verify --depth {depth} did not check the checksums: {checks}")
    timings = {k: round(float(v), 3) for k, v in verdict["timings"].items()}
    return elapsed, timings


def median_steps(runs: list[dict[str, float]]) -> dict[str, float]:
    steps: defaultdict[str, list[float]] = defaultdict(list)
    for run in runs:
        for k, v in run.items():
            steps[k].append(v)
    return {k: round(statistics.median(v), 3) for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=36, help="pgbench scale (36 ≈ 550 MB)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2, help="kopia restore parallelism")
    parser.add_argument(
        "--amcheck-jobs", type=int, default=2, help="pg_amcheck --jobs of the baseline-j side"
    )
    args = parser.parse_args()

    account = resolve_run_account()
    binaries = newest_binaries()
    base = Path(tempfile.mkdtemp(prefix="pgro-bench-"))
    os.chmod(base, 0o711)
    try:
        repo, snapshot_id, size, tree = build_repository(base, binaries, account, args.scale)
        print(
            f"PostgreSQL {binaries.major}, snapshot {snapshot_id}: database {size / 2**20:.0f} "
            f"MiB, data directory with WAL {tree / 2**20:.0f} MiB",
            file=sys.stderr,
        )
        manifest = fs_manifest(base / "m.yaml", repo, PASSWORD)
        work = base / "work"
        work.mkdir()
        os.chmod(work, 0o711)
        # Warm the page cache for every side before measuring.
        baseline(repo, snapshot_id, work, binaries, account, args.parallel, None)
        pgro(manifest, work, args.parallel, "full")

        sides = ("baseline", "baseline-j", *DEPTHS)
        times: dict[str, list[float]] = {s: [] for s in sides}
        steps: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
        for i in range(args.rounds):
            # Rotate the order so no side always runs first after the others.
            order = sides[i % len(sides) :] + sides[: i % len(sides)]
            for side in order:
                if side == "baseline":
                    t, laps = baseline(
                        repo, snapshot_id, work, binaries, account, args.parallel, None
                    )
                elif side == "baseline-j":
                    t, laps = baseline(
                        repo,
                        snapshot_id,
                        work,
                        binaries,
                        account,
                        args.parallel,
                        args.amcheck_jobs,
                    )
                else:
                    t, laps = pgro(manifest, work, args.parallel, side)
                times[side].append(t)
                steps[side].append(laps)
            print(
                f"round {i + 1}: " + "  ".join(f"{s} {times[s][-1]:.2f}s" for s in sides),
                file=sys.stderr,
            )
        med = {s: statistics.median(v) for s, v in times.items()}
        print(
            f"PostgreSQL {binaries.major}; database size {size / 2**20:.0f} MiB; "
            f"data directory with WAL {tree / 2**20:.0f} MiB; {args.rounds} rounds"
        )
        for s in sides:
            print(
                f"{s:>11} median {med[s]:7.2f}s  (runs: "
                + ", ".join(f"{t:.2f}" for t in times[s])
                + ")"
            )
            print(f"{'':>11} steps  {median_steps(steps[s])}")
        print(
            f"ratio full / baseline (pg_amcheck defaults): {med['full'] / med['baseline']:.3f}"
            "  (target <= 1.10)"
        )
        print(
            f"ratio full / baseline-j (pg_amcheck --jobs={args.amcheck_jobs}): "
            f"{med['full'] / med['baseline-j']:.3f}"
        )
        print(
            f"standard (default) over quick: +{med['standard'] - med['quick']:.2f}s "
            f"(x{med['standard'] / med['quick']:.2f})"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
