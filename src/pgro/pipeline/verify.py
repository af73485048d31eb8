"""Verification: restore a snapshot, boot PostgreSQL on it, prove it healthy, clean up.

Every process and directory this creates is removed before `verify_snapshot` returns or
raises, including on Ctrl-C (KeyboardInterrupt) and SIGTERM (which the CLI turns into one).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.secret import KopiaCredentials
from pgro.clock import utcnow
from pgro.core.secrets import scrub
from pgro.core.selection import select_snapshot
from pgro.core.snapshot import Snapshot
from pgro.core.timeouts import readiness_timeout
from pgro.core.verify_depth import Depth
from pgro.kopia.errors import RestoreFailed
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.data_checks import (
    DEFAULT_CHECKING_SUPERUSER,
    VERIFICATION_INCOMPLETE,
    DataVerification,
    checking_superuser,
    default_budget_s,
    depth_for,
    record,
)
from pgro.pipeline.events import Observer, SilentObserver
from pgro.pipeline.job import classify
from pgro.pipeline.locale_repair import (
    LocaleRepair,
    full_reindex_after_reset,
    locales_dir,
    refresh_collations,
)
from pgro.pipeline.report import (
    EXIT_FAILED_VERIFICATION,
    EXIT_MIGRATION_FAILED,
    EXIT_USAGE,
    VerificationReport,
)
from pgro.pipeline.restore import RestoredDataDirectory, restore_snapshot
from pgro.pipeline.verify_migration import (
    MigrationOutcome,
    MigrationRehearsal,
    check_migrator,
    rehearse_migration,
)
from pgro.postgres.account import RunAccount, resolve_run_account, unreachable
from pgro.postgres.catalog_guard import CatalogGuardFailed, neutralise_catalog
from pgro.postgres.health import check_health, record_collation_versions
from pgro.postgres.layout import NotPostgres
from pgro.postgres.server import (
    PostgresServer,
    StartupFailed,
    socket_dir_for,
    start_resetting_wal_if_needed,
)

DEFAULT_SUPERUSER = DEFAULT_CHECKING_SUPERUSER
# Failures that judge the snapshot (exit 1); any other failure leaves it unjudged (exit 2):
# configuration, a repository that could not be opened or read, a bug.
SNAPSHOT_FAULTS = (RestoreFailed, NotPostgres, StartupFailed, CatalogGuardFailed)


class ConfigurationError(Exception):
    """pgro cannot verify with this input (exit 2): the snapshot was not judged."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class VerifyOptions:
    snapshot_id: str | None = None
    work_root: Path | None = None
    ready_timeout: timedelta | None = None
    parallel: int | None = None
    keep: bool = False
    # `--migrate-to`: run the application's migrations once the snapshot is healthy.
    migration: MigrationRehearsal | None = None
    # `--depth`: how deep the checks read the data (None: the replica's
    # `pgro.bes.au/verify-depth` annotation, else `standard`).
    depth: Depth | None = None
    # `--verify-budget`: how long the data checks may take (None: 30m + 15m per 100 GiB).
    verify_budget: timedelta | None = None


def _check_traversable(path: Path, account: RunAccount) -> None:
    """The server's account must be able to reach its data directory through every parent."""
    if account.is_current_user:
        return
    why = unreachable(path, account, "enter")
    if why is not None:
        raise ConfigurationError(
            "WorkDirNotAccessible",
            f"PostgreSQL runs as {account.name}, but {why}: choose a --work-dir under a "
            "directory it can traverse, such as /tmp or /var/tmp",
        )


# Restored files take a little more room than the snapshot's logical size (block rounding).
SPACE_HEADROOM = 1.05


def _check_free_space(workdir: Path, snapshot_bytes: int) -> None:
    free = shutil.disk_usage(workdir).free
    needed = int(snapshot_bytes * SPACE_HEADROOM)
    if needed > free:
        raise ConfigurationError(
            "InsufficientDisk",
            f"the snapshot needs about {needed // 2**20} MiB but {workdir.parent} has "
            f"{free // 2**20} MiB free: restore elsewhere with --work-dir DIR",
        )


def choose_snapshot(
    snapshots: list[Snapshot], replica: PostgresPhysicalReplica, snapshot_id: str | None
) -> Snapshot:
    if snapshot_id is not None:
        for snap in snapshots:
            if snap.id == snapshot_id:
                return snap
        raise ConfigurationError(
            "SnapshotNotFound",
            f"snapshot {snapshot_id!r} is not in the repository ({len(snapshots)} snapshots "
            "there; `kopia snapshot list --all` shows them)",
        )
    chosen = select_snapshot(snapshots, replica.spec.snapshot_filter)
    if chosen is None:
        hosts = sorted({s.source.host for s in snapshots})
        raise ConfigurationError(
            "NoMatchingSnapshots",
            f"no snapshot matches the snapshotFilter of {replica.metadata.name} "
            f"({len(snapshots)} snapshots in the repository"
            + (f", from hosts {', '.join(hosts[:8])}" if hosts else "")
            + "): check tags, hostPattern, pathPattern and descriptionPattern",
        )
    return chosen


def _start(
    server: PostgresServer,
    restored: RestoredDataDirectory,
    timeout: timedelta,
    observer: Observer,
) -> None:
    observer.step(
        "start",
        f"starting PostgreSQL {restored.data.major} on private port {server.port} "
        f"(readiness timeout {int(timeout.total_seconds())}s)",
    )
    reset = start_resetting_wal_if_needed(server, timeout.total_seconds(), observer.note)
    if reset is not None:
        restored.repairs.record("reset_wal", reset)


def verify_snapshot(
    replica: PostgresPhysicalReplica,
    credentials: KopiaCredentials,
    options: VerifyOptions | None = None,
    observer: Observer | None = None,
    *,
    cancel: threading.Event | None = None,
    now: Callable[[], datetime] = utcnow,
) -> VerificationReport:
    """Run the whole verification. Returns a report; never leaves processes or files behind.

    Expected failures, including configuration problems, come back as a report with
    `exit_code` 1 (the snapshot failed) or 2 (it could not be judged), so callers always
    have one verdict to print. Only interruptions (KeyboardInterrupt) propagate.
    """
    opts = options or VerifyOptions()
    obs = observer or SilentObserver()
    # psycopg is needed only once the server runs; importing it while kopia works hides
    # its import time (a fixed cost that otherwise adds to every verification).
    threading.Thread(
        target=importlib.import_module, args=("psycopg",), daemon=True, name="prefetch"
    ).start()
    started = time.monotonic()
    report = VerificationReport(
        outcome="failure",
        snapshot_id=opts.snapshot_id,
        replica=f"{replica.metadata.namespace}/{replica.metadata.name}",
        repository=credentials.describe(),
    )
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        t = time.monotonic()
        timings[name] = t - mark
        mark = t

    workdir: Path | None = None
    server: PostgresServer | None = None
    restored: RestoredDataDirectory | None = None
    extra_dirs: list[Path] = []
    try:
        account = resolve_run_account()
        root = opts.work_root or Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="pgro-verify-", dir=root))
        # The server's account must traverse into the tree but not list or alter the rest.
        os.chmod(workdir, 0o711)
        _check_traversable(workdir, account)
        choice = depth_for(replica.metadata.annotations, opts.depth)
        report.depth = choice.depth
        if choice.warning is not None:
            obs.note(choice.warning)
        if opts.migration is not None:
            # Before a restore that may take hours, not after it.
            check_migrator(opts.migration, account)

        obs.step("connect", f"connecting to the {credentials.describe()}")
        with KopiaRepository(credentials, workdir / "kopia") as repo:
            snapshots = repo.list_snapshots()
            snapshot = choose_snapshot(snapshots, replica, opts.snapshot_id)
            report.snapshot_id = snapshot.id
            report.snapshot_time = snapshot.start_time
            report.snapshot_size = snapshot.size_bytes
            obs.note(
                f"snapshot {snapshot.id} of {snapshot.source.user_name}@{snapshot.source.host}:"
                f"{snapshot.source.path} taken {snapshot.start_time}"
            )
            lap("connect")
            _check_free_space(workdir, snapshot.size_bytes)
            restored = restore_snapshot(
                repo,
                snapshot,
                workdir / "data",
                account,
                obs,
                parallel=opts.parallel,
                cancel=cancel,
            )
            lap("restore")
            timings.update({f"restore.{k}": v for k, v in restored.timings.items()})
        report.postgres_version = restored.data.major
        timeout = readiness_timeout(
            snapshot.size_bytes, opts.ready_timeout or replica.spec.deployment_ready_timeout
        )
        budget = (
            opts.verify_budget.total_seconds()
            if opts.verify_budget is not None
            else default_budget_s(snapshot.size_bytes)
        )
        data = DataVerification(choice.depth, budget)
        if data.plan.checksums:
            obs.step("checksums", "checking the page checksums of the stopped cluster")
            data.before_start(restored.binaries, restored.data.path, account)
            lap("checksums")
        # The single-user locale probe and rewrite: the first time PostgreSQL opens the
        # data. Private locales are built (under the work directory) only when a database
        # names one this host lacks.
        obs.step("locale", "checking the databases' locales (single-user mode)")
        locales = LocaleRepair.before_start(
            restored.binaries, restored.data.path, account, locales_dir(workdir), obs.note
        )
        lap("locale")
        if data.wants_clean_stop:
            # A copy of a running server: single-user mode has just replayed its WAL and
            # shut it down cleanly, so pg_checksums can read the pages (torn ones repaired).
            obs.step("checksums", "checking the page checksums after WAL replay")
            data.recheck_stopped(restored.binaries, restored.data.path, account)
            lap("checksums")
        socket_dir = socket_dir_for(workdir / "run")
        if not socket_dir.is_relative_to(workdir):
            extra_dirs.append(socket_dir)
        # Assigned before starting, so an interrupt during startup still stops it.
        server = PostgresServer(
            restored.data.path,
            restored.binaries,
            account,
            socket_dir=socket_dir,
            log_path=workdir / "postgres.log",
            env=locales.env(),
        )
        _start(server, restored, timeout, obs)
        user = checking_superuser(server, restored, timeout.total_seconds())
        lap("start")
        if data.wants_clean_stop:
            # Single-user mode could not recover it; the first start did, and a clean stop
            # leaves pages pg_checksums can read.
            obs.step("checksums", "checking the page checksums after WAL replay (clean stop)")
            server.stop()
            data.recheck_stopped(restored.binaries, restored.data.path, account)
            _start(server, restored, timeout, obs)
            lap("checksums")
        # Before any other query: the catalog's stored settings, event triggers and C
        # functions with a library inside the snapshot must not run on the checks' sessions.
        endpoint = server.endpoint
        guard = neutralise_catalog(lambda dbname: endpoint.conninfo(dbname, user))
        for note in guard.notes():
            restored.repairs.notes.append(note)
            obs.note(note)
        lap("guard")

        def conninfo_for(dbname: str) -> str:
            return endpoint.conninfo(dbname, user)

        # After the guard (the rebuilds run index expressions), before the checks: an index
        # built in the source's locale order or under another collation library version
        # answers wrongly, and amcheck would call it damaged.
        locales.after_start(conninfo_for, restored.repairs, obs.note)
        collations = refresh_collations(conninfo_for, restored.repairs, obs.note)
        lap("repair")
        obs.step("check", "checking health: connect, list databases, SELECT 1 in each")
        health = check_health(server.endpoint, user)
        record_collation_versions(health, collations)
        lap("check")
        # On the data as restored: before any migration rehearsal changes it.
        if health.healthy and (data.plan.checksums or data.plan.reads_data):
            obs.step(
                "integrity",
                f"reading the data ({choice.depth}: {', '.join(data.plan.checks)}; "
                f"budget {budget:.0f}s)",
            )
            record(health, data.after_start(conninfo_for))
            lap("integrity")
        if restored.repairs.fixes["reset_wal"]:
            # After the checks (the reference runs it after Ready): torn index pages of the
            # reset cluster would surface later as "unexpected zero page".
            obs.step("reindex", "rebuilding every index after pg_resetwal")
            full_reindex_after_reset(conninfo_for, restored.repairs, obs.note)
            lap("reindex")
        report.checks = health.checks
        report.sizes = health.sizes
        report.restore_duration_sec = time.monotonic() - started
        if health.healthy:
            report.outcome = "success"
            report.exit_code = 0
            if opts.migration is not None:
                outcome = rehearse_migration(
                    opts.migration,
                    replica=replica,
                    endpoint=server.endpoint,
                    superuser=user,
                    account=account,
                    workdir=workdir,
                    observer=obs,
                    secrets=credentials.secret_values(),
                    cancel=cancel,
                )
                restored.repairs.notes.extend(outcome.notes)
                lap("migrate")
                _record_migration(report, outcome)
        else:
            report.reason = health.failure_reason
            report.error = health.failure_message
            # Cut short by the time budget: not judged (exit 2), unless something failed.
            report.exit_code = (
                EXIT_USAGE
                if health.failure_reason == VERIFICATION_INCOMPLETE
                else EXIT_FAILED_VERIFICATION
            )
    except Exception as exc:
        # One verdict whatever failed, even a bug (UnexpectedError), and a full cleanup.
        reason, message = classify(exc)
        code = EXIT_FAILED_VERIFICATION if isinstance(exc, SNAPSHOT_FAULTS) else EXIT_USAGE
        _fail(report, reason, message, code)
    finally:
        obs.step("cleanup", "stopping PostgreSQL and removing the restored files")
        if server is not None:
            server.stop()
        for extra in extra_dirs:
            shutil.rmtree(extra, ignore_errors=True)
        if workdir is not None and not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif workdir is not None:
            obs.note(f"kept the restored files in {workdir} (--keep)")
        lap("cleanup")
        if restored is not None:
            report.fixes = dict(restored.repairs.fixes)
            report.notes = list(restored.repairs.notes)
        if report.error:
            report.error = scrub(report.error, credentials.secret_values())
        report.timings = timings
        report.observed_at = now().isoformat().replace("+00:00", "Z")
    return report


def _record_migration(report: VerificationReport, outcome: MigrationOutcome) -> None:
    """The rehearsal's result in the report; a failed migration fails it with exit 3 (the
    health checks stay as they were)."""
    report.migration = outcome.to_json()
    if outcome.passed:
        return
    failed = outcome.result.failed_migration
    _fail(
        report,
        "MigrationFailed",
        outcome.result.error or f"the migration {failed} to {outcome.version} failed",
        EXIT_MIGRATION_FAILED,
    )


def _fail(report: VerificationReport, reason: str, message: str, code: int) -> None:
    report.outcome = "failure"
    report.reason = reason
    report.error = message
    report.exit_code = code
