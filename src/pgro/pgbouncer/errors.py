"""Failures of the stable endpoint, each naming its cause and the fix. Never a password."""

from __future__ import annotations


class EndpointError(Exception):
    reason = "EndpointFailed"

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class PgBouncerMissing(EndpointError):
    reason = "PgBouncerMissing"


class EndpointPortInUse(EndpointError):
    reason = "EndpointPortInUse"


class EndpointStartFailed(EndpointError):
    reason = "EndpointStartFailed"


class EndpointReloadFailed(EndpointError):
    reason = "EndpointReloadFailed"


class InvalidEndpointConfig(EndpointError, ValueError):
    """A name, path or credential PgBouncer's file formats cannot carry."""

    reason = "InvalidEndpointConfig"
