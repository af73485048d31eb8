"""`pgro canopy-proxy`: the restore pod's S3 re-signing sidecar (canopy replicas only).

Its two secrets never go on the command line (`ps` shows that to every local user): the
restore's broker token and the key pair kopia signs with come from `--secrets-from` (a
JSON file that only its owner may read, or `-` for stdin: how `pgro run` hands them
over), else from the environment (`PGRO_BROKER_TOKEN`, `PGRO_PROXY_ACCESS_KEY_ID`,
`PGRO_PROXY_SECRET_ACCESS_KEY`: how the restore Job's Secret hands them over).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Mapping
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
from pgro.canopy.sigv4 import SigningCredentials
from pgro.cli.run import JsonFormatter

SECRETS_ENV = {
    "brokerToken": "PGRO_BROKER_TOKEN",
    "accessKeyId": "PGRO_PROXY_ACCESS_KEY_ID",
    "secretAccessKey": "PGRO_PROXY_SECRET_ACCESS_KEY",
}


class SecretsUnavailable(Exception):
    pass


def read_secrets(source: str | None, env: Mapping[str, str]) -> tuple[str, SigningCredentials]:
    """(broker token, kopia's key pair) from `source` (a path, `-` for stdin) or `env`."""
    if source:
        if source == "-":
            text = sys.stdin.read()
        else:
            path = Path(source)
            try:
                mode = path.stat().st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise SecretsUnavailable(
                        f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                        "chmod 600 it"
                    )
                text = path.read_text()
            except OSError as exc:
                raise SecretsUnavailable(f"cannot read {path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
        except ValueError:
            raise SecretsUnavailable("--secrets-from is not a JSON object") from None
        if not isinstance(doc, dict):
            raise SecretsUnavailable("--secrets-from is not a JSON object")
        values = {k: doc.get(k) for k in SECRETS_ENV}
        where = {k: f"{k} in --secrets-from" for k in SECRETS_ENV}
    else:
        values = {k: env.get(var) for k, var in SECRETS_ENV.items()}
        where = {k: f"${var}" for k, var in SECRETS_ENV.items()}
    missing = [where[k] for k, v in values.items() if not isinstance(v, str) or not v]
    if missing:
        raise SecretsUnavailable(
            f"missing {', '.join(missing)}: the proxy needs the restore's broker token and "
            "the S3 keys its kopia signs with"
        )
    token, key_id, secret = (str(values[k]) for k in SECRETS_ENV)
    return token, SigningCredentials(key_id, secret)


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
    help="Address to listen on; keep it loopback. Only requests signed with kopia's key "
    "pair are forwarded.",
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
    "--secrets-from",
    envvar="PGRO_PROXY_SECRETS_FILE",
    help="JSON file (mode 0600) with brokerToken, accessKeyId and secretAccessKey; `-` "
    "reads it from stdin. Default: $PGRO_BROKER_TOKEN, $PGRO_PROXY_ACCESS_KEY_ID and "
    "$PGRO_PROXY_SECRET_ACCESS_KEY.",
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
    secrets_from: str | None,
    progress_interval: float,
    refresh_margin: float,
    log_level: str,
) -> None:
    """Serve S3 on loopback for kopia and re-sign every request with canopy credentials.

    kopia connects with its own key pair (see --secrets-from) to the port written to
    --port-file; the proxy checks that signature, replaces it with one made from
    short-lived credentials fetched from the broker with the restore's token (refreshed
    before they expire) and forwards the request to S3. Unsigned or wrongly signed
    requests get 403. On SIGTERM or
    SIGINT it posts the traffic totals to --stats-callback-url and exits 0.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)
    # httpx logs every request line at INFO; the proxy's own log says what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))

    try:
        token, client = read_secrets(secrets_from, os.environ)
    except SecretsUnavailable as exc:
        logging.getLogger(__name__).error("canopy proxy cannot start: %s", exc)
        sys.exit(2)
    settings = SidecarSettings(
        broker_url=broker_url,
        group=group,
        backup_type=backup_type,
        region=region,
        broker_token=token,
        client_credentials=client,
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
