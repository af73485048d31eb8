"""Processes: starting children that die with pgro, and looking at processes pgro did not
start itself (or started before a restart) by pid."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any


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


# -- Stopping -----------------------------------------------------------------------------
#
# Every child is stopped the same way: a polite signal, a grace period, then harder signals,
# each with its own wait. Only the signals differ: SIGTERM for most tools, SIGINT (fast
# shutdown) then SIGQUIT (immediate) for a postmaster, SIGINT (drain) for PgBouncer.

Ladder = Sequence[tuple[signal.Signals, float | None]]
"""Signals sent in turn after the first, each with how long to wait for the exit that
follows it (None: as long as it takes)."""

KILL: Ladder = ((signal.SIGKILL, None),)


def stop(
    proc: subprocess.Popen[Any],
    grace: float,
    *,
    first: signal.Signals = signal.SIGTERM,
    then: Ladder = KILL,
) -> int | None:
    """Stop our child `proc`: send `first` and wait up to `grace` seconds for it to exit, then
    each signal of `then` with its wait. `grace` <= 0 skips `first` (SIGKILL at once, with the
    default `then`). Only `proc` itself is signalled, never its process group. Returns the exit
    code, or None if `proc` outlived every step."""
    rc = proc.poll()
    for sig, wait in ((first, grace), *then) if grace > 0 else then:
        if rc is not None:
            break
        proc.send_signal(sig)  # a no-op once the child has been reaped
        try:
            rc = proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            rc = None
    return rc


def stop_pid(
    pid: int,
    grace: float,
    *,
    first: signal.Signals = signal.SIGTERM,
    then: Ladder = KILL,
) -> bool:
    """`stop` for a process we cannot wait() on (adopted from an earlier run, or not our
    child): the same ladder, watching /proc. False if `pid` outlived every step."""
    for sig, wait in ((first, grace), *then) if grace > 0 else then:
        if not is_alive(pid):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, math.inf if wait is None else wait):
            return True
    return not is_alive(pid)


POSTMASTER_THEN: Ladder = ((signal.SIGQUIT, 10.0),)
"""After fast shutdown (SIGINT), immediate shutdown (SIGQUIT) of a postmaster."""


def stop_postmaster_pid(pid: int, timeout: float = 60.0) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), of a postmaster we cannot wait() on."""
    stop_pid(pid, timeout, first=signal.SIGINT, then=POSTMASTER_THEN)


# -- Starting children that cannot outlive pgro ----------------------------------------------
#
# Every long-lived child pgro starts (kopia, the PostgreSQL of a verification, restore workers,
# canopy-proxy) must go when the pgro process that started it goes, however it goes: a
# refusal, a failure, Ctrl-C, or kill -9, which runs no cleanup at all. The kernel does this
# for us: PR_SET_PDEATHSIG, set in the child between fork and exec, delivers a signal to the
# child when its parent dies.
#
# Two Linux details shape the code:
# - The "parent" is the *thread* that forked, not the process: a child started from a
#   short-lived thread (a pool's worker, a per-restore thread) would be killed when that
#   thread ends. So only the main thread forks directly; every other thread hands the start
#   to one long-lived spawner thread, which lives as long as the process.
# - The kernel clears the setting when the child's credentials change. `subprocess` runs
#   `preexec_fn` after `user=`/`group=` have switched the uid, so setting it there sticks.
#   (It is also cleared by exec of a set-uid binary; pgro starts none.)
#
# Services that `pgro run` deliberately leaves running for the next run to adopt (its
# PostgreSQL servers with `--keep-serving` or after a crash, PgBouncer) are started without a
# death signal unless the process declared, with `tie_services()`, that its services are
# throwaway (`pgro verify`, `pgro demo`).

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_prctl: Callable[..., int] | None = None
_prctl_lock = threading.Lock()
_services_tied = False


def _prctl_function() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent (a forked child must not load libraries)."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return None
    with _prctl_lock:
        if _prctl is None:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.prctl
            function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
            function.restype = ctypes.c_int
            _prctl = function
        return _prctl


def prctl(option: int, value: int) -> None:
    """`prctl(option, value)` for this process; OSError on failure."""
    function = _prctl_function()
    if function is None:
        raise OSError(errno.ENOSYS, "prctl is Linux-only")
    if function(option, value, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def death_signal_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when this process's spawning thread
    dies (None where the kernel has no such feature)."""
    function = _prctl_function()
    if function is None:
        return None
    parent = os.getpid()
    signum = int(sig)

    def set_death_signal() -> None:
        # Runs in the forked child: no imports, no locks, no allocation worth mentioning.
        if function(PR_SET_PDEATHSIG, signum, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            # The parent died between fork and prctl: the signal will never come.
            os._exit(126)

    return set_death_signal


def tie_services() -> None:
    """Declare that servers this process starts (PostgreSQL) are throwaway: they get a death
    signal like every other child. Called by `pgro verify` and `pgro demo`."""
    global _services_tied
    _services_tied = True


def service_death_signal(sig: signal.Signals) -> signal.Signals | None:
    """`sig` if this process's services are tied to it (see `tie_services`), else None."""
    return sig if _services_tied else None


class _Spawner:
    """One long-lived thread that starts children for threads that may end before them."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[Any]], Future[subprocess.Popen[Any]]]
        ] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="pgro-spawner", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            start, result = self._requests.get()
            if not result.set_running_or_notify_cancel():
                continue
            try:
                result.set_result(start())
            except BaseException as exc:  # handed to the caller, raised there
                result.set_exception(exc)

    def run(self, start: Callable[[], subprocess.Popen[Any]]) -> subprocess.Popen[Any]:
        result: Future[subprocess.Popen[Any]] = Future()
        self._requests.put((start, result))
        return result.result()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _forget_spawner() -> None:
    # A forked child has no spawner thread, only the object: start a new one on demand.
    global _spawner, _spawner_lock
    _spawner, _spawner_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def _the_spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.thread.is_alive():
            _spawner = _Spawner()
        return _spawner


def spawn(
    args: Sequence[str],
    *,
    death_signal: signal.Signals | None = signal.SIGKILL,
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]:
    """`subprocess.Popen(args, **popen_kwargs)` for a child that dies with this process.

    `death_signal` is what the child receives when pgro dies (SIGKILL for tools that hold
    nothing worth a clean exit, SIGTERM for Python children that unwind their own children,
    SIGQUIT for a throwaway postmaster); None starts an ordinary, independent child.
    """
    if death_signal is None:
        return subprocess.Popen(args, **popen_kwargs)
    if "preexec_fn" in popen_kwargs:
        raise TypeError("spawn() sets preexec_fn itself")

    def start() -> subprocess.Popen[Any]:
        preexec = death_signal_preexec(death_signal)
        return subprocess.Popen(args, preexec_fn=preexec, **popen_kwargs)

    if threading.current_thread() is threading.main_thread():
        return start()
    return _the_spawner().run(start)


def run_tied(
    args: Sequence[str],
    stdin_text: str,
    popen_kwargs: Mapping[str, Any],
    *,
    timeout: float | None = None,
    death_signal: signal.Signals = signal.SIGQUIT,
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(args, input=stdin_text, capture_output=True, text=True,
    **popen_kwargs)` for a child that
    dies with this process (`death_signal`, SIGQUIT: a PostgreSQL single-user session quits
    at once) and runs in a session of its own, so a Ctrl-C or a signal to pgro's process
    group is pgro's to handle. A timeout kills it and raises `subprocess.TimeoutExpired`."""
    proc = spawn(
        args,
        death_signal=death_signal,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen_kwargs,
    )
    try:
        stdout, stderr = proc.communicate(stdin_text, timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
