"""Is a persistent kopia config and cache per repository worth keeping? (issue 16)

Builds a stopped PostgreSQL cluster whose `bench` database holds 2,000,000 rows of 100
bytes and an index (its WAL in the snapshot, about 740 MB in all), snapshots it by hand
into a filesystem kopia repository (`kopia repository create` + `kopia snapshot create`
with their own `--config-file` and `--cache-directory`: the machine that took the backup),
then times, alternately and in the same run, what `pgro verify` asks kopia to do (connect
when needed, `snapshot list --all --json`, `snapshot restore --parallel=N --skip-owners
--skip-permissions`), then `rm -rf` of the restored tree:

- fresh: `KopiaRepository` without a kept cache (what `pgro verify` does, and `pgro run` did
  before issue 16: connect, list, restore, and the config and cache are deleted; kopia's
  default cache limits, so the restore writes the contents into the doomed cache);
- fresh-meta: the same with a new cache directory bounded as a kept one is
  (`pgro.kopia.cache.KEPT_CACHE_FLAGS`), deleted after: what the bounds alone are worth;
- pgro-run: `KopiaRepository` with the kept cache `pgro run` uses now (a new config and
  connect each time, one cache directory per repository kept across restores, bounded by
  `KEPT_CACHE_FLAGS`);
- kept: one config and cache, connected once before the rounds and kept (default cache
  sizes: 5,000 MB of contents, 5,000 MB of metadata, soft limits);
- kept-meta: the same with the content cache bounded to 1 MB (`--content-cache-size-mb=1
  --content-cache-size-limit-mb=1`): only metadata and indexes are kept;
- author: the config and cache of the machine that took the snapshot;
- pgro: `pgro verify --depth quick` on the same snapshot, for scale (restore, start, checks,
  stop, cleanup).

Credentials are never persisted (`--no-persist-credentials`; the password is in
KOPIA_PASSWORD for each command), as pgro connects. Prints medians (default: of 5) and
each cache directory's size at the end.

    .venv/bin/python -m benchmarks.kopia_cache [--rows 2000000] [--rounds 5]
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
from pgro.kopia.cache import repository_cache_dir
from pgro.kopia.repository import KopiaRepository, find_kopia
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import init_cluster, newest_binaries
from pgro.postgres.server import PostgresServer

PASSWORD = "bench-repo-password"
SOURCE = "postgres@bench:/var/lib/postgresql"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Kopia:
    """The kopia CLI with one config file and cache directory, as typed by hand."""

    def __init__(self, state: Path, repo: Path) -> None:
        self.state = state
        self.repo = repo
        self.exe = find_kopia()

    def run(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KOPIA_")} | {
            "KOPIA_PASSWORD": PASSWORD,
            "KOPIA_CHECK_FOR_UPDATES": "false",
        }
        proc = subprocess.run(
            [
                self.exe,
                f"--config-file={self.state / 'repository.config'}",
                f"--log-dir={self.state / 'logs'}",
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"kopia {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
        return proc.stdout

    def attach(self, verb: str, *extra: str) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.run(
            "repository",
            verb,
            "filesystem",
            f"--path={self.repo}",
            f"--cache-directory={self.state / 'cache'}",
            "--no-persist-credentials",
            *extra,
        )

    def list_and_restore(self, snapshot_id: str, target: Path, parallel: int) -> None:
        listed = json.loads(self.run("snapshot", "list", "--json", "--all", "--no-retention"))
        if not any(s["id"] == snapshot_id for s in listed):
            raise SystemExit(f"snapshot {snapshot_id} not listed")
        self.run(
            "snapshot",
            "restore",
            f"--parallel={parallel}",
            "--skip-owners",
            "--skip-permissions",
            snapshot_id,
            str(target),
        )


def build_source(
    base: Path, binaries: PostgresBinaries, account: RunAccount, rows: int
) -> tuple[Path, int]:
    """A stopped cluster with `bench.t` (rows of 100 bytes, an index on id): (root, bytes
    of the data directory with its WAL)."""
    root = base / "source"
    pgdata = root / binaries.major / "main"
    init_cluster(binaries, pgdata, account)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=base / "src-run", log_path=base / "src.log"
    )
    server.start(120)
    try:
        with psycopg.connect(
            server.endpoint.conninfo("postgres", "postgres"), autocommit=True
        ) as c:
            c.execute("CREATE DATABASE bench")
        print(f"inserting {rows} rows of 100 bytes ...", file=sys.stderr)
        with psycopg.connect(server.endpoint.conninfo("bench", "postgres"), autocommit=True) as c:
            c.execute("CREATE TABLE t (id bigint NOT NULL, payload text NOT NULL)")
            c.execute(
                "INSERT INTO t SELECT g, repeat(md5(g::text), 3) || left(md5(g::text), 4) "
                "FROM generate_series(1, %s) g",
                (rows,),
            )
            c.execute("CREATE INDEX t_id ON t (id)")
            c.execute("CHECKPOINT")
    finally:
        server.stop()
    return root, dir_bytes(pgdata)


def timed(fn: Callable[[], None]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()

    account = resolve_run_account()
    binaries = newest_binaries()
    base = Path(tempfile.mkdtemp(prefix="pgro-bench-"))
    os.chmod(base, 0o711)
    try:
        repo = base / "repo"
        repo.mkdir()
        root, tree = build_source(base, binaries, account, args.rows)
        author = Kopia(base / "author", repo)
        author.attach("create")
        snapshot_id = json.loads(
            author.run("snapshot", "create", str(root), "--json", f"--override-source={SOURCE}")
        )["id"]
        shutil.rmtree(root)
        print(
            f"snapshot {snapshot_id}: data directory with WAL {tree / 2**20:.0f} MiB "
            f"({tree / 1e6:.0f} MB), repository {dir_bytes(repo) / 2**20:.0f} MiB",
            file=sys.stderr,
        )
        manifest = fs_manifest(base / "m.yaml", repo, PASSWORD)
        work = base / "work"
        work.mkdir()
        os.chmod(work, 0o711)
        target = work / "data"

        kept = Kopia(base / "kept", repo)
        kept.attach("connect", "--readonly")
        kept_meta = Kopia(base / "kept-meta", repo)
        kept_meta.attach(
            "connect", "--readonly", "--content-cache-size-mb=1", "--content-cache-size-limit-mb=1"
        )

        creds = KopiaCredentials(FilesystemLocation(str(repo)), PASSWORD)
        kept_root = base / "kopia-cache"

        def with_pgro(cache: Path | None) -> None:
            with KopiaRepository(creds, work / "kopia", cache_dir=cache) as k:
                if not any(s.id == snapshot_id for s in k.list_snapshots()):
                    raise SystemExit(f"snapshot {snapshot_id} not listed")
                k.restore(snapshot_id, target, parallel=args.parallel)

        def fresh() -> None:
            with_pgro(None)

        def fresh_meta() -> None:
            with_pgro(work / "fresh-cache")
            shutil.rmtree(work / "fresh-cache")

        def pgro_run() -> None:
            with_pgro(repository_cache_dir(kept_root, creds.location))

        def restore_with(k: Kopia) -> None:
            k.list_and_restore(snapshot_id, target, args.parallel)

        def pgro() -> None:
            proc = subprocess.run(
                [
                    str(Path(sys.executable).parent / "pgro"),
                    "verify",
                    "-f",
                    str(manifest),
                    "--json",
                    "--quiet",
                    "--depth=quick",
                    f"--parallel={args.parallel}",
                    "--work-dir",
                    str(work),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0 or json.loads(proc.stdout).get("replica_healthy") is not True:
                raise SystemExit(f"pgro verify failed:\n{proc.stdout}\n{proc.stderr}")

        sides: dict[str, Callable[[], None]] = {
            "fresh": fresh,
            "fresh-meta": fresh_meta,
            "pgro-run": pgro_run,
            "kept": lambda: restore_with(kept),
            "kept-meta": lambda: restore_with(kept_meta),
            "author": lambda: restore_with(author),
            "pgro": pgro,
        }
        # Warm the page cache and the kept caches.
        for run in sides.values():
            run()
            shutil.rmtree(target, ignore_errors=True)
        names = list(sides)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                times[name].append(timed(sides[name]))
                shutil.rmtree(target, ignore_errors=True)
            print(
                f"round {i + 1}: " + "  ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
                file=sys.stderr,
            )
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"snapshot: data directory with WAL {tree / 1e6:.0f} MB; {args.rounds} rounds")
        for n in names:
            print(
                f"{n:>10} median {med[n]:6.2f}s  (runs: "
                + ", ".join(f"{t:.2f}" for t in times[n])
                + ")"
            )
        caches = {
            "pgro-run": repository_cache_dir(kept_root, creds.location),
            "kept": kept.state / "cache",
            "kept-meta": kept_meta.state / "cache",
            "author": author.state / "cache",
        }
        for n, path in caches.items():
            print(f"{n:>10} cache {dir_bytes(path) / 2**20:.1f} MiB")
        print(
            f"kept saves {med['fresh'] - med['kept']:.2f}s per restore "
            f"({(med['fresh'] - med['kept']) / med['pgro'] * 100:.0f}% of "
            "pgro verify --depth quick)"
        )
        # Paired by round (the sides of a round ran back to back): robust to a load that
        # drifts over the run, which moves the medians of the sides apart.
        for n in ("kept", "kept-meta", "fresh-meta", "pgro-run"):
            saved = [f - t for f, t in zip(times["fresh"], times[n], strict=True)]
            print(
                f"{n} saves {med['fresh'] - med[n]:.2f}s per restore by the medians, "
                f"{statistics.median(saved):.2f}s by the median of the rounds' differences "
                f"(faster in {sum(d > 0 for d in saved)} of {len(saved)} rounds)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
