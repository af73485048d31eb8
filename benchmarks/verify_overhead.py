"""What `pgro verify` costs over doing the same work by hand.

Builds a real cluster of at least 500 MB (pgbench data), snapshots it into a local kopia
repository, then times, alternately and in the same run:

- baseline: what an operator would type as root: `kopia repository connect` +
  `kopia snapshot restore --parallel=N`, `chown -R` to the postgres account, `pg_ctl start -w`
  on a private port and socket, one `SELECT 1`, `pg_ctl stop -m fast`, `rm -rf`;
- pgro: `pgro verify -f MANIFEST --json --parallel=N --depth quick` (the real CLI process:
  listing, selection, restore, repairs, start, health checks on every database, stop,
  cleanup). `--depth quick` keeps it like for like with a baseline that only runs
  `SELECT 1`: the default depth (`standard`) also checks page checksums and every btree
  index, which `benchmarks/verify_depth.py` measures against its hand-typed equivalent.

Prints the median wall time of each and their ratio (target: at most 1.10).

    .venv/bin/python -m benchmarks.verify_overhead [--scale 36] [--rounds 3]
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
from collections.abc import Callable
from pathlib import Path

import psycopg
from tests.fixtures.manifests import fs_manifest

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.repository import KopiaRepository, find_kopia
from pgro.postgres.account import RunAccount, hand_over, resolve_run_account
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import init_cluster, newest_binaries
from pgro.postgres.server import PostgresServer, free_port

PASSWORD = "bench-repo-password"


def build_repository(
    base: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
    scale: int,
    *,
    initdb: Callable[[PostgresBinaries, Path, RunAccount], None] = init_cluster,
) -> tuple[Path, str, int, int]:
    """A stopped pgbench cluster (made by `initdb`) in a new kopia repository: (repository,
    snapshot ID, database size, size of the data directory with its WAL)."""
    root = base / "source"
    pgdata = root / binaries.major / "main"
    initdb(binaries, pgdata, account)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=base / "src-run", log_path=base / "src.log"
    )
    server.start(120)
    try:
        with psycopg.connect(
            server.endpoint.conninfo("postgres", "postgres"), autocommit=True
        ) as c:
            c.execute("CREATE DATABASE bench")
        print(f"generating pgbench data at scale {scale} ...", file=sys.stderr)
        subprocess.run(
            [
                binaries.tool("pgbench"),
                "-i",
                "-q",
                "-s",
                str(scale),
                "-h",
                str(server.socket_dir),
                "-p",
                str(server.port),
                "-U",
                "postgres",
                "bench",
            ],
            check=True,
            capture_output=True,
        )
        with psycopg.connect(server.endpoint.conninfo("bench", "postgres")) as c:
            row = c.execute("SELECT pg_database_size('bench')").fetchone()
            assert row is not None
            size = int(row[0])
    finally:
        server.stop()
    tree = sum(p.stat().st_size for p in pgdata.rglob("*") if p.is_file())
    creds = KopiaCredentials(FilesystemLocation(str(base / "repo")), PASSWORD)
    kopia = KopiaRepository(creds, base / "kopia-author")
    kopia.create()
    try:
        snapshot_id = kopia.snapshot_create(
            root, override_source="postgres@bench:/var/lib/postgresql"
        )
    finally:
        kopia.close()
    shutil.rmtree(root)
    return base / "repo", snapshot_id, size, tree


def restore_by_hand(
    repo: Path,
    snapshot_id: str,
    target: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
    parallel: int,
    lap: Callable[[str], None],
) -> Path:
    """What an operator types before starting a restored cluster: `kopia repository
    connect` with its own config, `kopia snapshot restore --parallel=N`, `chown -R`.
    Returns PGDATA; `lap` is called after each step."""
    kopia = find_kopia()
    state = target.parent / "kopia"
    env = {
        **os.environ,
        "KOPIA_PASSWORD": PASSWORD,
        "KOPIA_CONFIG_PATH": str(state / "repository.config"),
        "KOPIA_LOG_DIR": str(state / "logs"),
        "KOPIA_CACHE_DIRECTORY": str(state / "cache"),
        "KOPIA_CHECK_FOR_UPDATES": "false",
    }
    subprocess.run(
        [kopia, "repository", "connect", "filesystem", f"--path={repo}", "--readonly"],
        env=env,
        check=True,
        capture_output=True,
    )
    lap("connect")
    subprocess.run(
        [kopia, "snapshot", "restore", f"--parallel={parallel}", snapshot_id, str(target)],
        env=env,
        check=True,
        capture_output=True,
    )
    lap("restore")
    hand_over(target, account)
    pgdata = target / binaries.major / "main"
    os.chmod(pgdata, 0o700)
    lap("chown")
    return pgdata


def baseline(
    repo: Path,
    snapshot_id: str,
    work: Path,
    binaries: PostgresBinaries,
    account: RunAccount,
    parallel: int,
) -> float:
    sock = Path(tempfile.mkdtemp(prefix="pgro-bench-"))
    os.chown(sock, account.uid, account.gid) if os.geteuid() == 0 else None
    as_account = account.popen_kwargs()
    started = time.monotonic()
    laps: dict[str, float] = {}
    mark = started

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        laps[name] = round(now - mark, 3)
        mark = now

    target = work / "data"
    pgdata = restore_by_hand(repo, snapshot_id, target, binaries, account, parallel, lap)
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
        **as_account,
    )
    lap("start")
    with psycopg.connect(host=str(sock), port=port, user="postgres", dbname="postgres") as c:
        c.execute("SELECT 1").fetchone()
    subprocess.run(
        [pg_ctl, "-D", str(pgdata), "-w", "-m", "fast", "stop"],  # type: ignore[call-overload]
        check=True,
        capture_output=True,
        **as_account,
    )
    lap("query+stop")
    shutil.rmtree(target)
    shutil.rmtree(work / "kopia")
    lap("cleanup")
    print(f"  baseline steps: {laps}", file=sys.stderr)
    elapsed = time.monotonic() - started
    shutil.rmtree(sock)
    return elapsed


def pgro(manifest: Path, work: Path, parallel: int) -> float:
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
            "--depth=quick",
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
        raise SystemExit(f"pgro verify failed:\n{proc.stdout}\n{proc.stderr}")
    print(f"  pgro steps: {json.loads(proc.stdout)['timings']}", file=sys.stderr)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=36, help="pgbench scale (36 ≈ 540 MB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()

    account = resolve_run_account()
    binaries = newest_binaries()
    base = Path(tempfile.mkdtemp(prefix="pgro-bench-"))
    os.chmod(base, 0o711)
    try:
        repo, snapshot_id, size, _ = build_repository(base, binaries, account, args.scale)
        print(f"snapshot {snapshot_id}: database size {size / 2**20:.0f} MiB", file=sys.stderr)
        manifest = fs_manifest(base / "m.yaml", repo, PASSWORD)
        work = base / "work"
        work.mkdir()
        os.chmod(work, 0o711)
        # Warm the page cache for both before measuring.
        baseline(repo, snapshot_id, work, binaries, account, args.parallel)
        pgro(manifest, work, args.parallel)
        base_times, pgro_times = [], []
        for i in range(args.rounds):
            base_times.append(baseline(repo, snapshot_id, work, binaries, account, args.parallel))
            pgro_times.append(pgro(manifest, work, args.parallel))
            print(
                f"round {i + 1}: baseline {base_times[-1]:.2f}s  pgro {pgro_times[-1]:.2f}s",
                file=sys.stderr,
            )
        b, p = statistics.median(base_times), statistics.median(pgro_times)
        print(f"database size:   {size / 2**20:.0f} MiB")
        print(
            f"baseline median: {b:.2f}s  "
            "(kopia restore + chown + pg_ctl start -w + SELECT 1 + stop)"
        )
        print(f"pgro median:     {p:.2f}s  (pgro verify --json --depth quick)")
        print(f"ratio:           {p / b:.3f}  (target <= 1.10)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
