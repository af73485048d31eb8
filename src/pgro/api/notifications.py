"""Notification targets (`spec.notifications[]`) and their outcomes (`status.notifications[]`).

A target's URL is often the secret itself (Slack, Teams, Discord and Google Chat webhooks
carry their token in the path; others put `user:password@` in it), so a target is *named*
without it: `target_name` keeps the method, the scheme, host and port, and a short
fingerprint that tells two targets on one host apart. That name is the status `name`, the
metric label and what pgro logs; the URL itself is used only to send.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field

from pgro.api.base import ApiModel
from pgro.api.names import LABEL_PREFIX, LABEL_TRUE
from pgro.api.references import SecretKeySelector
from pgro.api.timestamp import Timestamp

# The operator reads a Secret named by a header's `secretKeyRef` only when the Secret
# carries this label with value "true": write access to a replica must not be read access
# to every Secret in its namespace (the operator would send the value to any URL).
LABEL_NOTIFICATION_SECRET: Final = f"{LABEL_PREFIX}notification-secret"
NOTIFICATION_SECRET_OPT_IN: Final = f"{LABEL_NOTIFICATION_SECRET}={LABEL_TRUE}"

FINGERPRINT_HEX: Final = 8


def url_origin(url: str) -> str:
    """`scheme://host[:port]` of `url`, lower-cased; no user information, path, query or
    fragment. `<invalid URL>` when it has no scheme and host."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "<invalid URL>"
    host = parts.netloc.rpartition("@")[2].lower()
    if not parts.scheme or not host or any(c.isspace() or c in '\\<>"' for c in host):
        return "<invalid URL>"
    return f"{parts.scheme.lower()}://{host}"


def url_fingerprint(url: str) -> str:
    """A short, stable hash of `url`, so two targets on one host get different names.

    The password of `user:password@` is left out of the hash: a short hash of a guessable
    password could be confirmed offline. Path and query tokens (webhook URLs) are random
    and long, so their hash reveals nothing usable.
    """
    try:
        parts = urlsplit(url.strip())
        userinfo, at, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        keyed = parts._replace(netloc=f"{user}{at}{host}").geturl()
    except ValueError:
        keyed = url
    return hashlib.sha256(keyed.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]


def target_name(kind: str, url: str) -> str:
    """`KIND scheme://host[:port] #fingerprint`: names a target without its secrets."""
    return f"{kind} {url_origin(url)} #{url_fingerprint(url)}"


class SecretHeaderValue(ApiModel):
    """A header whose value is read from a Secret when the notification is sent."""

    secret_key_ref: SecretKeySelector


HeaderValue = str | SecretHeaderValue


class WebhookNotification(ApiModel):
    target: Literal["webhook"] = "webhook"
    url: str
    method: str = "POST"
    headers: dict[str, HeaderValue] | None = None
    include_password: bool = False

    @property
    def effective_method(self) -> Literal["POST", "PUT"]:
        """PUT is honoured; anything else is sent as POST, as the reference does."""
        return "PUT" if self.method.strip().upper() == "PUT" else "POST"

    @property
    def display_name(self) -> str:
        """The status `name`, metric label and log name; the method as written, like the
        reference, but the URL reduced to what is not secret (see `target_name`)."""
        return target_name(self.method, self.url)


class GraphQLNotification(ApiModel):
    target: Literal["graphQL"] = "graphQL"
    url: str
    mutation: str
    variables_template: str
    headers: dict[str, HeaderValue] | None = None
    include_password: bool = False

    @property
    def display_name(self) -> str:
        return target_name("GraphQL", self.url)


_TARGETS = {"webhook": "webhook", "graphql": "graphQL"}


def _canonical_target(value: object) -> object:
    # `graphQL` is the wire spelling; people write `graphql` too, and a notification
    # silently rejected over letter case would be a poor trade.
    if isinstance(value, dict) and isinstance(value.get("target"), str):
        canonical = _TARGETS.get(value["target"].lower())
        if canonical is not None:
            return {**value, "target": canonical}
    return value


NotificationConfig = Annotated[
    WebhookNotification | GraphQLNotification,
    Field(discriminator="target"),
    BeforeValidator(_canonical_target),
]


class NotificationStatus(ApiModel):
    name: str
    last_sent_at: Timestamp | None = None
    success: bool = False
    last_error: str | None = None
