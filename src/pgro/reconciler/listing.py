"""Snapshot discovery for every runtime, with the kopia CLI, off the reconciling thread.

The reference runs a snapshot-list Job per trigger and waits for an HTTP callback: a pod
start (seconds to minutes) on every trigger, and in-memory callback state. pgro lists from
its own process (the operator, `pgro run`). Listings are shared by every replica that
reads the same repository with the same credentials (keyed by a digest of the Secret's
values, never the values), and at most one listing per repository runs at a time;
replicas asking meanwhile get the running one's result.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgro.api.secret import KopiaCredentials
from pgro.core.observations import (
    SnapshotListing,
    record_listing_failure,
    record_listing_success,
)
from pgro.core.secrets import scrub
from pgro.kopia.repository import KopiaRepository

log = logging.getLogger("pgro.listing")

ReplicaKey = str  # namespace/name
Access = Callable[[], AbstractContextManager[KopiaCredentials]]


def credentials_digest(creds: KopiaCredentials) -> str:
    """Which repository, opened how: equal digests may share a listing."""
    h = hashlib.sha256(repr(creds.location).encode())
    for value in (creds.repository_password, creds.access_key_id, creds.secret_access_key):
        h.update(b"\0" + (value or "").encode())
    return h.hexdigest()[:32]


@dataclass
class _Repo:
    listing: SnapshotListing | None = None
    running: bool = False
    waiting: set[ReplicaKey] = field(default_factory=set)


class ListingCache:
    def __init__(
        self,
        on_done: Callable[[ReplicaKey], None],
        clock: Callable[[], datetime],
        *,
        workers: int = 2,
        state_dir: Path | None = None,
    ) -> None:
        self.on_done = on_done
        self.clock = clock
        self.state_dir = state_dir or Path(tempfile.gettempdir()) / "pgro-operator-kopia"
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="listing")

    def listing_for(self, replica: ReplicaKey, creds: KopiaCredentials) -> SnapshotListing | None:
        digest = credentials_digest(creds)
        with self._lock:
            repo = self._repos.get(digest)
            return repo.listing if repo else None

    def request(
        self,
        replica: ReplicaKey,
        creds: KopiaCredentials,
        access: Access | None = None,
    ) -> None:
        """List the repository again (unless a listing of it is already running).
        `access` opens what kopia uses instead of `creds` (a canopy repository is reached
        through a proxy that lives only while the listing runs)."""
        digest = credentials_digest(creds)
        with self._lock:
            repo = self._repos.setdefault(digest, _Repo())
            repo.waiting.add(replica)
            if repo.running:
                return
            repo.running = True
            previous = repo.listing
        self._pool.submit(
            self._list, digest, creds, previous, access or (lambda: nullcontext(creds))
        )

    def _list(
        self,
        digest: str,
        creds: KopiaCredentials,
        previous: SnapshotListing | None,
        access: Access,
    ) -> None:
        state = self.state_dir / digest[:16]
        shutil.rmtree(state, ignore_errors=True)
        try:
            with access() as opened, KopiaRepository(opened, state) as kopia:
                snapshots = kopia.list_snapshots()
            listing = record_listing_success(snapshots, self.clock())
            log.info("listed %d snapshots in %s", len(snapshots), creds.describe())
        except Exception as exc:
            error = scrub(str(exc), creds.secret_values())
            listing = record_listing_failure(previous, error, self.clock())
            log.warning("listing %s failed: %s", creds.describe(), error)
        with self._lock:
            repo = self._repos[digest]
            repo.listing = listing
            repo.running = False
            waiting, repo.waiting = repo.waiting, set()
        for replica in waiting:
            self.on_done(replica)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
