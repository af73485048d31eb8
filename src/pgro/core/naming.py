"""Names of the restores a replica creates."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Final

from pgro.api.meta import MAX_NAME_LENGTH

_STAMP_FORMAT: Final = "%Y%m%d-%H%M%S"


def restore_name(replica: str, now: datetime, taken: Collection[str]) -> str:
    """`<replica>-<YYYYMMDD-HHMMSS>` (UTC), with `-2`, `-3`, … when that name is taken.

    The reference used the timestamp alone, so two restores created in the same second
    collided. A name taken by an object the caller has not observed yet still fails to
    create; that failure is the safe outcome (the next pass sees the restore and does not
    create a second one). The replica part is shortened when needed so the result is a
    valid name (63 characters at most).
    """
    stamp = now.astimezone(UTC).strftime(_STAMP_FORMAT)
    suffix_number = 1
    while True:
        suffix = f"-{stamp}" + (f"-{suffix_number}" if suffix_number > 1 else "")
        prefix = replica[: MAX_NAME_LENGTH - len(suffix)].rstrip("-")
        candidate = f"{prefix}{suffix}"
        if candidate not in taken:
            return candidate
        suffix_number += 1
