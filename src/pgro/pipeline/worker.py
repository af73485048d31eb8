"""The local job runner: one restore as a child process (`python -m pgro.pipeline.worker`).

The `RestoreJob` arrives as JSON on stdin (credentials never on a command line); the worker
starts the job's canopy proxy if it has one, runs `restore_snapshot`, starts the restored
server once privately (`first_start`: the WAL reset, where needed), and writes the
`RestoreOutcome` to `result.json` in the restore's directory, atomically; the exit code says
the same. `pgro run` starts it with `launch` (runtimes/embedded/work.py; docs/run.md) and
finds one an earlier run left with `leftover`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from pgro.api.data_checks import DataChecks
from pgro.canopy.proxy import new_client_credentials
from pgro.canopy.sigv4 import SigningCredentials
from pgro.core.timeouts import readiness_timeout
from pgro.core.verify_depth import data_checks, parse_depth
from pgro.interrupts import deferred_interrupts
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.data_checks import (
    DATA_DAMAGED,
    DataDamaged,
    DataVerification,
    checking_superuser,
    default_budget_s,
    record,
)
from pgro.pipeline.events import SilentObserver
from pgro.pipeline.job import (
    CanopyProxy,
    ProxyNotReady,
    RestoreJob,
    RestoreOutcome,
    credentials_to_json,
)
from pgro.pipeline.locale_repair import (
    LocaleRepair,
    detect_collations,
    locales_dir,
    refresh_collations,
)
from pgro.pipeline.restore import RestoredDataDirectory, restore_snapshot
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.catalog_guard import neutralise_catalog
from pgro.postgres.health import HealthReport
from pgro.postgres.server import PostgresServer, socket_dir_for, start_resetting_wal_if_needed
from pgro.processes import process_args, read_pid, spawn, stop, tie_services

RESULT = "result.json"
PIDFILE = "work.pid"
LOG = "work.log"
# This module, and its name before issue 11 (a worker an older pgro run left, unwinding).
MODULES: Final = ("pgro.pipeline.worker", "pgro.runtimes.embedded.restore_worker")
# The runtime's names for the shared types (`pgro.pipeline.job`).
WorkResult = RestoreOutcome
__all__ = ["LOG", "PIDFILE", "RESULT", "WorkResult", "credentials_to_json", "read_result"]


def launch(job: RestoreJob, restore_dir: Path) -> subprocess.Popen[bytes]:
    """Start a worker on `job`; its log, pidfile and result go in `restore_dir`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    with os.fdopen(os.open(restore_dir / LOG, flags, 0o600), "ab") as logf, deferred_interrupts():
        proc = spawn(
            [sys.executable, "-m", MODULES[0]],
            # Its parent gone (even kill -9): the worker unwinds, and its kopia and
            # canopy-proxy go with it; the next run restarts the restore from scratch.
            death_signal=signal.SIGTERM,
            stdin=subprocess.PIPE,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (restore_dir / PIDFILE).write_text(str(proc.pid))
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(job.to_json()).encode())
    proc.stdin.close()
    return proc


def leftover(restore_dir: Path) -> int | None:
    """The pid of a worker still running in `restore_dir`, by its pidfile and /proc."""
    pid = read_pid(restore_dir / PIDFILE)
    args = process_args(pid) if pid is not None else None
    return pid if args is not None and any(m in args for m in MODULES) else None


def read_result(restore_dir: Path) -> RestoreOutcome | None:
    try:
        return RestoreOutcome.from_json((restore_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None


def write_result(restore_dir: Path, result: RestoreOutcome) -> None:
    """`result.json`, atomically, 0600 (not through a link)."""
    tmp = restore_dir / (RESULT + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(result.to_json())
    os.replace(tmp, restore_dir / RESULT)


PROXY_START_TIMEOUT_S = 30.0
# SIGTERM: the proxy posts its final traffic totals, then exits.
PROXY_STOP_TIMEOUT_S = 15.0


def _start_proxy(
    settings: CanopyProxy, client: SigningCredentials
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `pgro canopy-proxy` for this restore and wait for its port (the reference's
    native sidecar, here a child of the worker). Only the proxy holds S3 credentials.

    Its secrets go on its stdin, never its command line: the restore's broker token and
    `client`, the random key pair kopia signs with (the proxy refuses anything else)."""
    proxy: Mapping[str, Any] = settings.launch or {}
    port_file = settings.port_file
    port_file.unlink(missing_ok=True)
    args = [
        proxy.get("python") or sys.executable,
        "-m",
        "pgro",
        "canopy-proxy",
        f"--broker-url={proxy['brokerUrl']}",
        f"--group={proxy['group']}",
        f"--type={proxy['type']}",
        f"--region={proxy['region']}",
        f"--listen-host={settings.host}",
        f"--port-file={port_file}",
        f"--progress-interval={proxy.get('progressInterval') or 30}",
    ]
    for flag, key in (
        ("--s3-endpoint", "s3Endpoint"),
        ("--run-id", "runId"),
        ("--progress-callback-url", "progressUrl"),
        ("--stats-callback-url", "statsUrl"),
    ):
        if proxy.get(key):
            args.append(f"{flag}={proxy[key]}")
    # The proxy's log lines go to the worker's log (work.log), next to kopia's.
    args.append("--secrets-from=-")
    # SIGKILL when the worker dies (even kill -9): the proxy serves this worker's kopia only.
    proc = spawn(
        args,
        death_signal=signal.SIGKILL,
        stdin=subprocess.PIPE,
        stdout=sys.stdout,
        stderr=sys.stdout,
    )
    secrets_doc = {
        "brokerToken": proxy.get("brokerToken") or "",
        "accessKeyId": client.access_key_id,
        "secretAccessKey": client.secret_access_key,
    }
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(secrets_doc).encode())
        proc.stdin.close()
    except OSError:
        pass  # it exited already: the wait below reports its exit code
    deadline = time.monotonic() + PROXY_START_TIMEOUT_S
    while True:
        try:
            return proc, int(port_file.read_text().strip())
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise ProxyNotReady(f"canopy-proxy exited with code {proc.returncode} before listening")
        if time.monotonic() > deadline:
            stop(proc, PROXY_STOP_TIMEOUT_S)
            raise ProxyNotReady(
                f"canopy-proxy did not write its port file within {PROXY_START_TIMEOUT_S:.0f}s"
            )
        time.sleep(0.05)


def run(doc: Mapping[str, Any]) -> RestoreOutcome:
    """Restore and prepare; never raises but for an interrupt (the outcome is the result)."""
    secrets: list[str] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        job = RestoreJob.from_json(doc)
        secrets = job.secret_values()
        if job.target.exists():
            shutil.rmtree(job.target)  # a previous attempt died midway: start over
        creds = job.credentials
        if job.proxy is not None:
            client = new_client_credentials()
            secrets.append(client.secret_access_key)
            proxy, port = _start_proxy(job.proxy, client)
            creds = job.proxy.route(creds, port, client)
        account = resolve_run_account()
        with KopiaRepository(creds, job.kopia_dir, cache_dir=job.kopia_cache) as repo:
            restored = restore_snapshot(
                repo,
                job.snapshot,
                job.target,
                account,
                SilentObserver(),
                parallel=job.parallel,
                settings=job.settings(),
            )
        checks = first_start(
            restored, account, job.target.parent, job.snapshot_size, depth=job.verify_depth
        )
        return RestoreOutcome.restored(restored, checks)
    except Exception as exc:
        # The result lands in status: whatever the error says, secrets stay out of it.
        return RestoreOutcome.failed(exc, secrets)
    finally:
        if proxy is not None:
            stop(proxy, PROXY_STOP_TIMEOUT_S)


def first_start(
    restored: RestoredDataDirectory,
    account: RunAccount,
    restore_dir: Path,
    snapshot_size: int,
    *,
    depth: str = "quick",
) -> DataChecks | None:
    """Start the restored server once, privately (socket only), and stop it cleanly, the way
    `pgro verify` and the pod's setup script do: a cluster whose crash recovery cannot
    start gets its WAL reset (`start_resetting_wal_if_needed`: a known WAL signature at
    once, an unrecognised failure after one retry, never the `NOT_RESETTABLE_SIGNATURES`),
    recorded as the fix `reset_wal`. The server `pgro run` then serves starts cleanly.
    `StartupFailed` fails the restore, with the server's log tail.

    The locale and collation repairs run here too (`pipeline.locale_repair`, as `pgro
    verify` runs them): the single-user locale rewrite before the start (private locales in
    `restore_dir/locales` when a database names one this host lacks; `LocaleUnavailable`
    when pgro cannot provide it), the fallback rewrite and the quick reindex after it
    (`fixes.locale`, `fixes.reindex`), the collation-version refresh
    (`fixes.collation_refresh`; a mismatch that remains is a note and the restore still
    serves), all before `pgro run` serves the server. The full reindex after a WAL reset
    runs later, on the served server (`core.full_reindex`): it does not gate readiness.

    At a `depth` other than quick (a verify replica's; `pipeline.data_checks`, as `pgro
    verify` runs them) the data is checked: the page checksums before the start, amcheck
    and the full read while it runs. Damage fails the restore (`DataDamaged`, naming the
    database, relation and block), so it is never verified nor served; a check the time
    budget cut short is a note, not a failure. Returns the checks' summary for the
    restore's status (None at quick depth)."""
    data = DataVerification(parse_depth(depth), default_budget_s(snapshot_size))
    if data.plan.checksums:
        data.before_start(restored.binaries, restored.data.path, account)
    verdicts = []
    # The single-user locale probe and rewrite (the first open of the data: crash recovery
    # runs here). Private locales go in the restore's directory, where the server pgro run
    # serves finds them too (`runtimes.embedded.servers`); none for a sound snapshot.
    locales = LocaleRepair.before_start(
        restored.binaries, restored.data.path, account, locales_dir(restore_dir), _say
    )
    if data.wants_clean_stop:
        # A copy of a running server: single-user mode has just replayed its WAL and shut it
        # down cleanly, so pg_checksums can read the pages (torn ones repaired).
        data.recheck_stopped(restored.binaries, restored.data.path, account)
    socket_dir = socket_dir_for(restore_dir / "run")
    server = PostgresServer(
        restored.data.path,
        restored.binaries,
        account,
        socket_dir=socket_dir,
        # The log of the server `pgro run` serves: a reset's failed starts stay readable.
        log_path=restore_dir / "postgres.log",
        env=locales.env(),
    )
    # No deploymentReadyTimeout here (the job does not carry it): the runtime's own
    # readiness deadline starts only once this worker has finished.
    timeout = readiness_timeout(snapshot_size).total_seconds()
    try:
        reset = start_resetting_wal_if_needed(server, timeout, _say)
        if reset is not None:
            _say(reset)
            restored.repairs.record("reset_wal", reset)
        if data.wants_clean_stop:
            # Single-user mode could not recover it; the first start did, and a clean stop
            # leaves pages pg_checksums can read.
            server.stop()
            data.recheck_stopped(restored.binaries, restored.data.path, account)
            server.start(timeout)
        user = checking_superuser(server, restored, timeout)
        endpoint = server.endpoint

        def conninfo_for(dbname: str) -> str:
            return endpoint.conninfo(dbname, user)

        # A sound snapshot pays the fallback's counted UPDATE and one detection query per
        # database; the guard runs (as `pgro verify` does, before any other query) only
        # when something is rebuilt here (index expressions run user code) or checked.
        locales.after_start_rewrite(conninfo_for, restored.repairs, _say)
        drifted = detect_collations(conninfo_for)
        checking = data.plan.checksums or data.plan.reads_data
        if checking or locales.rewritten or reset is not None or drifted:
            neutralise_catalog(conninfo_for)
        # The quick reindex gates readiness for free: the worker finishes before pgro run
        # starts the server it serves, so no client reaches an index still in the source's
        # locale order.
        locales.quick_reindex(conninfo_for, restored.repairs, _say)
        if drifted:
            # A mismatch that remains (a rebuild failed) is a note: pgro run still serves
            # the restore, where pgro verify fails its health check.
            refresh_collations(conninfo_for, restored.repairs, _say)
        if checking:
            verdicts = data.after_start(conninfo_for)
    finally:
        server.stop()
        if not socket_dir.is_relative_to(restore_dir):
            shutil.rmtree(socket_dir, ignore_errors=True)
    health = HealthReport()
    record(health, verdicts)
    for verdict in verdicts:
        _say(f"data check {verdict.name} ({data.depth}): {verdict.status}: {verdict.detail}")
    summary = None
    if data.plan.checksums or data.plan.reads_data:
        summary = data_checks(data.depth, verdicts, health.failure_message)
    if health.failure_reason == DATA_DAMAGED:
        raise DataDamaged(health.failure_message or "the data is damaged", summary)
    if health.failure_message:
        restored.repairs.notes.append(health.failure_message)
    return summary


def _say(line: str) -> None:
    print(line, flush=True)  # to work.log


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # `pgro run` stops work with SIGTERM: unwind so kopia (in its own session) is stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    # The first start's server is throwaway: it dies with the worker (even on kill -9).
    tie_services()
    doc = json.loads(sys.stdin.read())
    result = run(doc)
    write_result(Path(doc["restoreDir"]), result)
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "notes"}))
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
