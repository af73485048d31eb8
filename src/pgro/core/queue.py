"""The admission queue: at most `maxConcurrentRestores` restores download at once.

A value, never mutated: every operation returns a new queue, and the runtime keeps the
latest one (under one lock, or on one thread, since admission is check-then-take).

- A **slot** is held by a replica key (`<namespace>/<name>`). A replica asks for one
  only when it is about to create a restore (not to list snapshots: listing is cheap,
  and most scheduled fires find their snapshot already restored). The slot is a
  *reservation* until it is *bound* to the restore created. A restore holds its slot
  while it is in progress (no status yet, Pending, Restoring, Migrating, Ready) and
  gives it back on failure, on Ready→Switching and on teardown.
- **Waiting** replicas queue FIFO; `position` is 1-based. When a slot frees, the head of
  the queue is promoted into a reservation, and a replica holding a slot may start even
  if the queue is otherwise full (the reference's count-based check could block a
  promoted replica on its own slot).
- **Healing**: `reconcile` drops slots with nothing behind them (a restore deleted while
  Restoring, a reservation whose replica never came back) and adds slots for restores in
  progress that hold none (made by hand, or running before a restart).
- **Restarts**: the reference kept the queue only in memory and lost it. Here
  `rebuild` derives it from what can be observed: the restores in progress hold the
  slots, and replicas whose status shows a `queuePosition` wait in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

DEFAULT_MAX_CONCURRENT_RESTORES: Final = 2
# How long a reservation or a bound slot may go unbacked by an observed in-progress
# restore: long enough for a listing and for a newly created restore to be observed.
DEFAULT_UNBACKED_GRACE: Final = timedelta(minutes=10)


@dataclass(frozen=True)
class Slot:
    key: str
    since: datetime
    # None while reserved: admitted or promoted, the restore not created yet.
    restore: str | None = None


@dataclass(frozen=True)
class Waiter:
    key: str
    since: datetime


@dataclass(frozen=True)
class Admitted:
    """The replica holds a slot and may start a restore."""


@dataclass(frozen=True)
class Queued:
    position: int


Admission = Admitted | Queued


@dataclass(frozen=True)
class AdmissionQueue:
    limit: int = DEFAULT_MAX_CONCURRENT_RESTORES
    slots: tuple[Slot, ...] = ()
    waiting: tuple[Waiter, ...] = ()

    def slot(self, key: str) -> Slot | None:
        return next((s for s in self.slots if s.key == key), None)

    def holds(self, key: str) -> bool:
        return self.slot(key) is not None

    def position(self, key: str) -> int | None:
        """1-based place in the waiting line, or None if not waiting."""
        return next((i + 1 for i, w in enumerate(self.waiting) if w.key == key), None)

    @property
    def free(self) -> int:
        return max(0, self.limit - len(self.slots))

    def request(self, key: str, now: datetime) -> tuple[AdmissionQueue, Admission]:
        """Admit `key` if it holds a slot or one is free; otherwise queue it (once)."""
        held = self.slot(key)
        if held is not None:
            if held.restore is None and held.since != now:
                # A live replica keeps its reservation fresh, so only abandoned ones expire.
                refreshed = tuple(replace(s, since=now) if s is held else s for s in self.slots)
                return replace(self, slots=refreshed), Admitted()
            return self, Admitted()
        if self.free > 0 and (not self.waiting or self.waiting[0].key == key):
            return (
                replace(
                    self,
                    slots=(*self.slots, Slot(key, now)),
                    waiting=tuple(w for w in self.waiting if w.key != key),
                ),
                Admitted(),
            )
        position = self.position(key)
        if position is not None:
            return self, Queued(position)
        queued = replace(self, waiting=(*self.waiting, Waiter(key, now)))
        return queued, Queued(len(queued.waiting))

    def bind(self, key: str, restore: str, now: datetime) -> AdmissionQueue:
        """The slot of `key` now belongs to `restore` (taken if `key` had none: a
        restore made by hand, or one started before a restart, still downloads)."""
        held = self.slot(key)
        if held is not None and held.restore == restore:
            return self
        others = tuple(s for s in self.slots if s.key != key)
        waiting = tuple(w for w in self.waiting if w.key != key)
        return replace(self, slots=(*others, Slot(key, now, restore)), waiting=waiting)

    def release(self, key: str, restore: str | None = None) -> AdmissionQueue:
        """Give back the slot of `key` (only if bound to `restore`, when given) and leave
        the waiting line; the head of the line is promoted into the freed slot."""
        held = self.slot(key)
        if held is not None and restore is not None and held.restore not in (None, restore):
            return self
        if held is None and self.position(key) is None:
            return self
        return replace(
            self,
            slots=tuple(s for s in self.slots if s.key != key),
            waiting=tuple(w for w in self.waiting if w.key != key),
        ).promote()

    def key_bound_to(self, namespace: str, restore: str) -> str | None:
        """The replica key whose slot is bound to this restore, if any (to give the slot
        back when the restore vanishes without being seen deleting)."""
        return next(
            (
                s.key
                for s in self.slots
                if s.restore == restore and s.key.startswith(f"{namespace}/")
            ),
            None,
        )

    def withdraw(self, key: str) -> AdmissionQueue:
        """`key` no longer needs a restore: leave the line, and give back a reservation
        (never a slot bound to a restore, which its restore gives back)."""
        held = self.slot(key)
        if held is not None and held.restore is None:
            return self.release(key)
        if self.position(key) is None:
            return self
        return replace(self, waiting=tuple(w for w in self.waiting if w.key != key))

    def promote(self) -> AdmissionQueue:
        """Move the head of the line into free slots, as reservations."""
        if self.free == 0 or not self.waiting:
            return self
        count = min(self.free, len(self.waiting))
        promoted = tuple(Slot(w.key, w.since) for w in self.waiting[:count])
        return replace(self, slots=(*self.slots, *promoted), waiting=self.waiting[count:])

    def with_limit(self, limit: int) -> AdmissionQueue:
        """A new `maxConcurrentRestores`; slots above a lowered limit run to completion."""
        if limit == self.limit:
            return self
        return replace(self, limit=max(0, limit)).promote()

    def reconcile(
        self,
        in_progress: Mapping[str, str],
        now: datetime,
        grace: timedelta = DEFAULT_UNBACKED_GRACE,
    ) -> AdmissionQueue:
        """Heal against observation. `in_progress` maps each replica key with a restore in
        progress to that restore's name (cluster-wide, as the runtime lists them).

        A slot survives if its key has a restore in progress, or if it is younger than
        `grace` (a reservation mid-listing, a restore created but not yet observed).
        Keys in progress without a slot get one.
        """
        kept = []
        for slot in self.slots:
            restore = in_progress.get(slot.key)
            if restore is not None:
                kept.append(
                    slot if slot.restore == restore else Slot(slot.key, slot.since, restore)
                )
            elif now - slot.since < grace:
                kept.append(slot)
        held = {s.key for s in kept}
        kept.extend(Slot(k, now, r) for k, r in sorted(in_progress.items()) if k not in held)
        slots = tuple(kept)
        waiting = tuple(w for w in self.waiting if w.key not in in_progress)
        if slots == self.slots and waiting == self.waiting:
            return self.promote()
        return replace(self, slots=slots, waiting=waiting).promote()

    @classmethod
    def rebuild(
        cls,
        limit: int,
        in_progress: Mapping[str, str],
        queue_positions: Mapping[str, int],
        now: datetime,
    ) -> AdmissionQueue:
        """The queue after a restart, from observed state only.

        Restores in progress hold slots. Replicas whose status shows `queuePosition > 0`
        were waiting: they queue again in their old order (ties by key), so a restart
        does not send the longest-waiting replica to the back of the line.
        """
        waiters = sorted(
            (position, key)
            for key, position in queue_positions.items()
            if position > 0 and key not in in_progress
        )
        queue = cls(
            limit=limit,
            slots=tuple(Slot(k, now, r) for k, r in sorted(in_progress.items())),
            waiting=tuple(Waiter(key, now) for _, key in waiters),
        )
        return queue.promote()


def promoted_keys(before: AdmissionQueue, after: AdmissionQueue) -> tuple[str, ...]:
    """Keys that gained a reservation between two queues: replicas to wake up."""
    had = {s.key for s in before.slots}
    return tuple(s.key for s in after.slots if s.key not in had and s.restore is None)
