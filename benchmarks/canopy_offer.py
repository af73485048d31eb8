"""How soon `pgro run` starts restoring a snapshot canopy offers (issue 11, prompt triggers).

The real `pgro run` process (the embedded runtime), the stub canopy of
tests/fixtures/canopy_stub.py, a kopia repository on S3 (moto) protected by the stub's
repository password, and a real PostgreSQL cluster as the snapshot's content. A verify
declaration restores snapshot A first. Then, for each offer, as a new user did in the
issue: a NEW snapshot is taken (after every listing pgro made), the replica rests for
`--settle` seconds after its previous snapshot was verified, and canopy offers the new
snapshot. Timed from the offer (`stub.set_snapshot`):

- seen: pgro's canopy syncer wrote `canopyDesiredSnapshotId` (its worklist poll, every
  `--canopy-interval` seconds ±20 %);
- created: the restore object exists in pgro's state database;
- started: the restore worker's pid file exists (its process was spawned).

`seen → started` is what the trigger rule governs (before issue 11: up to
`relist_interval`, 300 s, because a listing taken before the offer served it). The
baseline, measured in the same run before each offer, is one plain kopia listing of the
same repository (`kopia repository connect` + `kopia snapshot list`, with the real keys,
no canopy proxy): the least work any design needs to discover a snapshot it has not seen.
The ratio `seen → started` / baseline says what pgro adds on top of that listing (its
tick, the canopy credential proxy, the decisions, creating the restore, spawning the
worker).

    .venv/bin/python -m benchmarks.canopy_offer [--offers 5] [--settle 30]
        [--canopy-interval 1] [--tick 1] [--at COMMIT]

`--at COMMIT` measures another commit's pgro (see benchmarks/fleet_common.py), e.g. the
one before prompt triggers, to show the `relist_interval`-bound wait they removed.

Run as root (as the tests do) with kopia and PostgreSQL on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
from tests.fixtures.canopy_stub import (
    REPLICA_ID,
    REPO_PASSWORD,
    Declaration,
    S3Target,
    start_canopy_stub,
)
from tests.fixtures.clusters import build_debian_cluster

from benchmarks.fleet_common import git_commit, run_at_commit
from pgro.api.secret import KopiaCredentials, S3Location
from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import resolve_run_account
from pgro.postgres.initdb import newest_binaries
from pgro.postgres.server import free_port

PGRO = str(Path(sys.executable).parent / "pgro")
BUCKET = "pgro-bench-canopy-offer"
# The stub's §7 naming vector: the replica lives in `int-test-<replica id prefix>`.
REPLICA_KEY_SUFFIX = "/canopy-replica"

T = TypeVar("T")

# moto accepts any keys; the canopy stub hands pgro its own.
SETUP_KEY = "setup"


@dataclass(frozen=True)
class Offer:
    snapshot: str
    baseline: float  # one plain kopia listing, seconds
    seen: float
    created: float
    started: float


@contextmanager
def moto_server(base: Path) -> Iterator[str]:
    """A local S3 server (moto); yields host:port."""
    port = free_port()
    venv_server = Path(sys.executable).parent / "moto_server"
    server = str(venv_server) if venv_server.exists() else "moto_server"
    log = (base / "moto.log").open("wb")
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{endpoint}/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"moto_server did not start: see {base / 'moto.log'}"
                    ) from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


class State:
    """Reads `pgro run`'s state database (read-only, beside the running process)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.db"

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # not created yet
        finally:
            db.close()

    def replica_status(self) -> dict[str, Any] | None:
        rows = self._query("SELECT key, status FROM replicas")
        for key, status in rows:
            if key.endswith(REPLICA_KEY_SUFFIX):
                found: dict[str, Any] = json.loads(status)
                return found
        return None

    def restores(self) -> list[tuple[str, str]]:
        """(key, snapshot) of every restore."""
        return [
            (key, json.loads(body)["spec"]["snapshot"])
            for key, body in self._query("SELECT key, body FROM restores")
        ]

    def run_root(self) -> Path | None:
        rows = self._query("SELECT value FROM settings WHERE key = 'run-root'")
        return Path(rows[0][0]) if rows else None


def wait_for(what: str, check: Callable[[], T | None], timeout: float, poll: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def verified(state: State, snapshot: str) -> bool:
    status = state.replica_status()
    return (
        status is not None and status.get("verifiedSnapshotId") == snapshot and not state.restores()
    )


def _verified_check(state: State, snapshot: str) -> Callable[[], bool]:
    return lambda: verified(state, snapshot)


def plain_listing(creds: KopiaCredentials, work: Path) -> float:
    started = time.monotonic()
    with KopiaRepository(creds, work) as kopia:
        kopia.list_snapshots()
    return time.monotonic() - started


def measure_offer(
    state: State,
    stub: Any,
    snapshot: str,
    baseline: float,
    timeout: float,
) -> Offer:
    offered = time.monotonic()
    stub.set_snapshot(REPLICA_ID, snapshot)

    def seen() -> float | None:
        status = state.replica_status()
        if status is not None and status.get("canopyDesiredSnapshotId") == snapshot:
            return time.monotonic()
        return None

    def created() -> tuple[float, str] | None:
        for key, snap in state.restores():
            if snap == snapshot:
                return time.monotonic(), key
        return None

    t_seen = wait_for("the offer seen", seen, timeout)
    t_created, key = wait_for("the restore created", created, timeout)
    root = wait_for("the run root", state.run_root, timeout)
    pidfile = root / "restores" / key / "work.pid"
    t_started = wait_for(
        "the restore worker started", lambda: time.monotonic() if pidfile.exists() else None, 60
    )
    return Offer(
        snapshot=snapshot,
        baseline=baseline,
        seen=t_seen - offered,
        created=t_created - offered,
        started=t_started - offered,
    )


def run(args: argparse.Namespace) -> list[Offer]:
    base = Path(tempfile.mkdtemp(prefix="pgro-bench-offer-"))
    os.chmod(base, 0o711)
    account = resolve_run_account()
    binaries = newest_binaries()
    try:
        print("building a PostgreSQL cluster ...", file=sys.stderr)
        clean = base / "clean"
        build_debian_cluster(clean, binaries, account, base)
        os.symlink(f"/var/lib/postgresql/{binaries.major}/main", clean / "current")
        with moto_server(base) as endpoint:
            boto3.client(
                "s3",
                endpoint_url=f"http://{endpoint}",
                region_name="us-east-1",
                aws_access_key_id=SETUP_KEY,
                aws_secret_access_key=SETUP_KEY,
            ).create_bucket(Bucket=BUCKET)
            creds = KopiaCredentials(
                location=S3Location(
                    bucket=BUCKET, region="us-east-1", endpoint=endpoint, disable_tls=True
                ),
                repository_password=REPO_PASSWORD,
                access_key_id=SETUP_KEY,
                secret_access_key=SETUP_KEY,
            )
            author = KopiaRepository(creds, base / "author")
            author.create()

            def new_snapshot() -> str:
                return author.snapshot_create(
                    clean,
                    tags={"kind": "clean"},
                    description="benchmark",
                    override_source="postgres@db-canopy:/var/lib/postgresql",
                )

            try:
                first = new_snapshot()
                with start_canopy_stub(
                    declarations=[Declaration(snapshot_id=first, intent="verify")],
                    s3=S3Target(bucket=BUCKET),
                ) as stub:
                    return _offers(args, base, stub, endpoint, creds, first, new_snapshot)
            finally:
                author.close()
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def _offers(
    args: argparse.Namespace,
    base: Path,
    stub: Any,
    endpoint: str,
    creds: KopiaCredentials,
    first: str,
    new_snapshot: Callable[[], str],
) -> list[Offer]:
    state_dir = base / "state"
    log_path = base / "run.log"
    command = [
        PGRO,
        "run",
        "--state-dir",
        str(state_dir),
        "--tick",
        str(args.tick),
        "--canopy-url",
        stub.url,
        "--s3-endpoint",
        f"http://{endpoint}",
        "--canopy-interval",
        str(args.canopy_interval),
    ]
    state = State(state_dir)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            print("pgro run: restoring and verifying the first snapshot ...", file=sys.stderr)
            wait_for("the first snapshot verified", lambda: verified(state, first), 600, 0.5)
            offers: list[Offer] = []
            for round_ in range(args.offers):
                snapshot = new_snapshot()
                baseline = plain_listing(creds, base / f"baseline-{round_}")
                time.sleep(args.settle)
                if proc.poll() is not None:
                    raise RuntimeError(f"pgro run exited; see {log_path}")
                offer = measure_offer(state, stub, snapshot, baseline, args.max_wait)
                offers.append(offer)
                print(
                    f"offer {round_ + 1}: seen {offer.seen:.2f} s, created "
                    f"{offer.created:.2f} s, worker started {offer.started:.2f} s "
                    f"(baseline listing {baseline:.2f} s)",
                    file=sys.stderr,
                )
                wait_for(f"{snapshot} verified", _verified_check(state, snapshot), 600, 0.5)
            return offers
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    run_at_commit("benchmarks.canopy_offer", sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offers", type=int, default=5)
    parser.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="seconds between a snapshot's verification and the next offer (the issue: 30)",
    )
    parser.add_argument("--canopy-interval", type=float, default=1.0)
    parser.add_argument("--tick", type=float, default=1.0, help="pgro run --tick (default 1)")
    parser.add_argument(
        "--max-wait", type=float, default=420.0, help="seconds to wait for each step"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    offers = run(args)
    if not offers:
        return

    def median(values: list[float]) -> float:
        return statistics.median(values)

    seen = median([o.seen for o in offers])
    started = median([o.started for o in offers])
    created = median([o.created for o in offers])
    after_seen = median([o.started - o.seen for o in offers])
    baseline = median([o.baseline for o in offers])
    print(
        f"pgro at {git_commit()}: {len(offers)} offers, pgro run --tick {args.tick} "
        f"--canopy-interval {args.canopy_interval}, settle {args.settle:.0f} s; medians:"
    )
    print(f"  offer → seen by pgro (worklist poll):  {seen:6.2f} s")
    print(f"  offer → restore created:              {created:6.2f} s")
    print(f"  offer → restore work started:         {started:6.2f} s  (target ≤ 5 s)")
    print(f"  seen → restore work started:          {after_seen:6.2f} s")
    print(f"  baseline, one plain kopia listing:    {baseline:6.2f} s")
    print(f"  ratio (seen → started) / baseline:    {after_seen / baseline:6.2f}")


if __name__ == "__main__":
    main()
