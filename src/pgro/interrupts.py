"""Starting child processes without orphaning them when Ctrl-C or SIGTERM lands mid-start.

An interrupt raised while `subprocess.Popen` is between fork and return leaves a running
child nobody holds a handle to. Inside `deferred_interrupts()` SIGINT and SIGTERM are only
recorded; on exit the handle exists, and the interrupt is raised then.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[signal.Signals] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signal.Signals(signum))

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL and pending[0] == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])
