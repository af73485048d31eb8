"""`pgro restore-job` keeps kopia's metadata cache on the kopia-cache volume, keyed by the
repository's location (`PGRO_KOPIA_CACHE_ROOT`, which the operator sets), and evicts it under
cache pressure (features.md §2.12), against a real kopia repository."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from pgro.api.secret import FilesystemLocation
from pgro.kopia.cache import CONTENT_CACHE_MB, location_key
from pgro.pipeline import restore_job
from pgro.pipeline.job import RestoreOutcome
from tests.conftest import Repo


def _env(repo: Repo, root: Path) -> dict[str, str]:
    (root / "pgdata-volume").mkdir(exist_ok=True)
    return {
        "PATH": os.environ["PATH"],
        "SNAPSHOT_ID": repo.snapshots["clean"],
        "KOPIA_FILESYSTEM_PATH": str(repo.path),
        "KOPIA_PASSWORD": repo.password,
        "PGRO_DATA_ROOT": str(root / "pgdata-volume"),
        "PGRO_KOPIA_DIR": str(root / "kopia-volume"),
        "PGRO_KOPIA_CACHE_ROOT": str(root / "kopia-volume" / "cache"),
        "PGRO_TERMINATION_LOG": str(root / "termination-log"),
    }


def _run(env: dict[str, str]) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pgro.cli.main", "restore-job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = Path(env["PGRO_TERMINATION_LOG"])
    return proc.returncode, log.read_text() if log.exists() else "", proc.stdout + proc.stderr


def _identities(path: Path) -> dict[str, tuple[int, int]]:
    """Every cached index and metadata file, by path, with its inode and mtime."""
    out = {}
    for sub in ("index-blobs", "metadata"):
        for item in (path / sub).rglob("*"):
            if item.is_file():
                st = item.stat()
                out[str(item.relative_to(path))] = (st.st_ino, st.st_mtime_ns)
    return out


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_second_restore_job_reuses_the_kept_metadata_cache(fs_repo: Repo, scratch: Path) -> None:
    env = _env(fs_repo, scratch)
    code, message, output = _run(env)
    assert code == 0, output
    assert "PGRO_CACHE_PRESSURE" not in output
    assert RestoreOutcome.from_message(message).cache_pressure is None
    volume = scratch / "kopia-volume"
    cache = volume / "cache" / location_key(FilesystemLocation(str(fs_repo.path)))
    # The location-keyed directory, private; the Job's other kopia state is gone.
    assert [p.name for p in (volume / "cache").iterdir()] == [cache.name]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE((volume / "cache").stat().st_mode) == 0o700
    assert not (volume / "restore").exists()
    kept = _identities(cache)
    assert kept, "kopia cached no index or metadata"
    # Never the password, in a name or in the contents.
    for path in cache.rglob("*"):
        assert fs_repo.password not in path.name
        assert path.name != "repository.config", path
        if path.is_file():
            assert fs_repo.password.encode() not in path.read_bytes(), path

    code, message, output = _run(env)
    assert code == 0, output
    assert RestoreOutcome.from_message(message).postgres_version == "15"
    # The second Job read what the first cached: a re-download writes a new file (new inode).
    after = _identities(cache)
    assert {name: after.get(name) for name in kept} == kept
    # Bounded: metadata only, the snapshot's contents stay out.
    assert _bytes(cache / "contents") <= (CONTENT_CACHE_MB << 20) + 64 * 1024
    restored = _bytes(scratch / "pgdata-volume" / "postgres")
    assert _bytes(cache) < restored // 4, (_bytes(cache), restored)


def test_cache_pressure_evicts_and_is_reported(fs_repo: Repo, scratch: Path) -> None:
    env = _env(fs_repo, scratch)
    stale = scratch / "kopia-volume" / "cache" / "0123456789abcdef0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "metadata").mkdir()
    (stale / "metadata" / "old").write_bytes(b"x" * 65536)
    calls: list[Path] = []

    def full(path: Path) -> os.statvfs_result:
        calls.append(path)
        # 1000 blocks, 100 free: 90 % used.
        return os.statvfs_result((4096, 4096, 1000, 100, 100, 10, 5, 5, 0, 255))

    outcome = restore_job.run(env, statvfs=full)
    assert outcome.ok, outcome.failure
    assert calls == [scratch / "kopia-volume"]  # the volume, read once before connecting
    assert outcome.cache_pressure == 90
    parsed = RestoreOutcome.from_message(outcome.message)
    assert parsed.cache_pressure == 90 and parsed.postgres_version == "15"
    # Every kept cache went; the restore then filled its own again.
    assert not stale.exists()
    cache = scratch / "kopia-volume" / "cache" / location_key(FilesystemLocation(str(fs_repo.path)))
    assert _identities(cache)

    # Not full: nothing evicted, nothing reported.
    before = _identities(cache)

    def roomy(path: Path) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 1000, 200, 200, 10, 5, 5, 0, 255))

    outcome = restore_job.run(env, statvfs=roomy)
    assert outcome.ok and outcome.cache_pressure is None
    assert "cachePressure" not in outcome.message
    after = _identities(cache)
    assert {name: after.get(name) for name in before} == before
