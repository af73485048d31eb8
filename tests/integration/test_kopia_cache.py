"""The kept kopia cache per repository (`pgro.kopia.cache`), against the real kopia binary:
keyed by location, reused, bounded to metadata, free of the password, shared by
concurrent kopia processes, and harmless to delete."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.cache import (
    CONTENT_CACHE_MB,
    METADATA_CACHE_LIMIT_MB,
    location_key,
    repository_cache_dir,
)
from pgro.kopia.errors import WrongPassword
from pgro.kopia.repository import KopiaRepository
from pgro.reconciler.listing import ListingCache

PASSWORD = "kept-cache-password-5f1c"
FILES = 24
FILE_BYTES = 512 * 1024  # random, so kopia can neither compress nor deduplicate them


@dataclass
class TreeRepo:
    credentials: KopiaCredentials
    snapshot: str
    source: Path


def _tree(root: Path, seed: str) -> Path:
    root.mkdir(parents=True)
    for i in range(FILES):
        (root / f"f{i:02}").write_bytes(os.urandom(FILE_BYTES))
    (root / "sub").mkdir()
    (root / "sub" / "seed").write_text(seed)
    return root


def _make_repo(base: Path, name: str, password: str = PASSWORD) -> TreeRepo:
    creds = KopiaCredentials(
        location=FilesystemLocation(str(base / name)), repository_password=password
    )
    source = _tree(base / f"{name}-src", name)
    author = KopiaRepository(creds, base / f"{name}-author")
    try:
        author.create()
        snapshot = author.snapshot_create(source)
    finally:
        author.close()
    return TreeRepo(creds, snapshot, source)


@pytest.fixture
def tree_repo(scratch: Path) -> TreeRepo:
    return _make_repo(scratch, "repo")


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _restore(repo: TreeRepo, state: Path, target: Path, cache: Path | None) -> None:
    with KopiaRepository(repo.credentials, state, cache_dir=cache) as kopia:
        assert repo.snapshot in {s.id for s in kopia.list_snapshots()}
        kopia.restore(repo.snapshot, target, parallel=2)
    assert _files(target) == _files(repo.source)


def _identities(cache: Path, sub: str) -> dict[str, int]:
    return {
        str(p.relative_to(cache)): p.stat().st_ino for p in (cache / sub).rglob("*") if p.is_file()
    }


def test_restores_reuse_one_bounded_cache_that_never_holds_the_password(
    tree_repo: TreeRepo, scratch: Path
) -> None:
    root = scratch / "kopia-cache"
    cache = repository_cache_dir(root, tree_repo.credentials.location)
    assert cache == root / location_key(tree_repo.credentials.location)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700

    state = scratch / "state-1"
    with KopiaRepository(tree_repo.credentials, state, cache_dir=cache) as kopia:
        kopia.restore(tree_repo.snapshot, scratch / "one", parallel=2)
        # kopia took the bounds: the config (in the throwaway state, not the cache) says so.
        caching = json.loads((state / "config" / "repository.config").read_text())["caching"]
        assert (state / "config" / caching["cacheDirectory"]).resolve() == cache.resolve()
        assert caching["contentCacheSizeLimitBytes"] == CONTENT_CACHE_MB << 20
        assert caching["metadataCacheSizeLimitBytes"] == METADATA_CACHE_LIMIT_MB << 20
        assert "maxListCacheDuration" not in caching  # 0: no stale list of index blobs
    assert not state.exists()  # close() removes the state ...
    assert (cache / "metadata").is_dir() and (cache / "index-blobs").is_dir()  # ... not the cache
    assert _files(scratch / "one") == _files(tree_repo.source)
    kept = _identities(cache, "index-blobs") | _identities(cache, "metadata")
    assert kept, "kopia cached no index or metadata"

    _restore(tree_repo, scratch / "state-2", scratch / "two", cache)
    # The second restore read what the first cached: a re-download would have written
    # each file anew (kopia writes a temporary file and renames it: a new inode).
    after = _identities(cache, "index-blobs") | _identities(cache, "metadata")
    assert {name: after.get(name) for name in kept} == kept

    # Metadata only: the snapshot's 12 MiB of contents stay out.
    assert _bytes(cache / "contents") <= (CONTENT_CACHE_MB << 20) + 64 * 1024
    assert _bytes(cache) < 2 << 20 < FILES * FILE_BYTES // 4
    # A throwaway cache (pgro verify, the operator's restore Job) is bounded the same way
    # for contents: kopia's default would copy every file it restores into it first.
    fresh = scratch / "fresh"
    with KopiaRepository(tree_repo.credentials, fresh) as kopia:
        kopia.restore(tree_repo.snapshot, scratch / "three", parallel=2)
        caching = json.loads((fresh / "config" / "repository.config").read_text())["caching"]
        assert caching["contentCacheSizeLimitBytes"] == CONTENT_CACHE_MB << 20
        assert _bytes(fresh / "cache" / "contents") <= (CONTENT_CACHE_MB << 20) + 64 * 1024
        assert _files(scratch / "three") == _files(tree_repo.source)

    # Neither the password nor the repository config is ever in the cache.
    for path in cache.rglob("*"):
        assert path.name != "repository.config", path
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_a_wrong_password_cannot_use_the_kept_cache(tree_repo: TreeRepo, scratch: Path) -> None:
    cache = repository_cache_dir(scratch / "kopia-cache", tree_repo.credentials.location)
    _restore(tree_repo, scratch / "state", scratch / "ok", cache)
    wrong = replace(tree_repo.credentials, repository_password="not-the-password")
    assert location_key(wrong.location) == location_key(tree_repo.credentials.location)
    with pytest.raises(WrongPassword):
        KopiaRepository(wrong, scratch / "state-wrong", cache_dir=cache).connect()


def test_deleting_the_cache_is_harmless(tree_repo: TreeRepo, scratch: Path) -> None:
    root = scratch / "kopia-cache"
    cache = repository_cache_dir(root, tree_repo.credentials.location)
    _restore(tree_repo, scratch / "state-1", scratch / "one", cache)
    shutil.rmtree(root)
    # A KopiaRepository made before the deletion recreates its directory ...
    _restore(tree_repo, scratch / "state-2", scratch / "two", cache)
    assert (cache / "metadata").is_dir()
    shutil.rmtree(root)
    # ... and so does the next lookup, private again.
    again = repository_cache_dir(root, tree_repo.credentials.location)
    assert again == cache and stat.S_IMODE(root.stat().st_mode) == 0o700
    _restore(tree_repo, scratch / "state-3", scratch / "three", again)


def test_concurrent_restores_and_a_listing_share_one_cache(
    tree_repo: TreeRepo, scratch: Path
) -> None:
    cache = repository_cache_dir(scratch / "kopia-cache", tree_repo.credentials.location)
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)

        return run

    def listing(i: int) -> None:
        with KopiaRepository(tree_repo.credentials, scratch / f"list-{i}", cache_dir=cache) as k:
            assert [s.id for s in k.list_snapshots()] == [tree_repo.snapshot]

    # Twice: all start on an empty cache, then all on the one they filled together.
    for round_ in range(2):
        jobs: list[Callable[[], None]] = [
            partial(
                _restore, tree_repo, scratch / f"s{round_}-{i}", scratch / f"t{round_}-{i}", cache
            )
            for i in range(3)
        ]
        jobs.append(partial(listing, round_))
        threads = [threading.Thread(target=guarded(job)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    assert _bytes(cache) < 2 << 20


def test_a_repository_recreated_at_the_same_location_is_read_afresh(scratch: Path) -> None:
    first = _make_repo(scratch, "repo")
    cache = repository_cache_dir(scratch / "kopia-cache", first.credentials.location)
    _restore(first, scratch / "state-1", scratch / "one", cache)
    # Same path, same password, a new repository (new keys) with another snapshot.
    shutil.rmtree(scratch / "repo")
    shutil.rmtree(first.source)
    second = _make_repo(scratch, "repo")
    assert second.snapshot != first.snapshot
    assert repository_cache_dir(scratch / "kopia-cache", second.credentials.location) == cache
    _restore(second, scratch / "state-2", scratch / "two", cache)


def test_listings_keep_one_cache_per_repository_location(scratch: Path) -> None:
    a = _make_repo(scratch, "a")
    b = _make_repo(scratch, "b", password="another-password-77")
    root = scratch / "kopia-cache"
    done = threading.Semaphore(0)
    listings = ListingCache(
        lambda key: done.release(),
        lambda: datetime.now(UTC),
        state_dir=scratch / "listing",
        cache_root=root,
    )
    try:
        listings.request("ns/a", a.credentials)
        listings.request("ns/b", b.credentials)
        for _ in range(2):
            assert done.acquire(timeout=120)
        for key, repo in (("ns/a", a), ("ns/b", b)):
            listing = listings.listing_for(key, repo.credentials)
            assert listing is not None and listing.snapshots is not None, listing
            assert [s.id for s in listing.snapshots] == [repo.snapshot]
    finally:
        listings.shutdown()
    keys = {location_key(a.credentials.location), location_key(b.credentials.location)}
    assert len(keys) == 2
    assert {p.name for p in root.iterdir()} == keys
    for d in root.iterdir():
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert (d / "index-blobs").is_dir()
