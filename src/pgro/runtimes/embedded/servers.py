"""Supervising each restore's PostgreSQL: start, provision users once, restart if it dies.

A server either is our child (`PostgresServer`) or was left running by an earlier `pgro run`
(a crash, or `--keep-serving`) and is adopted through its `postmaster.pid`, so a restart of
pgro never starts a second server on the same data directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pgro.core.observations import Server, ServerState
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.server import Endpoint, PostgresServer
from pgro.processes import is_alive, stop_postmaster_pid

# A server that keeps dying is a failed restore, not something to restart forever.
MAX_RESTARTS = 3


@dataclass(frozen=True)
class Postmaster:
    pid: int
    port: int
    socket_dir: Path
    status: str


def running_postmaster(pgdata: Path) -> Postmaster | None:
    """The live postmaster on `pgdata`, from its postmaster.pid (None if there is none)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        found = Postmaster(
            pid=int(lines[0]),
            port=int(lines[3]),
            socket_dir=Path(lines[4].strip()),
            status=lines[7].strip() if len(lines) > 7 else "",
        )
    except (OSError, ValueError, IndexError):
        return None
    return found if is_alive(found.pid) else None


@dataclass
class ServerHandle:
    """One restore's server as the runtime sees it."""

    pgdata: Path
    socket_dir: Path
    port: int
    log_path: Path
    binaries: PostgresBinaries
    account: RunAccount
    provision: Callable[[Endpoint], None]
    child: PostgresServer | None = None
    adopted_pid: int | None = None
    provisioned: bool = False
    restarts: int = 0
    failure: str = ""

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(socket_dir=self.socket_dir, port=self.port)

    def _spawn(self) -> None:
        self.child = PostgresServer(
            self.pgdata,
            self.binaries,
            self.account,
            socket_dir=self.socket_dir,
            log_path=self.log_path,
            port=self.port,
        )
        self.child.spawn()

    def ensure(self) -> None:
        """Adopt a running server, or start one if none runs (and it has not failed)."""
        if self.failure or self.alive():
            return
        found = running_postmaster(self.pgdata)
        if found is not None:
            # Reach it where it listens: its socket directory may differ from the one this
            # handle would have chosen (a fresh one in /tmp when the path is too long).
            if found.socket_dir != self.socket_dir and self.socket_dir.name.startswith(
                "pgro-sock-"
            ):
                # The fresh /tmp directory chosen for a start that is not needed after all.
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.adopted_pid, self.port, self.socket_dir = found.pid, found.port, found.socket_dir
            # It served before pgro restarted; its roles were provisioned then.
            self.provisioned = found.status == "ready"
            return
        self._spawn()

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.running()
        return self.adopted_pid is not None and is_alive(self.adopted_pid)

    def _ready(self) -> bool:
        found = running_postmaster(self.pgdata)
        return found is not None and found.status == "ready"

    def observe(self) -> Server:
        if self.failure:
            return Server(ServerState.FAILED, self.failure)
        if not self.alive():
            if self.child is None and self.adopted_pid is None:
                return Server(ServerState.NOT_READY)
            if self.restarts >= MAX_RESTARTS:
                tail = self.child.log_tail(5) if self.child else ""
                self.failure = f"PostgreSQL exited {self.restarts + 1} times. Log: {tail}"
                return Server(ServerState.FAILED, self.failure)
            self.restarts += 1
            self.child, self.adopted_pid, self.provisioned = None, None, False
            self._spawn()
            return Server(ServerState.NOT_READY)
        if not self._ready():
            return Server(ServerState.NOT_READY)
        if not self.provisioned:
            try:
                self.provision(self.endpoint)
            except Exception as exc:
                self.failure = f"provisioning the login roles failed: {exc}"
                return Server(ServerState.FAILED, self.failure)
            self.provisioned = True
        return Server(ServerState.READY)

    def stop(self, timeout: float = 60.0) -> None:
        if self.child is not None:
            self.child.stop(timeout)
            self.child = None
        elif self.adopted_pid is not None:
            stop_postmaster_pid(self.adopted_pid, timeout)
            self.adopted_pid = None
