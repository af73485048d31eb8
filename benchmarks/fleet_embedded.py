"""Fleet scale for `pgro run`: 200 replicas idle, their idle CPU and SQLite writes per minute.

    PATH=$HOME/.cache/pgro/bin:$PATH .venv/bin/python -m benchmarks.fleet_embedded          # 200
    PATH=$HOME/.cache/pgro/bin:$PATH .venv/bin/python -m benchmarks.fleet_embedded --replicas 20

The fleet: one manifest, one kopia Secret for a real filesystem repository (built like the
test fixtures build theirs, see fleet_common), and N ephemeral replicas (verify replicas, the
usual `pgro run` use) with a daily schedule. Each replica has already verified the newest
snapshot (`status.verifiedSnapshotId`), and its `nextScheduledRestore` has just passed: the
first pass lists the repository, sees the newest snapshot verified, advances the schedule to
tomorrow and from then on nothing is due. No restore runs at any point.

That state is put in place without touching pgro's code: a first `pgro run` with the
replicas' Secret missing loads them (SecretNotFound: nothing is created, nothing listed) and
is stopped; the benchmark then writes each replica's status row in the state directory's
SQLite database (table `replicas`, column `status`, the wire-form JSON `pgro status` shows)
and starts `pgro run` again with the Secret present.

Reported:
- the time from that start to every replica listed and advanced (the visible marker:
  `latestAvailableSnapshot` is the newest snapshot and `nextScheduledRestore` is tomorrow);
- steady state over `--steady` seconds: the `pgro run` process's CPU seconds per minute (from
  /proc/<pid>/stat, all its threads), the CPU of its child processes (the replicas' stable
  PgBouncer endpoints) likewise, RSS;
- SQLite commits per minute: a separate read-only connection polls `PRAGMA data_version`
  every 0.1 s from the start (it changes whenever another connection commits), so commits
  less than 0.1 s apart count once (a lower bound; 0 is exact); the count before the window
  shows the detector seeing the start-up's writes. Also what changed over the window: rows of
  `replicas`/`restores`/`settings` whose content differs, and new `events` rows; and the
  size and mtime of `state.db` and `state.db-wal` (a WAL that does not grow saw no commit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from benchmarks.fleet_common import (
    FleetRepo,
    ProcReading,
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

SCHEDULE = "0 3 * * *"
JITTER = "0s"
NAMESPACE = "default"


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _schedule_hash() -> str:
    from pgro.api.duration import parse_duration
    from pgro.core.schedule import schedule_input_hash

    return schedule_input_hash(SCHEDULE, parse_duration(JITTER))


def write_manifest(path: Path, repo: FleetRepo, replicas: int, secret_ref_present: bool) -> None:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "kopia" if secret_ref_present else "not-yet"},
            "stringData": repo.secret_data(),
        }
    ]
    for i in range(replicas):
        docs.append(
            {
                "apiVersion": "pgro.bes.au/v1alpha1",
                "kind": "PostgresPhysicalReplica",
                "metadata": {"name": f"db-{i:04d}"},
                "spec": {
                    "kopiaSecretRef": {"name": "kopia"},
                    "schedule": SCHEDULE,
                    "scheduleJitter": JITTER,
                    "ephemeral": True,
                },
            }
        )
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


class PgroRun:
    def __init__(self, state_dir: Path, manifest: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgro.cli.main", "run", "-f", str(manifest),
                 "--state-dir", str(state_dir)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _reader(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)


def _rows(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    key = "key" if "key" in cols else cols[0]
    return {
        str(r[0]): json.dumps(r[1:], default=str)
        for r in conn.execute(f"SELECT {key}, * FROM {table}")
    }


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [
        str(r[0])
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        if not str(r[0]).startswith("sqlite_")
    ]


def seed_status(db: Path, repo: FleetRepo, replicas: int) -> None:
    """Each replica verified the newest snapshot two hours ago; its schedule is just due."""
    now = datetime.now(UTC)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(replicas)")}
        if not {"key", "status"} <= cols:
            raise SystemExit(
                f"{db}: no replicas(key, status) table; the state format changed, so this "
                "benchmark's seeding step must follow it"
            )
        status = {
            "phase": "Pending",
            "lastRestoreCompletedAt": _ts(now - timedelta(hours=2)),
            "verifiedSnapshotId": repo.new_snapshot,
            "latestAvailableSnapshot": repo.old_snapshot,
            "nextScheduledRestore": _ts(now - timedelta(minutes=5)),
            "scheduleInputHash": _schedule_hash(),
        }
        conn.execute("BEGIN IMMEDIATE")
        for i in range(replicas):
            conn.execute(
                "UPDATE replicas SET status = ? WHERE key = ?",
                (json.dumps(status), f"{NAMESPACE}/db-{i:04d}"),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _descendants_cpu(pid: int) -> tuple[float, int]:
    """CPU seconds of the live descendants of `pid`, and how many there are."""
    total, count, todo = 0.0, 0, _children(pid)
    while todo:
        child = todo.pop()
        try:
            total += read_proc(child).cpu_s
            todo += _children(child)
            count += 1
        except (OSError, ValueError):
            continue
    return total, count


def _marker(db: Path, repo: FleetRepo, seeded: datetime) -> Callable[[], int]:
    def count() -> int:
        conn = _reader(db)
        try:
            done = 0
            for (raw,) in conn.execute("SELECT status FROM replicas"):
                status = json.loads(raw or "{}")
                nxt = status.get("nextScheduledRestore")
                if (
                    status.get("latestAvailableSnapshot") == repo.new_snapshot
                    and nxt
                    and datetime.fromisoformat(nxt.replace("Z", "+00:00")) > seeded
                ):
                    done += 1
            return done
        finally:
            conn.close()

    return count


class CommitWatch:
    """Polls `PRAGMA data_version` on its own read-only connection every 0.1 s, from start-up
    on, so the same detector that reads 0 in the steady state is seen counting the start-up's
    status writes."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        version = None
        while not self._stop.wait(0.1):
            try:
                if conn is None:
                    conn = _reader(self.db)
                now = conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:
                continue
            if version is not None and now != version:
                self.times.append(time.monotonic())
            version = now
        if conn is not None:
            conn.close()

    def between(self, start: float, end: float) -> list[float]:
        return [t for t in self.times if start <= t < end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _file(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"size": None, "mtime": None}
    return {"size": st.st_size, "mtime": round(st.st_mtime, 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work, result = start_result(args, "pgro-fleet-embedded-")
    repo = build_repository(work / "repo")
    state = work / "state"
    db = state / "state.db"
    manifest = work / "fleet.yaml"

    # 1. Load the replicas without credentials: nothing is listed or created.
    write_manifest(manifest, repo, args.replicas, secret_ref_present=False)
    bootstrap = PgroRun(state, manifest, work / "pgro-run-bootstrap.log")
    try:

        def loaded() -> bool:
            if bootstrap.proc.poll() is not None:
                raise RuntimeError(f"pgro run exited; see {bootstrap.log}")
            if not db.exists():
                return False
            conn = _reader(db)
            try:
                return bool(
                    conn.execute("SELECT count(*) FROM replicas").fetchone()[0] >= args.replicas
                )
            except sqlite3.Error:
                return False
            finally:
                conn.close()

        wait_for("the replicas loaded", loaded, 300, 0.5)
        time.sleep(2)
    finally:
        bootstrap.stop()

    # 2. Their state: verified the newest snapshot, schedule just due.
    seed_status(db, repo, args.replicas)
    seeded = datetime.now(UTC)
    write_manifest(manifest, repo, args.replicas, secret_ref_present=True)

    # 3. The run measured.
    pgro_run = PgroRun(state, manifest, work / "pgro-run.log")
    watch = CommitWatch(db)
    try:
        count = _marker(db, repo, seeded)

        def all_done() -> bool:
            if pgro_run.proc.poll() is not None:
                raise RuntimeError(f"pgro run exited; see {pgro_run.log}")
            return bool(count() >= args.replicas)

        _, took = wait_for("every replica listed and advanced", all_done, args.timeout, 1)
        first = read_proc(pgro_run.proc.pid)
        result["startup"] = {
            "seconds_to_all_replicas_reconciled": round(took, 1),
            "rss_mb_then": round(first.rss_kb / 1024, 1),
            "cpu_s_then": round(first.cpu_s, 1),
            "kopia_children_cpu_s_then": round(first.children_cpu_s, 1),
        }
        print(f"all {args.replicas} replicas reconciled after {took:.1f} s", flush=True)
        time.sleep(args.settle)

        reader = _reader(db)
        before_rows = {t: _rows(reader, t) for t in _tables(reader)}
        files_before = {n: _file(state / n) for n in ("state.db", "state.db-wal")}
        r_before: ProcReading = read_proc(pgro_run.proc.pid)
        kids_before, _ = _descendants_cpu(pgro_run.proc.pid)
        time.sleep(args.steady)
        r_after = read_proc(pgro_run.proc.pid)
        steady_commits = watch.between(r_before.at, r_after.at)
        startup_commits = watch.between(pgro_run.started, r_before.at)
        commits = len(steady_commits)
        commit_times = [round(t - r_before.at, 1) for t in steady_commits]
        kids_after, kids = _descendants_cpu(pgro_run.proc.pid)
        files_after = {n: _file(state / n) for n in ("state.db", "state.db-wal")}
        after_rows = {t: _rows(reader, t) for t in _tables(reader)}
        reader.close()
        minutes = (r_after.at - r_before.at) / 60
        changed: dict[str, dict[str, int]] = {}
        for table, rows in after_rows.items():
            old = before_rows.get(table, {})
            changed[table] = {
                "new": len(set(rows) - set(old)),
                "changed": sum(1 for k, v in rows.items() if k in old and old[k] != v),
                "removed": len(set(old) - set(rows)),
            }
        result["steady"] = {
            "window_minutes": round(minutes, 2),
            "load_average_at_end": load_average(),
            **cpu_per_minute(r_before, r_after),
            "descendants": kids,
            "descendants_cpu_s_per_min": round((kids_after - kids_before) / minutes, 3),
            "rss_mb": round(r_after.rss_kb / 1024, 1),
            "hwm_mb": round(r_after.hwm_kb / 1024, 1),
            "sqlite_commits_seen_before_window": len(startup_commits),
            "sqlite_commits_seen": commits,
            "sqlite_commits_per_min": round(commits / minutes, 1),
            "first_commit_times_s": commit_times[:10],
            "rows_changed_in_window": changed,
            "files_before": files_before,
            "files_after": files_after,
        }
    finally:
        watch.stop()
        pgro_run.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    run_at_commit("benchmarks.fleet_embedded", sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, settle=20.0)
    p.add_argument("--replicas", type=int, default=200)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    return report(run(args), args.json)


if __name__ == "__main__":
    threading.current_thread().name = "fleet-embedded"
    sys.exit(main())
