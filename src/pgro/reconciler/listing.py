"""Snapshot discovery for every runtime, with the kopia CLI, off the reconciling thread.

The reference runs a snapshot-list Job per trigger and waits for an HTTP callback: a pod
start (seconds to minutes) on every trigger, and in-memory callback state. pgro lists from
its own process (the operator, `pgro run`). Listings are shared by every replica that
reads the same repository with the same credentials (keyed by a digest of the Secret's
values, never the values), and at most one listing per repository runs at a time;
replicas asking meanwhile get the running one's result. Given a `cache_root` (`pgro run`:
`<state dir>/kopia-cache`), kopia keeps a metadata cache per repository location there
(`pgro.kopia.cache`), shared with the restores of that repository.
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
from pgro.kopia.cache import repository_cache_dir
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
        cache_root: Path | None = None,
    ) -> None:
        self.on_done = on_done
        self.clock = clock
        self.state_dir = state_dir or Path(tempfile.gettempdir()) / "pgro-operator-kopia"
        self.cache_root = cache_root
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
        # The keys a canopy proxy hands out for this listing are secrets too.
        secrets = list(creds.secret_values())
        try:
            # Keyed by where the repository is (`creds`: a canopy proxy's address changes).
            cache = (
                repository_cache_dir(self.cache_root, creds.location) if self.cache_root else None
            )
            with access() as opened:
                secrets += opened.secret_values()
                with KopiaRepository(opened, state, cache_dir=cache) as kopia:
                    snapshots = kopia.list_snapshots()
            listing = record_listing_success(snapshots, self.clock())
            log.info("listed %d snapshots in %s", len(snapshots), creds.describe())
        except Exception as exc:
            error = scrub(str(exc), secrets)
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


# What a decision needs is per replica: its failure streak and what the listing was taken
# to find (`ListSnapshots.wanted`, canopy's desired snapshot). Each finished listing of a
# repository is recorded for every replica that asked for it, with that replica's own
# previous listing and wanted snapshot.
class ReplicaListings:
    def __init__(
        self,
        on_done: Callable[[str], None],
        clock: Callable[[], datetime],
        state_dir: Path,
        *,
        cache_root: Path | None = None,
    ) -> None:
        self.on_done = on_done
        self._cache = ListingCache(self._listed, clock, state_dir=state_dir, cache_root=cache_root)
        self._lock = threading.Lock()
        self._listings: dict[str, SnapshotListing] = {}
        self._asked: dict[str, tuple[KopiaCredentials, str | None]] = {}

    def get(self, key: str) -> SnapshotListing | None:
        with self._lock:
            return self._listings.get(key)

    def request(
        self,
        key: str,
        creds: KopiaCredentials,
        wanted: str | None,
        access: Access | None = None,
    ) -> None:
        """List the replica's repository (joining a listing of it already running)."""
        with self._lock:
            self._asked[key] = (creds, wanted)
        self._cache.request(key, creds, access)

    def forget(self, key: str) -> None:
        with self._lock:
            self._listings.pop(key, None)
            self._asked.pop(key, None)

    def shutdown(self) -> None:
        self._cache.shutdown()

    def _listed(self, key: str) -> None:
        with self._lock:
            asked = self._asked.pop(key, None)
        # None: the replica went meanwhile, or an earlier listing answered it already.
        shared = self._cache.listing_for(key, asked[0]) if asked is not None else None
        if asked is not None and shared is not None:
            with self._lock:
                self._listings[key] = _for_replica(shared, self._listings.get(key), asked[1])
        self.on_done(key)


def _for_replica(
    shared: SnapshotListing, previous: SnapshotListing | None, wanted: str | None
) -> SnapshotListing:
    if shared.snapshots is None:
        return record_listing_failure(previous, shared.error or "", shared.listed_at)
    return record_listing_success(
        shared.snapshots, shared.listed_at, previous=previous, wanted=wanted
    )
