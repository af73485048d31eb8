"""The operator's in-process snapshot listing, shared per repository and credentials."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.reconciler.listing import ListingCache, credentials_digest
from tests.conftest import Repo


def _cache(scratch: Path) -> tuple[ListingCache, list[str], threading.Event]:
    done: list[str] = []
    event = threading.Event()

    def on_done(key: str) -> None:
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


def test_the_keys_an_access_hands_out_are_scrubbed_too(fs_repo: Repo, scratch: Path) -> None:
    """A canopy listing opens the repository with keys only the proxy knows; an error that
    quotes them (here kopia naming a path that holds one) must not carry them."""
    cache, _, event = _cache(scratch)
    key = "proxy-key-80917"
    opened = replace(
        fs_repo.credentials,
        location=FilesystemLocation(str(scratch / key)),
        access_key_id=key,
    )

    @contextmanager
    def access() -> Iterator[KopiaCredentials]:
        yield opened

    cache.request("ns/a", fs_repo.credentials, access)
    assert event.wait(60)
    listing = cache.listing_for("ns/a", fs_repo.credentials)
    assert listing is not None and listing.failed
    assert listing.error and key not in listing.error
    cache.shutdown()
