"""How large a restore's data volume is, from the snapshot and the replica's limits."""

from __future__ import annotations

from typing import Final

from pgro.api.quantity import format_quantity

GIB: Final = 1024**3
PERSISTENT_SCHEMA_HEADROOM: Final = 5 * GIB


class StorageLimitExceeded(ValueError):
    """The size the snapshot needs is above `storageSizeMaximum`."""

    reason = "StorageLimitExceeded"

    def __init__(self, computed: int, maximum: int) -> None:
        super().__init__(
            f"Computed PVC size ({format_quantity(computed)}) exceeds storageSizeMaximum "
            f"({format_quantity(maximum)}); raise storageSizeMaximum or restore a smaller "
            "snapshot"
        )
        self.computed = computed
        self.maximum = maximum


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def restore_storage_size(
    snapshot_bytes: int,
    *,
    maximum: int,
    floor: int | None = None,
    persistent_schemas: bool = False,
    persistent_schema_data_size: int | None = None,
) -> int:
    """The data volume size in bytes.

    Without persistent schemas: snapshot × 1.1. With them (the list is set, even empty):
    snapshot + max(10 % of snapshot, measured persistent data) + 5 GiB, room for the
    schemas carried over from the previous restore. Only the snapshot-derived size above
    `maximum` is an error; `floor` (`storageSizeOverride`) then raises the size, and a
    floor above the maximum is clamped to it (contradictory settings, not an error).
    """
    tenth = _ceil_div(snapshot_bytes, 10)
    if persistent_schemas:
        computed = (
            snapshot_bytes
            + max(tenth, persistent_schema_data_size or 0)
            + PERSISTENT_SCHEMA_HEADROOM
        )
    else:
        computed = snapshot_bytes + tenth
    if computed > maximum:
        raise StorageLimitExceeded(computed, maximum)
    if floor is not None:
        computed = max(computed, min(floor, maximum))
    return computed
