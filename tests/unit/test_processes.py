"""Process helpers used to adopt and stop what an earlier pgro run left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pgro.processes import is_alive, process_args, read_pid, stop_postmaster_pid, wait_gone


def test_read_pid(tmp_path: Path) -> None:
    (tmp_path / "a.pid").write_text("4242\n/var/lib/postgresql/15/main\n")
    (tmp_path / "b.pid").write_text("not a pid\n")
    assert read_pid(tmp_path / "a.pid") == 4242
    assert read_pid(tmp_path / "b.pid") is None
    assert read_pid(tmp_path / "missing.pid") is None


def test_liveness_and_stop_of_a_process_that_is_not_waited_on() -> None:
    # Never wait()ed on until the end: an exited child is a zombie, which counts as gone.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pid = proc.pid
    assert is_alive(pid)
    args = process_args(pid)
    assert args is not None and args[0] == sys.executable
    stop_postmaster_pid(pid, timeout=5)  # SIGINT ends a Python sleep
    assert not is_alive(pid)
    assert wait_gone(pid, 0)
    assert not is_alive(os.getpid() + 10_000_000)
    assert proc.wait(5) != 0
