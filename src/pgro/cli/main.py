"""`pgro`: the command line."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from pgro import __version__
from pgro.api.duration import parse_duration
from pgro.cli.demo import DemoPaths, default_demo_dir, prepare_demo
from pgro.cli.output import TerminalObserver, literal, render_report
from pgro.core.verify_depth import DEPTHS, parse_depth
from pgro.pipeline.migrator_command import MigratorCommandError
from pgro.pipeline.report import EXIT_USAGE, VerificationReport
from pgro.pipeline.verify import VerifyOptions, verify_snapshot
from pgro.pipeline.verify_migration import MigrationRehearsal
from pgro.processes import tie_services
from pgro.runtimes.embedded.manifest import (
    ManifestError,
    check_schedule,
    kopia_credentials,
    load_manifests,
)

EXIT_INTERRUPTED = 130


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks clean up as for Ctrl-C."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgro")
def cli() -> None:
    """pgro restores PostgreSQL physical backups from Kopia repositories.

    It proves backups restore (verify replicas) and keeps read-only analytics copies
    fresh. The same PostgresPhysicalReplica manifests work on one machine and in
    Kubernetes.
    """


def _emit(report: VerificationReport, as_json: bool, err: Console, out: Console) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=None, sort_keys=False))
    else:
        render_report(out, report)


def _manifest_failure(exc: ManifestError, as_json: bool, err: Console) -> None:
    if as_json:
        report = VerificationReport(
            outcome="failure", snapshot_id=None, error=str(exc), reason=exc.reason
        )
        click.echo(json.dumps(report.to_json()))
    # The message quotes the manifest (names, values): printed literally.
    err.print(
        Text.assemble(("error", "bold red"), " (", literal(exc.reason), "): ", literal(exc)),
        highlight=False,
    )


@cli.command()
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML manifest with the kopia Secret and the PostgresPhysicalReplica (repeatable).",
)
@click.option("--replica", help="Name of the replica to verify when the manifest holds several.")
@click.option(
    "--snapshot", "snapshot_id", help="Verify this kopia snapshot ID instead of the newest match."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON verdict on stdout (canopy's shape)."
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to restore (default: the system temp dir). Needs room for the whole snapshot.",
)
@click.option(
    "--ready-timeout",
    callback=_duration,
    help="How long PostgreSQL may take to accept connections (e.g. 45m). "
    "Default: the replica's deploymentReadyTimeout, else 30m + 15m per 100 GiB.",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    help="kopia restore parallelism (default: CPUs, at most 8).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the restored files for inspection (the server is still stopped).",
)
@click.option(
    "--migrate-to",
    "migrate_to",
    metavar="VERSION",
    help="Rehearse an upgrade: once the snapshot is healthy, run --migrator against it and "
    "report the migrations' timings and the size change. Needs --migrator.",
)
@click.option(
    "--migrate-to-id",
    "migrate_to_id",
    metavar="ID",
    help="The target's version id (PGRO_MIGRATE_VERSION_ID for the migrator; default: the "
    "manifest's migrateTo.versionId when its version is --migrate-to).",
)
@click.option(
    "--migrator",
    metavar="CMD",
    help="The application's migrate command, e.g. '/opt/app/bin/migrate up'. Split like a "
    "shell would, run without one as the PostgreSQL account, in /, with the database in "
    "DATABASE_URL, CONFIG_SYNC_DB_* and PG* (docs/verify.md). Needs --migrate-to.",
)
@click.option(
    "--depth",
    type=click.Choice(DEPTHS, case_sensitive=False),
    default=None,
    help="How deep the checks read the data (default: the replica's "
    "pgro.bes.au/verify-depth annotation, else standard). "
    "quick: the server starts, is a primary, each database answers SELECT 1 (seconds). "
    "standard: + pg_checksums --check on every page before start (when the cluster has "
    "checksums) and bt_index_check on every btree index: catches overwritten pages and "
    "misplaced index pages (about the time to read the indexes once). "
    "full: + heapallindexed, verify_heapam on every table and TOAST relation and a read of "
    "every page (about the time to read the whole database twice).",
)
@click.option(
    "--verify-budget",
    callback=_duration,
    metavar="DURATION",
    help="How long the data checks may take (e.g. 20m, 90s; default 30m + 15m per 100 "
    "GiB). When it runs out the verdict is VerificationIncomplete (exit 2).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress output on stderr.")
def verify(
    files: tuple[Path, ...],
    replica: str | None,
    snapshot_id: str | None,
    as_json: bool,
    work_dir: Path | None,
    ready_timeout: timedelta | None,
    parallel: int | None,
    keep: bool,
    migrate_to: str | None,
    migrate_to_id: str | None,
    migrator: str | None,
    depth: str | None,
    verify_budget: timedelta | None,
    quiet: bool,
) -> None:
    """Prove a backup restores: restore it, start PostgreSQL on it, check it, clean up.

    The snapshot is the newest one matching the replica's snapshotFilter, or --snapshot.
    Every process and file created is removed afterwards, also on failure and Ctrl-C.

    \b
    Exit codes:
      0  the snapshot restored and PostgreSQL came up healthy
      1  the snapshot failed verification (not PostgreSQL, does not start, no data,
         damaged pages or indexes: DataDamaged, naming database, relation and block)
      2  it could not be judged: bad manifest or options, wrong password, unreachable
         repository, no matching snapshot, PostgreSQL binaries for its version missing,
         the data checks cut short by --verify-budget (VerificationIncomplete);
         with --migrate-to also a migrator that could not be started
      3  (--migrate-to) the snapshot is healthy but the application's migrations failed

    With --migrate-to VERSION --migrator CMD it also rehearses an upgrade: CMD runs the
    application's migrations against the verified restore, and the report shows each
    migration's time, the total and the database's size before and after.
    """
    rehearsal = _rehearsal(migrate_to, migrate_to_id, migrator)
    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    # The server verified here is throwaway: if pgro dies (even kill -9), it goes too.
    tie_services()
    try:
        manifest = load_manifests(files)
        chosen = manifest.replica(replica)
        # What `pgro run` reports as ScheduleValid=False: the same manifest must not verify.
        check_schedule(chosen)
        creds = kopia_credentials(manifest, chosen)
    except ManifestError as exc:
        _manifest_failure(exc, as_json, err)
        sys.exit(EXIT_USAGE)
    if rehearsal is not None and not migrate_to_id:
        target = chosen.spec.migrate_to
        if target is not None and target.version == rehearsal.version:
            rehearsal = replace(rehearsal, version_id=target.version_id)
    observer = TerminalObserver(err, quiet=quiet)
    options = VerifyOptions(
        snapshot_id=snapshot_id,
        work_root=work_dir,
        ready_timeout=ready_timeout,
        parallel=parallel,
        keep=keep,
        migration=rehearsal,
        depth=parse_depth(depth) if depth is not None else None,
        verify_budget=verify_budget,
    )
    try:
        with _interruptible():
            report = verify_snapshot(chosen, creds, options, observer)
    except KeyboardInterrupt:
        observer.close()
        err.print("[yellow]interrupted[/]: the restore was stopped and its files removed")
        sys.exit(EXIT_INTERRUPTED)
    observer.close()
    _emit(report, as_json, err, out)
    sys.exit(report.exit_code)


def _rehearsal(
    migrate_to: str | None, migrate_to_id: str | None, migrator: str | None
) -> MigrationRehearsal | None:
    """The upgrade rehearsal asked for, if any; the options come together or not at all."""
    if migrate_to is None and migrator is None:
        if migrate_to_id is not None:
            raise click.UsageError("--migrate-to-id needs --migrate-to VERSION and --migrator CMD")
        return None
    if migrator is None:
        raise click.UsageError(
            "--migrate-to needs --migrator CMD: the application's migrate command, run "
            "against the restored server"
        )
    if migrate_to is None:
        raise click.UsageError(
            "--migrator needs --migrate-to VERSION: the application version whose "
            "migrations it runs"
        )
    try:
        return MigrationRehearsal.parse(migrator, migrate_to, migrate_to_id or "")
    except MigratorCommandError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the demo repository and manifest live (default: ~/.local/share/pgro/demo).",
)
@click.option("--fresh", is_flag=True, help="Rebuild the demo repository from a new cluster.")
@click.option("--clean", is_flag=True, help="Remove the demo repository and manifest, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON on stdout.")
def demo(demo_dir: Path | None, fresh: bool, clean: bool, as_json: bool) -> None:
    """Back up a sample cluster into a local Kopia repository, then verify the backup.

    This is `pgro verify` on a real backup made on the spot: a PostgreSQL cluster in the
    Debian layout with an application database, snapshotted by kopia. The repository and
    the manifest stay for re-runs (and for trying `pgro verify -f` yourself).
    """
    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    tie_services()  # like verify: no server outlives the demo
    paths = DemoPaths(demo_dir or default_demo_dir())
    if clean:
        if paths.root.exists():
            shutil.rmtree(paths.root)
            err.print(f"removed {paths.root}", markup=False)
        else:
            err.print(f"nothing to remove: {paths.root} does not exist", markup=False)
        return
    observer = TerminalObserver(err)
    try:
        with _interruptible():
            prepare_demo(paths, observer, fresh=fresh)
            manifest = load_manifests([paths.manifest])
            chosen = manifest.replica(None)
            report = verify_snapshot(chosen, kopia_credentials(manifest, chosen), None, observer)
    except KeyboardInterrupt:
        observer.close()
        err.print("[yellow]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)
    except ManifestError as exc:
        _manifest_failure(exc, as_json, err)
        sys.exit(EXIT_USAGE)
    except Exception as exc:
        # Building the demo failed (initdb, kopia, disk): say what, not a traceback.
        observer.close()
        reason = getattr(exc, "reason", type(exc).__name__)
        err.print(
            Text.assemble(("demo failed", "bold red"), " (", literal(reason), "): ", literal(exc)),
            highlight=False,
        )
        sys.exit(EXIT_USAGE)
    observer.close()
    _emit(report, as_json, err, out)
    # Name the executable as it was run: after `./run demo`, `pgro` is not on PATH.
    prog = sys.argv[0] if "/" in sys.argv[0] else "pgro"
    clean_cmd = f"{prog} demo --clean" + (f" --dir {paths.root}" if demo_dir else "")
    err.print(
        f"\nThe demo repository and manifest live in {paths.root}.\n"
        f"Verify again with:  {prog} verify -f {paths.manifest}\n"
        f"Remove them with:   {clean_cmd}   (or rm -rf {paths.root})",
        highlight=False,
        markup=False,
    )
    sys.exit(report.exit_code)


def main(*, prog_name: str | None = None, default_map: dict[str, Any] | None = None) -> None:
    """`pgro`; `kubectl pgro` (cli/kubectl_plugin.py) names itself and sets its defaults."""
    from pgro.cli.canopy_proxy import canopy_proxy
    from pgro.cli.crds import crds_command
    from pgro.cli.detect_version import detect_version
    from pgro.cli.operator import check_data, operator, restore_job
    from pgro.cli.run import run
    from pgro.cli.status import status

    cli.add_command(run)
    cli.add_command(status)
    cli.add_command(operator)
    cli.add_command(restore_job)
    cli.add_command(check_data)
    cli.add_command(detect_version)
    cli.add_command(crds_command)
    cli.add_command(canopy_proxy)
    cli(prog_name=prog_name, default_map=default_map)


if __name__ == "__main__":
    main()
