"""How long a restored server may take to become ready."""

from __future__ import annotations

from datetime import timedelta

GIB = 1024**3
BASE_READY_TIMEOUT_S = 1800
PER_100_GIB_S = 900


def readiness_timeout(
    snapshot_bytes: int,
    explicit: timedelta | None = None,
    floor_s: int = BASE_READY_TIMEOUT_S,
) -> timedelta:
    """`deploymentReadyTimeout` if set, else 30 min + 15 min per 100 GiB, never below the floor.

    Large data directories replay WAL for a long time, so the allowance grows with size
    (reference restore-pipeline.md §5.3; linear, as the reference's rounding is unknown).
    """
    if explicit is not None:
        return explicit
    derived = BASE_READY_TIMEOUT_S + PER_100_GIB_S * snapshot_bytes / (100 * GIB)
    return timedelta(seconds=max(float(floor_s), derived))
