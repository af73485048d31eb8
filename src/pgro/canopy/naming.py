"""Where a canopy replica lives and how it is labelled (reference/canopy-protocol.md §6.2).

Each worklist entry gets its own Namespace, `<slug(name)>-<hash>`, holding one
`PostgresPhysicalReplica` always named `canopy-replica`. The hash ties the Namespace to
the declaration and the machine, so two declarations with the same display name, or one
group-wide declaration expanded over several machines, never share a Namespace. These
names are the reference's, byte for byte: a cluster moved between the two operators keeps
its Namespaces.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final
from uuid import UUID

from pgro.api.names import (
    CANOPY_MANAGED_BY_VALUE,
    LABEL_CANOPY_APPLICATION_TYPE,
    LABEL_CANOPY_DECLARATION_ID,
    LABEL_CANOPY_GROUP,
    LABEL_CANOPY_INTENT,
    LABEL_CANOPY_MANAGED_BY,
    LABEL_CANOPY_SERVER,
    LABEL_CANOPY_TYPE,
)

REPLICA_NAME: Final = "canopy-replica"
"""The one replica CR in every canopy Namespace."""

MANAGED_SELECTOR: Final = f"{LABEL_CANOPY_MANAGED_BY}={CANOPY_MANAGED_BY_VALUE}"
"""The label selector that lists every Namespace the canopy syncer owns."""

SLUG_MAX: Final = 50
SLUG_FALLBACK: Final = "replica"
HASH_BYTES: Final = 4

_NOT_ALNUM: Final = re.compile(r"[^a-z0-9]+")
# A Kubernetes label value: at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
LABEL_VALUE_MAX: Final = 63


def slug(name: str) -> str:
    """`Nauru Prod Analytics!` → `nauru-prod-analytics`.

    ASCII letters and digits lower-cased; anything else (non-ASCII letters too) becomes
    `-`, runs collapsed, ends trimmed; empty becomes `replica`; cut to 50 characters and
    trimmed again.
    """
    ascii_lower = "".join(c.lower() if c.isascii() else "-" for c in name)
    text = _NOT_ALNUM.sub("-", ascii_lower).strip("-")
    if not text:
        return SLUG_FALLBACK
    return text[:SLUG_MAX].rstrip("-")


def name_hash(replica_id: UUID, server_id: UUID) -> str:
    """First 4 bytes, lower-case hex, of SHA-256 over the two UUIDs' 16 raw bytes each."""
    digest = hashlib.sha256(replica_id.bytes + server_id.bytes).digest()
    return digest[:HASH_BYTES].hex()


def namespace_name(name: str, replica_id: UUID, server_id: UUID) -> str:
    """`<slug(name)>-<hash>`: at most 59 characters, a valid Namespace name."""
    return f"{slug(name)}-{name_hash(replica_id, server_id)}"


def label_value_problem(value: str) -> str | None:
    """Why `value` cannot be a Kubernetes label value, or None if it can."""
    if len(value) > LABEL_VALUE_MAX:
        return f"is longer than {LABEL_VALUE_MAX} characters"
    if _LABEL_VALUE.fullmatch(value) is None:
        return (
            "must be letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    return None


def canopy_labels(
    *,
    replica_id: UUID,
    group_id: UUID,
    server_id: UUID,
    type: str,
    intent: str,
    application_type: str | None = None,
) -> dict[str, str]:
    """The labels on both the Namespace and the replica CR.

    The reporter reads the declaration, group and machine back from them, so they must
    survive unchanged. Raises ValueError when `type` or `intent` is not a valid label
    value (UUIDs always are).
    """
    for key, value in ((LABEL_CANOPY_TYPE, type), (LABEL_CANOPY_INTENT, intent)):
        problem = label_value_problem(value)
        if problem is not None:
            raise ValueError(f"label {key}={value!r} {problem}")
    labels = {
        LABEL_CANOPY_MANAGED_BY: CANOPY_MANAGED_BY_VALUE,
        LABEL_CANOPY_DECLARATION_ID: str(replica_id),
        LABEL_CANOPY_GROUP: str(group_id),
        LABEL_CANOPY_SERVER: str(server_id),
        LABEL_CANOPY_TYPE: type,
        LABEL_CANOPY_INTENT: intent,
    }
    # Only echoed in upgrade reports, where it is optional: a value that cannot be a
    # label is left out rather than refusing the entry.
    if application_type and label_value_problem(application_type) is None:
        labels[LABEL_CANOPY_APPLICATION_TYPE] = application_type
    return labels
