"""Supervising each restore's PostgreSQL: start, provision users once, restart if it dies.

A server is our child (`PostgresServer`) or one an earlier `pgro run` left running, adopted
through its `postmaster.pid`, which pgro takes nothing from on trust (docs/run.md,
"Robustness"): a pid only when /proc confirms it, never its socket directory or port.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pgro.core.observations import Server, ServerState
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.locale_aliases import restore_locale_env
from pgro.postgres.server import Endpoint, PostgresServer
from pgro.processes import process_args, stop_postmaster_pid

# A server that keeps dying is a failed restore, not something to restart forever.
MAX_RESTARTS = 3


@dataclass(frozen=True)
class Postmaster:
    pid: int
    status: str


def is_postmaster_of(pid: int, pgdata: Path, account: RunAccount) -> bool:
    """`pid` is a live postgres postmaster on `pgdata` (its argv is `postgres -D <pgdata> …`,
    as pgro starts it) that runs as the run account."""
    args = process_args(pid)
    if not args or os.path.basename(args[0]) not in ("postgres", "postmaster"):
        return False
    try:
        d = args.index("-D")
    except ValueError:
        return False
    if d + 1 >= len(args) or os.path.abspath(args[d + 1]) != os.path.abspath(pgdata):
        return False
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return owner == account.uid


def running_postmaster(pgdata: Path, account: RunAccount) -> Postmaster | None:
    """The live postmaster on `pgdata` named by its postmaster.pid, verified against /proc
    (None if there is none, or the file names some other process)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
        status = lines[7].strip() if len(lines) > 7 else ""
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1 or not is_postmaster_of(pid, pgdata, account):
        return None
    return Postmaster(pid=pid, status=status)


def stop_postmaster(pid: int, pgdata: Path, account: RunAccount, timeout: float = 60.0) -> bool:
    """Stop a postmaster we did not start, if it still is the one on `pgdata`."""
    if not is_postmaster_of(pid, pgdata, account):
        return False
    stop_postmaster_pid(pid, timeout)
    return True


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
            # The private locales the restore worker built (in the restore's directory,
            # beside postgres.log), as its first start had them; none for a sound snapshot.
            env=restore_locale_env(self.log_path.parent),
        )
        self.child.spawn()

    def ensure(self) -> None:
        """Adopt a running server, or start one if none runs (and it has not failed)."""
        if self.failure or self.alive():
            return
        found = running_postmaster(self.pgdata, self.account)
        if found is not None:
            # It listens where pgro started it: the socket directory and port the runtime
            # remembered for this restore (this handle's), whatever postmaster.pid says.
            self.adopted_pid = found.pid
            # It served before pgro restarted; its roles were provisioned then.
            self.provisioned = found.status == "ready"
            return
        self._spawn()

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.running()
        return self.adopted_pid is not None and is_postmaster_of(
            self.adopted_pid, self.pgdata, self.account
        )

    def ready(self) -> bool:
        """Its postmaster.pid says ready, and names this handle's postmaster."""
        found = running_postmaster(self.pgdata, self.account)
        if found is None or found.status != "ready":
            return False
        expected = self.child.pid if self.child is not None else self.adopted_pid
        return found.pid == expected

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
        if not self.ready():
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
            stop_postmaster(self.adopted_pid, self.pgdata, self.account, timeout)
            self.adopted_pid = None
