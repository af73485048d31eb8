"""What `pgro operator` reads from its environment once, at start-up."""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pgro.runtimes.kubernetes.config import DEFAULT_READY_TIMEOUT_SECS, parse_postgres_log_level

DEFAULT_OPERATOR_NAMESPACE: Final = "postgres-restore-operator"
DEFAULT_METRICS_ADDR: Final = "[::]:8080"
IMAGE_REPOSITORY: Final = "ghcr.io/beyondessential/pgro"
_ADDR: Final = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<host>[^\[\]:]+)):(?P<port>\d{1,5})")


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator reads from its environment once, at startup."""

    ready_timeout_floor_secs: int
    namespace: str
    metrics_host: str
    metrics_port: int
    pgro_image: str
    # `PGRO_LOG_LEVEL`, validated: the restored servers' `log_min_messages`.
    postgres_log_level: str | None = None
    # `POD_NAME`: the operator's own pod, annotated with its version at start.
    pod_name: str | None = None


def pgro_version() -> str:
    try:
        return importlib.metadata.version("pgro")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def default_pgro_image() -> str:
    return f"{IMAGE_REPOSITORY}:{pgro_version()}"


def parse_listen_addr(raw: str) -> tuple[str, int] | None:
    """`[::]:8080` → ("::", 8080); `0.0.0.0:9090` → ("0.0.0.0", 9090); None if malformed."""
    match = _ADDR.fullmatch(raw.strip())
    if match is None:
        return None
    port = int(match["port"])
    if port > 65535:
        return None
    return match["v6"] or match["host"], port


def parse_operator_settings(
    env: Mapping[str, str], *, serviceaccount_namespace: str | None = None
) -> tuple[OperatorSettings, list[str]]:
    """Settings from the environment (`os.environ`); `serviceaccount_namespace` is the
    content of the pod's service-account namespace file, if it could be read."""
    warnings: list[str] = []
    raw_timeout = env.get("DEPLOYMENT_READY_TIMEOUT_SECS")
    timeout = DEFAULT_READY_TIMEOUT_SECS
    if raw_timeout is not None:
        if raw_timeout.strip().isdigit():
            timeout = int(raw_timeout.strip())
        else:
            warnings.append(
                f"DEPLOYMENT_READY_TIMEOUT_SECS: invalid value {raw_timeout!r} (expected whole "
                f"seconds); using {DEFAULT_READY_TIMEOUT_SECS}"
            )
    namespace = (
        (env.get("OPERATOR_NAMESPACE") or "").strip()
        or (serviceaccount_namespace or "").strip()
        or DEFAULT_OPERATOR_NAMESPACE
    )
    raw_addr = env.get("METRICS_ADDR") or DEFAULT_METRICS_ADDR
    addr = parse_listen_addr(raw_addr)
    if addr is None:
        warnings.append(
            f"METRICS_ADDR: invalid value {raw_addr!r} (expected host:port, e.g. "
            f"{DEFAULT_METRICS_ADDR}); using {DEFAULT_METRICS_ADDR}"
        )
        addr = parse_listen_addr(DEFAULT_METRICS_ADDR)
        assert addr is not None
    image = (env.get("PGRO_IMAGE") or "").strip() or default_pgro_image()
    log_level, log_level_warnings = parse_postgres_log_level(env.get("PGRO_LOG_LEVEL"))
    warnings += log_level_warnings
    settings = OperatorSettings(
        ready_timeout_floor_secs=timeout,
        namespace=namespace,
        metrics_host=addr[0],
        metrics_port=addr[1],
        pgro_image=image,
        postgres_log_level=log_level,
        pod_name=(env.get("POD_NAME") or "").strip() or None,
    )
    return settings, warnings
