"""Which header Secrets a notification round may read: only those that opt in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pgro.api.notifications import (
    LABEL_NOTIFICATION_SECRET,
    NOTIFICATION_SECRET_OPT_IN,
    NotificationConfig,
    SecretHeaderValue,
)

NOTIFICATION_SECRET_REFUSED: Final = "NotificationSecretRefused"  # noqa: S105 - an event reason


@dataclass(frozen=True)
class NotificationSecrets:
    """The header Secrets a notification round may use, and those it may not (with why)."""

    found: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    missing: dict[tuple[str, str], str] = field(default_factory=dict)

    def unavailable(self) -> dict[tuple[str, str], str]:
        return {**self.missing, **self.refused}


def notification_secrets(
    namespace: str,
    targets: Iterable[NotificationConfig],
    get_secret: Callable[[str, str], Mapping[str, Any] | None],
) -> NotificationSecrets:
    """Read the Secrets named by the targets' header `secretKeyRef`s, in the replica's
    namespace, but use only those labelled `pgro.bes.au/notification-secret: "true"`.

    The operator may read every Secret in the cluster and sends a header's value to a URL
    the replica's author chose: without the opt-in, write access to a replica would be
    read access to every Secret in its namespace (a confused deputy).
    """
    out = NotificationSecrets()
    for target in targets:
        for value in (target.headers or {}).values():
            if not isinstance(value, SecretHeaderValue):
                continue
            name = value.secret_key_ref.name
            key = (namespace, name)
            if key in out.found or key in out.refused or key in out.missing:
                continue
            doc = get_secret(namespace, name)
            if doc is None:
                out.missing[key] = (
                    f"Secret {namespace}/{name} not found; create it (labelled "
                    f"{NOTIFICATION_SECRET_OPT_IN}) or fix the header's secretKeyRef"
                )
            elif (doc.get("metadata", {}).get("labels") or {}).get(
                LABEL_NOTIFICATION_SECRET
            ) != "true":
                out.refused[key] = (
                    f"Secret {namespace}/{name} is not labelled {NOTIFICATION_SECRET_OPT_IN}, "
                    "so the operator does not read it for notifications (editing a replica "
                    "must not expose every Secret in the namespace); if it is meant for "
                    f"notification headers, run: kubectl label secret -n {namespace} {name} "
                    f"{LABEL_NOTIFICATION_SECRET}=true"
                )
            else:
                out.found[key] = doc
    return out
