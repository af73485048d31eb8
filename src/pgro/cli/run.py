"""`pgro run`: the embedded runtime (`pgro status` shows its state, cli/status.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to ship, grep and parse."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _parse_addr(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT (for example 127.0.0.1:9187)")
    return (host.strip("[]") or "127.0.0.1", int(port))


@click.command()
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="YAML manifest with Secrets and PostgresPhysicalReplicas (repeatable). "
    "Re-read when it changes and on SIGHUP. Optional with --canopy-url.",
)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where state (SQLite), restores, credentials and endpoints live. A new or empty "
    "directory of yours, or one pgro run used before; it is kept private (other users "
    "cannot read it). A shared or non-empty directory such as /tmp or $HOME is refused.",
)
@click.option(
    "--metrics-addr",
    callback=_parse_addr,
    help="Serve /metrics, /livez and /readyz on HOST:PORT.",
)
@click.option(
    "--keep-serving",
    is_flag=True,
    help="On SIGTERM, leave the serving databases and endpoints running (the next "
    "`pgro run` adopts them).",
)
@click.option(
    "--listen-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the replicas' stable endpoints listen on.",
)
@click.option(
    "--max-concurrent-restores",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Restores downloading at once, across all replicas.",
)
@click.option(
    "--tick", type=click.FloatRange(0.05, 60), default=1.0, help="Seconds between passes."
)
@click.option(
    "--canopy-url",
    envvar="CANOPY_BASE_URL",
    help="Take replicas from canopy's worklist at this base URL ($CANOPY_BASE_URL): "
    "verify, upgrade and analytics declarations become replicas, their verdicts are "
    "reported back. https URLs authenticate with the device certificate.",
)
@click.option(
    "--canopy-device-key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="P-256 private key (PEM) of this canopy device; a self-signed certificate for it "
    "is built and renewed in the state directory. Without it a key is generated there: "
    "enrol its fingerprint (logged at start) in canopy.",
)
@click.option(
    "--canopy-ca-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="CA bundle to verify canopy's server certificate (default: the system's).",
)
@click.option(
    "--canopy-socks5-proxy",
    envvar="CANOPY_SOCKS5_PROXY",
    default="",
    help="SOCKS5 proxy for *.ts.net canopy URLs, e.g. socks5://[::1]:1055 "
    "($CANOPY_SOCKS5_PROXY; empty: none).",
)
@click.option(
    "--canopy-insecure-http",
    is_flag=True,
    help="Allow a plain http:// --canopy-url to a host other than this one (repository "
    "passwords and S3 credentials then cross the network unencrypted; logged as a warning).",
)
@click.option(
    "--canopy-interval",
    type=click.FloatRange(0.2, 3600),
    default=30.0,
    show_default=True,
    help="Seconds between worklist polls (each one jittered by ±20%).",
)
@click.option(
    "--canopy-progress-interval",
    type=click.FloatRange(0.05, 3600),
    default=30.0,
    show_default=True,
    help="Seconds between restore progress samples relayed to canopy.",
)
@click.option(
    "--canopy-removal-grace",
    type=click.FloatRange(0, 30 * 86400),
    default=600.0,
    show_default=True,
    help="Seconds a replica canopy no longer lists is kept before it and its data are "
    "removed (the reference removes it at once).",
)
@click.option(
    "--s3-endpoint",
    envvar="PGRO_S3_ENDPOINT",
    help="Upstream S3 URL the canopy proxy forwards to, e.g. http://127.0.0.1:9000 "
    "($PGRO_S3_ENDPOINT; default https://s3.<region>.amazonaws.com).",
)
@click.option(
    "--migrator",
    envvar="PGRO_MIGRATOR",
    metavar="CMD",
    help="The application's migrate command, run for restores with migrateTo (upgrade "
    "rehearsals), e.g. '/opt/tamanu/migrate.sh migrate' ($PGRO_MIGRATOR). Split like a shell "
    "would, run without one as the PostgreSQL account, pointed at the restore's own server by "
    "CONFIG_SYNC_DB_*, DATABASE_URL and PG* (docs/upgrade-rehearsals.md). Without it such "
    "restores fail MigrationUnsupported.",
)
def run(
    files: tuple[Path, ...],
    state_dir: Path,
    metrics_addr: tuple[str, int] | None,
    keep_serving: bool,
    listen_host: str,
    max_concurrent_restores: int,
    tick: float,
    canopy_url: str | None,
    canopy_device_key: Path | None,
    canopy_ca_file: Path | None,
    canopy_socks5_proxy: str,
    canopy_insecure_http: bool,
    canopy_interval: float,
    canopy_progress_interval: float,
    canopy_removal_grace: float,
    s3_endpoint: str | None,
    migrator: str | None,
) -> None:
    """Keep the manifests' replicas restored on this machine until stopped.

    Restores run as local processes (kopia, then PostgreSQL on a private port), each
    replica answers on one stable address (PgBouncer) that moves to the new restore at
    switchover, and state survives restarts. Logs are JSON lines on stderr.
    """
    from pgro.observability import serve
    from pgro.pgbouncer.endpoint import StableEndpoint
    from pgro.pipeline.migrator_command import MigratorCommand, MigratorCommandError
    from pgro.postgres.account import AccountMissing, resolve_run_account
    from pgro.runtimes.embedded.canopy import CanopyOptions
    from pgro.runtimes.embedded.manifest import ManifestError, load_manifests
    from pgro.runtimes.embedded.runtime import RunOptions, Runtime
    from pgro.runtimes.embedded.state_dir import StateDirError, prepare_state_dir

    if not files and not canopy_url:
        raise click.UsageError("give at least one manifest (-f) or --canopy-url")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # httpx logs every request's full URL at INFO; a notification URL is often the secret.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Nothing pgro run writes is for other users (state, logs, results); the few paths the
    # run account needs are opened up explicitly (see runtimes/embedded/state_dir.py).
    os.umask(0o077)
    try:
        # Read first, so that a manifest that cannot be used stops the start (exit 2) before
        # anything is created, instead of leaving a process that runs nothing; later edits
        # are reloaded while running.
        load_manifests(files)
        state_dir = prepare_state_dir(state_dir)
        command = MigratorCommand.parse(migrator) if migrator else None
        if command is not None:
            with contextlib.suppress(AccountMissing):  # the runtime reports that one
                command.check(resolve_run_account())
    except (StateDirError, ManifestError, MigratorCommandError) as exc:
        _refuse_start(exc)
    canopy = (
        _canopy(
            canopy_url,
            state_dir,
            canopy_device_key,
            canopy_ca_file,
            canopy_socks5_proxy or None,
            canopy_insecure_http,
            CanopyOptions(
                s3_endpoint=s3_endpoint or None,
                interval=timedelta(seconds=canopy_interval),
                progress_interval=canopy_progress_interval,
                removal_grace=timedelta(seconds=canopy_removal_grace),
            ),
        )
        if canopy_url
        else None
    )

    def endpoint_factory(
        name: str, run_dir: Path, account: Any, port: int, host: str
    ) -> StableEndpoint:
        return StableEndpoint(name, run_dir, account, port=port, listen_host=host)

    try:
        runtime = Runtime(
            RunOptions(
                manifests=list(files),
                state_dir=state_dir,
                keep_serving=keep_serving,
                tick=tick,
                listen_host=listen_host,
                max_concurrent_restores=max_concurrent_restores,
                canopy=canopy,
                migrator=command,
            ),
            endpoint_factory,
        )
    except StateDirError as exc:
        _refuse_start(exc)
    stop = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        runtime.reload_requested.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    http = None
    if metrics_addr:
        try:
            http = serve(runtime.metrics, runtime.health, *metrics_addr)
        except OSError as exc:
            host, port = metrics_addr
            shown = f"[{host}]" if ":" in host else host
            click.echo(
                f"Error: cannot serve --metrics-addr {shown}:{port}: {exc.strerror or exc}. "
                "Pick a free port, or an address of this host.",
                err=True,
            )
            sys.exit(2)
    try:
        runtime.run(stop)
    finally:
        if http is not None:
            http.shutdown()


def _refuse_start(exc: Exception) -> NoReturn:
    """Exit 2 (bad input, as `pgro verify` does) with the error on stderr, plain text."""
    reason = getattr(exc, "reason", type(exc).__name__)
    click.echo(f"error ({reason}): {exc}", err=True)
    sys.exit(2)


def _canopy(
    url: str,
    state_dir: Path,
    device_key: Path | None,
    ca_file: Path | None,
    socks5_proxy: str | None,
    insecure_http: bool,
    options: Any,
) -> tuple[Any, Any]:
    """The canopy client for `pgro run`: plain HTTP as given, https with this machine's
    device certificate (kept in the state directory, renewed before it expires)."""
    import httpx

    from pgro.canopy.client import CanopyClient, plain_http_problem
    from pgro.canopy.device_cert import DeviceCertificateError, DeviceIdentity

    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--canopy-url")
    problem = plain_http_problem(url, allowed=insecure_http, flag="--canopy-insecure-http")
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--canopy-url")
    identity = None
    # On the tailnet canopy knows the node; a certificate is for the mTLS route only.
    if parsed.scheme == "https" and not parsed.host.endswith(".ts.net"):
        state_dir.mkdir(parents=True, exist_ok=True)
        identity = DeviceIdentity(
            state_dir / "canopy-device",
            key_pem=device_key.read_bytes() if device_key is not None else None,
        )
        try:
            fingerprint = identity.fingerprint()
        except DeviceCertificateError as exc:
            raise click.BadParameter(str(exc), param_hint="--canopy-device-key") from None
        logging.getLogger("pgro.run").info(
            "canopy device key SPKI SHA-256 %s (enrol it in canopy with role backup-restore)",
            fingerprint,
        )
    client = CanopyClient(url, socks5_proxy=socks5_proxy, device_cert=identity, ca_file=ca_file)
    return client, options
