"""Resource sizing of a restore's pods (reference restore-pipeline.md §2.6, §3.1, §4.4)."""

from __future__ import annotations

from typing import Any

import pytest

from pgro.api.replica import PostgresPhysicalReplicaSpec
from pgro.core.pod_sizing import (
    KopiaCacheCaps,
    kopia_cache_caps,
    kopia_cache_size,
    postgres_resources,
    restore_job_resources,
    shm_size_mib,
)

MIB = 1024**2
GIB = 1024**3


def spec(**fields: Any) -> PostgresPhysicalReplicaSpec:
    return PostgresPhysicalReplicaSpec.model_validate(
        {"kopiaSecretRef": {"name": "kopia"}, "schedule": "0 3 * * *", **fields}
    )


# ---------------------------------------------------------------------- restore Job


@pytest.mark.parametrize(
    ("snapshot", "memory"),
    [
        (GIB, "4096Mi"),  # 10 % is below the 4Gi floor
        ("40Gi", "4096Mi"),
        ("50Gi", "5120Mi"),
        (100 * GIB + 1, "10241Mi"),  # ceiled to whole Mi
        ("160Gi", "16384Mi"),
        ("2Ti", "16384Mi"),  # capped at 16Gi
        (0, "4096Mi"),
    ],
)
def test_restore_job_memory_limit(snapshot: str | int, memory: str) -> None:
    assert restore_job_resources(snapshot) == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": memory},
    }


def test_restore_job_unparsable_size_gives_4gi() -> None:
    assert restore_job_resources("lots")["limits"]["memory"] == "4096Mi"


# ---------------------------------------------------------------------- postgres resources


def test_no_resources_without_resources_or_floor() -> None:
    assert postgres_resources(spec(), "100Gi") is None


def test_explicit_resources_verbatim() -> None:
    explicit = {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"memory": "3Gi"}}
    assert (
        postgres_resources(
            spec(resources=explicit, resourcesFloor={"limits": {"memory": "8Gi"}}), "1Ti"
        )
        == explicit
    )


FLOOR = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


@pytest.mark.parametrize(
    ("snapshot", "maximum", "memory"),
    [
        ("10Gi", None, "4096Mi"),  # 1Gi of data is below the floor's 4Gi limit
        ("100Gi", None, "10240Mi"),
        (100 * GIB + 1, None, "10241Mi"),
        ("1Ti", None, "65536Mi"),  # default cap 64Gi
        ("1Ti", "32Gi", "32768Mi"),
        ("10Gi", "2Gi", "2048Mi"),  # a cap below the floor wins
    ],
)
def test_floor_scales_memory_with_snapshot(
    snapshot: str | int, maximum: str | None, memory: str
) -> None:
    resolved = postgres_resources(spec(resourcesFloor=FLOOR, resourcesMaximum=maximum), snapshot)
    assert resolved == {
        "requests": {"cpu": "250m", "memory": memory},
        "limits": {"cpu": "2", "memory": memory},
    }


def test_floor_without_cpu_limit_gives_none() -> None:
    resolved = postgres_resources(
        spec(resourcesFloor={"requests": {"cpu": "1"}, "limits": {"memory": "2Gi"}}), "100Gi"
    )
    assert resolved == {
        "requests": {"cpu": "1", "memory": "10240Mi"},
        "limits": {"memory": "10240Mi"},
    }


def test_floor_without_memory_limit_uses_zero_floor() -> None:
    resolved = postgres_resources(spec(resourcesFloor={"requests": {"cpu": "1"}}), "5Gi")
    assert resolved == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}


def test_floor_verbatim_when_snapshot_size_unparsable() -> None:
    assert postgres_resources(spec(resourcesFloor=FLOOR), "huge") == FLOOR


# ---------------------------------------------------------------------- shm / shared_buffers


@pytest.mark.parametrize(
    ("resources", "shm", "shared_buffers"),
    [
        # The reference's table (§4.4.3).
        (None, 369, 258),
        ({"requests": {"memory": "2Gi"}}, 738, 516),
        ({"requests": {"memory": "2Gi"}, "limits": {"memory": "4Gi"}}, 1024, 716),
        ({"requests": {"memory": "4Gi"}, "limits": {"memory": "8Gi"}}, 2048, 1433),
        # request = limit reduces to 36 % of memory.
        ({"requests": {"memory": "10Gi"}, "limits": {"memory": "10Gi"}}, 3687, 2580),
        # No request: 1Gi is assumed; the limit still caps shm at half of it.
        ({"limits": {"memory": "512Mi"}}, 256, 179),
        ({"requests": {"memory": "junk"}}, 369, 258),
        # Never below 16 MiB.
        ({"requests": {"memory": "32Mi"}, "limits": {"memory": "32Mi"}}, 16, 11),
    ],
)
def test_shm_and_shared_buffers(
    resources: dict[str, Any] | None, shm: int, shared_buffers: int
) -> None:
    assert shm_size_mib(resources, None) == (shm, shared_buffers)


def test_shm_floor_raises_shm_and_scales_shared_buffers() -> None:
    # 369 MiB computed, floor 1Gi: shared_buffers = floor(258 × 1024 / 369) = 715.
    assert shm_size_mib(None, "1Gi") == (1024, 715)


def test_shm_floor_below_computed_is_ignored() -> None:
    assert shm_size_mib(None, "100Mi") == (369, 258)


def test_shm_floor_unparsable_is_ignored() -> None:
    assert shm_size_mib(None, "big") == (369, 258)


def test_shm_floor_ceiled_to_mib() -> None:
    assert shm_size_mib(None, 400 * MIB + 1)[0] == 401


# ---------------------------------------------------------------------- kopia cache


@pytest.mark.parametrize(
    ("snapshot", "size"),
    [
        (GIB, 10 * GIB),
        ("50Gi", 10 * GIB),
        ("100Gi", 20 * GIB),
        (5, 10 * GIB),
        (100 * GIB + 3, 20 * GIB + 1),  # ceiled to a whole byte
        ("unparsable", 10 * GIB),
    ],
)
def test_kopia_cache_size(snapshot: str | int, size: int) -> None:
    assert kopia_cache_size(snapshot) == size


@pytest.mark.parametrize(
    ("snapshot", "content"),
    [
        ("10Gi", 7168),  # 10Gi cache: 10240 - 3072
        ("100Gi", 14336),  # 20Gi cache: 20480 - 6144
        ("500Gi", 71680),  # 100Gi cache: 102400 - 30720
    ],
)
def test_kopia_cache_caps(snapshot: str, content: int) -> None:
    assert kopia_cache_caps(snapshot) == KopiaCacheCaps(content_mb=content, metadata_mb=512)
