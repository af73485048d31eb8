"""A replica's stable endpoint: one PgBouncer whose `*` database moves at switchover.

Clients keep one address (TCP host:port and a Unix socket directory) while restores come and
go. `route()` rewrites the configuration atomically and has PgBouncer re-read it with the
admin console's `RELOAD`, which returns only once the new routing is in force; new
connections then go to the new restore while open sessions stay on the old one until their
clients disconnect (see `pgro.pgbouncer.config` for the settings that give this).

PgBouncer runs in the foreground as a child in its own session, as the account PostgreSQL
runs as (it refuses root, and needs the restores' private socket directories, mode 0700).
It outlives a crash of pgro: a new `StableEndpoint` for the same run directory adopts it via
its pidfile, verified against `/proc/<pid>/cmdline`, instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, LiteralString

import psycopg

from pgro.interrupts import deferred_interrupts
from pgro.pgbouncer.config import (
    BouncerFiles,
    BouncerSettings,
    check_admin_user,
    parse_auth_file,
    render_auth_file,
    render_hba,
    render_ini,
)
from pgro.pgbouncer.errors import (
    EndpointError,
    EndpointPortInUse,
    EndpointReloadFailed,
    EndpointStartFailed,
    InvalidEndpointConfig,
    PgBouncerMissing,
)
from pgro.postgres.account import RunAccount
from pgro.postgres.server import MAX_SOCKET_PATH, Endpoint, make_conninfo
from pgro.processes import Ladder, process_args, read_pid, spawn, stop_pid

log = logging.getLogger(__name__)

DEFAULT_PGBOUNCER = Path("/usr/sbin/pgbouncer")  # Debian's package; not on a user's PATH
WILDCARD_HOSTS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def find_pgbouncer() -> str:
    """`$PGRO_PGBOUNCER`, else `pgbouncer` on PATH, else /usr/sbin/pgbouncer."""
    wanted = os.environ.get("PGRO_PGBOUNCER")
    if wanted:
        if os.path.isfile(wanted) and os.access(wanted, os.X_OK):
            return wanted
        raise PgBouncerMissing(
            f"PGRO_PGBOUNCER={wanted} is not an executable file: point it at the pgbouncer "
            "binary, or unset it to use the installed one (apt-get install pgbouncer)"
        )
    found = shutil.which("pgbouncer")
    if found:
        return found
    if DEFAULT_PGBOUNCER.is_file() and os.access(DEFAULT_PGBOUNCER, os.X_OK):
        return str(DEFAULT_PGBOUNCER)
    raise PgBouncerMissing(
        "PgBouncer is not installed (looked at $PGRO_PGBOUNCER, PATH and /usr/sbin/pgbouncer) "
        "and the stable endpoint needs it: install it with `apt-get install pgbouncer`, or "
        "set PGRO_PGBOUNCER to its path"
    )


def default_socket_dir(run_dir: Path, port: int) -> Path:
    """`run_dir/socket` if the socket path fits the kernel's limit, else a short directory in
    /tmp named after run_dir, so every `StableEndpoint` for the same run_dir (a restarted pgro
    adopting a running PgBouncer) agrees on the same address."""
    preferred = run_dir / "socket"
    if len(str(preferred / f".s.PGSQL.{port}")) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pgro-pgbouncer-{digest}"


def _invoking_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def pgbouncer_pids(ini: Path) -> list[int]:
    """Every live process running PgBouncer on this configuration file."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = process_args(int(entry.name))
            if args and str(ini) in args[1:]:
                pids.append(int(entry.name))
    return sorted(pids)


def _write_atomically(path: Path, text: str, account: RunAccount) -> None:
    """Replace `path` with `text`: mode 0600, owned by `account`, never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            if os.geteuid() == 0:
                os.fchown(f.fileno(), account.uid, account.gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tail(path: Path, lines: int, offset: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class StableEndpoint:
    """One replica's fixed address, served by PgBouncer in front of its serving restore."""

    def __init__(
        self,
        name: str,
        run_dir: Path,
        account: RunAccount,
        *,
        port: int,
        listen_host: str = "127.0.0.1",
        socket_dir: Path | None = None,
        max_client_conn: int = 100,
    ) -> None:
        self.name = name
        self.run_dir = Path(os.path.abspath(run_dir))
        self.account = account
        self.port = port
        self.listen_host = listen_host
        self.files = BouncerFiles(self.run_dir)
        self._own_socket_dir = socket_dir is None
        self.socket_dir = Path(
            os.path.abspath(socket_dir) if socket_dir else default_socket_dir(self.run_dir, port)
        )
        if len(str(self.socket_dir / f".s.PGSQL.{port}")) > MAX_SOCKET_PATH:
            raise InvalidEndpointConfig(
                f"the socket directory {self.socket_dir} is too long for a Unix socket "
                f"(paths are limited to {MAX_SOCKET_PATH} bytes): choose a shorter one"
            )
        self.admin_user = check_admin_user(_invoking_user())
        self.settings = BouncerSettings(
            files=self.files,
            listen_host=listen_host,
            port=port,
            socket_dir=self.socket_dir,
            admin_user=self.admin_user,
            max_client_conn=max_client_conn,
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        # The configuration this object last had PgBouncer load. None after a pgro restart,
        # so the first route() always reloads (the files may be newer than what runs).
        self._applied: str | None = None

    # --- what clients use ------------------------------------------------------------------

    @property
    def address(self) -> Endpoint:
        """TCP host:port and the socket directory clients connect to; never changes."""
        first = self.listen_host.split(",")[0].strip()
        host = WILDCARD_HOSTS.get(first, first) or None
        return Endpoint(socket_dir=self.socket_dir, port=self.port, host=host)

    # --- process state ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running PgBouncer's pid: started by this object or adopted from the pidfile."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # reaped
        pid = read_pid(self.files.pidfile)
        if pid is not None:
            args = process_args(pid)
            if args and str(self.files.ini) in args[1:]:
                return pid
        if self._proc is not None:
            return self._proc.pid  # started, pidfile not written yet
        return None

    def running(self) -> bool:
        return self.pid is not None

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.files.log, lines)

    # --- routing ---------------------------------------------------------------------------

    def route(self, backend: Endpoint | None, users: Mapping[str, str]) -> None:
        """Send new connections to `backend` (None: refuse them, stay up) for these users.

        Returns once PgBouncer runs with the new routing. Open sessions keep their server.
        """
        with self._lock:
            self._prepare_dirs()
            config = self._write_config(backend, users)
            if not self.running():
                self._start()
            elif self._listening_elsewhere():
                log.info("endpoint %s: listen address changed, restarting PgBouncer", self.name)
                self.stop()
                self._start()
            elif config == self._applied:
                return  # a reconcile that changes nothing: no reload, no log line
            else:
                self._reload()
            self._applied = config
            log.info(
                "endpoint %s routes new connections to %s",
                self.name,
                "nothing (no restore serving)" if backend is None else backend.socket_dir,
            )

    def start(self, timeout: float = 10.0) -> None:
        """Start PgBouncer unless it runs (then adopt it). It routes as the last `route()` for
        this run_dir did; with none, it is up and refuses every client until one comes."""
        with self._lock:
            if self.running():
                return
            self._prepare_dirs()
            self._rewrite_routing()
            self._start(timeout)

    def stop(self, timeout: float = 10.0, *, drain: float = 0.0) -> int | None:
        """Shut PgBouncer down; returns its exit code when it was our child.

        `drain` > 0 first asks for a safe shutdown (SIGINT: stop listening, wait for clients to
        disconnect) for that many seconds. Then SIGTERM (immediate: drops open sessions), then
        SIGKILL. The pidfile and socket are gone afterwards.
        """
        with self._lock:
            pid = self.pid
            rc: int | None = None
            if pid is not None:
                then: Ladder = ((signal.SIGKILL, 5.0),)
                if drain > 0:
                    then = ((signal.SIGTERM, timeout), *then)
                    gone = stop_pid(pid, drain, first=signal.SIGINT, then=then)
                else:
                    gone = stop_pid(pid, timeout, then=then)
                if not gone:
                    raise EndpointError(
                        f"PgBouncer (pid {pid}) for {self.name} survived SIGKILL: it is stuck "
                        "in the kernel; check the machine",
                        self.log_tail(),
                    )
                if self._proc is not None:
                    rc = self._proc.wait()
                    self._proc = None
                log.info("endpoint %s: PgBouncer (pid %d) stopped", self.name, pid)
            self._remove_leftovers()
            return rc

    # --- internals -------------------------------------------------------------------------

    def _clear_stale_pidfile(self) -> None:
        """A pidfile naming no PgBouncer on our configuration (it died, or the pid now belongs
        to another process) would make PgBouncer refuse to start."""
        if self.files.pidfile.exists() and self.pid is None:
            self.files.pidfile.unlink(missing_ok=True)

    def _clear_stale_socket(self) -> None:
        """Remove our socket file if nothing listens on it any more (after a SIGKILL)."""
        path = self.socket_dir / f".s.PGSQL.{self.port}"
        if not path.is_socket():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def _remove_leftovers(self) -> None:
        """After a SIGKILL (or a crash) PgBouncer leaves its pidfile and socket behind."""
        self._clear_stale_pidfile()
        self._clear_stale_socket()
        if self._own_socket_dir and self.socket_dir != self.run_dir / "socket":
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()  # the short /tmp fallback; only when empty

    def _prepare_dirs(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.run_dir, 0o711)  # clients traverse it to reach run_dir/socket
        if self._own_socket_dir:
            try:
                self.socket_dir.mkdir(mode=0o711)
            except FileExistsError:
                st = os.lstat(self.socket_dir)
                if (
                    not self.socket_dir.is_dir()
                    or self.socket_dir.is_symlink()
                    or (st.st_uid not in (self.account.uid, os.geteuid()))
                ):
                    raise InvalidEndpointConfig(
                        f"{self.socket_dir} exists but is not a directory owned by "
                        f"{self.account.name}: remove it, or pass socket_dir"
                    ) from None
            self._hand_over(self.socket_dir, 0o711)
        elif not self.socket_dir.exists():
            self.socket_dir.mkdir(parents=True)
            self._hand_over(self.socket_dir, 0o711)

    def _hand_over(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if os.geteuid() == 0:
            os.chown(path, self.account.uid, self.account.gid)

    def _write_config(self, backend: Endpoint | None, users: Mapping[str, str]) -> str:
        """Render and write the files; returns a digest of their content."""
        try:
            previous = parse_auth_file(self.files.auth_file.read_text())
        except OSError:
            previous = {}
        auth = render_auth_file(users, self.admin_user, previous)
        routing = self._routing_files(backend, admin_is_client=self.admin_user in users)
        files = {self.files.auth_file: auth, **routing}
        # Everything rendered (and so validated) before anything is written.
        self._write_files(files)
        return hashlib.sha256("\0".join(files.values()).encode()).hexdigest()

    def _routing_files(self, backend: Endpoint | None, *, admin_is_client: bool) -> dict[Path, str]:
        """pgbouncer.ini and the HBA, plus their inputs (no secrets) so `start()` can render
        them again for this object's listen address without being given the users."""
        routing = {
            "backend": None
            if backend is None
            else {"socket_dir": str(backend.socket_dir), "port": backend.port},
            "admin_is_client": admin_is_client,
        }
        hba = render_hba(
            self.admin_user, serving=backend is not None, admin_is_client=admin_is_client
        )
        return {
            self.files.routing: json.dumps(routing) + "\n",
            self.files.hba_file: hba,
            self.files.ini: render_ini(self.settings, backend),  # last: it names the others
        }

    def _write_files(self, files: Mapping[Path, str]) -> None:
        for path, text in files.items():
            with contextlib.suppress(OSError):
                if path.read_text() == text:
                    continue
            _write_atomically(path, text, self.account)

    def _rewrite_routing(self) -> None:
        """The last routing (or none) for this object's settings; the auth file as it is."""
        try:
            routing = json.loads(self.files.routing.read_text())
            last = routing["backend"]
            backend = (
                None if last is None else Endpoint(Path(last["socket_dir"]), int(last["port"]))
            )
            admin_is_client = bool(routing["admin_is_client"])
        except (OSError, ValueError, KeyError, TypeError):
            self._write_config(None, {})
            return
        if not self.files.auth_file.exists():
            self._write_config(backend, {})
            return
        self._write_files(self._routing_files(backend, admin_is_client=admin_is_client))

    def _check_port_free(self) -> None:
        for host in filter(None, (h.strip() for h in self.listen_host.split(","))):
            bind_host = "0.0.0.0" if host == "*" else host  # noqa: S104
            family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PgBouncer does
                try:
                    s.bind((bind_host, self.port))
                except OSError as e:
                    raise self._port_in_use(host, str(e.strerror)) from None

    def _port_in_use(self, host: str, detail: str, log_tail: str = "") -> EndpointPortInUse:
        return EndpointPortInUse(
            f"the stable endpoint of {self.name} cannot listen on {host}:{self.port} "
            f"({detail}): another process holds that port; stop it or give this replica's "
            "endpoint another port",
            log_tail,
        )

    def _start(self, timeout: float = 10.0) -> None:
        binary = find_pgbouncer()
        self._clear_stale_pidfile()  # a dead PgBouncer's, or a reused pid: must not block us
        self._check_port_free()
        _write_atomically(self.files.listening, self._listen_record(), self.account)
        log_path = self.files.log
        with log_path.open("ab") as logf:
            os.fchmod(logf.fileno(), 0o600)
            if os.geteuid() == 0:
                os.fchown(logf.fileno(), self.account.uid, self.account.gid)
            offset = logf.tell()
            with deferred_interrupts():
                self._proc = self._popen(binary, logf)
        self._wait_ready(timeout, offset)
        log.info("endpoint %s: PgBouncer (pid %d) started", self.name, self._proc.pid)

    def _popen(self, binary: str, logf: IO[bytes]) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        env.update(self.account.env())
        return spawn(
            [binary, str(self.files.ini)],
            death_signal=None,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.run_dir),
            start_new_session=True,  # survives pgro; a restarted pgro adopts it
            **self.account.popen_kwargs(),
        )

    def _wait_ready(self, timeout: float, offset: int) -> None:
        """Ready = the admin console answers and the pidfile names our child."""
        assert self._proc is not None
        proc = self._proc
        deadline = time.monotonic() + timeout
        while True:
            rc = proc.poll()
            if rc is not None:
                self._proc = None
                tail = _tail(self.files.log, 20, offset)
                raise self._startup_error(f"exited with code {rc} during startup", tail)
            if read_pid(self.files.pidfile) == proc.pid:
                with contextlib.suppress(psycopg.Error):
                    self._admin("SHOW VERSION")
                    break
            if time.monotonic() > deadline:
                tail = _tail(self.files.log, 20, offset)
                self.stop()
                raise self._startup_error(f"did not come up within {timeout:.0f}s", tail)
            time.sleep(0.02)
        tail = _tail(self.files.log, 200, offset)
        if "cannot listen on" in tail:
            # PgBouncer 1.18 only warns when a TCP address is taken and serves the socket alone.
            self.stop()
            host = self.listen_host
            for line in tail.splitlines():
                if "cannot listen on" in line:
                    host = line.split("cannot listen on", 1)[1].strip()
                    break
            raise self._port_in_use(host, "address already in use", tail)

    def _startup_error(self, what: str, tail: str) -> EndpointError:
        if "unix socket is in use" in tail:
            return EndpointPortInUse(
                f"the stable endpoint of {self.name} cannot use the socket "
                f"{self.socket_dir}/.s.PGSQL.{self.port}: another server listens there; "
                "stop it or give this replica's endpoint another port or socket directory",
                tail,
            )
        if "Address already in use" in tail:
            return self._port_in_use(self.listen_host, "address already in use", tail)
        if "pidfile exists" in tail:
            return EndpointStartFailed(
                f"PgBouncer for {self.name} found another instance's pidfile "
                f"{self.files.pidfile}: stop that PgBouncer first",
                tail,
            )
        return EndpointStartFailed(
            f"PgBouncer for {self.name} {what}: see {self.files.log} (last lines attached)",
            tail,
        )

    def _admin(self, command: LiteralString) -> list[tuple[object, ...]]:
        """Run one admin-console command, as pgro's OS user by peer over the Unix socket."""
        conninfo = make_conninfo(
            host=str(self.socket_dir),
            port=str(self.port),
            dbname="pgbouncer",
            user=self.admin_user,
            connect_timeout="5",
        )
        # The console speaks only the simple query protocol: ClientCursor uses it.
        with psycopg.connect(
            conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.execute(command)
            return cur.fetchall() if cur.description else []

    def _listen_record(self) -> str:
        return json.dumps(
            {
                "listen_addr": self.listen_host,
                "listen_port": self.port,
                "unix_socket_dir": str(self.socket_dir),
            },
            sort_keys=True,
        )

    def _listening_elsewhere(self) -> bool:
        """Whether the running PgBouncer listens on another address than ours: a reload
        cannot move listeners, so that takes a restart. Read from what `_start` recorded
        (the ini may already be rewritten, and the console is then at the old address)."""
        try:
            return self.files.listening.read_text() != self._listen_record()
        except OSError:
            return True

    def _reload(self) -> None:
        """`RELOAD` on the console (synchronous); SIGHUP if the console cannot be reached."""
        try:
            self._admin("RELOAD")
            return
        except psycopg.Error as e:
            console_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pid = self.pid
        if pid is None:
            raise EndpointReloadFailed(
                f"PgBouncer for {self.name} exited before it could reload: see {self.files.log}",
                self.log_tail(),
            )
        log.warning(
            "endpoint %s: admin console unreachable (%s); reloading with SIGHUP",
            self.name,
            console_error,
        )
        before = self.files.log.read_bytes().count(b"got SIGHUP")
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.files.log.read_bytes().count(b"got SIGHUP") <= before:
            if time.monotonic() > deadline:
                raise EndpointReloadFailed(
                    f"PgBouncer for {self.name} (pid {pid}) did not reload on SIGHUP within 10s "
                    f"and its admin console fails ({console_error}): restart the endpoint",
                    self.log_tail(),
                )
            time.sleep(0.02)
