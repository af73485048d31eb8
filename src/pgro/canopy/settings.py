"""The operator's canopy settings, from its environment (pure: no I/O).

`settings_from_env` reads the reference's variables plus pgro's own; the operator
(`runtimes/kubernetes/canopy.py`) runs the syncer and the broker with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from pgro.canopy.client import DEFAULT_SOCKS5_PROXY, TAILNET_URL, plain_http_problem
from pgro.canopy.syncer import DEFAULT_INTERVAL, DEFAULT_REMOVAL_GRACE
from pgro.canopy.tailscale import DEFAULT_SOCKET, socket_from_env

DEFAULT_BROKER_PORT: Final = 9091
DEFAULT_SERVICE_NAME: Final = "postgres-restore-operator"
INSECURE_HTTP_ENV: Final = "CANOPY_INSECURE_HTTP"


@dataclass(frozen=True)
class CanopySettings:
    base_url: str
    namespace: str
    tailnet_url: str | None = TAILNET_URL
    socks5_proxy: str | None = DEFAULT_SOCKS5_PROXY
    device_cert_secret: str | None = None
    broker_host: str = "::"
    broker_port: int = DEFAULT_BROKER_PORT
    broker_base_url: str | None = None
    s3_endpoint: str | None = None
    interval: timedelta = DEFAULT_INTERVAL
    removal_grace: timedelta = DEFAULT_REMOVAL_GRACE
    service_name: str = DEFAULT_SERVICE_NAME
    # tailscaled's LocalAPI socket, for the `url` semantic (canopy.tailscale); None: off.
    tailscaled_socket: str | None = DEFAULT_SOCKET

    @property
    def broker_key_secret(self) -> str:
        """The Secret (in the operator's namespace) holding the broker's token key."""
        return f"{self.service_name}-broker-key"

    @property
    def sidecar_base_url(self) -> str:
        """Where restore pods reach the broker and post their callbacks."""
        if self.broker_base_url:
            return self.broker_base_url.rstrip("/")
        return f"http://{self.service_name}.{self.namespace}.svc:{self.broker_port}"


def _seconds(env: Mapping[str, str], name: str, default: timedelta, warn: list[str]) -> timedelta:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        warn.append(f"{name}={raw!r} is not a number of seconds; using {default}")
        return default
    return timedelta(seconds=value)


def settings_from_env(
    env: Mapping[str, str], namespace: str
) -> tuple[CanopySettings | None, list[str]]:
    """The reference's environment (`CANOPY_BASE_URL`, `CANOPY_SOCKS5_PROXY`,
    `CANOPY_DEVICE_CERT_SECRET`, `PGRO_BROKER_LISTEN_ADDR`, `CANOPY_BROKER_BASE_URL`,
    `CANOPY_RECONCILE_INTERVAL_SECS`) plus pgro's `PGRO_S3_ENDPOINT`,
    `CANOPY_TAILNET_URL` (empty: never probe the tailnet), `CANOPY_REMOVAL_GRACE_SECS`,
    `OPERATOR_SERVICE_NAME` (the Service sidecars reach the broker through) and the
    reference's `PGRO_TAILSCALED_SOCKET` (empty: no `url` in reports). None: canopy is
    off."""
    warnings: list[str] = []
    base = env.get("CANOPY_BASE_URL", "").strip()
    if not base:
        return None, warnings
    if not base.startswith(("http://", "https://")):
        warnings.append(f"CANOPY_BASE_URL={base!r} is not an http(s) URL; canopy is off")
        return None, warnings
    insecure = env.get(INSECURE_HTTP_ENV, "").strip().lower() in ("1", "true", "yes")
    problem = plain_http_problem(base, allowed=insecure, flag=f"{INSECURE_HTTP_ENV}=true")
    if problem is not None:
        raise ValueError(problem)
    host, port = "::", DEFAULT_BROKER_PORT
    listen = env.get("PGRO_BROKER_LISTEN_ADDR", "").strip()
    if listen:
        h, sep, p = listen.rpartition(":")
        if not sep or not p.isdigit():
            warnings.append(f"PGRO_BROKER_LISTEN_ADDR={listen!r} is not HOST:PORT; using [::]:9091")
        else:
            host, port = h.strip("[]") or "::", int(p)
    tailnet = env.get("CANOPY_TAILNET_URL")
    socks = env.get("CANOPY_SOCKS5_PROXY")
    settings = CanopySettings(
        base_url=base,
        namespace=namespace,
        tailnet_url=TAILNET_URL if tailnet is None else (tailnet.strip() or None),
        socks5_proxy=DEFAULT_SOCKS5_PROXY if socks is None else (socks.strip() or None),
        device_cert_secret=env.get("CANOPY_DEVICE_CERT_SECRET", "").strip() or None,
        broker_host=host,
        broker_port=port,
        broker_base_url=env.get("CANOPY_BROKER_BASE_URL", "").strip() or None,
        s3_endpoint=env.get("PGRO_S3_ENDPOINT", "").strip() or None,
        interval=_seconds(env, "CANOPY_RECONCILE_INTERVAL_SECS", DEFAULT_INTERVAL, warnings),
        removal_grace=_seconds(env, "CANOPY_REMOVAL_GRACE_SECS", DEFAULT_REMOVAL_GRACE, warnings),
        service_name=env.get("OPERATOR_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
        tailscaled_socket=socket_from_env(env),
    )
    return settings, warnings
