"""Resource sizing for the pods of a restore (reference restore-pipeline.md §2.6, §3.1, §4.4).

All arithmetic is exact (integers and fractions) so the documented examples come out to
the MiB. The readiness timeout lives in `pgro.core.timeouts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from math import ceil, floor
from typing import Any, Final, NamedTuple

from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplicaSpec

MIB: Final = 1024**2
GIB: Final = 1024**3

RESTORE_JOB_REQUESTS: Final = {"cpu": "500m", "memory": "1Gi"}
RESTORE_JOB_CPU_LIMIT: Final = "2"
RESTORE_JOB_MEMORY_MIN: Final = 4 * GIB
RESTORE_JOB_MEMORY_MAX: Final = 16 * GIB

DEFAULT_RESOURCES_MAXIMUM: Final = 64 * GIB

DEFAULT_SHM_REQUEST: Final = GIB
SHM_MIN_MIB: Final = 16
SHM_SHARE: Final = Fraction(36, 100)
SHARED_BUFFERS_SHARE: Final = Fraction(70, 100)
SHARED_BUFFERS_MIN_MB: Final = 16

KOPIA_CACHE_MIN: Final = 10 * GIB
KOPIA_CACHE_SHARE: Final = Fraction(20, 100)
KOPIA_METADATA_CACHE_MB: Final = 512
KOPIA_CONTENT_CACHE_MIN_MB: Final = 1024
KOPIA_CACHE_RESERVE_MIN_MB: Final = 2048
KOPIA_CACHE_RESERVE_SHARE: Final = Fraction(30, 100)


class KopiaCacheCaps(NamedTuple):
    content_mb: int
    metadata_mb: int


def _bytes(value: object) -> int | None:
    """A quantity in bytes, or None when absent or unparsable."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        return parse_quantity(value)
    except ValueError:
        return None


def _ceil_mib(n: Fraction | int) -> int:
    return ceil(Fraction(n) / MIB)


def _memory_limit_mib(snapshot_bytes: int, low: int, high: int) -> int:
    """clamp(10 % of the snapshot, low, high), ceiled to whole MiB."""
    tenth = Fraction(snapshot_bytes, 10)
    return _ceil_mib(min(max(tenth, Fraction(low)), Fraction(high)))


def restore_job_resources(snapshot_size: str | int) -> dict[str, Any]:
    """The restore container's resources: memory grows with the snapshot (kopia's index)."""
    snapshot_bytes = _bytes(snapshot_size)
    limit_mib = (
        _memory_limit_mib(snapshot_bytes, RESTORE_JOB_MEMORY_MIN, RESTORE_JOB_MEMORY_MAX)
        if snapshot_bytes is not None
        else RESTORE_JOB_MEMORY_MIN // MIB
    )
    return {
        "requests": dict(RESTORE_JOB_REQUESTS),
        "limits": {"cpu": RESTORE_JOB_CPU_LIMIT, "memory": f"{limit_mib}Mi"},
    }


def _section(resources: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    section = (resources or {}).get(name)
    return section if isinstance(section, Mapping) else {}


def postgres_resources(
    spec: PostgresPhysicalReplicaSpec, snapshot_size: str | int
) -> dict[str, Any] | None:
    """The postgres container's resources (`resolve_postgres_resources`, §4.4.1).

    `spec.resources` verbatim; else, with `resourcesFloor`, memory scaled to 10 % of the
    snapshot between the floor's memory limit and `resourcesMaximum` (request = limit, so
    memory is Guaranteed), CPU copied from the floor; else nothing.
    """
    if spec.resources is not None:
        return dict(spec.resources)
    floor_spec = spec.resources_floor
    if floor_spec is None:
        return None
    snapshot_bytes = _bytes(snapshot_size)
    if snapshot_bytes is None:
        return dict(floor_spec)
    cap = _bytes(spec.resources_maximum) or DEFAULT_RESOURCES_MAXIMUM
    floor_limits = _section(floor_spec, "limits")
    floor_requests = _section(floor_spec, "requests")
    floor_memory = _bytes(floor_limits.get("memory")) or 0
    memory = f"{_memory_limit_mib(snapshot_bytes, min(floor_memory, cap), cap)}Mi"
    requests: dict[str, Any] = {"memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    # CPU does not scale with data; a floor without a CPU limit yields none.
    if "cpu" in floor_requests:
        requests["cpu"] = floor_requests["cpu"]
    if "cpu" in floor_limits:
        limits["cpu"] = floor_limits["cpu"]
    return {"requests": requests, "limits": limits}


def shm_size_mib(
    resources: Mapping[str, Any] | None, shm_floor: str | int | None = None
) -> tuple[int, int]:
    """(/dev/shm size in MiB, `shared_buffers` in MB) for the postgres container (§4.4.2-4).

    shm is memory-backed and counts against the container's memory, hence the cap at half
    the limit. PostgreSQL's `MB` is 1024², so MiB is the right unit for shared_buffers.
    """
    request = _bytes(_section(resources, "requests").get("memory")) or DEFAULT_SHM_REQUEST
    limit = _bytes(_section(resources, "limits").get("memory"))
    shm = min(Fraction(request, 2), SHM_SHARE * max(request, limit or 0))
    if limit is not None:
        shm = min(shm, Fraction(limit, 2))
    shm_mib = max(SHM_MIN_MIB, _ceil_mib(shm))
    shared_buffers = floor(SHARED_BUFFERS_SHARE * shm_mib)
    floor_bytes = _bytes(shm_floor)
    if floor_bytes is not None:
        floor_mib = _ceil_mib(floor_bytes)
        if floor_mib > shm_mib:
            shared_buffers = max(
                SHARED_BUFFERS_MIN_MB, floor(Fraction(shared_buffers * floor_mib, shm_mib))
            )
            shm_mib = floor_mib
    return shm_mib, shared_buffers


def kopia_cache_size(snapshot_size: str | int) -> int:
    """Bytes for the replica's kopia cache PVC: max(10Gi, 20 % of the snapshot)."""
    snapshot_bytes = _bytes(snapshot_size)
    if snapshot_bytes is None:
        return KOPIA_CACHE_MIN
    return max(KOPIA_CACHE_MIN, ceil(KOPIA_CACHE_SHARE * snapshot_bytes))


def kopia_cache_caps(snapshot_size: str | int) -> KopiaCacheCaps:
    """Kopia's cache caps, from the default cache size for this snapshot (not the PVC's
    current, possibly grown, size): the content cache leaves 30 % (at least 2 GiB) of
    the volume free for kopia's logs and metadata."""
    pvc_mb = kopia_cache_size(snapshot_size) // MIB
    reserve = max(KOPIA_CACHE_RESERVE_MIN_MB, floor(KOPIA_CACHE_RESERVE_SHARE * pvc_mb))
    content = max(KOPIA_CONTENT_CACHE_MIN_MB, pvc_mb - reserve)
    return KopiaCacheCaps(content_mb=content, metadata_mb=KOPIA_METADATA_CACHE_MB)
