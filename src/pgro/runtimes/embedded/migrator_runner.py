"""Runs one restore's `--migrator` command and records how it exited (see
`pgro.runtimes.embedded.migrator`). pgro's own program, started by `pgro run` in a session of
its own so that it outlives pgro:

    python -m pgro.runtimes.embedded.migrator_runner RUN/restores/<ns>/<restore>/migrate

It reads the command, its environment and its account as JSON on stdin (the environment holds
a password: never on the command line or on disk), appends the command's output to
`migrate.log`, and when the command exits writes `status.json` (`returncode`, and `stopped`
when pgro asked it to stop). SIGTERM/SIGINT/SIGHUP are forwarded to the command's process
group (SIGKILL after the grace period).
"""

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
from types import FrameType
from typing import Any

from pgro.runtimes.embedded.migrator import LOG, STATUS, write_json


def _say(logfd: int, line: str) -> None:
    os.write(logfd, f"[pgro] {line}\n".encode())


def run(directory: Path, spec: dict[str, Any]) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    logfd = os.open(directory / LOG, flags, 0o600)
    account = spec.get("account")
    as_account: dict[str, Any] = (
        {"user": account["uid"], "group": account["gid"], "extra_groups": []} if account else {}
    )
    argv = [str(a) for a in spec["argv"]]
    stopped = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        stopped.set()
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(
            argv,
            env={str(k): str(v) for k, v in spec["env"].items()},
            # The run account may not reach pgro's working directory.
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=logfd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **as_account,
        )
    except OSError as exc:
        _say(logfd, f"cannot start the migrator {argv[0]!r}: {exc.strerror or exc}")
        write_json(directory / STATUS, {"returncode": 127, "stopped": False})
        return 127
    if stopped.is_set():
        forward(signal.SIGTERM, None)
    grace = float(spec.get("grace", 30.0))
    deadline: float | None = None
    while True:
        try:
            rc = child.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if not stopped.is_set():
                continue
            if deadline is None:
                deadline = time.monotonic() + grace
            elif time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
    if rc < 0:
        _say(logfd, f"the migrator was ended by signal {signal.Signals(-rc).name}")
    write_json(directory / STATUS, {"returncode": rc, "stopped": stopped.is_set()})
    return 0


def main() -> None:
    directory = Path(sys.argv[1])
    spec = json.loads(sys.stdin.read())
    sys.exit(run(directory, spec))


if __name__ == "__main__":
    main()
