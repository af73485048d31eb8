"""Object metadata, the part of `metadata` that pgro reads or writes."""

from __future__ import annotations

import re
from typing import Any, Final

from pydantic import Field, ValidationInfo, field_validator

from pgro.api.base import ApiModel
from pgro.api.timestamp import Timestamp

_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_NAME_LENGTH: Final = 63


def dns1123_label_problem(value: str) -> str | None:
    """Why `value` cannot name a Service, Deployment or namespace, or None if it can."""
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters (it has {len(value)})"
    if _DNS1123_LABEL.fullmatch(value) is None:
        return (
            "must consist of lower-case letters, digits and '-', and start and end with a "
            "letter or digit (e.g. 'analytics-replica')"
        )
    return None


class ObjectMeta(ApiModel):
    # Names are DNS-1123 labels, not the looser subdomains Kubernetes allows for custom
    # resources: a replica's name becomes its Service's, a restore's its Deployment's.
    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: Timestamp | None = None
    deletion_timestamp: Timestamp | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # None, not []: an empty list in a merge patch would drop every owner or finalizer.
    owner_references: list[dict[str, Any]] | None = None
    finalizers: list[str] | None = None

    @field_validator("name", "namespace")
    @classmethod
    def _kubernetes_name(cls, value: str, info: ValidationInfo) -> str:
        problem = dns1123_label_problem(value)
        if problem is not None:
            raise ValueError(f"metadata.{info.field_name} {value!r} is not a valid name: {problem}")
        return value

    @property
    def is_deleting(self) -> bool:
        return self.deletion_timestamp is not None
