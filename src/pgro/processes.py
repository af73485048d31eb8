"""Looking at processes pgro did not start itself (or started before a restart) by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def read_pid(pidfile: Path) -> int | None:
    """The pid on a pidfile's first line, or None if it is missing or not a pid."""
    try:
        text = pidfile.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def process_args(pid: int) -> list[str] | None:
    """A live (not zombie) process's argv, or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def is_alive(pid: int) -> bool:
    return process_args(pid) is not None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until `pid` has exited; False if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop_postmaster_pid(pid: int, timeout: float = 60.0) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), of a postmaster we cannot wait() on."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, wait):
            return
