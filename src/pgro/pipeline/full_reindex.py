"""The full reindex after `pg_resetwal`, run in the background on a restore's serving server
(`core.plan.ReindexAfterReset`; features.md §2.3 step 5). Shared by `pgro run` and the
operator: each gives a way to reach the server as its superuser and to write the restore's
status.

One thread per restore at most. The rebuild is `REINDEX DATABASE CONCURRENTLY` (PostgreSQL
12 and later), so clients keep reading while it runs; `_pgro.restore_info.stage` says
`reindexing`, then `ready`. Nothing here raises: the outcome goes to the status and, when it
did not complete, to a Warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgro.core import full_reindex as outcome
from pgro.pipeline.locale_repair import full_reindex_after_reset
from pgro.postgres import restore_info
from pgro.postgres.locale_fix import error_text
from pgro.postgres.repair import Repairs

log = logging.getLogger("pgro.reindex")

Record = Callable[[Mapping[str, Any]], None]
Warn = Callable[[str], None]


@dataclass(eq=False)
class BackgroundReindex:
    """The rebuilds running in this process, by restore key."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: dict[str, threading.Thread] = field(default_factory=dict)

    def running(self, key: str) -> bool:
        with self._lock:
            thread = self._running.get(key)
            return thread is not None and thread.is_alive()

    def start(
        self,
        key: str,
        conninfo_for: Callable[[str], str],
        record: Record,
        warn: Warn,
        scrub: Callable[[str], str] = str,
    ) -> bool:
        """Start the rebuild unless one runs for `key`; True when this call started it."""
        with self._lock:
            thread = self._running.get(key)
            if thread is not None and thread.is_alive():
                return False
            thread = threading.Thread(
                target=rebuild,
                args=(key, conninfo_for, record, warn, scrub),
                name=f"reindex-{key}",
                daemon=True,
            )
            self._running[key] = thread
        thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the running rebuilds (tests, and a clean shutdown)."""
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)


def rebuild(
    key: str,
    conninfo_for: Callable[[str], str],
    record: Record,
    warn: Warn,
    scrub: Callable[[str], str] = str,
) -> None:
    """Run the rebuild now and write its outcome (the thread's body)."""

    def say(text: str) -> None:
        log.info("restore %s: %s", key, text)

    try:
        record(outcome.started())
        _stage(key, conninfo_for, restore_info.STAGE_REINDEXING)
        say("full reindex after pg_resetwal: started (the server serves meanwhile)")
        repairs = Repairs()
        result = full_reindex_after_reset(conninfo_for, repairs, say)
        _stage(key, conninfo_for, restore_info.STAGE_READY)
        note = scrub(result.note("full reindex after pg_resetwal (databases)"))
        record(outcome.finished(len(result.reindexed), len(result.failures), note))
        if result.failures:
            warn(note)
    except Exception as exc:  # the outcome goes to the status, never out of the thread
        why = scrub(error_text(exc))
        log.warning("restore %s: the full reindex after pg_resetwal failed: %s", key, why)
        try:
            record(outcome.failed(why))
            warn(f"the full reindex after pg_resetwal could not run: {why}")
        except Exception as again:
            log.warning("restore %s: cannot record the reindex outcome: %s", key, again)


def _stage(key: str, conninfo_for: Callable[[str], str], stage: str) -> None:
    # The row is informative: a snapshot without pgro's table, or one it cannot update,
    # does not stop the rebuild.
    try:
        restore_info.set_stage(conninfo_for(restore_info.DATABASE), stage)
    except restore_info.RestoreInfoFailed as exc:
        log.info("restore %s: %s", key, exc)


@dataclass(eq=False)
class ReindexOutcomes:
    """What the rebuild threads recorded, held for a runtime whose status store belongs to
    its reconcile thread (`pgro run`'s SQLite connection): that thread takes and writes them."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _patches: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    _warnings: dict[str, list[str]] = field(default_factory=dict)
    _finished: set[str] = field(default_factory=set)

    def put(self, key: str, patch: Mapping[str, Any]) -> None:
        with self._lock:
            self._patches.setdefault(key, []).append(patch)
            if patch.get("fullReindex") != outcome.RUNNING:
                self._finished.add(key)

    def warn(self, key: str, note: str) -> None:
        with self._lock:
            self._warnings.setdefault(key, []).append(note)

    def take(self, key: str) -> tuple[list[Mapping[str, Any]], list[str]]:
        """The patches (in order) and warnings recorded for `key` since the last take."""
        with self._lock:
            return self._patches.pop(key, []), self._warnings.pop(key, [])

    def finished(self, key: str) -> bool:
        """Whether a rebuild for `key` ended in this process (its status may not show it
        yet in the object a pass holds)."""
        with self._lock:
            return key in self._finished
