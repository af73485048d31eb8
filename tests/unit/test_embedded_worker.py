"""`pgro run` finds a restore worker an earlier run left by its pidfile and command line,
under the worker's module name and the name it had before (pgro.pipeline.worker)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgro.pipeline import worker
from pgro.processes import process_args


@pytest.fixture
def sleeper() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("module", [*worker.MODULES, "pgro.something_else"])
def test_a_leftover_worker_is_known_by_its_module_name(
    tmp_path: Path, sleeper: list[subprocess.Popen[bytes]], module: str
) -> None:
    # A stand-in whose argv holds the module name the way `python -m NAME` does.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", module])
    sleeper.append(proc)
    while not process_args(proc.pid):  # /proc shows argv only once exec has set it up
        time.sleep(0.01)
    (tmp_path / worker.PIDFILE).write_text(str(proc.pid))
    expected = proc.pid if module in worker.MODULES else None
    assert worker.leftover(tmp_path) == expected
    proc.kill()
    proc.wait()
    assert worker.leftover(tmp_path) is None  # the pid names no live worker any more
