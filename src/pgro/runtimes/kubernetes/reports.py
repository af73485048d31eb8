"""Verification reports to canopy: the waiting list in the replica's status, written with
the replica's `resourceVersion` as a precondition (a conflict means "look again"), and
delivered by the canopy session's courier after each pass of a canopy replica.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from datetime import datetime
from typing import Any

from pgro.api.names import REPLICA_KIND
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.verification import PendingVerificationReport
from pgro.core import verification_reports as vr
from pgro.kube.client import KubeApi, is_conflict
from pgro.runtimes.kubernetes.canopy import OperatorCanopy
from pgro.runtimes.kubernetes.observe import EmitRaw, Requeue


@dataclass(eq=False)
class ReportDelivery:
    api: KubeApi
    canopy: OperatorCanopy | None
    _: KW_ONLY
    clock: Callable[[], datetime]
    requeue: Requeue
    emit: EmitRaw

    def patch(self, raw: Mapping[str, Any], reports: Sequence[PendingVerificationReport]) -> bool:
        """Write the report list only if the replica did not change since `raw` was read:
        False on a conflict, and the next pass recomputes."""
        meta = raw["metadata"]
        try:
            self.api.merge_patch(
                REPLICA_KIND,
                meta["namespace"],
                meta["name"],
                {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "status": vr.status_patch(reports),
                },
                status=True,
            )
        except Exception as exc:
            if is_conflict(exc):
                self.requeue(f"{meta['namespace']}/{meta['name']}", 1.0)
                return False
            raise
        return True

    def deliver(self, cached: PostgresPhysicalReplica) -> None:
        """One courier round for a canopy replica, after its pass."""
        if self.canopy is None or cached.spec.canopy_source is None:
            return
        courier = self.canopy.courier
        if not cached.status.pending_verification_reports and not courier.busy():
            return
        raw = self.api.get(REPLICA_KIND, cached.namespace, cached.name)
        if raw is None:
            return
        replica = PostgresPhysicalReplica.model_validate(raw)
        step = courier.step(replica)
        if step.reports is not None and not self.patch(raw, step.reports):
            return
        for dropped in step.dropped:
            self.emit(raw, dropped.event())
        courier.settled(step)
        waiting = (
            step.reports
            if step.reports is not None
            else replica.status.pending_verification_reports
        )
        if courier.busy():
            self.requeue(replica.key, 1.0)
        retries = [r.next_attempt_at for r in waiting if r.next_attempt_at is not None]
        if retries:
            delay = (min(retries) - self.clock()).total_seconds()
            self.requeue(replica.key, max(1.0, delay))

    def add_health(
        self, namespace: str, name: str, restore: str, details: Mapping[str, Any]
    ) -> None:
        """Sizes and checks from the restored server, added to its waiting report."""
        raw = self.api.get(REPLICA_KIND, namespace, name)
        if raw is None:
            return
        pending = PostgresPhysicalReplica.model_validate(raw).status.pending_verification_reports
        target = next((r for r in pending if r.restore == restore), None)
        if target is not None:
            self.patch(raw, vr.with_details(pending, target.key, health_details=dict(details)))
