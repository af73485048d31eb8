"""`pgro run`: the reconciler shell applied to local processes, with state in SQLite.

This module holds the lifecycle: the manifests, the loop, polling canopy, shutting down;
deciding and applying is the shell's, what it asks of the machine `effects.py`. One loop
thread runs every pass, when an object is due (docs/run.md says when); slow work runs
elsewhere (the listing service, worker processes, supervised servers).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from pgro.canopy.client import CanopyClient
from pgro.clock import utcnow
from pgro.event_publisher import EventPublisher
from pgro.notifications import Notifier
from pgro.observability import Health, Metrics
from pgro.pipeline.migrator_command import MigratorCommand
from pgro.postgres.account import resolve_run_account
from pgro.reconciler.listing import ReplicaListings
from pgro.reconciler.shell import Shell, WorkKind
from pgro.runtimes.embedded.canopy import CanopyOptions, EmbeddedCanopy, is_canopy_managed
from pgro.runtimes.embedded.credentials import CredentialStore
from pgro.runtimes.embedded.effects import EmbeddedEffects
from pgro.runtimes.embedded.endpoints import EndpointFactory, Endpoints
from pgro.runtimes.embedded.manifest import ManifestError, load_manifests
from pgro.runtimes.embedded.state_dir import (
    PRIVATE,
    TRAVERSE,
    choose_run_root,
    ensure_dir,
    prepare_state_dir,
)
from pgro.runtimes.embedded.store import Store
from pgro.runtimes.embedded.work import Restores

log = logging.getLogger("pgro.run")

RUN_ROOT_SETTING: Final = "run-root"
# kopia's metadata cache per repository location (`pgro.kopia.cache`; docs/run.md).
KOPIA_CACHE: Final = "kopia-cache"


@dataclass
class RunOptions:
    manifests: Sequence[Path]
    state_dir: Path
    keep_serving: bool = False
    tick: float = 1.0
    listen_host: str = "127.0.0.1"
    max_concurrent_restores: int = 2
    # `--canopy-url`: the client to canopy and the syncer's settings; None: no canopy.
    canopy: tuple[CanopyClient, CanopyOptions] | None = None
    # `--migrator`: the application's migrate command for `migrateTo` restores.
    migrator: MigratorCommand | None = None


class Runtime:
    def __init__(
        self,
        options: RunOptions,
        endpoint_factory: EndpointFactory,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.options = options
        # Raises StateDirError (the CLI exits 2 with its message) before anything is made.
        self.state_dir = prepare_state_dir(options.state_dir)
        self.account = resolve_run_account()
        self.store = Store(self.state_dir / "state.db")
        # Only the path to restores and endpoints is for the run account (see state_dir).
        stored = self.store.setting(RUN_ROOT_SETTING)
        self.run_root = choose_run_root(self.state_dir, self.account, stored)
        if stored != str(self.run_root):
            self.store.set_setting(RUN_ROOT_SETTING, str(self.run_root))
        if self.run_root != self.state_dir:
            why = "%s cannot reach %s: restores and endpoints live in %s"
            log.info(why, self.account.name, self.state_dir, self.run_root)
        for name in ("restores", "endpoints"):
            ensure_dir(self.run_root / name, TRAVERSE)
        for name in ("credentials", "kopia", KOPIA_CACHE):
            ensure_dir(self.state_dir / name, PRIVATE)
        self.metrics = Metrics()
        self.health = Health()
        self.clock = clock
        self._manifest_mtimes: dict[Path, float] = {}
        self.reload_requested = threading.Event()
        # (kind, key) → when it is due (time.monotonic()); written by listing threads too.
        self._due: dict[tuple[WorkKind, str], float] = {}
        self._due_lock = threading.Lock()
        self.random = random.Random()  # noqa: S311 - schedule jitter, not secrets
        self.notifier = Notifier(self.metrics, clock=self.clock)
        # eventPublisher's client identity comes from a Secret in the manifests.
        self.event_publisher = EventPublisher(
            lambda ns, name: self.effects.manifest.secrets.get((ns, name)), clock=self.clock
        )
        self.canopy: EmbeddedCanopy | None = None
        if options.canopy is not None:
            client, canopy_options = options.canopy
            self.canopy = EmbeddedCanopy(
                client, canopy_options, self.store, clock=self.clock, rnd=self.random.random
            )
            self.canopy.courier.metrics = self.metrics
        # One kopia metadata cache per repository, shared by listings and restores.
        kopia_cache = self.state_dir / KOPIA_CACHE
        self.restores = Restores(self.store, self.run_root, self.account, kopia_cache=kopia_cache)
        self.endpoints = Endpoints(
            self.store,
            CredentialStore(self.state_dir / "credentials"),
            self.run_root,
            self.account,
            options.listen_host,
            endpoint_factory,
        )
        self.listings = ReplicaListings(
            lambda key: self.schedule("replica", key, 0.0),
            clock,
            self.state_dir / "kopia",
            cache_root=kopia_cache,
        )
        self.effects = EmbeddedEffects(
            self.store,
            self.restores,
            self.endpoints,
            self.listings,
            self.canopy,
            self.schedule,
            options.listen_host,
            migrator=options.migrator,
        )
        self.shell = Shell(
            self.effects,
            schedule=self.schedule,
            clock=clock,
            limit=options.max_concurrent_restores,
            random=self.random.random,
            new_run_id=lambda: str(uuid.uuid4()),
            metrics=self.metrics,
            notifier=self.notifier,
            event_publisher=self.event_publisher,
        )
        self.store.watch(self._changed)

    # -- scheduling -----------------------------------------------------------------------
    def schedule(self, kind: WorkKind, key: str, delay: float) -> None:
        """Reconcile (kind, key) within `delay` seconds (an earlier time asked for stays)."""
        due = time.monotonic() + max(0.0, delay)
        with self._due_lock:
            if due < self._due.get((kind, key), float("inf")):
                self._due[(kind, key)] = due

    def _changed(self, replica_key: str, restore_key: str | None) -> None:
        """A replica or restore changed in the store: as a watch event on Kubernetes."""
        self.schedule("replica", replica_key, 0.0)
        if restore_key is not None:
            self.schedule("restore", restore_key, 0.0)

    def _take_due(self) -> list[tuple[WorkKind, str]]:
        now = time.monotonic()
        with self._due_lock:
            due = sorted(k for k, at in self._due.items() if at <= now)
            self._due = {k: at for k, at in self._due.items() if at > now}
        return due

    def _everything_due(self) -> None:
        for key in self.store.replica_keys():
            self.schedule("replica", key, 0.0)
        for restore in self.store.restores():
            self.schedule("restore", f"{restore.namespace}/{restore.name}", 0.0)

    # -- manifests ----------------------------------------------------------------------
    def load(self) -> None:
        """Read the manifests; on an error keep running with what was loaded before."""
        # Times first, whatever the outcome: a bad manifest is reported once per change.
        self._manifest_mtimes = {p: _mtime(p) for p in self.options.manifests}
        try:
            manifest = load_manifests(self.options.manifests)
        except ManifestError as exc:
            log.error("manifest not reloaded: %s", exc, extra={"reason": exc.reason})
            return
        except Exception as exc:
            # Whatever a file holds, the replicas already running keep running.
            log.exception("manifest not reloaded: %s: %s", type(exc).__name__, exc)
            return
        self.effects.manifest = manifest
        wanted = {r.key for r in manifest.replicas}
        for replica in manifest.replicas:
            if self.store.apply_replica(replica):
                log.info("replica %s loaded", replica.key)
        for existing in self.store.replicas():
            # Canopy's replicas are the syncer's to remove, not the manifests'.
            if existing.key not in wanted and not is_canopy_managed(existing):
                self.remove_replica(existing.key)
        # The Secrets may have changed with the replicas unchanged.
        for key in self.store.replica_keys():
            self.schedule("replica", key, 0.0)

    def _manifests_changed(self) -> bool:
        return any(_mtime(p) != self._manifest_mtimes.get(p) for p in self.options.manifests)

    def remove_replica(self, key: str) -> None:
        log.info("replica %s is no longer wanted: removing it and its restores", key)
        for restore in self.store.restores(key):
            self.restores.delete(restore)
            self.shell.forget_restore(f"{restore.namespace}/{restore.name}")
        self.endpoints.stop(key)
        self.store.delete_replica(key)
        self.listings.forget(key)
        # Its notifications, failures and slot or place in line go now.
        self.shell.forget_replica(key)

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        # Whatever ends the loop (a stop, an exception), the children are stopped.
        try:
            self.load()
            self.shell.rebuild_admission()
            self._everything_due()
            self.health.set_ready(True)
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:
                    log.exception("reconcile pass failed")
                self.health.beat()
                stop.wait(self.options.tick)
        finally:
            self.shutdown()

    def tick(self) -> None:
        """One turn of the loop: take in what changed, then reconcile what is due."""
        if self.reload_requested.is_set() or self._manifests_changed():
            self.reload_requested.clear()
            self.load()
        if self.canopy is not None:
            self.canopy.poll(self.remove_replica)
            # Canopy's credentials live in its book, not in the store.
            for key in self.canopy.book.take_changes():
                self.schedule("replica", key, 0.0)
        for key in self.restores.changed():
            self.schedule("restore", key, 0.0)
        self.shell.tick()
        # What these passes make due (their own writes too) waits for the next tick, after
        # canopy's next poll, as each pass did when every object was reconciled every tick.
        for kind, key in self._take_due():
            self.shell.reconcile(kind, key)

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        self.health.set_ready(False)
        self.restores.shutdown(self.options.keep_serving)
        if not self.options.keep_serving:
            self.endpoints.stop_all()
        self.notifier.shutdown()
        self.event_publisher.shutdown()
        if self.canopy is not None:
            self.canopy.shutdown()
        self.listings.shutdown()
        self.store.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0
