"""Process helpers used to adopt and stop what an earlier pgro run left running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pgro.postgres.account import resolve_run_account
from pgro.processes import (
    is_alive,
    process_args,
    read_pid,
    spawn,
    stop,
    stop_pid,
    stop_postmaster_pid,
    wait_gone,
)
from tests.fixtures.waiting import wait_for


def test_read_pid(tmp_path: Path) -> None:
    (tmp_path / "a.pid").write_text("4242\n/var/lib/postgresql/15/main\n")
    (tmp_path / "b.pid").write_text("not a pid\n")
    assert read_pid(tmp_path / "a.pid") == 4242
    assert read_pid(tmp_path / "b.pid") is None
    assert read_pid(tmp_path / "missing.pid") is None


def test_liveness_and_stop_of_a_process_that_is_not_waited_on() -> None:
    # Never wait()ed on until the end: an exited child is a zombie, which counts as gone.
    # SIGINT as a terminal gives it (a suite run in the background inherits it ignored).
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=_default_sigint
    )
    pid = proc.pid
    try:
        assert is_alive(pid)
        # Popen returns once exec has begun; the kernel fills in the new argv a moment
        # later, so an empty argv (still alive) is a legitimate first answer.
        args = wait_for("the child's argv", lambda: process_args(pid), timeout=10, interval=0.01)
        assert args[0] == sys.executable
        stop_postmaster_pid(pid, timeout=5)  # SIGINT ends a Python sleep
        assert not is_alive(pid)
        assert wait_gone(pid, 0)
        assert not is_alive(os.getpid() + 10_000_000)
        assert proc.wait(5) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- children die with pgro (issue 18, item 21) ------------------------------------------------

# A stand-in for a pgro process: it starts children the ways pgro does, reports their pids,
# then waits to be killed. Children: from the main thread, from a thread that has already
# ended when the pids are printed (pool and per-restore threads end; their children must not),
# as the unprivileged run account (Popen's user= switches the uid before the death signal is
# set, which the kernel would otherwise clear), and one plain Popen child as the control.
HARNESS = r"""
import json, subprocess, sys, threading
from pgro.postgres.account import resolve_run_account
from pgro.processes import spawn

sleep = ["sleep", "300"]
main = spawn(sleep, start_new_session=True)
from_thread = []
t = threading.Thread(target=lambda: from_thread.append(spawn(sleep, start_new_session=True)))
t.start()
t.join()
account = resolve_run_account()
as_account = spawn(sleep, start_new_session=True, **account.popen_kwargs())
plain = subprocess.Popen(sleep, start_new_session=True)
print(json.dumps({"tied": [main.pid, from_thread[0].pid, as_account.pid], "plain": plain.pid}))
sys.stdout.flush()
threading.Event().wait()
"""


def _start_harness(code: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the harness printed no pids"
    return proc, json.loads(line)


def _owner(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def test_children_die_when_the_parent_is_killed_9() -> None:
    harness, pids = _start_harness(HARNESS)
    tied, plain = pids["tied"], pids["plain"]
    try:
        time.sleep(0.5)  # the spawning thread has ended: its child must still run
        assert all(is_alive(pid) for pid in [*tied, plain])
        if os.geteuid() == 0:
            assert _owner(tied[2]) == resolve_run_account().uid != 0
        harness.kill()  # kill -9: no cleanup runs in the parent
        harness.wait()
        assert all(wait_gone(pid, 5) for pid in tied), [p for p in tied if is_alive(p)]
        # The control: an ordinary child is orphaned, as every pgro child was before.
        assert is_alive(plain)
    finally:
        for pid in [*tied, plain]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap_orphans([*tied, plain])


def _reap_orphans(pids: list[int]) -> None:
    # Orphans reparent to the test process when it is a child subreaper (tests/conftest.py).
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_the_death_signal_follows_the_spawning_thread_which_spawn_keeps_alive() -> None:
    # Why spawn() forks from a long-lived thread: the kernel's "parent" is the thread.
    from pgro.processes import death_signal_preexec

    children: list[subprocess.Popen[bytes]] = []

    def start_naively() -> None:
        preexec = death_signal_preexec(signal.SIGKILL)
        children.append(subprocess.Popen(["sleep", "300"], preexec_fn=preexec))

    thread = threading.Thread(target=start_naively)
    thread.start()
    thread.join()
    naive = children[0]
    assert naive.wait(5) == -signal.SIGKILL  # killed when its thread ended

    from_thread: list[subprocess.Popen[Any]] = []
    thread = threading.Thread(target=lambda: from_thread.append(spawn(["sleep", "300"])))
    thread.start()
    thread.join()
    kept = from_thread[0]
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            kept.wait(1)
    finally:
        kept.kill()
        kept.wait()


def test_spawn_reports_start_failures_from_any_thread(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        spawn([str(tmp_path / "missing")])
    failure: list[BaseException] = []

    def start() -> None:
        try:
            spawn([str(tmp_path / "missing")])
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert isinstance(failure[0], FileNotFoundError)


def test_services_are_tied_only_where_declared_throwaway() -> None:
    code = (
        "import signal\n"
        "from pgro import processes\n"
        "print(repr(processes.service_death_signal(signal.SIGQUIT)))\n"
        "processes.tie_services()\n"
        "print(repr(processes.service_death_signal(signal.SIGQUIT)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["None", "<Signals.SIGQUIT: 3>"]


# -- stopping: one ladder for every child ------------------------------------------------------

# A child that ignores the given signals, and says so once it does (so no signal can arrive
# before the handler is in place).
STUBBORN = (
    "import signal, sys, time\n"
    "for name in sys.argv[1:]:\n"
    "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stubborn(*ignored: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, *ignored],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,  # as a terminal gives it, whatever the suite inherited
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_stop_sends_the_first_signal_and_stops_there_if_it_works() -> None:
    proc = _stubborn()
    assert stop(proc, 30) == -signal.SIGTERM
    proc = _stubborn("SIGTERM")
    assert stop(proc, 30, first=signal.SIGINT) == -signal.SIGINT


def test_stop_climbs_the_ladder_when_the_child_ignores_a_signal() -> None:
    proc = _stubborn("SIGTERM")
    assert stop(proc, 0.2) == -signal.SIGKILL
    proc = _stubborn("SIGINT", "SIGQUIT")
    then = ((signal.SIGQUIT, 0.2), (signal.SIGKILL, None))
    assert stop(proc, 0.2, first=signal.SIGINT, then=then) == -signal.SIGKILL


def test_stop_without_grace_kills_at_once() -> None:
    proc = _stubborn()  # SIGTERM would have ended it: SIGKILL did
    assert stop(proc, 0) == -signal.SIGKILL


def test_stop_reports_a_child_that_outlives_every_step() -> None:
    proc = _stubborn("SIGTERM")
    try:
        assert stop(proc, 0.2, then=()) is None
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_stop_of_an_exited_child_returns_its_code_and_signals_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert stop(proc, 30) == 3


def test_stop_pid_stops_a_process_it_cannot_wait_on() -> None:
    proc = _stubborn("SIGINT")
    try:
        # The zombie left behind counts as gone: stop_pid never reaps.
        assert stop_pid(proc.pid, 0.2, first=signal.SIGINT, then=((signal.SIGTERM, None),))
        assert not is_alive(proc.pid)
        assert proc.wait(5) == -signal.SIGTERM
        assert stop_pid(proc.pid, 30)  # long gone: nothing to do
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def test_stop_pid_reports_a_process_that_outlives_every_step() -> None:
    proc = _stubborn("SIGTERM")
    try:
        assert stop_pid(proc.pid, 0.2, then=()) is False
        assert is_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
