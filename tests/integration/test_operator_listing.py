"""The operator's in-process snapshot listing, shared per repository and credentials."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from pgro.reconciler.listing import ListingCache, credentials_digest
from tests.conftest import Repo


def _cache(scratch: Path) -> tuple[ListingCache, list[tuple[str, str]], threading.Event]:
    done: list[tuple[str, str]] = []
    event = threading.Event()

    def on_done(key: tuple[str, str]) -> None:
        done.append(key)
        event.set()

    return ListingCache(on_done, lambda: datetime.now(UTC), state_dir=scratch), done, event


def test_replicas_reading_one_repository_share_one_listing(fs_repo: Repo, scratch: Path) -> None:
    cache, done, _ = _cache(scratch)
    creds = fs_repo.credentials
    a, b = "ns/a", "ns/b"
    assert cache.listing_for(a, creds) is None
    cache.request(a, creds)
    cache.request(b, creds)  # joins the listing already running
    deadline = datetime.now(UTC).timestamp() + 60
    while len(done) < 2 and datetime.now(UTC).timestamp() < deadline:
        threading.Event().wait(0.1)
    assert sorted(done) == [a, b]
    listing = cache.listing_for(a, creds)
    assert listing is not None and not listing.failed
    assert listing is cache.listing_for(b, creds)
    assert listing.snapshots is not None
    assert fs_repo.snapshots["clean"] in {s.id for s in listing.snapshots}
    cache.shutdown()


def test_a_failed_listing_is_secret_free_and_counts_the_streak(
    fs_repo: Repo, scratch: Path
) -> None:
    cache, _, event = _cache(scratch)
    wrong = replace(fs_repo.credentials, repository_password="wrong-password-31337")
    for attempt in (1, 2):
        event.clear()
        cache.request("ns/a", wrong)
        assert event.wait(60)
        listing = cache.listing_for("ns/a", wrong)
        assert listing is not None and listing.failed
        assert listing.consecutive_failures == attempt
        assert "wrong-password-31337" not in (listing.error or "")
    cache.shutdown()


def test_the_digest_tells_credentials_apart_without_holding_them(fs_repo: Repo) -> None:
    creds = fs_repo.credentials
    other = replace(creds, repository_password="another")
    assert credentials_digest(creds) == credentials_digest(replace(creds))
    assert credentials_digest(creds) != credentials_digest(other)
    assert creds.repository_password not in credentials_digest(creds)
