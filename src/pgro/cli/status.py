"""`pgro status`: the replicas of `pgro run`'s state directory, or of a Kubernetes cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from pgro.cli.status_view import emit, replica_entry

_CLUSTER_OPTIONS = ("kubeconfig", "context", "namespace", "all_namespaces")


@click.command()
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The --state-dir of `pgro run`: show its replicas.",
)
@click.option(
    "--cluster",
    is_flag=True,
    help="Show the replicas of a Kubernetes cluster instead, read through the kubeconfig "
    "(--kubeconfig, else $KUBECONFIG, else ~/.kube/config, else the pod's service account). "
    "Implied by any of the options below; the default of `kubectl pgro status`.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="With --cluster: the kubeconfig file to use.",
)
@click.option("--context", help="With --cluster: the kubeconfig context to use.")
@click.option(
    "-n",
    "--namespace",
    help="With --cluster: the namespace to show (default: the context's namespace).",
)
@click.option(
    "-A",
    "--all-namespaces",
    is_flag=True,
    help="With --cluster: show the replicas of every namespace.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with the CRD status field names.")
@click.option(
    "--show-credentials",
    is_flag=True,
    help="Include the users' passwords (they are otherwise never printed). With --cluster "
    "they are read from each user's Secret, which needs get on those Secrets; without it "
    "no Secret is read.",
)
@click.pass_context
def status(
    ctx: click.Context,
    state_dir: Path | None,
    cluster: bool,
    kubeconfig: Path | None,
    context: str | None,
    namespace: str | None,
    all_namespaces: bool,
    as_json: bool,
    show_credentials: bool,
) -> None:
    """Show every replica: phase, serving restore, verification, schedule, conditions,
    connection info, restores and users.

    From `pgro run`'s state (--state-dir DIR) or from a Kubernetes cluster's
    PostgresPhysicalReplica and PostgresPhysicalRestore objects (--cluster, as
    `kubectl pgro status` does); the output is the same for both.
    """
    from pgro.cli.status_cluster import Target, cluster_entries

    params = ctx.params
    cluster_given = [
        f"--{p.replace('_', '-')}" for p in _CLUSTER_OPTIONS if params[p] not in (None, False)
    ]
    if cluster and ctx.get_parameter_source("cluster") is not ParameterSource.DEFAULT_MAP:
        cluster_given.insert(0, "--cluster")
    if state_dir is not None and cluster_given:
        raise click.UsageError(
            f"--state-dir reads pgro run's state, {', '.join(cluster_given)} a cluster: give "
            "one or the other"
        )
    if namespace is not None and all_namespaces:
        raise click.UsageError("-n/--namespace and -A/--all-namespaces exclude each other")
    if state_dir is not None:
        entries = state_dir_entries(state_dir, show_credentials=show_credentials)
    elif cluster or cluster_given:
        target = Target(kubeconfig, context, namespace, all_namespaces)
        entries = cluster_entries(target, show_credentials=show_credentials)
    else:
        raise click.UsageError(
            "say what to show: --state-dir DIR (pgro run's state) or --cluster (the "
            "current kubeconfig's cluster)"
        )
    emit(entries, as_json=as_json)


def state_dir_entries(state_dir: Path, *, show_credentials: bool) -> list[dict[str, Any]]:
    from pgro.runtimes.embedded.credentials import CredentialStore
    from pgro.runtimes.embedded.store import Store

    db = state_dir / "state.db"
    if not db.exists():
        raise click.ClickException(
            f"{state_dir} holds no pgro state (no state.db): is it a --state-dir?"
        )
    store = Store(db)
    creds = CredentialStore(state_dir / "credentials")
    out: list[dict[str, Any]] = []
    for replica in store.replicas():
        users = creds.read(replica.key)
        credentials = [
            {
                "username": u.username,
                "file": str(creds.path_of(replica.key, u.username)),
                **({"password": u.password} if show_credentials else {}),
            }
            for u in users.values()
        ]
        out.append(
            replica_entry(
                replica.to_wire(),
                [r.to_wire() for r in store.restores(replica.key)],
                events=[e.__dict__ for e in store.events(replica.key, limit=10)],
                credentials=credentials,
            )
        )
    store.close()
    return out
