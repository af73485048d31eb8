"""Work a runtime runs on threads of its own process while its reconcile loop goes on (the
redaction of a switching restore): started by key, at most one per key, and collected by
the reconcile thread, which alone writes status (`pgro run`'s store belongs to it).

A task lost with its process is simply absent after a restart: the step that owns it reads
its recorded phase and starts it again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("pgro.background")


@dataclass
class Finished(Generic[T]):
    """A task's end: its value, or the exception it raised."""

    value: T | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class BackgroundTasks(Generic[T]):
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: dict[str, threading.Thread] = field(default_factory=dict)
    _finished: dict[str, Finished[T]] = field(default_factory=dict)

    def running(self, key: str) -> bool:
        with self._lock:
            thread = self._running.get(key)
            return thread is not None and thread.is_alive()

    def finished(self, key: str) -> bool:
        with self._lock:
            return key in self._finished

    def take(self, key: str) -> Finished[T] | None:
        """The task's end, once (None while it runs or when there is none)."""
        with self._lock:
            return self._finished.pop(key, None)

    def start(
        self, key: str, work: Callable[[], T], on_done: Callable[[], None] = lambda: None
    ) -> bool:
        """Run `work` on a thread unless a task for `key` runs or waits to be taken; True
        when this call started it. `on_done` (wake the owner's reconcile) runs after the
        outcome is stored."""
        with self._lock:
            thread = self._running.get(key)
            if (thread is not None and thread.is_alive()) or key in self._finished:
                return False
            thread = threading.Thread(
                target=self._run, args=(key, work, on_done), name=f"task-{key}", daemon=True
            )
            self._running[key] = thread
        thread.start()
        return True

    def _run(self, key: str, work: Callable[[], T], on_done: Callable[[], None]) -> None:
        try:
            outcome: Finished[T] = Finished(value=work())
        except BaseException as exc:  # stored for the owner, who decides what it means
            outcome = Finished(error=exc)
        with self._lock:
            self._finished[key] = outcome
            self._running.pop(key, None)
        try:
            on_done()
        except Exception as exc:
            log.warning("task %s: waking its owner failed: %s", key, exc)

    def join(self, timeout: float | None = None) -> None:
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)
