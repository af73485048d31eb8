"""Notification targets (`spec.notifications[]`) and their outcomes (`status.notifications[]`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from pgro.api.base import ApiModel
from pgro.api.references import SecretKeySelector
from pgro.api.timestamp import Timestamp


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
        """The status `name` and metric label; the method as written, like the reference."""
        return f"{self.method} {self.url}"


class GraphQLNotification(ApiModel):
    target: Literal["graphQL"] = "graphQL"
    url: str
    mutation: str
    variables_template: str
    headers: dict[str, HeaderValue] | None = None
    include_password: bool = False

    @property
    def display_name(self) -> str:
        return f"GraphQL {self.url}"


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
