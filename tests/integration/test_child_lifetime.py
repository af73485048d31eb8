"""No child of `pgro verify` outlives it, even when it is killed with SIGKILL and runs no
cleanup at all (issue 18, item 21): kopia and PostgreSQL get a death signal from the kernel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Repo
from tests.fixtures.manifests import fs_manifest, replica_doc, secret_doc, write_manifest

PGRO = str(Path(sys.executable).parent / "pgro")


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid → (command line, session id, parent pid) of every live, non-zombie process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if stat[0] != "Z":
            found[int(entry)] = (cmdline, int(stat[3]), int(stat[1]))
    return found


def _wait_for(what: str, found: Callable[[], list[int]], proc: subprocess.Popen[Any]) -> list[int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if pids := found():
            return pids
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} ended before {what} ran")
        time.sleep(0.01)
    pytest.fail(f"{what} never ran")


@pytest.mark.parametrize("victim", ["kopia", "postgres"])
def test_kill_9_of_pgro_verify_takes_its_children_with_it(
    fs_repo: Repo, scratch: Path, victim: str
) -> None:
    # kopia: waiting on storage that accepts connections and never answers, so it writes
    # nothing (no SIGPIPE would end it) and would wait out its own long timeouts.
    # postgres: the restored clean cluster, killed while it runs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    if victim == "kopia":
        s3 = {
            "bucket": "blackhole-bucket",
            "region": "us-east-1",
            "endpoint": f"127.0.0.1:{blackhole.getsockname()[1]}",
            "disableTls": "true",
            "accessKeyId": "blackhole-access-key",
            "secretAccessKey": "blackhole-secret-key",
            "repositoryPassword": "blackhole-password",
        }
        manifest = write_manifest(scratch / "m.yaml", secret_doc("kopia", s3), replica_doc("r"))
    else:
        manifest = fs_manifest(
            scratch / "m.yaml",
            fs_repo.path,
            fs_repo.password,
            snapshotFilter={"hostPattern": "db-clean"},
        )
    work = scratch / "work"
    work.mkdir()
    os.chmod(work, 0o711)
    proc = subprocess.Popen(
        [PGRO, "verify", "-q", "-f", str(manifest), "--work-dir", str(work), "--parallel", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    tree: list[int] = []
    try:

        def children() -> list[int]:
            return [
                pid
                for pid, (cmd, _, ppid) in _processes().items()
                if ppid == proc.pid and victim in cmd.split(" ", 1)[0]
            ]

        running = _wait_for(victim, children, proc)
        # A postmaster's backends do not name the data directory: follow its session.
        sessions = {_processes()[pid][1] for pid in running if pid in _processes()}
        # Never this test's own session: a child left in it would take pytest down with it.
        assert os.getsid(0) not in sessions, f"{victim} runs in pgro verify's session"
        sessions.discard(os.getsid(0))
        tree = [pid for pid, (_, sid, _) in _processes().items() if sid in sessions] or running
        proc.kill()  # kill -9: pgro's own cleanup never runs
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(tree) & set(_processes()):
            time.sleep(0.05)
        left = {pid: _processes()[pid][0] for pid in set(tree) & set(_processes())}
        assert left == {}, f"still running after pgro verify was killed: {left}"
    finally:
        blackhole.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in set(tree) & set(_processes()):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_restore_worker_stopped_while_its_proxy_starts_leaves_no_proxy(
    scratch: Path, how: signal.Signals
) -> None:
    """The review's 34-minute canopy-proxy: `pgro run` stops a worker (SIGTERM) while the
    worker still waits for its proxy to listen; the worker unwound without the proxy's
    handle, and the proxy ran on, reparented to init. kill -9 of the worker did the same."""
    from pgro.pipeline import worker
    from tests.conftest import s3_credentials

    # Stands in for `python -m pgro canopy-proxy`: it never writes its port file.
    stand_in = scratch / "proxy-stand-in"
    stand_in.write_text("#!/bin/sh\nexec sleep 300\n")
    stand_in.chmod(0o755)
    restore_dir = scratch / "restore"
    restore_dir.mkdir()
    job = {
        "restoreDir": str(restore_dir),
        "snapshot": "k0123456789abcdef",
        "credentials": worker.credentials_to_json(s3_credentials("127.0.0.1:9", "bucket")),
        "canopyProxy": {
            "python": str(stand_in),
            "brokerUrl": "http://127.0.0.1:9",
            "group": "11111111-1111-1111-1111-111111111111",
            "type": "postgres",
            "region": "us-east-1",
        },
    }
    with (scratch / "work.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgro.pipeline.worker"],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(job).encode())
    proc.stdin.close()
    proxies: list[int] = []
    try:

        def proxy() -> list[int]:
            return [
                pid
                for pid, (cmd, _, ppid) in _processes().items()
                if ppid == proc.pid and cmd.startswith("sleep 300")
            ]

        proxies = _wait_for("the proxy", proxy, proc)
        proc.send_signal(how)
        proc.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(proxies) & set(_processes()):
            time.sleep(0.05)
        left = set(proxies) & set(_processes())
        assert not left, f"the proxy (pid {left}) outlived its restore worker"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in set(proxies) & set(_processes()):
            os.kill(pid, signal.SIGKILL)


def test_kill_9_of_pgro_run_stops_its_restore_work(fs_repo: Repo, scratch: Path) -> None:
    """A restore worker (and the kopia under it) goes when `pgro run` is killed with -9."""
    manifest = fs_manifest(
        scratch / "m.yaml",
        fs_repo.path,
        fs_repo.password,
        snapshotFilter={"hostPattern": "db-clean"},
        scheduleJitter="0s",
    )
    state = scratch / "state"
    with (scratch / "run.log").open("wb") as log:
        proc = subprocess.Popen(
            [PGRO, "run", "-f", str(manifest), "--state-dir", str(state), "--tick", "0.3"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    tree: list[int] = []
    try:

        def worker() -> list[int]:
            return [
                pid
                for pid, (cmd, _, ppid) in _processes().items()
                if ppid == proc.pid and "pgro.pipeline.worker" in cmd
            ]

        workers = _wait_for("a restore worker", worker, proc)
        # Its stdout is `<restore dir>/work.log`; result.json would appear beside it.
        restore_dir = Path(os.readlink(f"/proc/{workers[0]}/fd/1")).parent
        table = _processes()
        tree = [*workers, *(pid for pid, (_, _, ppid) in table.items() if ppid in workers)]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and set(tree) & set(_processes()):
            time.sleep(0.05)
        left = {pid: _processes()[pid][0] for pid in set(tree) & set(_processes())}
        assert left == {}, f"still running after pgro run was killed: {left}"
        # Stopped, not merely finished: an orphaned worker carried on and wrote its result.
        assert not (restore_dir / "result.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in set(tree) & set(_processes()):
            os.kill(pid, signal.SIGKILL)
        # The run's PostgreSQL and PgBouncer (if it got that far) are adopted by design; none
        # should exist this early, but never leave one behind.
        for pid, (cmd, _, _) in _processes().items():
            if str(state) in cmd:
                os.kill(pid, signal.SIGKILL)
