"""Canopy in `pgro run`: the worklist syncer, the broker, and report delivery.

Canopy's calls run in a thread pool; the loop thread calls `poll` once per tick and applies
what came back to the store. Canopy's replicas are the syncer's to remove, never the
manifests'. The broker listens on loopback on a port kept in the state database (a proxy
that outlived a restart still reaches it); each restore's proxy authenticates with its own
token (`pgro.canopy.tokens`, key in `canopy-broker.key`, 0600).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pgro.api.names import CANOPY_MANAGED_BY_VALUE, LABEL_CANOPY_MANAGED_BY
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import KopiaCredentials
from pgro.canopy.access import CanopyRepository
from pgro.canopy.broker import serve
from pgro.canopy.client import CanopyClient
from pgro.canopy.materialise import ExistingReplica, ReplicaChange
from pgro.canopy.naming import REPLICA_NAME
from pgro.canopy.proxy import DEFAULT_PROGRESS_INTERVAL
from pgro.canopy.session import CanopySession, restore_token
from pgro.canopy.syncer import DEFAULT_INTERVAL, DEFAULT_REMOVAL_GRACE, SyncTick
from pgro.canopy.tokens import BrokerTokens, load_or_create_key
from pgro.core import verification_reports as vr
from pgro.core.observations import SecretCheck
from pgro.postgres.server import free_port
from pgro.runtimes.embedded.store import Store

log = logging.getLogger("pgro.run.canopy")

BROKER_HOST = "127.0.0.1"
BROKER_PORT_SETTING = "canopy-broker-port"
BROKER_KEY_FILE = "canopy-broker.key"


@dataclass(frozen=True)
class CanopyOptions:
    s3_endpoint: str | None = None
    interval: timedelta = DEFAULT_INTERVAL
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    removal_grace: timedelta = DEFAULT_REMOVAL_GRACE


def is_canopy_managed(replica: PostgresPhysicalReplica) -> bool:
    labels = replica.metadata.labels or {}
    return labels.get(LABEL_CANOPY_MANAGED_BY) == CANOPY_MANAGED_BY_VALUE


class EmbeddedCanopy(CanopySession):
    def __init__(
        self,
        client: CanopyClient,
        options: CanopyOptions,
        store: Store,
        *,
        clock: Callable[[], datetime],
        rnd: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(client, options, clock=clock, rnd=rnd)
        self.options = options
        self.store = store
        self.tokens = BrokerTokens(load_or_create_key(store.path.parent / BROKER_KEY_FILE))
        stored = store.setting(BROKER_PORT_SETTING)
        port = int(stored) if stored else free_port(BROKER_HOST)
        try:
            self.server = serve(self.broker, BROKER_HOST, port, self.callbacks, tokens=self.tokens)
        except OSError as exc:
            # Taken by something else since: a new port (a restore's proxy that outlived
            # the previous pgro run loses its broker and fails; the restore is retried).
            log.warning("canopy broker port %d unavailable (%s); using another", port, exc)
            port = free_port(BROKER_HOST)
            self.server = serve(self.broker, BROKER_HOST, port, self.callbacks, tokens=self.tokens)
            stored = None
        if not stored:
            store.set_setting(BROKER_PORT_SETTING, str(port))
        self.base_url = f"http://{BROKER_HOST}:{port}"
        self._capabilities: Future[None] | None = None
        self._tick: Future[SyncTick] | None = None
        self._next_tick = 0.0
        log.info("canopy: %r; broker on %s", client, self.base_url)

    # -- the loop thread's entry point ---------------------------------------------------
    def poll(self, remove_replica: Callable[[str], None]) -> None:
        self._poll_capabilities()
        self._poll_tick(remove_replica)
        self._poll_deliveries()

    def _poll_capabilities(self) -> None:
        now = time.monotonic()
        if self._capabilities is None:
            if self.capabilities.due(now):
                self._capabilities = self.pool.submit(self.client.register_capabilities)
        elif self._capabilities.done():
            future, self._capabilities = self._capabilities, None
            self.capabilities.settle(now, future.exception())

    def _poll_tick(self, remove_replica: Callable[[str], None]) -> None:
        if self._tick is None:
            # The first tick waits for the first capabilities attempt: canopy lists only
            # intents it knows this device handles.
            if time.monotonic() >= self._next_tick and self.capabilities.tried:
                self._tick = self.pool.submit(self.fetch_tick)
            return
        if not self._tick.done():
            return
        future, self._tick = self._tick, None
        self._next_tick = time.monotonic() + self.next_tick_in()
        try:
            tick = future.result()
        except Exception:
            # fetch_tick turns canopy's answers into a SyncTick; anything else is a bug
            # that must not stop the syncer for good.
            log.exception("canopy sync tick failed")
            return
        self.book.apply(
            tick,
            self.clock(),
            existing={
                r.namespace: ExistingReplica(r.namespace, r.status.canopy_desired_snapshot_id)
                for r in self.store.replicas()
                if is_canopy_managed(r)
            },
            replica=lambda namespace: self.store.replica(f"{namespace}/{REPLICA_NAME}"),
            put=self._put,
            remove=lambda namespace: remove_replica(f"{namespace}/{REPLICA_NAME}"),
        )

    def _put(self, change: ReplicaChange, password: str | None) -> None:
        # The password stays in the book: the store holds no secrets.
        replica = change.desired.replica()
        if self.store.apply_replica(replica):
            log.info(
                "canopy: replica %s applied (%s)", replica.key, change.desired.entry.describe()
            )
        if change.desired_snapshot_patch is not None:
            self.store.patch_replica_status(
                replica.key, {"canopyDesiredSnapshotId": change.desired_snapshot_patch}
            )
            log.info(
                "canopy: %s should restore snapshot %s", replica.key, change.desired_snapshot_patch
            )

    # -- what the runtime asks ------------------------------------------------------------
    def secret_check(self, replica: PostgresPhysicalReplica) -> SecretCheck:
        refused = self.book.refusal(replica.key)
        if refused is not None:
            return refused
        if self.book.repository(replica.key) is not None:
            return SecretCheck.valid()
        return SecretCheck.not_found("waiting for the repository password from canopy")

    def repository(self, replica: PostgresPhysicalReplica) -> CanopyRepository:
        repo = self.book.repository(replica.key)
        if repo is None:
            raise RuntimeError(f"{replica.key}: canopy has not issued its repository password yet")
        return repo

    def restore_job(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        run_id: str | None,
    ) -> tuple[KopiaCredentials, dict[str, Any]]:
        """Kopia's credentials (the worker routes them through its proxy) and how the worker
        starts `pgro canopy-proxy`, with the restore's own broker token."""
        source = replica.spec.canopy_source
        assert source is not None
        repo = self.repository(replica)
        job = f"{restore.namespace}/{restore.name}"
        run_id = run_id or restore.status.run_id
        proxy: dict[str, Any] = {
            "python": sys.executable,
            "brokerUrl": self.base_url,
            "group": source.group,
            "type": source.type,
            "region": repo.region,
            "s3Endpoint": self.options.s3_endpoint,
            "runId": run_id,
            "statsUrl": f"{self.base_url}/api/v1/canopy-stats/{job}",
            "progressUrl": f"{self.base_url}/api/v1/canopy-progress/{job}" if run_id else None,
            "progressInterval": self.options.progress_interval,
            "brokerToken": restore_token(self.tokens, replica, run_id, job),
        }
        return repo.through(""), proxy

    # -- verification reports -------------------------------------------------------------
    def add_details(
        self,
        replica: PostgresPhysicalReplica,
        restore: str,
        health_details: dict[str, Any] | None,
    ) -> None:
        """Merge what the runtime measured into the restore's waiting report."""
        pending = replica.status.pending_verification_reports
        target = next((r for r in pending if r.restore == restore), None)
        if target is None:
            return
        updated = vr.with_details(pending, target.key, health_details=health_details)
        if updated != list(pending):
            self.store.patch_replica_status(replica.key, vr.status_patch(updated))

    def _poll_deliveries(self) -> None:
        for replica in self.store.replicas():
            if not is_canopy_managed(replica):
                continue
            step = self.courier.step(replica)
            if step.reports is not None:
                self.store.patch_replica_status(replica.key, vr.status_patch(step.reports))
            for dropped in step.dropped:
                e = dropped.event()
                self.store.add_event(replica.key, e.type, e.reason, e.note, e.related)
                log.warning("%s: %s", replica.key, e.note)
            self.courier.settled(step)

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        self.close(self.server)
