"""References from one object to another, as Kubernetes spells them."""

from __future__ import annotations

from pgro.api.base import ApiModel


class LocalObjectReference(ApiModel):
    """An object in the same namespace, by name."""

    name: str


class SecretReference(ApiModel):
    """A Secret. The reference reads it from the replica's own namespace whatever
    `namespace` says, and so does pgro; the field is kept so manifests round-trip."""

    name: str
    namespace: str | None = None


class SecretKeySelector(ApiModel):
    """One key of a Secret in the same namespace."""

    name: str
    key: str
