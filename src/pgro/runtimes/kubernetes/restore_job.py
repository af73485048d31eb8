"""`pgro restore-job`: the restore step inside the Kubernetes restore Job's pod.

The same pipeline as `pgro run`'s restore worker (`pgro.pipeline.restore`): kopia restores
the snapshot onto the data volume, PGDATA is located and repaired, and the major version is
reported through the container's termination message, which the operator reads from the
pod. The volume's root gets `pgdata`, a relative symlink to PGDATA (the path every later
pod uses), and `.postgres-version`, as in the reference.

Everything comes from the environment the operator's Job sets (see
`pgro.runtimes.kubernetes.workloads.restore_job`): the Secret values by `secretKeyRef`,
so they never appear in the pod spec. The exit code tells the Job controller whether a
retry can help: 2 for a failure that will repeat (wrong password, no such snapshot, not a
PostgreSQL snapshot), which the Job's pod failure policy turns into an immediate failure,
and 1 for anything else.

On a canopy replica (`PGRO_CANOPY_PROXY_PORT_FILE` set) kopia goes through the pod's
`canopy-proxy` sidecar (reference canopy-protocol §5.4): the restore waits up to 30 s for
the port the sidecar writes, then connects to it on loopback without TLS, with the dummy
keys of the canopy-creds Secret and the real repository password; the sidecar re-signs
each request with canopy's credentials, which this container never sees.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final

from pgro.api.secret import KopiaCredentials, S3Location, SecretInvalid, parse_kopia_secret
from pgro.canopy.proxy import wait_for_port_file
from pgro.core.secrets import scrub
from pgro.core.snapshot import Snapshot, SnapshotSource
from pgro.kopia.errors import EndpointUnreachable, KopiaError, RestoreFailed
from pgro.kopia.repository import KopiaRepository, RestoreProgress
from pgro.pipeline.events import Observer
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.confine import ConfinedTree, sanitise_tree
from pgro.postgres.image import OfficialImage
from pgro.postgres.layout import NotPostgres, locate_data_directory
from pgro.postgres.repair import default_settings, prepare_data_directory

EXIT_RETRY: Final = 1
EXIT_PERMANENT: Final = 2
# Kubernetes keeps at most 4096 bytes of a termination message.
MESSAGE_LIMIT: Final = 4096

# Secret key each environment variable carries (reference restore-pipeline §2.1), plus
# pgro's filesystem repositories.
SECRET_ENV: Final = MappingProxyType(
    {
        "KOPIA_BUCKET": "bucket",
        "KOPIA_REGION": "region",
        "AWS_ACCESS_KEY_ID": "accessKeyId",
        "AWS_SECRET_ACCESS_KEY": "secretAccessKey",
        "KOPIA_PASSWORD": "repositoryPassword",
        "KOPIA_ENDPOINT": "endpoint",
        "KOPIA_DISABLE_TLS": "disableTls",
        "KOPIA_FILESYSTEM_PATH": "filesystemPath",
        "KOPIA_PREFIX": "prefix",
    }
)

# The canopy-creds Secret's keys a canopy restore ignores: kopia's endpoint is the proxy.
CANOPY_IGNORED_KEYS: Final = frozenset({"endpoint", "disableTls", "filesystemPath"})
PROXY_PORT_TIMEOUT_S: Final = 30
DEFAULT_PROXY_HOST: Final = "127.0.0.1"
# What the proxy answers kopia when the broker gives it no credentials (pgro.canopy.proxy).
_NO_CREDENTIALS: Final = "no S3 credentials"

# Kubernetes: TCP from anywhere in the cluster with a password; the socket stays inside
# the pod, where only the server's own uid runs.
KUBERNETES_HBA: Final = """\
# Written by pgro for a Kubernetes restore. The socket is private to the pod.
local   all  all                 trust
host    all  all  0.0.0.0/0      scram-sha-256
host    all  all  ::/0           scram-sha-256
"""


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    message: str


class _Progress:
    """Plain lines on stdout, which `kubectl logs` shows (a pipeline Observer)."""

    def __init__(self) -> None:
        self._last_pct = -10.0

    def step(self, name: str, message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    def note(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def restore_progress(self, progress: RestoreProgress) -> None:
        if not progress.total_bytes:
            return
        pct = 100.0 * progress.done_bytes / progress.total_bytes
        if pct - self._last_pct >= 10.0:
            self._last_pct = pct
            print(f"  restored {pct:.0f}% ({progress.done_bytes // 2**20} MiB)", flush=True)


def _account() -> RunAccount:
    """Who will own the data: the pod's own uid (999, the official image's postgres, which
    the pgro image has no passwd entry for). Run as root outside a pod, the data goes to
    the PostgreSQL system account, as with `pgro run`."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        return resolve_run_account()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return RunAccount(name, uid, gid)


def _snapshot(env: Mapping[str, str]) -> Snapshot:
    size = env.get("SNAPSHOT_SIZE", "0")
    return Snapshot(
        id=env.get("SNAPSHOT_ID", ""),
        description="",
        source=SnapshotSource(host="", user_name="", path=""),
        tags=MappingProxyType({}),
        start_time=env.get("SNAPSHOT_TIME", ""),
        size_bytes=int(size) if size.isdigit() else 0,
    )


def _through_proxy(creds: KopiaCredentials, host: str, port: int) -> KopiaCredentials:
    """The same repository, reached through the canopy-proxy sidecar on loopback."""
    loc = creds.location
    assert isinstance(loc, S3Location)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return replace(creds, location=replace(loc, endpoint=netloc, disable_tls=True))


def run(env: Mapping[str, str]) -> Outcome:
    """Restore and prepare; never raises (the outcome is the termination message)."""
    port_file = env.get("PGRO_CANOPY_PROXY_PORT_FILE", "")
    data = {
        key: env[var].encode()
        for var, key in SECRET_ENV.items()
        if env.get(var) and not (port_file and key in CANOPY_IGNORED_KEYS)
    }
    try:
        creds = parse_kopia_secret(data)
    except SecretInvalid as exc:
        return Outcome(EXIT_PERMANENT, f"error: SecretInvalid: {exc}")
    secrets = creds.secret_values()
    snapshot = _snapshot(env)
    if not snapshot.id:
        return Outcome(EXIT_PERMANENT, "error: InvalidJob: SNAPSHOT_ID is not set")
    if port_file:
        try:
            port = wait_for_port_file(Path(port_file), timeout=PROXY_PORT_TIMEOUT_S)
        except TimeoutError:
            return Outcome(
                EXIT_RETRY,
                "error: CanopyProxyNotReady: canopy-proxy sidecar did not write port file "
                f"within {PROXY_PORT_TIMEOUT_S}s",
            )
        host = env.get("PGRO_CANOPY_PROXY_HOST", "").strip("[]") or DEFAULT_PROXY_HOST
        creds = _through_proxy(creds, host, port)
    root = Path(env.get("PGRO_DATA_ROOT", "/pgdata"))
    kopia_dir = Path(env.get("PGRO_KOPIA_DIR", "/tmp/kopia")) / "restore"  # noqa: S108 - the cache volume
    target = root / "postgres"
    observer: Observer = _Progress()
    try:
        # A retried pod starts over: kopia cannot resume a partial restore.
        for leftover in (target, kopia_dir, root / "pgdata", root / ".postgres-version"):
            if leftover.is_symlink() or leftover.is_file():
                leftover.unlink()
            elif leftover.exists():
                shutil.rmtree(leftover)
        parallel = env.get("KOPIA_PARALLEL", "")
        with KopiaRepository(creds, kopia_dir) as repo:
            observer.step("restore", f"restoring snapshot {snapshot.id} from {repo.description}")
            repo.restore(
                snapshot.id,
                target,
                parallel=int(parallel) if parallel.isdigit() else None,
                on_progress=observer.restore_progress,
            )
        # Before anything looks inside: the snapshot is untrusted (as in pipeline/restore.py).
        sanitised = sanitise_tree(target)
        observer.step("locate", "locating the PostgreSQL data directory")
        data_dir = locate_data_directory(target, sanitised.removed_links)
        observer.note(f"PGDATA is {data_dir.path.relative_to(root)} (PostgreSQL {data_dir.major})")
        settings = default_settings()
        if env.get("PGRO_READ_ONLY") == "true":
            settings["default_transaction_read_only"] = "on"
        extra = env.get("PGRO_EXTRA_CONFIG", "")
        for line in extra.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.strip().startswith("#"):
                settings[key.strip()] = value.strip().strip("'")
        observer.step("repair", "preparing the data directory for postgres:" + data_dir.major)
        repairs = prepare_data_directory(
            target,
            data_dir.path,
            OfficialImage(data_dir.major),
            _account(),
            settings=settings,
            hba=KUBERNETES_HBA,
            removed_links=sanitised.removed_links,
        )
        for note in repairs.notes:
            observer.note(note)
        link = root / "pgdata"
        # prepare_data_directory refused a PGDATA outside `target`; this link stays inside.
        link.symlink_to(ConfinedTree(root).relative(data_dir.path))
        (root / ".postgres-version").write_text(data_dir.major + "\n")
        fixes = sorted(name for name, done in repairs.fixes.items() if done)
        (root / ".pgro-restore.json").write_text(
            json.dumps({"postgresVersion": data_dir.major, "fixes": fixes, "notes": repairs.notes})
        )
    except (KopiaError, NotPostgres) as exc:
        retry = isinstance(exc, EndpointUnreachable | RestoreFailed)
        reason = getattr(exc, "reason", type(exc).__name__)
        if port_file and _NO_CREDENTIALS in str(exc):
            # The broker (or canopy behind it) gave the sidecar nothing: canopy may be
            # down or the group not ready yet, so let the Job retry.
            retry, reason = True, "CanopyCredentialsUnavailable"
        return Outcome(
            EXIT_RETRY if retry else EXIT_PERMANENT,
            f"error: {reason}: {scrub(str(exc), secrets)}",
        )
    except Exception as exc:
        return Outcome(
            EXIT_RETRY, f"error: UnexpectedError: {scrub(f'{type(exc).__name__}: {exc}', secrets)}"
        )
    # The major version on the first line (what the reference writes), the repairs as
    # JSON on the second, for the restore's status and canopy's `health_details.fixes`.
    return Outcome(0, f"{data_dir.major}\n{json.dumps({'fixes': dict(repairs.fixes)})}")


def parse_message(message: str) -> tuple[str | None, str]:
    """(postgres version, failure reason) from a restore pod's termination message."""
    text = message.strip()
    if text.startswith("error: "):
        return None, text.removeprefix("error: ")
    first = text.split("\n", 1)[0].strip()
    if first and all(part.isdigit() for part in first.split(".")):
        return first, ""
    return None, text


def parse_fixes(message: str) -> dict[str, bool] | None:
    """The repairs a successful restore step reported on its message's second line."""
    _, _, rest = message.strip().partition("\n")
    try:
        doc = json.loads(rest) if rest else None
    except ValueError:
        return None
    fixes = doc.get("fixes") if isinstance(doc, dict) else None
    if not isinstance(fixes, dict):
        return None
    return {str(k): v for k, v in fixes.items() if isinstance(v, bool)}


def main() -> None:
    outcome = run(os.environ)
    path = Path(os.environ.get("PGRO_TERMINATION_LOG", "/dev/termination-log"))
    encoded = outcome.message.encode()[:MESSAGE_LIMIT]
    try:
        path.write_bytes(encoded)
    except OSError as exc:
        print(f"cannot write the termination message to {path}: {exc}", file=sys.stderr)
    stream = sys.stdout if outcome.exit_code == 0 else sys.stderr
    print(
        outcome.message
        if outcome.exit_code
        else f"done: PostgreSQL {outcome.message.splitlines()[0]}",
        file=stream,
    )
    sys.exit(outcome.exit_code)


__all__ = ["main", "parse_fixes", "parse_message", "run"]
