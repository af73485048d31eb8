"""Leader election on a coordination.k8s.io Lease, so two operator pods never both act.

The reference has none (one replica, `Recreate`); its queue and callback state live in
memory, so two instances would double-admit restores. The protocol is client-go's:
the holder renews `renewTime` every `renew_every`; a candidate takes the Lease over only
when `renewTime + leaseDurationSeconds` has passed, and every write carries the Lease's
`resourceVersion`, so of two candidates racing for an expired Lease exactly one wins.
A leader that cannot renew within the lease duration stops acting before anyone else can
take over (it exits; its pod restarts as a candidate).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pgro.clock import utcnow
from pgro.kube.client import KubeApi

log = logging.getLogger("pgro.operator.leader")

LEASE_NAME = "pgro-operator-leader"


def _micro(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        identity: str,
        *,
        name: str = LEASE_NAME,
        lease_duration: float = 15.0,
        renew_every: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.identity = identity
        self.name = name
        self.lease_duration = lease_duration
        self.renew_every = renew_every
        self.clock = clock
        self.is_leader = threading.Event()
        self.lost = threading.Event()
        self._last_renew = 0.0

    def _lease(self, holder: str, acquired: str | None, transitions: int) -> dict[str, Any]:
        now = _micro(self.clock())
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": int(self.lease_duration),
                "acquireTime": acquired or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def try_acquire_or_renew(self) -> bool:
        """One round of the protocol; True if this instance holds the Lease afterwards."""
        current = self.api.get("Lease", self.namespace, self.name)
        if current is None:
            try:
                self.api.create(self._lease(self.identity, None, 0))
            except Exception as exc:
                log.debug("lease create lost: %s", exc)
                return False
            return True
        spec = current.get("spec", {})
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime"))
        duration = timedelta(seconds=spec.get("leaseDurationSeconds") or self.lease_duration)
        transitions = int(spec.get("leaseTransitions") or 0)
        expired = renewed is None or renewed + duration < self.clock()
        if holder and holder != self.identity and not expired:
            return False
        ours = holder == self.identity
        lease = self._lease(
            self.identity,
            spec.get("acquireTime") if ours else None,
            transitions if ours else transitions + 1,
        )
        lease["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            self.api.replace(lease)
        except Exception as exc:
            log.debug("lease update lost: %s", exc)
            return False
        return True

    def run(self, stop: threading.Event) -> None:
        """Campaign until `stop`; sets `is_leader` once elected, `lost` if leadership lapses."""
        while not stop.is_set():
            try:
                held = self.try_acquire_or_renew()
            except Exception as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                held = False
            now = time.monotonic()
            if held:
                self._last_renew = now
                if not self.is_leader.is_set():
                    log.info("elected leader (%s)", self.identity)
                    self.is_leader.set()
            elif self.is_leader.is_set() and now - self._last_renew > self.lease_duration * 0.8:
                log.error("leadership lost: could not renew the lease in time; stopping")
                self.lost.set()
                return
            stop.wait(self.renew_every if self.is_leader.is_set() else self.renew_every / 2)

    def release(self) -> None:
        """Give the Lease up on a clean shutdown so a standby takes over at once."""
        if not self.is_leader.is_set():
            return
        try:
            current = self.api.get("Lease", self.namespace, self.name)
            if current is None or current.get("spec", {}).get("holderIdentity") != self.identity:
                return
            current["spec"]["holderIdentity"] = ""
            current["spec"]["renewTime"] = _micro(self.clock() - timedelta(days=1))
            self.api.replace(current)
            log.info("lease released")
        except Exception as exc:
            log.warning("could not release the lease: %s", exc)
