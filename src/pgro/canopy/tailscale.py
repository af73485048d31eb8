"""The canopy `url` semantic: the tailnet address of an exposed analytics replica.

An analytics replica declared with `expose` has the Service annotations
`tailscale.com/expose: "true"` and `tailscale.com/hostname: H`, and the Tailscale
operator publishes it as `H.<tailnet's MagicDNS suffix>`. Its verification reports then
carry `health_details.url = https://H.<suffix>`, which canopy shows next to the report.

The suffix is read from tailscaled's LocalAPI (`GET /localapi/v0/status`,
`CurrentTailnet.MagicDNSSuffix`) over the unix socket the operator pod's Tailscale
sidecar shares through an `emptyDir` (`PGRO_TAILSCALED_SOCKET`, default
`/var/run/tailscale/tailscaled.sock`; empty disables). The LocalAPI allows reads over its
socket to any peer, so the operator needs only access to the file. The request's host is
`local-tailscaled.sock`, the `Host` header LocalAPI expects; it is never resolved.

Best effort, as the reference's `tailscale.rs`: no socket, an error, a non-2xx answer, a
body that is not the expected JSON or an empty suffix omits the url (a debug line), and
the report goes without it. The suffix is fixed per tailnet, so the first success is
kept; a failure is tried again at the next report.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Final

import httpx

from pgro.api.replica import PostgresPhysicalReplica
from pgro.canopy.materialise import EXPOSE_ANNOTATION, HOSTNAME_ANNOTATION

log = logging.getLogger("pgro.canopy.tailscale")

SOCKET_ENV: Final = "PGRO_TAILSCALED_SOCKET"
DEFAULT_SOCKET: Final = "/var/run/tailscale/tailscaled.sock"
LOCALAPI_HOST: Final = "local-tailscaled.sock"
STATUS_PATH: Final = "/localapi/v0/status"
TIMEOUT: Final = httpx.Timeout(5.0)


def socket_from_env(env: Mapping[str, str]) -> str | None:
    """`PGRO_TAILSCALED_SOCKET`: unset is the default path, empty (or blank) disables."""
    raw = env.get(SOCKET_ENV)
    if raw is None:
        return DEFAULT_SOCKET
    return raw.strip() or None


def suffix_from_status(body: bytes) -> str | None:
    """`CurrentTailnet.MagicDNSSuffix` of a LocalAPI status body; None unless it is a
    non-empty string."""
    try:
        status = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    tailnet = status.get("CurrentTailnet") if isinstance(status, dict) else None
    suffix = tailnet.get("MagicDNSSuffix") if isinstance(tailnet, dict) else None
    if not isinstance(suffix, str):
        return None
    # A leading dot is tolerated (the reference's test); so is a trailing one.
    return suffix.strip().strip(".") or None


def magic_dns_suffix(socket_path: str, *, timeout: httpx.Timeout = TIMEOUT) -> str | None:
    """The tailnet's MagicDNS suffix from tailscaled's LocalAPI on `socket_path`, or None
    (with a debug line saying why)."""
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=socket_path), timeout=timeout, trust_env=False
        ) as client:
            response = client.get(f"http://{LOCALAPI_HOST}{STATUS_PATH}")
    except (httpx.HTTPError, OSError) as exc:
        log.debug("tailscaled LocalAPI on %s not reachable: %s", socket_path, exc)
        return None
    if not 200 <= response.status_code < 300:
        log.debug("tailscaled LocalAPI on %s answered HTTP %d", socket_path, response.status_code)
        return None
    suffix = suffix_from_status(response.content)
    if suffix is None:
        log.debug(
            "tailscaled LocalAPI on %s: the status has no CurrentTailnet.MagicDNSSuffix",
            socket_path,
        )
    return suffix


def replica_url(hostname: str, suffix: str) -> str:
    """`https://<hostname>.<suffix>`, the suffix without a leading (or trailing) dot."""
    return f"https://{hostname}.{suffix.strip('.')}"


def exposed_hostname(replica: PostgresPhysicalReplica) -> str | None:
    """The tailnet hostname of a replica exposed through its Service annotations, or None
    when it is not exposed."""
    annotations = replica.spec.service_annotations or {}
    if annotations.get(EXPOSE_ANNOTATION) != "true":
        return None
    hostname = (annotations.get(HOSTNAME_ANNOTATION) or "").strip()
    return hostname or None


class TailnetUrls:
    """Replica → its tailnet URL, reading the suffix once (kept after the first success).

    Called from the courier's delivery threads, hence the lock; a report of a replica
    that is not exposed never touches the socket.
    """

    def __init__(self, socket_path: str, *, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.socket_path = socket_path
        self._timeout = timeout
        self._suffix: str | None = None
        self._lock = threading.Lock()

    def suffix(self) -> str | None:
        with self._lock:
            if self._suffix is None:
                self._suffix = magic_dns_suffix(self.socket_path, timeout=self._timeout)
            return self._suffix

    def url_for(self, replica: PostgresPhysicalReplica) -> str | None:
        hostname = exposed_hostname(replica)
        if hostname is None:
            return None
        suffix = self.suffix()
        if suffix is None:
            log.debug("%s: no MagicDNS suffix, its report goes without a url", replica.key)
            return None
        return replica_url(hostname, suffix)
