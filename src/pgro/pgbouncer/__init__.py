"""The stable endpoint of a replica in the embedded runtime: PgBouncer, rerouted at switchover."""

from pgro.pgbouncer.endpoint import StableEndpoint, find_pgbouncer, pgbouncer_pids
from pgro.pgbouncer.errors import (
    EndpointError,
    EndpointPortInUse,
    EndpointReloadFailed,
    EndpointStartFailed,
    InvalidEndpointConfig,
    PgBouncerMissing,
)

__all__ = [
    "EndpointError",
    "EndpointPortInUse",
    "EndpointReloadFailed",
    "EndpointStartFailed",
    "InvalidEndpointConfig",
    "PgBouncerMissing",
    "StableEndpoint",
    "find_pgbouncer",
    "pgbouncer_pids",
]
