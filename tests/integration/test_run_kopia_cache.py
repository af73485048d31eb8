"""`pgro run` keeps one kopia metadata cache per repository location in its state directory
(`<state dir>/kopia-cache/<location_key>`), used by the snapshot listing and the restore
worker alike (issue 16)."""

from __future__ import annotations

import stat
from pathlib import Path

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.cache import location_key
from pgro.kopia.repository import KopiaRepository
from pgro.runtimes.embedded.runtime import KOPIA_CACHE
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import PASSWORD, Backups, StartRun

OTHER_PASSWORD = "second-repository-password-93d1"


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_each_repository_gets_one_private_bounded_cache_without_secrets(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("one")
    # A second repository holding the same cluster, opened with another password.
    other = KopiaCredentials(FilesystemLocation(str(scratch / "repo-2")), OTHER_PASSWORD)
    author = KopiaRepository(other, scratch / "kopia-author-2")
    try:
        author.create()
        author.snapshot_create(backups.source, override_source="postgres@db-two:/var/lib/pg")
    finally:
        author.close()
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc("one", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        secret_doc(
            "two", {"filesystemPath": str(scratch / "repo-2"), "repositoryPassword": OTHER_PASSWORD}
        ),
        replica_doc("orders", "one", ephemeral=False, scheduleJitter="0s"),
        replica_doc("sales", "two", ephemeral=False, scheduleJitter="0s"),
    )
    run = start_run(manifest)
    run.wait_for(
        "both replicas to serve",
        lambda: all(run.replica(n)["status"].get("phase") == "Ready" for n in ("orders", "sales")),
        timeout=300,
    )

    root = run.state / KOPIA_CACHE
    keys = {
        location_key(FilesystemLocation(str(backups.path))): PASSWORD,
        location_key(other.location): OTHER_PASSWORD,
    }
    assert {p.name for p in root.iterdir()} == set(keys)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    tree = _bytes(backups.source)
    for key in keys:
        cache = root / key
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert any((cache / "index-blobs").iterdir()) and any((cache / "metadata").rglob("*.f"))
        # Only a restore reads file contents (a listing leaves `contents` empty but for
        # kopia's `.shards`): the restore worker used this cache too.
        assert list((cache / "contents").rglob("*.f"))
        assert _bytes(cache / "contents") <= (1 << 20) + 64 * 1024
        assert _bytes(cache) < min(tree // 3, 50 << 20), (_bytes(cache), tree)
        for path in cache.rglob("*"):
            assert path.name != "repository.config", path
            if path.is_file():
                data = path.read_bytes()
                assert PASSWORD.encode() not in data and OTHER_PASSWORD.encode() not in data
    # The restores' own kopia state (config, logs) went when they finished.
    assert not list(run.state.rglob("repository.config"))
