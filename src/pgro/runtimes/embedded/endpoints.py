"""Each replica's stable endpoint in `pgro run`: PgBouncer on a port fixed per replica
(kept in the state database), routed to the serving restore's server, and its users."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pgro.api.replica import PostgresPhysicalReplica
from pgro.postgres.account import RunAccount
from pgro.postgres.server import Endpoint, free_port
from pgro.postgres.users import RoleCredentials
from pgro.runtimes.embedded.credentials import CredentialStore
from pgro.runtimes.embedded.state_dir import TRAVERSE, ensure_dirs
from pgro.runtimes.embedded.store import Store


class StableEndpoint(Protocol):
    """The replica's fixed address (PgBouncer in production; see pgro.pgbouncer)."""

    def route(self, backend: Endpoint | None, users: Mapping[str, str]) -> None: ...

    def stop(self) -> object: ...


EndpointFactory = Callable[[str, Path, RunAccount, int, str], StableEndpoint]


def _port_setting(key: str) -> str:
    return f"endpoint-port/{key}"


@dataclass
class _Routed:
    endpoint: StableEndpoint
    port: int
    routed: tuple[Any, ...] | None = None


@dataclass(eq=False)
class Endpoints:
    store: Store
    credentials: CredentialStore
    run_root: Path
    account: RunAccount
    listen_host: str
    factory: EndpointFactory
    _held: dict[str, _Routed] = field(default_factory=dict, init=False)

    def port(self, key: str) -> int | None:
        """The replica's port, once this run holds its endpoint."""
        held = self._held.get(key)
        return held.port if held is not None else None

    def users(self, replica: PostgresPhysicalReplica) -> dict[str, RoleCredentials]:
        """The analytics, extra and persistent users, with their passwords (made once):
        PgBouncer lets in those it knows."""
        names = [
            replica.spec.analytics_username,
            *(u.name for u in replica.spec.extra_users),
            *(u.name for u in replica.spec.persistent_users or ()),
        ]
        return {name: self.credentials.ensure(replica.key, name) for name in names}

    def hold(self, replica: PostgresPhysicalReplica) -> None:
        """Take the endpoint on (its port is chosen once and kept), without routing it."""
        self._endpoint(replica)

    def route(self, replica: PostgresPhysicalReplica, backend: Endpoint | None) -> None:
        """New connections go to `backend` (None: refused), as the replica's users."""
        held = self._endpoint(replica)
        users = {name: c.password for name, c in self.users(replica).items()}
        wanted = (backend, tuple(sorted(users.items())))
        if held.routed == wanted:
            return
        held.endpoint.route(backend, users)
        held.routed = wanted

    def stop(self, key: str) -> None:
        """Stop the replica's PgBouncer: this run's, or one an earlier run left serving."""
        held = self._held.pop(key, None) or self._adopted(key)
        if held is not None:
            held.endpoint.stop()

    def stop_all(self) -> None:
        for held in self._held.values():
            held.endpoint.stop()

    def _endpoint(self, replica: PostgresPhysicalReplica) -> _Routed:
        held = self._held.get(replica.key)
        if held is not None:
            return held
        setting = _port_setting(replica.key)
        stored = self.store.setting(setting)
        port = int(stored) if stored else free_port(self.listen_host)
        if not stored:
            self.store.set_setting(setting, str(port))
        ensure_dirs(self.run_root, ("endpoints", replica.namespace), TRAVERSE)
        held = self._held[replica.key] = self._make(replica.key, port)
        return held

    def _make(self, key: str, port: int) -> _Routed:
        run_dir = self.run_root / "endpoints" / key  # namespace/name
        return _Routed(self.factory(key, run_dir, self.account, port, self.listen_host), port)

    def _adopted(self, key: str) -> _Routed | None:
        """The endpoint of a replica this run never routed (it left the manifest while pgro
        was stopped, its PgBouncer kept serving): built from its recorded port and run
        directory, so stopping it finds the PgBouncer through its pidfile."""
        stored = self.store.setting(_port_setting(key))
        name = key.partition("/")[2]
        if not stored or not name or not (self.run_root / "endpoints" / key).is_dir():
            return None
        return self._make(key, int(stored))
