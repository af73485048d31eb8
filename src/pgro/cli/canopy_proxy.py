"""`pgro canopy-proxy`: the restore pod's S3 re-signing sidecar (canopy replicas only)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType

import click

from pgro.canopy.proxy import (
    DEFAULT_PORT_FILE,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_REFRESH_MARGIN,
    SidecarSettings,
    run_sidecar,
)
from pgro.cli.run import JsonFormatter


def _blank_is_none(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # The pod spec sets optional variables to "" as often as it leaves them out.
    return value or None


@click.command("canopy-proxy")
@click.option(
    "--broker-url",
    envvar="PGRO_BROKER_URL",
    required=True,
    help="The operator's credential broker base URL ($PGRO_BROKER_URL).",
)
@click.option("--group", envvar="PGRO_GROUP", required=True, help="Canopy group id ($PGRO_GROUP).")
@click.option(
    "--type",
    "backup_type",
    envvar="PGRO_TYPE",
    required=True,
    help="Backup type, e.g. tamanu-postgres ($PGRO_TYPE).",
)
@click.option(
    "--region", envvar="PGRO_REGION", required=True, help="The bucket's AWS region ($PGRO_REGION)."
)
@click.option(
    "--s3-endpoint",
    envvar="PGRO_S3_ENDPOINT",
    callback=_blank_is_none,
    help="Upstream S3 URL, e.g. http://minio:9000 ($PGRO_S3_ENDPOINT; default "
    "https://s3.<region>.amazonaws.com). Requests go path-style.",
)
@click.option(
    "--run-id",
    envvar="PGRO_RUN_ID",
    callback=_blank_is_none,
    help="The restore run's UUID, sent to the broker and in progress samples ($PGRO_RUN_ID).",
)
@click.option(
    "--progress-callback-url",
    envvar="PGRO_PROGRESS_CALLBACK_URL",
    callback=_blank_is_none,
    help="POST a cumulative traffic sample here periodically; needs --run-id "
    "($PGRO_PROGRESS_CALLBACK_URL).",
)
@click.option(
    "--stats-callback-url",
    envvar="PGRO_STATS_CALLBACK_URL",
    callback=_blank_is_none,
    help="POST the final traffic totals here at shutdown ($PGRO_STATS_CALLBACK_URL).",
)
@click.option(
    "--listen-host",
    envvar="PGRO_PROXY_LISTEN_HOST",
    default="::1",
    show_default=True,
    help="Address to listen on; keep it loopback: the proxy signs for anyone who asks.",
)
@click.option(
    "--port",
    envvar="PGRO_PROXY_PORT",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--port-file",
    envvar="PGRO_PROXY_PORT_FILE",
    default=str(DEFAULT_PORT_FILE),
    show_default=True,
    help="Write the chosen port here (atomically) once listening; empty disables.",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(0.05, 3600),
    default=DEFAULT_PROGRESS_INTERVAL,
    show_default=True,
    help="Seconds between progress samples.",
)
@click.option(
    "--refresh-margin",
    type=click.FloatRange(0, 3000),
    default=DEFAULT_REFRESH_MARGIN.total_seconds(),
    show_default=True,
    help="Fetch new credentials this many seconds before the current ones expire.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def canopy_proxy(
    broker_url: str,
    group: str,
    backup_type: str,
    region: str,
    s3_endpoint: str | None,
    run_id: str | None,
    progress_callback_url: str | None,
    stats_callback_url: str | None,
    listen_host: str,
    port: int,
    port_file: str,
    progress_interval: float,
    refresh_margin: float,
    log_level: str,
) -> None:
    """Serve S3 on loopback for kopia and re-sign every request with canopy credentials.

    kopia connects with dummy keys to the port written to --port-file; the proxy replaces
    the signature with one made from short-lived credentials fetched from the operator's
    broker (refreshed before they expire) and forwards the request to S3. On SIGTERM or
    SIGINT it posts the traffic totals to --stats-callback-url and exits 0.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)
    # httpx logs every request line at INFO; the proxy's own log says what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))

    settings = SidecarSettings(
        broker_url=broker_url,
        group=group,
        backup_type=backup_type,
        region=region,
        s3_endpoint=s3_endpoint,
        listen_host=listen_host.strip("[]"),
        port=port,
        port_file=Path(port_file) if port_file else None,
        run_id=run_id,
        progress_url=progress_callback_url,
        stats_url=stats_callback_url,
        progress_interval=progress_interval,
        refresh_margin=timedelta(seconds=refresh_margin),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run_sidecar(settings, stop)
    except (OSError, ValueError) as exc:
        # Cannot listen, cannot write the port file, bad endpoint URL: say so, exit 2.
        logging.getLogger(__name__).error("canopy proxy failed to start: %s", exc)
        sys.exit(2)
