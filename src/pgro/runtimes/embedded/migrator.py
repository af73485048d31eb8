"""The application migration in `pgro run` (`migrateTo`, features §2.2): the user's
`--migrator` command, run against one restore's own server.

The shared step (`pgro.pipeline.app_migration.AppMigration`) decides; `LocalMigrator` is how
it starts and sees the command. The command does not run as pgro's child but under a small
runner (`pgro.runtimes.embedded.migrator_runner`) in its own session, so a migration that
takes hours outlives a pgro crash or restart, as a Job outlives the operator:

    RUN/restores/<ns>/<restore>/migrate/   0700, pgro's own
        run.json     written before the runner starts: the only "started" marker
        runner.pid   the runner's pid, to see it again after pgro restarted
        status.json  written by the runner when the command exited (its exit code)
        migrate.log  the command's output

A `run.json` without `status.json` and without a live runner means the runner died with the
machine or was killed: the migration ended without an exit code and counts as failed; the
result is still read from the database. The command is never started a second time.

The command runs as the run account (never root), without a shell, with the reference Job's
environment pointing at the restore's socket directory (`core.app_migration.migrator_env`).
Its password reaches it through the runner's stdin, never a file or an argument.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from pgro.api.names import migrate_job_name
from pgro.api.restore import PostgresPhysicalRestore
from pgro.clock import utcnow
from pgro.core.app_migration import LOG_TAIL_LINES, Run, scrub
from pgro.core.observations import WorkState
from pgro.pipeline.app_migration import Migrator
from pgro.pipeline.migrator_command import MigratorCommand, command_environment
from pgro.postgres.account import RunAccount
from pgro.postgres.schema_migration import Conninfo
from pgro.postgres.server import Endpoint
from pgro.processes import process_args, read_pid, stop, stop_pid

log = logging.getLogger("pgro.run")

DIRECTORY: Final = "migrate"
RUN_RECORD: Final = "run.json"
STATUS: Final = "status.json"
PIDFILE: Final = "runner.pid"
LOG: Final = "migrate.log"
RUNNER_MODULE: Final = "pgro.runtimes.embedded.migrator_runner"
# The bootstrap superuser every other SQL step of pgro run uses on a restore's server.
ADMIN_USER: Final = "postgres"
# A runner asked to stop forwards it to the command and waits this long before SIGKILL.
STOP_GRACE_S: Final = 30.0


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically, 0600, never through a link."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of the command's output (at most 1 MiB read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 2**20))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def runner_pid(directory: Path) -> int | None:
    """The runner's pid while it still runs (by its pidfile, confirmed through /proc)."""
    pid = read_pid(directory / PIDFILE)
    args = process_args(pid) if pid is not None else None
    return pid if args is not None and RUNNER_MODULE in args else None


@dataclass
class Runners:
    """The runners this pgro run started (its children: waited for, so none is left a
    zombie that /proc would show as running)."""

    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def running(self, key: str) -> bool | None:
        """True/False for a runner this run started; None if it started none for `key`."""
        child = self.children.get(key)
        return None if child is None else child.poll() is None

    def exited(self) -> list[str]:
        """Keys whose runner exited since the last look (the restore's pass reads it now)."""
        done = [k for k, c in self.children.items() if c.poll() is not None]
        for key in done:
            del self.children[key]
        return done

    def stop(self, key: str, directory: Path) -> None:
        """Stop the runner of `key` (it stops its command first and records the exit)."""
        child = self.children.pop(key, None)
        if child is not None:
            stop(child, STOP_GRACE_S + 5)
            return
        pid = runner_pid(directory / DIRECTORY)
        if pid is not None:
            stop_pid(pid, STOP_GRACE_S + 5)

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for child in self.children.values():
            stop(child, STOP_GRACE_S + 5)
        self.children.clear()


@dataclass(eq=False)
class LocalMigrator(Migrator):
    """The `--migrator` command of one restore."""

    command: MigratorCommand
    restore: PostgresPhysicalRestore
    restore_dir: Path
    endpoint: Endpoint
    account: RunAccount
    username: str
    password: str = field(repr=False)
    runners: Runners
    clock: Callable[[], datetime] = utcnow

    @property
    def name(self) -> str:
        return migrate_job_name(self.restore.name)

    @property
    def directory(self) -> Path:
        return self.restore_dir / DIRECTORY

    @property
    def _key(self) -> str:
        return f"{self.restore.namespace}/{self.restore.name}"

    def conninfo_for(self) -> Conninfo:
        endpoint = self.endpoint
        return lambda dbname: endpoint.conninfo(dbname, ADMIN_USER)

    def start(self, *, database: str) -> None:
        target = self.restore.spec.migrate_to
        if target is None:
            raise RuntimeError(f"restore {self.restore.name} has no migrateTo")
        mdir = self.directory
        mdir.mkdir(mode=0o700, exist_ok=True)
        if (mdir / RUN_RECORD).exists():
            return  # started before: never twice
        started = self.clock()
        write_json(
            mdir / RUN_RECORD,
            {
                "command": list(self.command.argv),
                "version": target.version,
                "versionId": target.version_id,
                "database": database,
                "startedAt": started.isoformat(),
            },
        )
        env = command_environment(
            self.account,
            self.endpoint,
            database=database,
            username=self.username,
            password=self.password,
            version=target.version,
            version_id=target.version_id,
        )
        spec = {
            "argv": list(self.command.argv),
            "env": env,
            "account": None
            if self.account.is_current_user
            else {"uid": self.account.uid, "gid": self.account.gid},
            "grace": STOP_GRACE_S,
        }
        child = subprocess.Popen(
            [sys.executable, "-m", RUNNER_MODULE, str(mdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C or a signal to pgro's group does not reach it.
            start_new_session=True,
        )
        (mdir / PIDFILE).write_text(str(child.pid))
        self.runners.children[self._key] = child
        assert child.stdin is not None
        child.stdin.write(json.dumps(spec).encode())
        child.stdin.close()
        log.info(
            "restore %s: migrator started (%s, migrations of %s on database %s)",
            self._key,
            self.command.argv[0],
            target.version,
            database,
        )

    def observe(self) -> Run:
        mdir = self.directory
        status = read_json(mdir / STATUS)
        if status is not None:
            code = status.get("returncode")
            ok = code == 0 and not status.get("stopped")
            return Run(WorkState.SUCCEEDED if ok else WorkState.FAILED, self._tail(status))
        if not (mdir / RUN_RECORD).exists():
            return Run(WorkState.NOT_STARTED)
        ours = self.runners.running(self._key)
        if ours or (ours is None and runner_pid(mdir) is not None):
            return Run(WorkState.RUNNING)
        # The runner records the exit before it exits: read again before calling it lost.
        status = read_json(mdir / STATUS)
        if status is not None:
            return self.observe()
        note = (
            "pgro run lost the migrator's runner before it recorded an exit code (the "
            "machine or the runner stopped while it ran); the result is what the database "
            "shows"
        )
        return Run(WorkState.FAILED, self._tail({}) + "\n" + note)

    def _tail(self, status: Mapping[str, Any]) -> str:
        tail = log_tail(self.directory / LOG)
        if status.get("stopped"):
            tail += "\nthe migrator was stopped by pgro run before it finished"
        return scrub(tail, [self.password])
