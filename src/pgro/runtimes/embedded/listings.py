"""Each replica's latest snapshot listing in `pgro run`, from the shared listing service.

`pgro.reconciler.listing.ListingCache` lists each repository once for every replica that
reads it, off the loop thread. What a decision needs is per replica: its failure streak and
what the listing was taken to find (`ListSnapshots.wanted`, canopy's desired snapshot), so
each finished listing is recorded for the replicas that asked for it, with their own
previous listing and wanted snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pgro.api.secret import KopiaCredentials
from pgro.core.observations import (
    SnapshotListing,
    record_listing_failure,
    record_listing_success,
)
from pgro.reconciler.listing import Access, ListingCache


class ReplicaListings:
    def __init__(
        self, on_done: Callable[[str], None], clock: Callable[[], datetime], state_dir: Path
    ) -> None:
        self.on_done = on_done
        self._cache = ListingCache(self._listed, clock, state_dir=state_dir)
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
