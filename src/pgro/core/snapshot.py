"""Kopia snapshots as `kopia snapshot list --json --all` describes them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

_EXCERPT: Final = 200


class SnapshotListParseError(ValueError):
    """The snapshot list is not what kopia writes; the message says what was wrong."""


@dataclass(frozen=True)
class SnapshotSource:
    host: str
    user_name: str
    # Kept exactly as kopia reports it, backslashes included; selection normalises.
    path: str


@dataclass(frozen=True)
class Snapshot:
    id: str
    description: str
    source: SnapshotSource
    # User tags carry kopia's `tag:` prefix (`tag:env`), as kopia stores them.
    tags: Mapping[str, str] = field(hash=False)
    # Kopia's RFC 3339 text as written (nanosecond fractions of varying length).
    start_time: str
    size_bytes: int


def _excerpt(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _EXCERPT else f"{text[:_EXCERPT]}… ({len(text)} characters)"


def _text(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    return value if isinstance(value, str) else ""


def _size(entry: Mapping[str, Any]) -> int:
    # `stats.totalSize` is what kopia 0.22 fills; `rootEntry.summ.size` covers manifests
    # without stats. A wrong-typed value counts as absent: the size only sizes the PVC,
    # and the reference falls back to 0 too.
    stats = entry.get("stats")
    total = stats.get("totalSize") if isinstance(stats, dict) else None
    for value in (total, _root_size(entry)):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def _root_size(entry: Mapping[str, Any]) -> object:
    root = entry.get("rootEntry")
    summary = root.get("summ") if isinstance(root, dict) else None
    return summary.get("size") if isinstance(summary, dict) else None


def _parse_entry(index: int, entry: object) -> Snapshot:
    if not isinstance(entry, dict):
        raise SnapshotListParseError(
            f"snapshot list entry {index} is not an object: {_excerpt(entry)}"
        )
    snapshot_id = entry.get("id")
    if not isinstance(snapshot_id, str) or not snapshot_id:
        raise SnapshotListParseError(
            f"snapshot list entry {index} has no string 'id': {_excerpt(entry)}"
        )
    source = entry.get("source")
    source = source if isinstance(source, dict) else {}
    tags = entry.get("tags")
    tags = tags if isinstance(tags, dict) else {}
    return Snapshot(
        id=snapshot_id,
        description=_text(entry, "description"),
        source=SnapshotSource(
            host=_text(source, "host"),
            user_name=_text(source, "userName"),
            path=_text(source, "path"),
        ),
        tags=MappingProxyType({str(k): str(v) for k, v in tags.items()}),
        start_time=_text(entry, "startTime"),
        size_bytes=_size(entry),
    )


def parse_snapshot_list(payload: str | bytes | list[Any]) -> list[Snapshot]:
    """The snapshots in kopia's JSON list, in the order kopia gave them."""
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SnapshotListParseError(
                f"snapshot list is not UTF-8 ({error}): {payload[:_EXCERPT]!r}"
            ) from None
    if isinstance(payload, str):
        try:
            decoded: object = json.loads(payload)
        except json.JSONDecodeError as error:
            raise SnapshotListParseError(
                f"snapshot list is not valid JSON ({error}): {_excerpt(payload)!r}"
            ) from None
    else:
        decoded = payload
    if not isinstance(decoded, list):
        raise SnapshotListParseError(
            f"snapshot list is not a JSON array but {type(decoded).__name__}: {_excerpt(decoded)}"
        )
    return [_parse_entry(index, entry) for index, entry in enumerate(decoded)]


_KOPIA_TIME: Final = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})"
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def start_time_ns(text: str) -> int | None:
    """Nanoseconds since the epoch for kopia's `startTime`, or None if it is not RFC 3339.

    Kopia trims trailing zeros from the fraction (`…:05Z`, `…:05.4Z`, `…:05.458139381Z`),
    so its strings do not sort as times; datetime alone would drop the last three digits.
    """
    match = _KOPIA_TIME.fullmatch(text.strip())
    if match is None:
        return None
    offset = match["offset"].upper()
    try:
        whole = datetime.fromisoformat(
            f"{match['date']}T{match['time']}{'+00:00' if offset == 'Z' else offset}"
        )
    except ValueError:
        return None
    seconds = (whole - _EPOCH) // timedelta(seconds=1)
    nanos = int((match["fraction"] or "").ljust(9, "0")[:9])
    return seconds * 1_000_000_000 + nanos
