"""`pgro operator` and `pgro restore-job`: the Kubernetes runtime's two entry points."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from pgro.cli.run import JsonFormatter, _parse_addr

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@click.command()
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    envvar="KUBECONFIG",
    help="Kubeconfig to use outside a cluster (default: in-cluster service account, then "
    "$KUBECONFIG, then ~/.kube/config).",
)
@click.option("--context", help="Kubeconfig context (default: the current one).")
@click.option(
    "--namespace",
    envvar="OPERATOR_NAMESPACE",
    help="The operator's own namespace: its ConfigMap and leader Lease live there "
    "(default: the service account's namespace, else postgres-restore-operator).",
)
@click.option(
    "--metrics-addr",
    envvar="METRICS_ADDR",
    default="[::]:8080",
    show_default=True,
    callback=_parse_addr,
    help="Serve /metrics, /livez and /readyz on HOST:PORT.",
)
@click.option(
    "--identity",
    envvar="POD_NAME",
    help="This instance's name in the leader Lease (default: the host name and pid).",
)
@click.option(
    "--image",
    envvar="PGRO_IMAGE",
    help="pgro image for restore Jobs when the ConfigMap's kopiaImage is unset.",
)
@click.option(
    "--install-crds/--no-install-crds",
    default=True,
    show_default=True,
    help="Server-side apply the CRDs at startup (needs RBAC on customresourcedefinitions).",
)
@click.option(
    "--leader-election/--no-leader-election",
    default=True,
    show_default=True,
    help="Hold a Lease so only one instance acts; others stand by.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    default=2,
    show_default=True,
    help="Objects reconciled at once (never the same object twice).",
)
@click.option(
    "--resync",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds between full resyncs of every replica and restore.",
)
@click.option("--lease-duration", type=click.FloatRange(2, 300), default=15.0, hidden=True)
@click.option("--renew-every", type=click.FloatRange(0.5, 100), default=5.0, hidden=True)
def operator(
    kubeconfig: Path | None,
    context: str | None,
    namespace: str | None,
    metrics_addr: tuple[str, int],
    identity: str | None,
    image: str | None,
    install_crds: bool,
    leader_election: bool,
    workers: int,
    resync: float,
    lease_duration: float,
    renew_every: float,
) -> None:
    """Run the Kubernetes operator until SIGTERM.

    Watches PostgresPhysicalReplica and PostgresPhysicalRestore objects in every namespace
    and turns them into restore Jobs, data volumes, PostgreSQL Deployments and a stable
    Service per replica that moves to each new restore at switchover. Settings come from
    the ConfigMap postgres-restore-operator-config in the operator's namespace (watched
    live). With CANOPY_BASE_URL set, replicas also come from canopy's worklist and their
    verdicts are reported back (see docs/canopy.md). Logs are JSON lines on stderr. See
    docs/operator.md.
    """
    from pgro.canopy.settings import settings_from_env as canopy_settings_from_env
    from pgro.cli.operator_settings import parse_operator_settings
    from pgro.core.settings import ReconcilerSettings
    from pgro.kube.client import KubeApi
    from pgro.observability import serve
    from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # lightkube's HTTP client logs every request at INFO, and httpx logs full URLs (a
    # notification URL is often the secret).
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    log = logging.getLogger("pgro.operator")

    sa_namespace = None
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        sa_namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    env = dict(os.environ)
    if namespace:
        env["OPERATOR_NAMESPACE"] = namespace
    if image:
        env["PGRO_IMAGE"] = image
    settings, warnings = parse_operator_settings(env, serviceaccount_namespace=sa_namespace)
    for warning in warnings:
        log.warning("%s", warning)
    try:
        api = KubeApi.connect(str(kubeconfig) if kubeconfig else None, context)
    except Exception as exc:
        raise click.ClickException(
            f"cannot configure a Kubernetes client: {exc}. Run inside a cluster, or pass "
            "--kubeconfig / set KUBECONFIG."
        ) from None
    options = OperatorOptions(
        namespace=settings.namespace,
        identity=identity or f"{socket.gethostname()}-{os.getpid()}",
        default_image=settings.pgro_image,
        install_crds=install_crds,
        leader_election=leader_election,
        workers=workers,
        resync_s=resync,
        settings=ReconcilerSettings(ready_timeout_floor_s=settings.ready_timeout_floor_secs),
        lease_duration_s=lease_duration,
        renew_every_s=renew_every,
        postgres_log_level=settings.postgres_log_level,
        pod_name=settings.pod_name,
    )
    try:
        canopy, canopy_warnings = canopy_settings_from_env(env, settings.namespace)
    except ValueError as exc:
        raise click.UsageError(f"CANOPY_BASE_URL: {exc}") from None
    for warning in canopy_warnings:
        log.warning("%s", warning)
    op = Operator(api, options, canopy=canopy)
    host, port = metrics_addr
    try:
        server = serve(op.metrics, op.health, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    stop = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    log.info("pgro operator starting as %s (namespace %s)", options.identity, options.namespace)
    try:
        code = op.run(stop)
    except Exception as exc:
        log.exception("operator failed")
        raise click.ClickException(str(exc)) from None
    finally:
        server.shutdown()
    sys.exit(code)


@click.command("check-data")
def check_data() -> None:
    """The data checks inside a `<restore>-data-check` Job's pod (set up by the operator).

    Reads the page checksums the postgres pod's setup took, then runs amcheck and the full
    read of $PGRO_VERIFY_DEPTH against $PGRO_CHECK_HOST as the admin role
    ($PGRO_ADMIN_PASSWORD), and writes the verdict as JSON to the termination message.
    """
    from pgro.pipeline.data_check_job import main as job_main

    job_main()


@click.command("restore-job")
def restore_job() -> None:
    """The restore step inside a restore Job's pod (set up by the operator).

    Restores SNAPSHOT_ID with kopia onto $PGRO_DATA_ROOT, locates and repairs PGDATA, and
    writes the PostgreSQL major version (or `error: <reason>: <detail>`) to the
    termination message. Credentials come from the environment (KOPIA_PASSWORD, ...).
    """
    from pgro.pipeline.restore_job import main as job_main

    job_main()
