"""What the canopy syncer remembers between ticks, written once for both runtimes.

Which replicas canopy refused credentials for (401/403/409: a configuration problem the
replica's `KopiaSecretValid` condition shows), the repository passwords it issued, since
when each Namespace has gone unlisted (the removal grace), and the retries of the
capability registration. A runtime says only how it holds replicas: what exists, how one
change is applied and how a Namespace's replica is removed (`SyncBook.apply`'s
callables); `pgro run` keeps them in its store, the operator in Namespaces and Secrets.

No I/O and no clock reads: time is passed in. The syncer writes the book while
reconciles read it, from other threads, so its maps are guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pgro.api.replica import PostgresPhysicalReplica
from pgro.canopy.access import CanopyRepository
from pgro.canopy.materialise import (
    DesiredReplica,
    ExistingReplica,
    ReplicaChange,
    plan_removals,
    plan_sync,
)
from pgro.canopy.naming import REPLICA_NAME
from pgro.canopy.syncer import SyncTick, capability_retry_delay
from pgro.core import verification_reports as vr
from pgro.core.observations import SecretCheck

log = logging.getLogger("pgro.canopy.sync")


@dataclass
class SyncBook:
    removal_grace: timedelta
    # Replica key → the repository canopy issued its password for; never logged.
    repositories: dict[str, CanopyRepository] = field(default_factory=dict, repr=False)
    # Replica key → why canopy refused its credentials.
    refusals: dict[str, str] = field(default_factory=dict)
    # Namespace → when a fetched worklist first did not list it.
    absent_since: dict[str, datetime] = field(default_factory=dict)
    # Replica keys whose password or refusal changed since `take_changes` last looked.
    _changed: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def apply(
        self,
        tick: SyncTick,
        now: datetime,
        *,
        existing: Mapping[str, ExistingReplica],
        replica: Callable[[str], PostgresPhysicalReplica | None],
        put: Callable[[ReplicaChange, str | None], None],
        remove: Callable[[str], object],
    ) -> None:
        """Apply one tick: `existing` is every canopy Namespace the runtime holds,
        `replica(namespace)` its replica, `put(change, password)` applies one change (the
        password is None when canopy issued none this tick) and `remove(namespace)`
        removes one; a change or removal that raises is logged and tried next tick."""
        plan = plan_sync(tick.worklist, existing)
        if not plan.fetched:
            return
        for problem in plan.problems:
            log.warning("canopy worklist: %s", problem)
        if plan.deletions_withheld:
            log.warning("canopy worklist: %s", plan.deletions_withheld)
        for change in plan.apply:
            password = self._record(change.desired, tick)
            try:
                put(change, password)
            except Exception as exc:
                log.warning("canopy: %s not applied: %s", change.desired.namespace, exc)

        def holds(namespace: str) -> bool:
            held = replica(namespace)
            return held is not None and vr.holds_removal(held.status.pending_verification_reports)

        removals = plan_removals(plan, self.absent_since, now, self.removal_grace, holds)
        self.absent_since = removals.absent_since
        for namespace in removals.held:
            log.info("canopy no longer lists %s; kept until its reports are delivered", namespace)
        for namespace in removals.remove:
            log.info("canopy no longer lists %s: removing it", namespace)
            try:
                remove(namespace)
            except Exception as exc:
                log.warning("canopy: %s not removed: %s", namespace, exc)
                continue
            key = f"{namespace}/{REPLICA_NAME}"
            with self._lock:
                self.repositories.pop(key, None)
                self.refusals.pop(key, None)
                self._changed.add(key)

    def _record(self, desired: DesiredReplica, tick: SyncTick) -> str | None:
        entry = desired.entry
        group_type = (str(entry.group_id), entry.type)
        password = tick.passwords.get(group_type)
        refusal = tick.refusals.get(group_type)
        key = f"{desired.namespace}/{desired.name}"
        with self._lock:
            before = (self.repositories.get(key), self.refusals.get(key))
            if password is not None:
                self.repositories[key] = CanopyRepository(
                    entry.bucket, entry.region, entry.prefix, password
                )
            if refusal is not None:
                self.refusals[key] = refusal
            elif password is not None:
                # Canopy issued credentials again: the refusal is over.
                self.refusals.pop(key, None)
            if (self.repositories.get(key), self.refusals.get(key)) != before:
                self._changed.add(key)
        return password

    def take_changes(self) -> set[str]:
        """The replica keys whose password or refusal changed (issued, refused, lifted,
        forgotten) since the last call: the replicas whose secret check changed."""
        with self._lock:
            changed, self._changed = self._changed, set()
        return changed

    def refusal(self, key: str) -> SecretCheck | None:
        """The replica's condition when canopy refused its credentials, else None."""
        with self._lock:
            refusal = self.refusals.get(key)
        return None if refusal is None else SecretCheck.invalid(refusal)

    def repository(self, key: str) -> CanopyRepository | None:
        with self._lock:
            return self.repositories.get(key)


@dataclass
class CapabilityRetries:
    """Advertising the intents this device handles (canopy lists only those): retried
    1, 2, 4 … 64 s apart, then hourly. Times are seconds on the caller's clock."""

    attempts: int = 0
    advertised: bool = False
    next_at: float = 0.0

    @property
    def tried(self) -> bool:
        """An attempt has ended, either way."""
        return self.advertised or self.attempts > 0

    def due(self, now: float) -> bool:
        return not self.advertised and now >= self.next_at

    def settle(self, now: float, error: BaseException | None) -> None:
        """Record how an attempt ended (`error` None: it succeeded)."""
        if error is None:
            self.advertised = True
            log.info("canopy: intents advertised (verify, upgrade, analytics)")
            return
        self.attempts += 1
        delay = capability_retry_delay(self.attempts).total_seconds()
        self.next_at = now + delay
        log.warning(
            "canopy: advertising intents failed (attempt %d), again in %ds: %s",
            self.attempts,
            delay,
            error,
        )

    def run(self, now: float, register: Callable[[], None]) -> None:
        """Call `register` when an attempt is due, and record how it ended."""
        if not self.due(now):
            return
        try:
            register()
        except Exception as exc:
            self.settle(now, exc)
        else:
            self.settle(now, None)
