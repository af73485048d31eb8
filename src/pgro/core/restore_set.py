"""A replica's restores, classified the way the decisions read them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

from pgro.api.phases import RestorePhase
from pgro.api.restore import PostgresPhysicalRestore

# A restore with no status yet is in progress: it was just created. So is `Migrating`.
# (The reference counted neither, so a pass right after a creation re-ran the triggers.)
IN_PROGRESS_PHASES: Final = frozenset(
    {
        None,
        RestorePhase.PENDING,
        RestorePhase.RESTORING,
        RestorePhase.MIGRATING,
        RestorePhase.READY,
    }
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def created(restore: PostgresPhysicalRestore) -> datetime | None:
    return restore.status.created_at or restore.metadata.creation_timestamp


def _creation_order(restore: PostgresPhysicalRestore) -> tuple[datetime, str]:
    return (created(restore) or _EPOCH, restore.name)


def is_live(restore: PostgresPhysicalRestore) -> bool:
    """Not Failed; a restore without status counts as live."""
    return restore.status.phase is not RestorePhase.FAILED


def is_in_progress(restore: PostgresPhysicalRestore) -> bool:
    return restore.status.phase in IN_PROGRESS_PHASES


def is_covered(
    snapshot_id: str, restores: Iterable[PostgresPhysicalRestore], verified: str | None
) -> bool:
    """Restoring `snapshot_id` again would add nothing: it is the verified snapshot, or a
    restore that has not failed already has it."""
    if verified is not None and snapshot_id == verified:
        return True
    return any(r.spec.snapshot == snapshot_id and is_live(r) for r in restores)


class RestoreSet:
    """A replica's restores in creation order, with the groups the decisions use."""

    def __init__(self, restores: Sequence[PostgresPhysicalRestore], current: str | None) -> None:
        self.all: tuple[PostgresPhysicalRestore, ...] = tuple(sorted(restores, key=_creation_order))
        self.current_name = current
        self.active = tuple(r for r in self.all if r.status.phase is RestorePhase.ACTIVE)
        self.live = tuple(r for r in self.all if is_live(r))
        self.failed = tuple(r for r in self.all if not is_live(r))
        self.in_progress = next((r for r in self.all if is_in_progress(r)), None)
        self.switching = next(
            (
                r
                for r in self.all
                if r.status.phase is RestorePhase.SWITCHING and not r.metadata.is_deleting
            ),
            None,
        )

    def named(self, name: str | None) -> PostgresPhysicalRestore | None:
        if name is None:
            return None
        return next((r for r in self.all if r.name == name), None)

    @property
    def current(self) -> PostgresPhysicalRestore | None:
        """The Active restore `currentRestore` names, if it exists and is Active."""
        restore = self.named(self.current_name)
        return (
            restore if restore is not None and restore.status.phase is RestorePhase.ACTIVE else None
        )

    @property
    def serving(self) -> PostgresPhysicalRestore | None:
        """The Active restore that counts as serving: the current one, else the one
        activated last. One being deleted still counts until it is gone."""
        current = self.current
        if current is not None:
            return current
        if not self.active:
            return None
        return max(self.active, key=lambda r: (r.status.activated_at or _EPOCH, r.name))
