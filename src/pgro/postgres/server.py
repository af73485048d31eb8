"""Running a PostgreSQL server on a restored data directory: start, wait, stop.

The server is a direct child (not daemonised through pg_ctl) so its lifetime is tied to
ours and the embedded runtime can supervise it. It listens on a private port and socket
directory; readiness is read from `postmaster.pid`, the same signal `pg_ctl -w` uses.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO

from pgro.interrupts import deferred_interrupts
from pgro.postgres.account import RunAccount
from pgro.postgres.backup_label import (
    BackupLabel,
    missing_wal_message,
    pending_backup_recovery,
    read_backup_label,
    wal_segments,
)
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.config import (
    configured_value,
    forced_arguments,
    forced_settings,
    safe_preload_libraries,
)
from pgro.processes import POSTMASTER_THEN, run_tied, service_death_signal, spawn, stop

# Startup failures that mean the WAL needed for crash recovery is missing or torn (an
# online-backup snapshot taken without its trailing WAL). `pg_resetwal -f` brings such a
# cluster up at the price of consistency (reference restore-pipeline.md §4.3 step 11).
WAL_FAILURE_SIGNATURES = (
    "WAL ends before end of online backup",
    "invalid record length at",
    "database system was interrupted while in recovery",
    "could not locate required checkpoint record",
    "could not locate a valid checkpoint record",
)

# Startup failures of a data directory holding `backup_label` (an online backup) that mean
# the WAL from the backup's start to its end is not all there: the WAL signatures, and the
# redo location of the label's checkpoint not found (its segment missing, the checkpoint's
# present). Such a backup is incomplete: it fails `BackupIncomplete`, never reset.
BACKUP_WAL_SIGNATURES = (
    *WAL_FAILURE_SIGNATURES,
    "could not locate required checkpoint record",
    "could not find redo location",
)

# Startup failures pg_resetwal cannot fix. Resetting would only destroy what a person needs
# to diagnose them (the WAL and pg_control's state), so these are never reset, not even as
# the last resort, and they win over the WAL signatures (a permissions error reading pg_wal
# also ends in "could not locate a valid checkpoint record"):
# - another major version or build, or no data directory: a reset changes neither;
# - permissions, ownership, running as root;
# - configuration: a bad setting or file, a library that is not installed;
# - the host: memory, disk space, shared memory, sockets, another server holding the lock;
# - in the pod's single-user session: a database or role that does not exist, a missing
#   binary (`pgro verify` and `pgro run` never get that far: spawning raises).
NOT_RESETTABLE_SIGNATURES = (
    "database files are incompatible with server",
    "is not a valid data directory",
    "Permission denied",
    "has invalid permissions",
    "has wrong ownership",
    "has group or world access",
    '"root" execution of the PostgreSQL server is not permitted',
    "configuration file",
    "invalid value for parameter",
    "unrecognized configuration parameter",
    "could not access file",
    "could not load library",
    "No space left on device",
    "out of memory",
    "could not create shared memory segment",
    "could not map anonymous shared memory",
    'lock file "',
    "could not bind",
    "could not create any TCP/IP sockets",
    "could not create Unix-domain socket",
    '" does not exist',
    ": not found",
    "command not found",
)

# Lines that say what happened on the way, not why startup failed: a never-reset
# signature counts only outside them ("LOG:  skipping missing configuration file" is not a
# configuration error). POSIX ERE, also grepped by the pod's setup script.
INFORMATIONAL_LINE_PATTERN = (
    r"(LOG|DEBUG[0-9]?|INFO|NOTICE|WARNING|DETAIL|HINT|CONTEXT|STATEMENT):  "
)
INFORMATIONAL_LINE = re.compile(INFORMATIONAL_LINE_PATTERN)

RESET_WAL_NOTE = "reset the WAL with pg_resetwal -f (indexes may need a REINDEX)"
LAST_RESORT_NOTE = (
    "reset the WAL with pg_resetwal -f as a last resort: PostgreSQL failed to start twice "
    "for a reason pgro does not recognise (indexes may need a REINDEX)"
)


class StartupFailureKind(Enum):
    WAL_LOST = "wal-lost"  # reset at once
    NOT_RESETTABLE = "not-resettable"  # never reset
    UNRECOGNISED = "unrecognised"  # retry once unchanged, then reset as the last resort


def classify_startup_failure(log_text: str) -> StartupFailureKind:
    """What a failed start's log says about resetting the WAL (the pod's setup script
    applies the same rules, `runtimes/kubernetes/scripts.py`). Without a FATAL or PANIC
    line nothing says startup itself failed (the server was killed, or in the pod's
    single-user session a statement failed): that is never reset either."""
    decisive = "\n".join(
        line for line in log_text.splitlines() if not INFORMATIONAL_LINE.search(line)
    )
    if any(sig in decisive for sig in NOT_RESETTABLE_SIGNATURES):
        return StartupFailureKind.NOT_RESETTABLE
    if "FATAL:" not in log_text and "PANIC:" not in log_text:
        return StartupFailureKind.NOT_RESETTABLE
    if any(sig in log_text for sig in WAL_FAILURE_SIGNATURES):
        return StartupFailureKind.WAL_LOST
    return StartupFailureKind.UNRECOGNISED


class StartupFailed(Exception):
    reason = "StartupFailed"

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class StartupTimeout(StartupFailed):
    reason = "StartupTimeout"


class BackupIncomplete(StartupFailed):
    """An online backup (`backup_label`) whose WAL is not all there: not restorable as it
    is, and never reset (`backup_label.missing_wal_message` says what to do)."""

    reason = "BackupIncomplete"


ONLINE_BACKUP_NOT_RESET = (
    "; the WAL was not reset: the data directory holds a backup_label (an online backup), "
    "and resetting its WAL would start an inconsistent database"
)


def _refuse_online_backup(
    server: PostgresServer, label: BackupLabel | None, failure: StartupFailed, *, last: bool
) -> None:
    """Stop here, instead of resetting the WAL, when `server`'s data directory is an online
    backup (`label`, read before the first start, or a backup recovery `pg_control` says is
    pending): `BackupIncomplete` when its log says recovery lacks WAL; any other failure is
    raised as it is (noting why it was not reset) once it is the `last` before a reset.
    Returns when it is no online backup, or to let an unrecognised failure be retried."""
    if label is None:
        label = pending_backup_recovery(server.binaries, server.pgdata, server.account)
    if label is None:
        return
    if any(sig in failure.log_tail for sig in BACKUP_WAL_SIGNATURES):
        message = missing_wal_message(label, wal_segments(server.pgdata))
        raise BackupIncomplete(message, failure.log_tail) from None
    if last:
        raise StartupFailed(f"{failure}{ONLINE_BACKUP_NOT_RESET}", failure.log_tail) from None


# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def socket_dir_for(preferred: Path) -> Path:
    """`preferred` if a socket path in it fits the kernel's limit, else a short dir in /tmp.

    A deep work directory (a test's tmp dir, a user's --work-dir) easily exceeds 107 bytes,
    and PostgreSQL then refuses to start. The caller removes the returned directory.
    """
    if len(str(preferred / ".s.PGSQL.65535")) <= MAX_SOCKET_PATH:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="pgro-sock-", dir="/tmp"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def make_conninfo(**params: str) -> str:
    """A libpq keyword/value string, quoting as libpq requires (psycopg not needed to build it)."""

    def quote(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{key}={quote(value)}" for key, value in params.items())


@dataclass(frozen=True)
class Endpoint:
    """How to reach a running server."""

    socket_dir: Path
    port: int
    host: str | None = None  # TCP address, if it listens on one

    def conninfo(self, dbname: str, user: str) -> str:
        """A libpq connection string through the private socket directory."""
        return make_conninfo(
            host=str(self.socket_dir), port=str(self.port), dbname=dbname, user=user
        )


def _read_own_config(pgdata: Path) -> str:
    """postgresql.conf as repaired, never through a link (a link may point anywhere)."""
    try:
        fd = os.open(pgdata / "postgresql.conf", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    # Checked before fdopen, which refuses a directory with IsADirectoryError.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return ""
    with os.fdopen(fd, "rb") as f:
        return f.read(4 * 2**20).decode(errors="replace")


def server_forced_settings(pgdata: Path, binaries: PostgresBinaries) -> dict[str, str]:
    """The settings a server on `pgdata` is started with, overriding every config file.

    `shared_preload_libraries` keeps only the bare names postgresql.conf lists that are
    installed in this host's $libdir (what the repair left there); everything else that can
    load a library or run a program is forced off (`config.forced_settings`).
    """
    value = configured_value(_read_own_config(pgdata), "shared_preload_libraries") or ""
    libraries = safe_preload_libraries(value, binaries.has_library)
    return forced_settings(binaries.major, str(pgdata.absolute()), libraries)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class PostgresServer:
    def __init__(
        self,
        pgdata: Path,
        binaries: PostgresBinaries,
        account: RunAccount,
        *,
        socket_dir: Path,
        log_path: Path,
        port: int | None = None,
        listen_addresses: str = "",
        options: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.pgdata = pgdata
        self.binaries = binaries
        self.account = account
        self.socket_dir = socket_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.listen_addresses = listen_addresses
        self.options = dict(options or {})
        # Extra environment, e.g. `locale_aliases.LocaleAliases.env()` (LOCPATH, GCONV_PATH).
        self.env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> Endpoint:
        host = self.listen_addresses.split(",")[0].strip() or None
        return Endpoint(socket_dir=self.socket_dir, port=self.port, host=host)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log_path, lines)

    def _command(self) -> list[str]:
        cmd = [
            self.binaries.tool("postgres"),
            "-D",
            str(self.pgdata),
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
            "-c",
            f"listen_addresses={self.listen_addresses}",
        ]
        for key, value in self.options.items():
            cmd += ["-c", f"{key}={value}"]
        # Last, so no caller option can undo them (the last -c for a key wins).
        cmd += forced_arguments(server_forced_settings(self.pgdata, self.binaries))
        return cmd

    def spawn(self) -> None:
        if self.running():
            return
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket_dir, 0o700)
        if os.geteuid() == 0:
            os.chown(self.socket_dir, self.account.uid, self.account.gid)
        self._log = self.log_path.open("ab")
        with deferred_interrupts():
            self._proc = self._popen()

    def _popen(self) -> subprocess.Popen[bytes]:
        assert self._log is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        env.update(self.account.env())
        env.update(self.env)
        return spawn(
            self._command(),
            # Immediate shutdown if pgro dies, where this server is throwaway (pgro verify).
            death_signal=service_death_signal(signal.SIGQUIT),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.pgdata),
            start_new_session=True,  # Ctrl-C reaches pgro, which then stops the server cleanly
            **self.account.popen_kwargs(),
        )

    def _status(self) -> str | None:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 8 or lines[0].strip() != str(self.pid):
            return None
        return lines[7].strip()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            rc = self._proc.poll()
            if rc is not None:
                self._close_log()
                raise StartupFailed(
                    f"PostgreSQL {self.binaries.major} exited with code {rc} during startup",
                    self.log_tail(),
                )
            if self._status() == "ready":
                return
            if time.monotonic() > deadline:
                raise StartupTimeout(
                    f"PostgreSQL {self.binaries.major} did not accept connections within "
                    f"{timeout:.0f}s (crash recovery of a large cluster can take longer: "
                    "raise the readiness timeout)",
                    self.log_tail(),
                )
            time.sleep(0.02)

    def start(self, timeout: float) -> None:
        self.spawn()
        try:
            self.wait_ready(timeout)
        except StartupTimeout:
            self.stop()
            raise

    def stop(self, timeout: float = 60.0) -> int | None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL. Returns exit code."""
        proc = self._proc
        if proc is None:
            return None
        then = (*POSTMASTER_THEN, (signal.SIGKILL, 10.0))
        rc = stop(proc, timeout, first=signal.SIGINT, then=then)
        self._close_log()
        self._proc = None
        return rc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def start_resetting_wal_if_needed(
    server: PostgresServer, timeout: float, note: Callable[[str], None] = lambda _: None
) -> str | None:
    """Start `server`, resetting its WAL only when that is what may bring it up.

    A known WAL signature resets at once. Any other failure, unless a reset cannot fix it
    (`NOT_RESETTABLE_SIGNATURES`), is retried once unchanged and then, as the last resort,
    reset (the reference's two-stage fallback). A timeout is never reset: the server was
    still recovering, and its log can hold a WAL signature that recovery got past. Nor is
    an online backup (`backup_label` in the data directory, where the reference resets
    too): a lack of WAL fails `BackupIncomplete`, naming the backup's start WAL location
    and the fix; any other failure is raised as it is.
    Returns the repair note when the WAL was reset (fix `reset_wal`), else None;
    `StartupFailed` when the server did not start.
    """
    # Before the first start: PostgreSQL renames backup_label once it has read it.
    label = read_backup_label(server.pgdata)
    try:
        server.start(timeout)
        return None
    except StartupTimeout:
        raise
    except StartupFailed as exc:
        kind = classify_startup_failure(exc.log_tail)
        if kind is StartupFailureKind.NOT_RESETTABLE:
            raise
        _refuse_online_backup(server, label, exc, last=kind is StartupFailureKind.WAL_LOST)
    repair = RESET_WAL_NOTE
    if kind is StartupFailureKind.UNRECOGNISED:
        note("PostgreSQL did not start, for a reason pgro does not recognise: retrying once")
        try:
            server.start(timeout)
            return None
        except StartupTimeout:
            raise
        except StartupFailed as again:
            if classify_startup_failure(again.log_tail) is StartupFailureKind.NOT_RESETTABLE:
                raise
            _refuse_online_backup(server, label, again, last=True)
        note("PostgreSQL failed to start twice: resetting WAL with pg_resetwal -f as a last resort")
        repair = LAST_RESORT_NOTE
    else:
        note("crash recovery cannot find its WAL: resetting WAL with pg_resetwal -f")
    reset_wal(server.binaries, server.pgdata, server.account)
    server.start(timeout)
    return repair


def reset_wal(binaries: PostgresBinaries, pgdata: Path, account: RunAccount) -> str:
    """`pg_resetwal -f`: discard unreplayable WAL so the cluster can start."""
    proc = subprocess.run(  # type: ignore[call-overload]
        [binaries.tool("pg_resetwal"), "-f", str(pgdata)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", **account.env()},
        **account.popen_kwargs(),
    )
    if proc.returncode != 0:
        raise StartupFailed(f"pg_resetwal failed: {proc.stderr.strip()}")
    return str(proc.stdout).strip()


_ROLNAME = re.compile(r'rolname\s*=\s*"([^"]+)"')


def bootstrap_superuser(
    binaries: PostgresBinaries,
    pgdata: Path,
    account: RunAccount,
    env: Mapping[str, str] | None = None,
) -> str:
    """The cluster's bootstrap superuser (the role with OID 10), read in single-user mode.

    Needed when the source cluster was initialised by an OS user other than `postgres`:
    local `trust` authentication still needs an existing role name. `env` is added to the
    session's environment (the private locales of `locale_aliases`).
    """
    # Single-user mode loads shared_preload_libraries too, so it gets the same forced
    # settings (pg_db_role_setting and event triggers are not applied in this mode).
    forced = forced_arguments(server_forced_settings(pgdata, binaries))
    proc = run_tied(
        [binaries.tool("postgres"), "--single", "-D", str(pgdata), *forced, "template1"],
        "SELECT rolname FROM pg_authid WHERE oid = 10;\n",
        {
            "env": {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LC_ALL": "C",
                **account.env(),
                **(env or {}),
            },
            **account.popen_kwargs(),
        },
    )
    m = _ROLNAME.search(str(proc.stdout))
    if not m:
        raise StartupFailed(
            "could not read the bootstrap superuser in single-user mode",
            f"{proc.stdout}\n{proc.stderr}"[-2000:],
        )
    return m.group(1)
