"""Canopy in `pgro run`: the worklist syncer, the broker, and report delivery.

Everything that talks to canopy runs in a small thread pool; the runtime's loop thread
calls `poll` once per pass and applies what came back (the store is only touched from the
loop thread). Replicas canopy wants live in the store as `<namespace>/canopy-replica`,
exactly as the operator materialises them, labelled `pgro.bes.au/managed-by=pgro-canopy`;
the manifests never remove them, the syncer does.

The credential broker and the proxies' callbacks are served on loopback on a port kept
in the state database, so a restore's proxy that outlived a `pgro run` restart still
reaches the broker of the next one. Loopback is every local user's: each restore's proxy
authenticates with a token issued when the restore starts (`pgro.canopy.tokens`), under
a key kept 0600 in the state directory (`canopy-broker.key`).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pgro.api.names import CANOPY_MANAGED_BY_VALUE, LABEL_CANOPY_MANAGED_BY
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import KopiaCredentials
from pgro.canopy.access import CanopyRepository, broker_source, listing_access
from pgro.canopy.broker import Callbacks, CredentialBroker, serve
from pgro.canopy.client import CanopyClient
from pgro.canopy.courier import ReportCourier
from pgro.canopy.materialise import ExistingReplica, plan_removals, plan_sync
from pgro.canopy.naming import REPLICA_NAME
from pgro.canopy.proxy import DEFAULT_PROGRESS_INTERVAL, valid_run_id
from pgro.canopy.syncer import (
    DEFAULT_INTERVAL,
    DEFAULT_REMOVAL_GRACE,
    SyncTick,
    capability_retry_delay,
    fetch_tick,
    jittered,
)
from pgro.canopy.tokens import BrokerTokens, TokenBinding, load_or_create_key
from pgro.core import reasons
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


@dataclass
class _State:
    repositories: dict[str, CanopyRepository] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    # Namespace → when a fetched worklist first did not list it.
    absent_since: dict[str, datetime] = field(default_factory=dict)
    ticks: int = 0


def is_canopy_managed(replica: PostgresPhysicalReplica) -> bool:
    labels = replica.metadata.labels or {}
    return labels.get(LABEL_CANOPY_MANAGED_BY) == CANOPY_MANAGED_BY_VALUE


class EmbeddedCanopy:
    def __init__(
        self,
        client: CanopyClient,
        options: CanopyOptions,
        store: Store,
        *,
        clock: Callable[[], datetime],
        rnd: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.options = options
        self.store = store
        self.clock = clock
        self.rnd = rnd
        self.broker = CredentialBroker(client, clock=clock)
        self.callbacks = Callbacks(client)
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
        self.pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="canopy")
        self.state = _State()
        self._capabilities: Future[None] | None = self.pool.submit(client.register_capabilities)
        self._capability_attempts = 0
        self._capabilities_at: float | None = None
        self._tick: Future[SyncTick] | None = None
        self._next_tick = 0.0
        self.courier = ReportCourier(
            client.report_verification, self.pool, clock, callbacks=self.callbacks
        )
        log.info("canopy: %r; broker on %s", client, self.base_url)

    # -- the loop thread's entry point ---------------------------------------------------
    def poll(self, remove_replica: Callable[[str], None]) -> None:
        self._poll_capabilities()
        self._poll_tick(remove_replica)
        self._poll_deliveries()

    def _poll_capabilities(self) -> None:
        now = time.monotonic()
        if self._capabilities is None:
            if self._capabilities_at is not None and now >= self._capabilities_at:
                self._capabilities = self.pool.submit(self.client.register_capabilities)
                self._capabilities_at = None
            return
        if not self._capabilities.done():
            return
        error = self._capabilities.exception()
        self._capabilities = None
        if error is None:
            log.info("canopy: intents advertised (verify, upgrade, analytics)")
            return
        self._capability_attempts += 1
        delay = capability_retry_delay(self._capability_attempts)
        log.warning(
            "canopy: advertising intents failed (attempt %d), again in %ds: %s",
            self._capability_attempts,
            delay.total_seconds(),
            error,
        )
        self._capabilities_at = now + delay.total_seconds()

    def _poll_tick(self, remove_replica: Callable[[str], None]) -> None:
        if self._tick is None:
            # The first tick waits for the first capabilities attempt: canopy lists only
            # intents it knows this device handles.
            first_pending = self.state.ticks == 0 and self._capabilities is not None
            if time.monotonic() >= self._next_tick and not first_pending:
                self._tick = self.pool.submit(fetch_tick, self.client, self.broker)
            return
        if not self._tick.done():
            return
        future, self._tick = self._tick, None
        self.state.ticks += 1
        self._next_tick = time.monotonic() + jittered(self.options.interval, self.rnd)
        try:
            tick = future.result()
        except Exception:
            # fetch_tick turns canopy's answers into a SyncTick; anything else is a bug
            # that must not stop the syncer for good.
            log.exception("canopy sync tick failed")
            return
        self._apply(tick, remove_replica)

    # -- applying a tick -----------------------------------------------------------------
    def _apply(self, tick: SyncTick, remove_replica: Callable[[str], None]) -> None:
        existing = {
            r.namespace: ExistingReplica(r.namespace, r.status.canopy_desired_snapshot_id)
            for r in self.store.replicas()
            if is_canopy_managed(r)
        }
        plan = plan_sync(tick.worklist, existing)
        if not plan.fetched:
            return
        for problem in plan.problems:
            log.warning("canopy worklist: %s", problem)
        if plan.deletions_withheld:
            log.warning("canopy worklist: %s", plan.deletions_withheld)
        for change in plan.apply:
            desired = change.desired
            replica = desired.replica()
            key = replica.key
            if self.store.apply_replica(replica):
                log.info("canopy: replica %s applied (%s)", key, desired.entry.describe())
            if change.desired_snapshot_patch is not None:
                self.store.patch_replica_status(
                    key, {"canopyDesiredSnapshotId": change.desired_snapshot_patch}
                )
                log.info(
                    "canopy: %s should restore snapshot %s", key, change.desired_snapshot_patch
                )
            entry = desired.entry
            group_type = (str(entry.group_id), entry.type)
            password = tick.passwords.get(group_type)
            if password is not None:
                self.state.repositories[key] = CanopyRepository(
                    entry.bucket, entry.region, entry.prefix, password
                )
            refusal = tick.refusals.get(group_type)
            if refusal is not None:
                self.state.refusals[key] = refusal
            elif password is not None:
                self.state.refusals.pop(key, None)

        def holds(namespace: str) -> bool:
            held = self.store.replica(f"{namespace}/{REPLICA_NAME}")
            return held is not None and vr.holds_removal(held.status.pending_verification_reports)

        removals = plan_removals(
            plan, self.state.absent_since, self.clock(), self.options.removal_grace, holds
        )
        self.state.absent_since = removals.absent_since
        for namespace in removals.held:
            log.info("canopy no longer lists %s; kept until its reports are delivered", namespace)
        for namespace in removals.remove:
            key = f"{namespace}/{REPLICA_NAME}"
            log.info("canopy no longer lists %s: removing it", key)
            remove_replica(key)
            self.state.repositories.pop(key, None)
            self.state.refusals.pop(key, None)

    # -- what the runtime asks ------------------------------------------------------------
    def secret_check(self, replica: PostgresPhysicalReplica) -> SecretCheck:
        refusal = self.state.refusals.get(replica.key)
        if refusal is not None:
            return SecretCheck.invalid(refusal)
        if replica.key in self.state.repositories:
            return SecretCheck.valid()
        return SecretCheck.not_found("waiting for the repository password from canopy")

    def repository(self, replica: PostgresPhysicalReplica) -> CanopyRepository:
        repo = self.state.repositories.get(replica.key)
        if repo is None:
            raise RuntimeError(f"{replica.key}: canopy has not issued its repository password yet")
        return repo

    def listing(self, replica: PostgresPhysicalReplica) -> Any:
        """A context manager giving kopia credentials through an in-process proxy."""
        source = replica.spec.canopy_source
        assert source is not None
        return listing_access(
            self.repository(replica),
            broker_source(self.broker, source.group, source.type),
            s3_endpoint=self.options.s3_endpoint,
        )

    def restore_job(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        run_id: str | None,
    ) -> tuple[KopiaCredentials, dict[str, Any]]:
        """Kopia's credentials (the proxy's endpoint and kopia's keys are filled in by the
        worker) and how the worker starts its `pgro canopy-proxy`, with the restore's
        broker token (bound to its group, type, run id and callbacks)."""
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
            "brokerToken": self.tokens.issue(
                TokenBinding(
                    group=source.group, type=source.type, run_id=valid_run_id(run_id), job=job
                )
            ),
        }
        return repo.through(""), proxy

    # -- verification reports -------------------------------------------------------------
    def add_details(
        self,
        replica: PostgresPhysicalReplica,
        restore: str,
        health_details: dict[str, Any] | None,
    ) -> None:
        """Merge what the runtime measured into the restore's waiting report (delivered
        from the next pass on, so the details always go with it)."""
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
                note = (
                    f"The {dropped.report.outcome} report on restore {dropped.report.restore} "
                    f"was dropped: {dropped.why}"
                )
                self.store.add_event(
                    replica.key,
                    "Warning",
                    reasons.EVENT_VERIFICATION_REPORT_REJECTED,
                    note,
                    dropped.report.restore,
                )
                log.warning("%s: %s", replica.key, note)
            self.courier.settled(step)

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def state_dir_for_device(state_dir: Path) -> Path:
    return state_dir / "canopy-device"
