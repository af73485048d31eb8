"""The events.k8s.io Event the operator records about a replica."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from pgro.api.names import RESTORE_KIND
from pgro.core.plan import EmitEvent

EVENT_REPORTER: Final = "postgres-restore-operator"
NOTE_LIMIT: Final = 1024  # the API server refuses longer notes


def event_document(
    regarding: Mapping[str, Any], event: EmitEvent, *, instance: str, now: datetime
) -> dict[str, Any]:
    """`event` about `regarding`: a replica in wire form (it may not validate, as for
    InvalidSpec); `event.related` names one of its restores."""
    meta = regarding.get("metadata", {})
    ns = meta.get("namespace", "default")
    ref = {
        "apiVersion": regarding.get("apiVersion"),
        "kind": regarding.get("kind"),
        "name": meta.get("name"),
        "namespace": ns,
        "uid": meta.get("uid"),
    }
    doc: dict[str, Any] = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        # A unique name per occurrence: the name of the object and a random suffix.
        "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": ns},
        "eventTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": EVENT_REPORTER,
        "reportingInstance": instance,
        "action": "Restore",
        "reason": event.reason,
        "note": event.note[:NOTE_LIMIT],
        "type": str(event.type),
        "regarding": {k: v for k, v in ref.items() if v},
    }
    if event.related:
        doc["related"] = {
            "apiVersion": regarding.get("apiVersion"),
            "kind": RESTORE_KIND,
            "name": event.related,
            "namespace": ns,
        }
    return doc
