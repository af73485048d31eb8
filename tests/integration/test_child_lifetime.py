"""No child of `pgro verify` outlives it, even when it is killed with SIGKILL and runs no
cleanup at all (issue 18, item 21): kopia and PostgreSQL get a death signal from the kernel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def _wait_for(what: str, found: Callable[[], list[int]], proc: subprocess.Popen[str]) -> list[int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if pids := found():
            return pids
        if proc.poll() is not None:
            pytest.fail(f"pgro verify ended before {what} ran")
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
