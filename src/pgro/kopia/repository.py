"""The kopia CLI, wrapped: connect, list snapshots, restore one.

Each `KopiaRepository` uses its own config, cache and log directories, so concurrent uses
(several replicas, tests, a user's own kopia) never share state; the one exception is a
kept cache (`cache_dir`, `pgro.kopia.cache`): metadata only, bounded, shared by every use
of the same repository, which kopia allows. Secrets reach kopia only through its
environment (`KOPIA_PASSWORD`, `AWS_*`), never its command line, and the connection does
not persist the password to disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

from pgro.api.secret import FilesystemLocation, KopiaCredentials, S3Location
from pgro.core.secrets import scrub
from pgro.core.snapshot import Snapshot, SnapshotListParseError, parse_snapshot_list
from pgro.interrupts import deferred_interrupts
from pgro.kopia.cache import KEPT_CACHE_FLAGS, ONE_SHOT_CACHE_FLAGS, PRIVATE
from pgro.kopia.errors import (
    EndpointUnreachable,
    KopiaError,
    KopiaNotInstalled,
    SnapshotNotFound,
    classify_connect_failure,
    classify_restore_failure,
    last_lines,
)
from pgro.processes import spawn, stop

# Rotate CLI logs as the reference does, so a long-lived cache directory cannot fill up.
# Content logs (one line per content read, for kopia's own debugging) only cost I/O during a
# restore; the CLI logs kept for diagnostics say what failed.
GLOBAL_FLAGS = ("--log-dir-max-files=20", "--log-dir-max-age=24h", "--disable-content-log")
DEFAULT_CONNECT_TIMEOUT = 120.0
DEFAULT_LIST_TIMEOUT = 300.0
KOPIA_STOP_GRACE_S = 10.0  # a cancelled restore's SIGTERM, before SIGKILL

_PROGRESS = re.compile(
    r"Processed (?P<done_n>\d+) \((?P<done>[\d.]+ ?[KMGTPE]?i?B)\) of (?P<total_n>\d+) "
    r"\((?P<total>[\d.]+ ?[KMGTPE]?i?B)\)"
)
_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6}


@dataclass(frozen=True)
class RestoreProgress:
    """One progress report of `kopia snapshot restore`, in bytes."""

    done_bytes: int
    total_bytes: int


ProgressCallback = Callable[[RestoreProgress], None]


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+) ?([KMGTPE]?)(i?)B", text.strip())
    if not m:
        return 0
    base = 1024 if m.group(3) else 1000
    power = " KMGTPE".index(m.group(2) or " ")
    return int(float(m.group(1)) * base**power) if m.group(2) else int(float(m.group(1)))


def parse_progress_line(line: str) -> RestoreProgress | None:
    m = _PROGRESS.search(line)
    if not m:
        return None
    return RestoreProgress(done_bytes=_parse_size(m["done"]), total_bytes=_parse_size(m["total"]))


def find_kopia() -> str:
    """Locate the kopia binary: `$PGRO_KOPIA`, then PATH, then the setup script's cache."""
    explicit = os.environ.get("PGRO_KOPIA")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise KopiaNotInstalled(f"PGRO_KOPIA={explicit} is not an executable file")
        return explicit
    found = shutil.which("kopia")
    if found:
        return found
    cache = Path(os.environ.get("PGRO_CACHE_DIR", Path.home() / ".cache" / "pgro"))
    candidate = cache / "bin" / "kopia"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    raise KopiaNotInstalled(
        "the kopia CLI was not found on PATH or in ~/.cache/pgro/bin: run `./run setup` "
        "(it builds kopia v0.22.3 from the Go module proxy) or set PGRO_KOPIA to its path"
    )


class KopiaRepository:
    """A connected kopia repository. Use as a context manager; `close()` removes its state.

    `cache_dir`: a kept cache (`pgro.kopia.cache.repository_cache_dir`), which `close()`
    leaves in place, with kopia's cache bounded to metadata (`KEPT_CACHE_FLAGS`). Without
    one, kopia's cache lives in the state directory and goes with it (`pgro verify`: one
    restore, nothing to keep it for), its contents bounded too (`ONE_SHOT_CACHE_FLAGS`)."""

    def __init__(
        self,
        credentials: KopiaCredentials,
        state_dir: Path,
        *,
        kopia: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        cache_dir: Path | None = None,
    ) -> None:
        self._creds = credentials
        self._state_dir = state_dir
        self._cache_dir = cache_dir
        self._kopia = kopia or find_kopia()
        self._connect_timeout = connect_timeout
        self._connected = False

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> KopiaRepository:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self._state_dir, ignore_errors=True)
        self._connected = False

    # -- plumbing -----------------------------------------------------------------------
    @property
    def _is_s3(self) -> bool:
        return isinstance(self._creds.location, S3Location)

    @property
    def cache_dir(self) -> Path:
        return self._cache_dir or self._state_dir / "cache"

    @property
    def description(self) -> str:
        return self._creds.describe()

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KOPIA_", "AWS_")) or k == "KOPIA_CHECK_FOR_UPDATES"
        }
        env.update(
            KOPIA_CONFIG_PATH=str(self._state_dir / "config" / "repository.config"),
            KOPIA_LOG_DIR=str(self._state_dir / "logs"),
            KOPIA_CACHE_DIRECTORY=str(self.cache_dir),
            KOPIA_CHECK_FOR_UPDATES="false",
            KOPIA_PASSWORD=self._creds.repository_password,
        )
        if self._creds.access_key_id:
            env["AWS_ACCESS_KEY_ID"] = self._creds.access_key_id
        if self._creds.secret_access_key:
            env["AWS_SECRET_ACCESS_KEY"] = self._creds.secret_access_key
        if self._creds.session_token:
            env["AWS_SESSION_TOKEN"] = self._creds.session_token
        return env

    def _scrub(self, text: str) -> str:
        return scrub(text, self._creds.secret_values())

    def _run(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = [self._kopia, *GLOBAL_FLAGS, *args]
        child: subprocess.Popen[str] | None = None
        try:
            with deferred_interrupts():
                child = spawn(  # dies with pgro, even on kill -9
                    cmd,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            stdout, stderr = child.communicate(timeout=timeout)
            proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
        except BaseException as exc:
            if child is not None:
                stop(child, 0)  # SIGKILL at once: kopia holds nothing worth a clean exit
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            raise EndpointUnreachable(
                f"kopia {args[0]} {args[1] if len(args) > 1 else ''} on {self.description} "
                f"did not finish within {timeout:.0f}s: the storage is unreachable or very slow"
            ) from None
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, self._scrub(proc.stdout), self._scrub(proc.stderr)
        )

    def _connect_args(self, verb: str = "connect") -> list[str]:
        loc = self._creds.location
        common = ["--no-persist-credentials"]
        if verb == "connect":
            common.append("--readonly")
            common += KEPT_CACHE_FLAGS if self._cache_dir is not None else ONE_SHOT_CACHE_FLAGS
        if isinstance(loc, FilesystemLocation):
            return ["repository", verb, "filesystem", f"--path={loc.path}", *common]
        assert isinstance(loc, S3Location)
        args = ["repository", verb, "s3", f"--bucket={loc.bucket}", f"--region={loc.region}"]
        if loc.prefix:
            args.append(f"--prefix={loc.prefix}")
        if loc.endpoint:
            args.append(f"--endpoint={loc.endpoint}")
            if loc.disable_tls:
                args += ["--disable-tls", "--disable-tls-verification"]
        return [*args, *common]

    # -- operations ---------------------------------------------------------------------
    def connect(self) -> None:
        for sub in ("config", "logs", "cache"):
            (self._state_dir / sub).mkdir(parents=True, exist_ok=True)
        self._state_dir.chmod(0o700)
        if self._cache_dir is not None:
            # Gone since it was made (a user cleaning up): kopia starts it afresh.
            self._cache_dir.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
        proc = self._run(self._connect_args(), self._connect_timeout)
        if proc.returncode != 0:
            raise classify_connect_failure(proc.stderr, self.description, s3=self._is_s3)
        self._connected = True

    def create(self) -> None:
        """Create a new repository at the credentials' location and connect to it (read-write).

        pgro itself only reads repositories; this exists for `pgro demo` and test fixtures.
        """
        for sub in ("config", "logs", "cache"):
            (self._state_dir / sub).mkdir(parents=True, exist_ok=True)
        if isinstance(self._creds.location, FilesystemLocation):
            Path(self._creds.location.path).mkdir(parents=True, exist_ok=True)
        proc = self._run(self._connect_args("create"), self._connect_timeout)
        if proc.returncode != 0:
            raise classify_connect_failure(proc.stderr, self.description, s3=self._is_s3)
        self._connected = True

    def snapshot_create(
        self,
        source: Path,
        *,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        override_source: str | None = None,
        start_time: datetime | None = None,
        timeout: float = 3600.0,
    ) -> str:
        """Snapshot `source`; returns the new snapshot's ID. For demos and fixtures."""
        self._require_connected()
        args = ["snapshot", "create", str(source), "--json"]
        for key, value in (tags or {}).items():
            args.append(f"--tags={key}:{value}")
        if description is not None:
            args.append(f"--description={description}")
        if override_source is not None:
            args.append(f"--override-source={override_source}")
        if start_time is not None:
            # kopia parses Go's "2006-01-02 15:04:05 MST" layout; the end must follow the start.
            fmt = "%Y-%m-%d %H:%M:%S UTC"
            utc = start_time.astimezone(UTC)
            args += [
                f"--start-time={utc.strftime(fmt)}",
                f"--end-time={(utc + timedelta(seconds=1)).strftime(fmt)}",
            ]
        proc = self._run(args, timeout)
        if proc.returncode != 0:
            raise KopiaError(f"kopia snapshot create failed: {last_lines(proc.stderr)}")
        try:
            return str(json.loads(proc.stdout)["id"])
        except (ValueError, KeyError, TypeError):
            raise KopiaError(
                f"unexpected output from kopia snapshot create: {proc.stdout[:200]}"
            ) from None

    def _require_connected(self) -> None:
        if not self._connected:
            raise KopiaError("kopia repository is not connected: call connect() first")

    def list_snapshots(self, timeout: float = DEFAULT_LIST_TIMEOUT) -> list[Snapshot]:
        """Every snapshot in the repository (`kopia snapshot list --json --all`)."""
        self._require_connected()
        # Retention reasons need every policy evaluated, and pgro does not use them.
        proc = self._run(["snapshot", "list", "--json", "--all", "--no-retention"], timeout)
        if proc.returncode != 0:
            raise classify_connect_failure(proc.stderr, self.description, s3=self._is_s3)
        try:
            return parse_snapshot_list(proc.stdout)
        except SnapshotListParseError as exc:
            raise KopiaError(f"kopia printed a snapshot list pgro cannot read: {exc}") from None

    def restore(
        self,
        snapshot_id: str,
        target: Path,
        *,
        parallel: int | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Restore `snapshot_id` into `target` (created if missing, must be empty).

        Owners are not restored: the tree belongs to whoever will run PostgreSQL on it,
        which the caller arranges. Nor are permissions: a snapshot is untrusted, and kopia
        would restore its set-uid, set-gid and world-write bits on files the restoring user
        (often root) owns. kopia then creates directories 0700 and files 0600, and `target`
        is made 0700, so nothing restored is reachable by another user, even if the
        restore fails half-way.
        """
        self._require_connected()
        if not re.fullmatch(r"[0-9a-zA-Z]{6,}", snapshot_id):
            raise SnapshotNotFound(f"{snapshot_id!r} is not a kopia snapshot ID")
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise KopiaError(f"restore target {target} is not empty")
        os.chmod(target, 0o700)
        workers = parallel or max(1, min(os.cpu_count() or 1, 8))
        cmd = [
            self._kopia,
            *GLOBAL_FLAGS,
            "snapshot",
            "restore",
            f"--parallel={workers}",
            "--skip-owners",
            "--skip-permissions",
            "--no-ignore-permission-errors",
            "--progress-update-interval=1s",
            snapshot_id,
            str(target),
        ]
        proc: subprocess.Popen[bytes] | None = None
        tail: list[str] = []
        buf = b""
        try:
            with deferred_interrupts():
                proc = spawn(  # dies with pgro, even on kill -9
                    cmd,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            # An interrupt deferred during the start lands here, with `proc` set.
            assert proc.stderr is not None
            if cancel is not None:
                threading.Thread(
                    target=_kill_on_cancel, args=(proc, cancel), daemon=True, name="kopia-cancel"
                ).start()
            # kopia redraws its progress line with carriage returns: split on both.
            while chunk := proc.stderr.read1(4096):  # type: ignore[attr-defined]
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                for raw in parts:
                    line = raw.decode(errors="replace")
                    sample = parse_progress_line(line)
                    if sample and on_progress:
                        on_progress(sample)
                    elif line.strip():
                        tail = [*tail[-40:], line]
            rc = proc.wait()
        except BaseException:
            if proc is not None:
                stop(proc, KOPIA_STOP_GRACE_S)
            raise
        finally:
            if proc is not None and proc.stderr is not None:
                proc.stderr.close()
        if buf.strip():
            tail.append(buf.decode(errors="replace"))
        if cancel is not None and cancel.is_set():
            raise KopiaError(f"restore of {snapshot_id} was cancelled")
        if rc != 0:
            raise classify_restore_failure(self._scrub("\n".join(tail)), snapshot_id)

    def log_tail(self) -> str:
        """The end of kopia's newest CLI log, for diagnostics."""
        logs = sorted((self._state_dir / "logs").glob("**/*.log"), key=os.path.getmtime)
        if not logs:
            return ""
        return self._scrub(last_lines(logs[-1].read_text(errors="replace"), 20))


def _kill_on_cancel(proc: subprocess.Popen[bytes], cancel: threading.Event) -> None:
    while proc.poll() is None:
        if cancel.wait(0.2):
            stop(proc, KOPIA_STOP_GRACE_S)
            return
