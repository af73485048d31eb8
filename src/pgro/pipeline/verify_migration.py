"""The upgrade rehearsal of `pgro verify --migrate-to` (features §2.2, issue 14).

After the health check passed, the user's migrator command runs against the verified
restore's own server, and what it did is read back from the database: the same steps as the
shared `AppMigration` (`pgro.pipeline.app_migration`), in one pass and without a "started"
marker, since nothing outlives a verification:

1. the replica's analytics role is (re)created as a LOGIN role that is never a superuser,
   with a fresh random password (`pgro.postgres.users.provision_users`: a restored role of
   that name that is a superuser is demoted);
2. the baseline (`max(logged_at)` of `logs.migrations`), so only the batch this run writes is
   reported;
3. `preMigrateDropSchemas` dropped (the refused ones become notes), the size before;
4. the application's objects handed to the analytics role (DDL needs their owner);
5. the command: split like a shell would, run without one as the run account (never root),
   with `/` as its working directory and a minimal environment plus
   `core.app_migration.migrator_env`; its output goes to `<workdir>/migrate.log` and, line by
   line with secrets masked and row-quoting lines redacted, to the observer;
6. the newest batch after the baseline, the size after, shaped by `core.app_migration.result`
   (a failed run carries only its redacted error).

Ctrl-C, SIGTERM and `cancel` stop the command's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pgro.api.migration import MigrationResult
from pgro.api.replica import PostgresPhysicalReplica
from pgro.core import app_migration as decide
from pgro.core.app_migration import Batch, Run
from pgro.core.observations import WorkState
from pgro.pipeline.events import Observer
from pgro.pipeline.migrator_command import (
    MigratorCommand,
    MigratorCommandError,
    command_environment,
)
from pgro.postgres import app_migration as sql
from pgro.postgres.account import RunAccount
from pgro.postgres.schema_migration import Conninfo, main_database
from pgro.postgres.server import Endpoint
from pgro.postgres.users import RoleCredentials, generate_password, provision_users
from pgro.processes import spawn

LOG: Final = "migrate.log"
# A stopped command gets SIGTERM, then SIGKILL after this long.
STOP_GRACE_S: Final = 10.0
_POLL_S: Final = 0.2


class MigrationNotRun(Exception):
    """The rehearsal could not run (the snapshot itself was verified): exit 2."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class MigrationCancelled(Exception):
    """`cancel` was set while the migrator ran; it was stopped."""

    reason = "Cancelled"


@dataclass(frozen=True)
class MigrationRehearsal:
    """What `--migrate-to VERSION [--migrate-to-id ID] --migrator CMD` asked for."""

    argv: tuple[str, ...]
    version: str
    version_id: str = ""

    @classmethod
    def parse(cls, command: str, version: str, version_id: str = "") -> MigrationRehearsal:
        if not version.strip():
            raise MigratorCommandError("--migrate-to is empty: give the target version")
        return cls(MigratorCommand.parse(command).argv, version.strip(), version_id.strip())

    @property
    def program(self) -> str:
        return self.argv[0]


def check_migrator(rehearsal: MigrationRehearsal, account: RunAccount) -> Path:
    """The program the command runs, checked before anything is restored: it exists and the
    run account may execute it. Raises MigrationNotRun("MigratorNotExecutable")."""
    try:
        return MigratorCommand(rehearsal.argv).check(account)
    except MigratorCommandError as exc:
        raise MigrationNotRun("MigratorNotExecutable", str(exc)) from None


@dataclass
class MigrationOutcome:
    """What the rehearsal did: the shaped result, its target, notes for the report."""

    result: MigrationResult
    version: str
    version_id: str
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.result.passed

    def to_json(self) -> dict[str, Any]:
        """The report's `migration` object: `status.migrationResult`'s shape plus the target."""
        return {**self.result.to_wire(), "version": self.version, "versionId": self.version_id}


def _measured_by_migrator(batch: Batch | None) -> bool:
    """Whether the batch carries the migrator's own size before (`preSnapshot`)."""
    pre = (batch.stats or {}).get("preSnapshot") if batch is not None else None
    if not isinstance(pre, Mapping):
        return False
    value = pre.get("databaseSizeBytes")
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and value.strip().isdigit()


def _environment(
    rehearsal: MigrationRehearsal,
    account: RunAccount,
    endpoint: Endpoint,
    database: str,
    credentials: RoleCredentials,
) -> dict[str, str]:
    return command_environment(
        account,
        endpoint,
        database=database,
        username=credentials.username,
        password=credentials.password,
        version=rehearsal.version,
        version_id=rehearsal.version_id,
    )


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, SIGKILL after the grace period."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Whatever the leader left behind in its group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _pump(stream: Any, log_path: Path, lines: queue.SimpleQueue[str | None]) -> None:
    """Copy the command's output to the log, handing each line on; None at the end."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    fd = os.open(log_path, flags, 0o600)
    try:
        for raw in iter(stream.readline, b""):
            os.write(fd, raw)
            lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    finally:
        os.close(fd)
        lines.put(None)


def _log_tail(path: Path, secrets: Sequence[str]) -> str:
    try:
        text = path.read_bytes()[-(2**20) :].decode(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-decide.LOG_TAIL_LINES :])
    return decide.scrub(tail, secrets)


def _run_command(
    rehearsal: MigrationRehearsal,
    env: Mapping[str, str],
    account: RunAccount,
    log_path: Path,
    observer: Observer,
    secrets: Sequence[str],
    cancel: threading.Event | None,
) -> int:
    """Run the command to its end; its exit code (negative: the signal that ended it)."""
    try:
        proc: subprocess.Popen[bytes] = spawn(
            list(rehearsal.argv),
            # Its children die with pgro only if it passes the signal on; the server it
            # talks to is tied to pgro, so a migrator left behind has nothing to reach.
            death_signal=signal.SIGKILL,
            env=dict(env),
            # The run account may not reach pgro's working directory.
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **account.popen_kwargs(),
        )
    except OSError as exc:
        raise MigrationNotRun(
            "MigratorNotStarted",
            f"the migrator {rehearsal.program!r} could not be started as {account.name}: "
            f"{exc.strerror or type(exc).__name__}",
        ) from None
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    pump = threading.Thread(
        target=_pump, args=(proc.stdout, log_path, lines), daemon=True, name="migrator-output"
    )
    pump.start()
    try:
        while True:
            try:
                line = lines.get(timeout=_POLL_S)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    raise MigrationCancelled("the migration was cancelled") from None
                if proc.poll() is not None:
                    # Exited; a child it left holding the output must not hold pgro.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                continue
            if line is None:
                break
            shown = decide.redact_log(decide.scrub(line, secrets))
            if shown:
                observer.note(f"migrate: {shown}")
        return proc.wait()
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        pump.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def rehearse_migration(
    rehearsal: MigrationRehearsal,
    *,
    replica: PostgresPhysicalReplica,
    endpoint: Endpoint,
    superuser: str,
    account: RunAccount,
    workdir: Path,
    observer: Observer,
    secrets: Sequence[str] = (),
    cancel: threading.Event | None = None,
) -> MigrationOutcome:
    """Run the migration on the verified server (the steps in the module docstring).

    A migrator that fails is a result (`passed` False), not an exception. Raises
    MigrationNotRun when the rehearsal could not be prepared or the command not started,
    MigrationCancelled when `cancel` was set."""
    conninfo: Conninfo = lambda dbname: endpoint.conninfo(dbname, superuser)  # noqa: E731
    credentials = RoleCredentials(replica.spec.analytics_username, generate_password())
    masked = [credentials.password, *secrets]
    notes: list[str] = []
    observer.step(
        "migrate",
        f"rehearsing the upgrade to {rehearsal.version}: provisioning "
        f"{credentials.username} (never a superuser), handing it the application's objects",
    )
    try:
        provision_users(
            conninfo,
            analytics=credentials,
            extra_users=[],
            read_only=False,
            bootstrap_superuser=superuser,
        )
        database = main_database(conninfo)
        baseline = sql.latest_batch_at(conninfo, database)
        droppable, refused = decide.split_droppable(replica.spec.pre_migrate_drop_schemas)
        if refused:
            notes.append(decide.refused_note(refused))
        if droppable:
            dropped = sql.drop_schemas(conninfo, database, droppable)
            if dropped:
                notes.append(
                    f"dropped {', '.join(dropped)} before migrating (preMigrateDropSchemas)"
                )
        before = sql.database_size(conninfo, database)
        sql.hand_over(conninfo, database, credentials.username)
    except sql.HandOverRefused as exc:
        raise MigrationNotRun("MigrationNotPrepared", decide.scrub(str(exc), masked)) from None
    for note in notes:
        observer.note(note)

    observer.step(
        "migrate",
        f"running the migrator as {account.name} against database {database}: "
        f"{shlex.join(rehearsal.argv)}",
    )
    log_path = workdir / LOG
    env = _environment(rehearsal, account, endpoint, database, credentials)
    code = _run_command(rehearsal, env, account, log_path, observer, masked, cancel)
    state = WorkState.SUCCEEDED if code == 0 else WorkState.FAILED
    if code != 0:
        ended = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        observer.note(f"the migrator ended with {ended}")

    batch = sql.read_batch(conninfo, database, baseline)
    after = sql.database_size(conninfo, database)
    shaped = decide.result(batch, after, Run(state, _log_tail(log_path, masked)))
    if not _measured_by_migrator(batch):
        # pgro measured it just before the hand-over: better than "unchanged".
        shaped = shaped.model_copy(update={"data_bytes_before": before})
    if shaped.error is not None:
        shaped = shaped.model_copy(update={"error": decide.scrub(shaped.error, masked)})
    return MigrationOutcome(shaped, rehearsal.version, rehearsal.version_id, notes)
