"""The full reindex after `pg_resetwal` (features.md §2.3 step 5): when it is due, and how
its outcome is written.

A WAL reset can leave torn index pages that surface later as "unexpected zero page". The
rebuild (`REINDEX DATABASE CONCURRENTLY` in every connectable database) runs once the
restored server is up and its data checks are done, in the background: it never gates
readiness nor the switchover, so a large database is served while it runs (the reference's
order). `status.fullReindex` records it; `running` is re-planned, so a runner lost with its
process starts again (the rebuild is idempotent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pgro.api.restore import PostgresPhysicalRestore

RUNNING: Final = "running"
COMPLETE: Final = "complete"
PARTIAL: Final = "partial"
FAILED: Final = "failed"
# The reason of the Warning event when the rebuild did not complete.
EVENT_INCOMPLETE: Final = "FullReindexIncomplete"
_MESSAGE_MAX: Final = 500


def due(restore: PostgresPhysicalRestore) -> bool:
    """Whether the rebuild is still to run (or to start again) on this restore's server."""
    status = restore.status
    if not (status.fixes or {}).get("reset_wal"):
        return False
    return status.full_reindex is None or status.full_reindex == RUNNING


def pending(restore: PostgresPhysicalRestore) -> bool:
    """Whether `_pgro.restore_info` starts at `restored` rather than `ready`."""
    return due(restore)


def started() -> Mapping[str, Any]:
    return {"fullReindex": RUNNING}


def finished(rebuilt: int, failures: int, note: str) -> Mapping[str, Any]:
    """The status patch of a rebuild that ran: `complete`, or `partial: <note>` when some
    database failed; `fixes.reindex` when anything was rebuilt (a merge patch keeps the
    other fixes)."""
    patch: dict[str, Any] = {
        "fullReindex": COMPLETE if not failures else f"{PARTIAL}: {note[:_MESSAGE_MAX]}"
    }
    if rebuilt:
        patch["fixes"] = {"reindex": True}
    return patch


def failed(why: str) -> Mapping[str, Any]:
    """The status patch of a rebuild that could not run at all (not retried: the server's
    own health decides what happens to the restore)."""
    return {"fullReindex": f"{FAILED}: {why[:_MESSAGE_MAX]}"}


def incomplete(value: str | None) -> bool:
    return value is not None and value.startswith((PARTIAL, FAILED))
