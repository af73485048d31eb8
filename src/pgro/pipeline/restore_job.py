"""`pgro restore-job`: `pipeline.restore_snapshot` inside the restore Job's pod, on the
`RestoreJob` in its environment; the `RestoreOutcome` is the termination message the
operator reads (exit 2: a failure a retry cannot fix). On a canopy replica kopia goes
through the pod's `canopy-proxy` sidecar (docs/canopy.md).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Final

from pgro.canopy.proxy import wait_for_port_file
from pgro.core.verify_depth import parse_depth
from pgro.kopia.cache import relieve_cache_pressure, repository_cache_dir
from pgro.kopia.repository import KopiaRepository, RestoreProgress
from pgro.pipeline.detect_version import PGDATA_LINK, VERSION_FILE, link_data_directory
from pgro.pipeline.job import SECRET_ENV, ProxyNotReady, RestoreJob, RestoreOutcome
from pgro.pipeline.restore import RestoredDataDirectory, restore_snapshot
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.backup_label import incomplete_online_backup
from pgro.postgres.image import OfficialImage
from pgro.postgres.server import BackupIncomplete

# The replica's verification depth, for the postgres pod's setup script
# (`runtimes.kubernetes.scripts`).
VERIFY_DEPTH_FILE: Final = "pgro-verify-depth"
# Kubernetes keeps at most 4096 bytes of a termination message.
MESSAGE_LIMIT: Final = 4096
PROXY_PORT_TIMEOUT_S: Final = 30
StatVfs = Callable[[Path], os.statvfs_result]

# Kubernetes: TCP from anywhere in the cluster with a password; the socket stays inside
# the pod, where only the server's own uid runs.
KUBERNETES_HBA: Final = """\
# Written by pgro for a Kubernetes restore. The socket is private to the pod.
local   all  all                 trust
host    all  all  0.0.0.0/0      scram-sha-256
host    all  all  ::/0           scram-sha-256
"""


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


def _restore(job: RestoreJob) -> RestoredDataDirectory:
    creds = job.credentials
    if job.proxy is not None:
        try:
            port = wait_for_port_file(job.proxy.port_file, timeout=PROXY_PORT_TIMEOUT_S)
        except TimeoutError:
            raise ProxyNotReady(
                f"canopy-proxy sidecar did not write port file within {PROXY_PORT_TIMEOUT_S}s"
            ) from None
        creds = job.proxy.route(creds, port)
    root = job.target.parent
    # A retried pod starts over: kopia cannot resume a partial restore.
    depth_file = root / VERIFY_DEPTH_FILE
    leftovers = (job.target, job.kopia_dir, root / PGDATA_LINK, root / VERSION_FILE, depth_file)
    for leftover in leftovers:
        if leftover.is_symlink() or leftover.is_file():
            leftover.unlink()
        elif leftover.exists():
            shutil.rmtree(leftover)
    # The repository's kept metadata cache on the kopia-cache volume, keyed by location
    # (the Secret's, not the proxy's), when the operator set one; else a throwaway one.
    cache = (
        repository_cache_dir(job.kopia_cache_root, job.credentials.location)
        if job.kopia_cache_root is not None
        else None
    )
    with KopiaRepository(creds, job.kopia_dir, cache_dir=cache) as repo:
        restored = restore_snapshot(
            repo,
            job.snapshot,
            target=job.target,
            account=_account(),
            observer=_Progress(),
            # The data is served by the official image's `postgres`, over the pod network.
            install=OfficialImage,
            hba=KUBERNETES_HBA,
            parallel=job.parallel,
            settings=job.settings(),
        )
    # An online backup without its start WAL fails here, not in the pod's crash loop.
    incomplete = incomplete_online_backup(restored.data.path)
    if incomplete is not None:
        raise BackupIncomplete(incomplete)
    # prepare_data_directory refused a PGDATA outside `target`; this link stays inside.
    link_data_directory(root, restored.data.path, restored.data.major)
    fixes = sorted(name for name, done in restored.repairs.fixes.items() if done)
    notes = restored.repairs.notes
    if job.verify_depth != "quick":
        # Read by the pod's setup script, which checks the page checksums at these depths.
        depth_file.write_text(parse_depth(job.verify_depth) + "\n")
    (root / ".pgro-restore.json").write_text(
        json.dumps({"postgresVersion": restored.data.major, "fixes": fixes, "notes": notes})
    )
    return restored


def _relieve_pressure(job: RestoreJob, statvfs: StatVfs) -> int | None:
    """features.md §2.12: a kopia-cache volume 85 % full or more has its kept caches
    evicted before kopia connects; the percentage goes into the termination message, for
    the operator to grow the volume."""
    if job.kopia_cache_root is None:
        return None
    percent = relieve_cache_pressure(job.kopia_dir.parent, job.kopia_cache_root, statvfs)
    if percent is not None:
        print(
            f"PGRO_CACHE_PRESSURE: cache PVC {percent}% full — evicting regenerable content",
            flush=True,
        )
    return percent


def run(env: Mapping[str, str], statvfs: StatVfs = os.statvfs) -> RestoreOutcome:
    """Restore and prepare; never raises (the outcome is the termination message).
    `statvfs` reads how full the kopia-cache volume is (tests pass their own)."""
    secrets: list[str] = []
    try:
        job = RestoreJob.from_env(env)
        secrets = job.secret_values()
        pressure = _relieve_pressure(job, statvfs)
        return replace(RestoreOutcome.restored(_restore(job)), cache_pressure=pressure)
    except Exception as exc:
        return RestoreOutcome.failed(exc, secrets)


# The operator's readers of the termination message (`RestoreOutcome.from_message`).
def parse_message(message: str) -> tuple[str | None, str]:
    """(postgres version, failure) from a restore pod's termination message."""
    outcome = RestoreOutcome.from_message(message)
    return outcome.postgres_version, outcome.failure


def parse_fixes(message: str) -> dict[str, bool] | None:
    """The repairs a successful restore step reported on its message's second line."""
    return RestoreOutcome.from_message(message).fixes


def main() -> None:
    outcome = run(os.environ)
    path = Path(os.environ.get("PGRO_TERMINATION_LOG", "/dev/termination-log"))
    try:
        path.write_bytes(outcome.message.encode()[:MESSAGE_LIMIT])
    except OSError as exc:
        print(f"cannot write the termination message to {path}: {exc}", file=sys.stderr)
    if outcome.ok:
        print(f"done: PostgreSQL {outcome.postgres_version}")
    else:
        print(outcome.message, file=sys.stderr)
    sys.exit(outcome.exit_code)


__all__ = ["SECRET_ENV", "main", "parse_fixes", "parse_message", "run"]
