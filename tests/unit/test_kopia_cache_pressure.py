"""Kopia cache pressure (features.md §2.12): how full the restore Job finds its cache volume,
the eviction on a real directory, the termination message that reports it, and the
operator's growth of `<replica>-kopia-cache` against the in-memory API."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pgro.api.names import kopia_cache_pvc_name, restore_job_name
from pgro.api.quantity import parse_quantity
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.core.observations import RestoreWork, WorkState
from pgro.core.plan import PrepareRestoreStorage
from pgro.kopia.cache import (
    PRESSURE_PERCENT,
    location_key,
    relieve_cache_pressure,
    repository_cache_dir,
    volume_used_percent,
)
from pgro.kube.client import KubeApi
from pgro.pipeline.job import RestoreJob, RestoreOutcome
from pgro.runtimes.kubernetes.housekeeping import (
    CACHE_PRESSURE_ANNOTATION,
    cache_pressure,
    grow_cache_volume,
    grown_cache_size,
)
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from tests.fixtures.kube_api import Clock, MemoryApi
from tests.fixtures.manifests import replica as replica_manifest
from tests.fixtures.manifests import restore, restore_doc

GIB = 2**30


def _statvfs(blocks: int, free: int, avail: int) -> Any:
    """A statvfs of `blocks` 4 KiB blocks, `free` of them free (`avail` to non-root)."""
    result = os.statvfs_result((4096, 4096, blocks, free, avail, 1000, 900, 900, 0, 255))

    def read(path: Path) -> os.statvfs_result:
        assert isinstance(path, Path)
        return result

    return read


# -- how full --------------------------------------------------------------------------------
def test_used_percent_is_df_s() -> None:
    root = Path("/")
    assert volume_used_percent(root, _statvfs(100, 100, 100)) == 0
    assert volume_used_percent(root, _statvfs(100, 15, 15)) == 85
    # Rounded up: 84.1 % is 85 %.
    assert volume_used_percent(root, _statvfs(1000, 159, 159)) == 85
    assert volume_used_percent(root, _statvfs(1000, 160, 160)) == 84
    # Blocks reserved for root count as used by nobody: used / (used + available).
    assert volume_used_percent(root, _statvfs(100, 20, 10)) == 89
    assert volume_used_percent(root, _statvfs(0, 0, 0)) == 0
    # The real call works on a real directory.
    assert 0 <= volume_used_percent(root) <= 100


def _fill(cache_root: Path) -> Path:
    kept = repository_cache_dir(cache_root, FilesystemLocation("/repos/a"))
    (kept / "metadata").mkdir()
    (kept / "metadata" / "blob").write_bytes(b"x" * 4096)
    (kept / "contents").mkdir()
    other = repository_cache_dir(cache_root, FilesystemLocation("/repos/b"))
    (other / "indexes").mkdir()
    return kept


def test_below_the_threshold_nothing_is_touched(tmp_path: Path) -> None:
    kept = _fill(tmp_path / "cache")
    assert relieve_cache_pressure(tmp_path, tmp_path / "cache", _statvfs(100, 16, 16)) is None
    assert (kept / "metadata" / "blob").read_bytes() == b"x" * 4096
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("percent", [PRESSURE_PERCENT, 90, 100])
def test_at_the_threshold_every_kept_cache_is_evicted(tmp_path: Path, percent: int) -> None:
    (tmp_path / "restore").mkdir()  # the Job's throwaway kopia state: not the eviction's
    _fill(tmp_path / "cache")
    free = 100 - percent
    assert relieve_cache_pressure(tmp_path, tmp_path / "cache", _statvfs(100, free, free)) == (
        percent
    )
    cache = tmp_path / "cache"
    assert cache.is_dir() and list(cache.iterdir()) == []
    assert cache.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "restore").is_dir()
    # The next use recreates the repository's directory.
    again = repository_cache_dir(cache, FilesystemLocation("/repos/a"))
    assert again.is_dir() and again.name == location_key(FilesystemLocation("/repos/a"))


def test_a_missing_cache_root_under_pressure_is_created(tmp_path: Path) -> None:
    assert relieve_cache_pressure(tmp_path, tmp_path / "cache", _statvfs(10, 0, 0)) == 100
    assert (tmp_path / "cache").is_dir()


def test_an_unreadable_volume_is_no_pressure(tmp_path: Path) -> None:
    kept = _fill(tmp_path / "cache")

    def broken(path: Path) -> os.statvfs_result:
        raise OSError(5, "Input/output error")

    assert relieve_cache_pressure(tmp_path, tmp_path / "cache", broken) is None
    assert (kept / "metadata" / "blob").exists()


# -- the Job's environment and message ----------------------------------------------------------
def test_the_cache_root_travels_in_the_job_environment(tmp_path: Path) -> None:
    job = RestoreJob(
        snapshot_id="k0123",
        credentials=KopiaCredentials(
            location=FilesystemLocation("/repos/a"), repository_password="pw-secret-1"
        ),
        target=tmp_path / "pgdata" / "postgres",
        kopia_dir=tmp_path / "kopia" / "restore",
        kopia_cache_root=tmp_path / "kopia" / "cache",
    )
    env = job.to_env()
    assert env["PGRO_KOPIA_CACHE_ROOT"] == str(tmp_path / "kopia" / "cache")
    assert RestoreJob.from_env(env).kopia_cache_root == tmp_path / "kopia" / "cache"
    bare = {k: v for k, v in env.items() if k != "PGRO_KOPIA_CACHE_ROOT"}
    assert RestoreJob.from_env(bare).kopia_cache_root is None


def test_the_message_reports_cache_pressure() -> None:
    outcome = RestoreOutcome(ok=True, postgres_version="15", fixes={"a": True}, cache_pressure=91)
    first, second = outcome.message.splitlines()
    assert first == "15"  # the reference's line stays as it was
    assert json.loads(second) == {"fixes": {"a": True}, "cachePressure": 91}
    parsed = RestoreOutcome.from_message(outcome.message)
    assert parsed.cache_pressure == 91 and parsed.fixes == {"a": True}
    assert RestoreOutcome.from_message(RestoreOutcome(ok=True, postgres_version="15").message)
    assert (
        RestoreOutcome.from_message(RestoreOutcome(ok=True, postgres_version="15").message)
    ).cache_pressure is None
    assert "cachePressure" not in RestoreOutcome(ok=True, postgres_version="15").message
    # Not a number: ignored.
    assert RestoreOutcome.from_message('15\n{"cachePressure": true}').cache_pressure is None
    assert RestoreOutcome.from_message('15\n{"cachePressure": "9"}').cache_pressure is None
    assert RestoreOutcome.from_message('16\n{"cachePressure": 87}').cache_pressure == 87


def test_what_counts_as_pressure() -> None:
    done = RestoreWork(WorkState.SUCCEEDED, "j")
    pressed = RestoreOutcome(ok=True, postgres_version="15", cache_pressure=88).message
    calm = RestoreOutcome(ok=True, postgres_version="15").message
    assert cache_pressure(done, [calm]) is None
    assert cache_pressure(done, [calm, pressed]) == (
        "the restore Job found it 88% full and evicted the cache"
    )
    full = RestoreWork(WorkState.FAILED, "j", reason="InsufficientDisk: restore ran out of disk")
    assert cache_pressure(full, []) == "the restore ran out of disk space"
    other = RestoreWork(WorkState.FAILED, "j", reason="NotPostgres: no PG_VERSION")
    assert cache_pressure(other, [pressed]) is None
    assert cache_pressure(RestoreWork(WorkState.RUNNING, "j"), [pressed]) is None


# -- the operator's growth ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("current", "snapshot", "want"),
    [
        # Default max(10Gi, 20 % of the snapshot); the cap twice that.
        (10 * GIB, 10 * GIB, 11.5 * GIB),
        (10 * GIB, "10Gi", 11.5 * GIB),
        (18 * GIB, 10 * GIB, 20 * GIB),  # 20.7Gi capped
        (20 * GIB, 10 * GIB, None),  # at the cap
        (25 * GIB, 10 * GIB, None),  # past it (grown by hand): never shrunk
        (40 * GIB, 200 * GIB, 46 * GIB),
        (70 * GIB, 200 * GIB, 80 * GIB),
        (1, 0, 2),  # rounded up
    ],
)
def test_grown_cache_size(current: int, snapshot: str | int, want: float | None) -> None:
    assert grown_cache_size(current, snapshot) == (None if want is None else int(want))


def _world(storage: str, api: MemoryApi | None = None) -> tuple[MemoryApi, Any, dict[str, Any]]:
    api = api or MemoryApi()
    rs = restore("r-now", snapshot_size="10Gi")
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": kopia_cache_pvc_name(rs.replica_name), "namespace": rs.namespace},
        "spec": {"resources": {"requests": {"storage": storage}}},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": restore_job_name(rs.name), "namespace": rs.namespace},
        "spec": {"ttlSecondsAfterFinished": 120},
    }
    api.create(pvc)
    return api, rs, api.create(job)


def _storage(api: MemoryApi, rs: Any) -> int:
    pvc = api.get("PersistentVolumeClaim", rs.namespace, kopia_cache_pvc_name(rs.replica_name))
    assert pvc is not None
    return parse_quantity(pvc["spec"]["resources"]["requests"]["storage"])


def test_the_operator_grows_the_volume_once_per_job() -> None:
    api, rs, job = _world("10Gi")
    assert grow_cache_volume(cast(KubeApi, api), rs, job, "test") == int(11.5 * GIB)
    assert _storage(api, rs) == int(11.5 * GIB)
    held = api.get("Job", rs.namespace, restore_job_name(rs.name))
    assert held is not None
    assert held["metadata"]["annotations"][CACHE_PRESSURE_ANNOTATION] == "11776Mi"
    # The same Job seen again (the informer's copy now carries the mark): no second growth.
    assert grow_cache_volume(cast(KubeApi, api), rs, held, "test") is None
    assert _storage(api, rs) == int(11.5 * GIB)


def test_at_the_cap_the_job_is_marked_and_nothing_grows() -> None:
    api, rs, job = _world("20Gi")
    assert grow_cache_volume(cast(KubeApi, api), rs, job, "test") is None
    assert _storage(api, rs) == 20 * GIB
    held = api.get("Job", rs.namespace, restore_job_name(rs.name))
    assert held is not None
    assert held["metadata"]["annotations"][CACHE_PRESSURE_ANNOTATION] == "unchanged"


def test_errors_are_logged_only(caplog: pytest.LogCaptureFixture) -> None:
    api, rs, job = _world("10Gi")
    api.delete("PersistentVolumeClaim", rs.namespace, kopia_cache_pvc_name(rs.replica_name))
    assert (
        grow_cache_volume(cast(KubeApi, api), rs, job, "test") is None
    )  # no volume: nothing to grow

    class Refusing(MemoryApi):
        def merge_patch(self, kind: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            if kind == "PersistentVolumeClaim":
                raise RuntimeError("storage class does not allow volume expansion")
            return super().merge_patch(kind, *args, **kwargs)

    refusing, rs2, job2 = _world("10Gi", Refusing())
    with caplog.at_level("WARNING", logger="pgro.operator"):
        assert grow_cache_volume(cast(KubeApi, refusing), rs2, job2, "test") is None
    assert "the kopia cache volume was not grown" in caplog.text
    assert "volume expansion" in caplog.text
    assert _storage(refusing, rs2) == 10 * GIB


# -- the grow-only ratchet of the storage step (reference cache_size_needs_grow_ratchet) ----
@pytest.fixture
def operator() -> Iterator[Operator]:
    op = Operator(
        cast(KubeApi, MemoryApi()),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="pgro:test"),
        clock=Clock(),
    )
    try:
        yield op
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def test_the_storage_step_grows_the_cache_volume_and_never_shrinks_it(
    operator: Operator,
) -> None:
    api = cast(MemoryApi, operator.api)
    rep = replica_manifest("r", namespace="team-a", metadata={"uid": "u-r"})

    def prepare(snapshot_size: str) -> int:
        rs = PostgresPhysicalRestore.model_validate(
            restore_doc(
                f"r-{snapshot_size.lower()}",
                "r",
                namespace="team-a",
                metadata={"uid": "u"},
                snapshotSize=snapshot_size,
            )
        )
        operator.effects.prepare_restore_storage(rep, rs, PrepareRestoreStorage(rs.name))
        return _storage(api, rs)

    assert prepare("10Gi") == 10 * GIB  # created at max(10Gi, 20 %)
    assert prepare("100Gi") == 20 * GIB  # a larger snapshot's default: grown
    assert prepare("10Gi") == 20 * GIB  # a smaller one's: never shrunk
    assert prepare("50Gi") == 20 * GIB  # the same default: unchanged
    # Grown by hand (or by cache pressure) past the default: kept.
    pvc = api.get("PersistentVolumeClaim", "team-a", kopia_cache_pvc_name("r"))
    assert pvc is not None
    pvc["spec"]["resources"]["requests"]["storage"] = "64Gi"
    assert prepare("200Gi") == 64 * GIB
    assert prepare("500Gi") == 100 * GIB
