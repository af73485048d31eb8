"""Reading a pgro object of either kind from a decoded manifest or API response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pgro.api.names import API_VERSION, REPLICA_KIND, RESTORE_KIND
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore

PgroObject = PostgresPhysicalReplica | PostgresPhysicalRestore

_KINDS: dict[str, type[PgroObject]] = {
    REPLICA_KIND: PostgresPhysicalReplica,
    RESTORE_KIND: PostgresPhysicalRestore,
}


def load_object(doc: Mapping[str, Any]) -> PgroObject:
    """The typed object for `doc`; `ValueError` (pydantic's `ValidationError` is one)
    when it is not a pgro object or does not validate."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"expected a mapping with apiVersion and kind, got {type(doc).__name__}")
    api_version = doc.get("apiVersion")
    kind = doc.get("kind")
    if api_version != API_VERSION:
        raise ValueError(
            f"unsupported apiVersion {api_version!r} (kind {kind!r}): expected {API_VERSION!r}"
        )
    model = _KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        expected = " or ".join(repr(k) for k in _KINDS)
        raise ValueError(f"unsupported kind {kind!r} for {API_VERSION}: expected {expected}")
    return model.model_validate(doc)
