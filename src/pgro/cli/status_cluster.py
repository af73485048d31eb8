"""`pgro status --cluster`: the replicas and restores as a cluster holds them.

Reads PostgresPhysicalReplica and PostgresPhysicalRestore objects (and the replicas' Events)
through a kubeconfig, kubectl's way: `--kubeconfig`, else the first file of $KUBECONFIG,
else ~/.kube/config, else the pod's service account; `--context` picks a context, and the
namespace is `-n`, the context's namespace, or every namespace with `-A`.

Passwords are read only with `--show-credentials`, from the Secret each user's password lives
in (the one `status.connectionInfo.passwordSecret` names for the analytics user, the extra and
persistent users' own); otherwise no Secret is read at all, so an account without access to
Secrets sees everything else.

Every failure to reach or read the cluster becomes one `ClickException` naming the problem and
the fix; none carries a token or a password (the API server's messages name users and
resources, never credentials).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click
import httpx2
import yaml
from lightkube import ApiError, Client, ConfigError, KubeConfig
from lightkube.config.kubeconfig import DEFAULT_KUBECONFIG, SingleConfig
from pydantic import ValidationError

from pgro.api.names import (
    GROUP,
    REPLICA_KIND,
    RESTORE_KIND,
    extra_user_secret_name,
    replica_creds_secret_name,
    user_slug,
)
from pgro.api.replica import DEFAULT_ANALYTICS_USERNAME, PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.cli.status_view import replica_entry
from pgro.kube.client import KubeApi

INSTALL_HINT: Final = "install pgro's CRDs with `kubectl apply -k deploy/`"
EVENTS_SHOWN: Final = 10  # as many as `pgro status --state-dir` shows
_TIMEOUT: Final = httpx2.Timeout(15.0)


@dataclass(frozen=True)
class Target:
    """Where to read: the kubeconfig (None: kubectl's search), its context, the namespace
    (None: the context's), or every namespace."""

    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False


def load_config(target: Target) -> SingleConfig:
    """The selected context of the first configuration found, kubectl's order."""
    try:
        if target.kubeconfig is not None:
            config = KubeConfig.from_file(target.kubeconfig)
        else:
            config = _default_config()
        single = config.get(context_name=target.context)
    except ConfigError as exc:
        raise click.ClickException(f"the Kubernetes configuration is not usable: {exc}") from None
    except (OSError, ValueError, LookupError, TypeError, AttributeError, yaml.YAMLError) as exc:
        # A file that is not YAML or misses sections: name the file and the kind of error,
        # never its text (a kubeconfig holds tokens).
        where = target.kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
        raise click.ClickException(
            f"cannot read the kubeconfig {where} ({type(exc).__name__}): is it a kubeconfig?"
        ) from None
    assert single is not None  # get() without a default raises instead
    return single


def _default_config() -> KubeConfig:
    env = os.environ.get("KUBECONFIG")
    if env:
        paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p]
        found = next((p for p in paths if p.is_file()), None)
        if found is None:
            raise click.ClickException(
                f"$KUBECONFIG names no existing file ({env}): point it at a kubeconfig, or "
                "pass --kubeconfig PATH"
            )
        return KubeConfig.from_file(found)
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    if default.is_file():
        return KubeConfig.from_file(default)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return KubeConfig.from_service_account()
    raise click.ClickException(
        f"no kubeconfig: --kubeconfig is not given, $KUBECONFIG is not set and {default} does "
        "not exist (and this is not a pod). Pass --kubeconfig PATH, set $KUBECONFIG, or read "
        "`pgro run`'s state with --state-dir DIR instead"
    )


def cluster_entries(target: Target, *, show_credentials: bool) -> list[dict[str, Any]]:
    """Every replica in scope as a `pgro status` entry (sorted by namespace and name)."""
    single = load_config(target)
    namespace = None if target.all_namespaces else (target.namespace or single.namespace)
    where = "every namespace" if namespace is None else f"namespace {namespace}"
    try:
        reader = _Reader(single)
    except ConfigError as exc:
        raise click.ClickException(f"the Kubernetes configuration is not usable: {exc}") from None
    try:
        replicas = reader.objects(
            REPLICA_KIND, namespace, f"list {PLURALS[REPLICA_KIND]} in {where}"
        )
        restores = reader.objects(
            RESTORE_KIND, namespace, f"list {PLURALS[RESTORE_KIND]} in {where}"
        )
        events = reader.events(namespace)
        by_replica: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for doc in sorted((_restore_doc(r) for r in restores), key=_key):
            replica_name = str(((doc.get("spec") or {}).get("replica") or {}).get("name", ""))
            by_replica[(_key(doc)[0], replica_name)].append(doc)
        entries = []
        for doc in sorted((_replica_doc(r) for r in replicas), key=_key):
            creds = _credentials(doc)
            if show_credentials:
                creds = [reader.with_password(c) for c in creds]
            entries.append(
                replica_entry(
                    doc,
                    by_replica.get(_key(doc), []),
                    events=events.get(_key(doc), [])[-EVENTS_SHOWN:],
                    credentials=creds,
                )
            )
        return entries
    except ConfigError as exc:  # an exec credential plugin that failed, for one
        raise click.ClickException(f"the Kubernetes configuration is not usable: {exc}") from None
    finally:
        reader.close()


PLURALS: Final = {
    REPLICA_KIND: "postgresphysicalreplicas",
    RESTORE_KIND: "postgresphysicalrestores",
}


class _Reader:
    """The reads `pgro status` makes, each failure turned into a message naming the fix."""

    def __init__(self, single: SingleConfig) -> None:
        self.server = single.cluster.server
        self.context = single.context_name
        self.client = Client(single, timeout=_TIMEOUT, field_manager="pgro-status")
        self.api = KubeApi(self.client)

    def close(self) -> None:
        self.client.close()

    def objects(self, kind: str, namespace: str | None, what: str) -> list[dict[str, Any]]:
        try:
            return self.api.list(kind, namespace=namespace).items
        except httpx2.HTTPError as exc:
            raise self._explain(exc, what, custom=True) from None

    def events(self, namespace: str | None) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The replicas' Events, oldest first, in the shape `pgro run`'s store gives them.
        An account that may read the CRs but not Events still sees the rest."""
        try:
            items = self.api.list(
                "Event", namespace=namespace, fields={"regarding.kind": REPLICA_KIND}
            ).items
        except httpx2.HTTPError as exc:
            if _code(exc) != 403:
                raise self._explain(exc, "list Events") from None
            click.echo("pgro status: may not list Events here; showing no events", err=True)
            return {}
        return _events_by_replica(items)

    def with_password(self, cred: dict[str, Any]) -> dict[str, Any]:
        ns, _, name = str(cred["secret"]).partition("/")
        try:
            secret = self.api.get("Secret", ns, name)
        except httpx2.HTTPError as exc:
            raise self._explain(exc, f"get Secret {ns}/{name}") from None
        if secret is None:
            return {**cred, "missing": True}
        encoded = (secret.get("data") or {}).get("password")
        try:
            password = base64.b64decode(encoded, validate=True).decode() if encoded else None
        except (binascii.Error, UnicodeDecodeError):
            password = None
        if password is None:
            raise click.ClickException(f"Secret {ns}/{name} has no readable `password` key")
        return {**cred, "password": password}

    def _explain(
        self, exc: httpx2.HTTPError, what: str, *, custom: bool = False
    ) -> click.ClickException:
        where = f"{self.server} (context {self.context})"
        code = _code(exc)
        if code is None:
            return click.ClickException(
                f"cannot reach the Kubernetes API server {where}: {type(exc).__name__}: {exc}. "
                "Is the cluster up, and are --context and --kubeconfig the right ones?"
            )
        # The API server's own message (Status); a bare 404 of an unknown group has none.
        message = (exc.status.message if isinstance(exc, ApiError) else "") or ""
        if code == 404 and custom:
            return click.ClickException(
                f"{where} does not serve {GROUP} resources: pgro's CRDs are not installed in "
                f"this cluster; {INSTALL_HINT}"
            )
        if code == 403:
            fix = (
                "get on that Secret, or leave out --show-credentials"
                if what.startswith("get Secret")
                else f"get and list on {PLURALS[REPLICA_KIND]} and {PLURALS[RESTORE_KIND]} "
                f"({GROUP})"
            )
            if "every namespace" in what:
                fix += ", or name a namespace you may read with -n NAMESPACE"
            return click.ClickException(f"forbidden to {what} on {where}: {message}. Needs {fix}")
        if code == 401:
            return click.ClickException(
                f"{where} refused the kubeconfig's credentials (401 Unauthorized): log in "
                "again or renew the token"
            )
        return click.ClickException(f"cannot {what} on {where}: {code} {message}".rstrip())


def _code(exc: httpx2.HTTPError) -> int | None:
    """The HTTP status of a failed request; None when no answer came."""
    if isinstance(exc, ApiError):
        return exc.status.code
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def _key(doc: Mapping[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def _replica_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """The replica as `pgro run` stores it (defaults filled, unknown fields dropped), or as
    it is when it does not validate (its status still tells what the operator made of it)."""
    try:
        return PostgresPhysicalReplica.model_validate(raw).to_wire()
    except ValidationError:
        return raw


def _restore_doc(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return PostgresPhysicalRestore.model_validate(raw).to_wire()
    except ValidationError:
        return raw


def _events_by_replica(
    items: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for ev in items:
        regarding = ev.get("regarding") or {}
        meta = ev.get("metadata") or {}
        at = (
            ev.get("eventTime")
            or (ev.get("series") or {}).get("lastObservedTime")
            or ev.get("deprecatedLastTimestamp")
            or meta.get("creationTimestamp")
            or ""
        )
        key = (
            str(regarding.get("namespace") or meta.get("namespace", "")),
            str(regarding.get("name", "")),
        )
        out[key].append(
            {
                "at": str(at),
                "replica_key": f"{key[0]}/{key[1]}",
                "type": ev.get("type", ""),
                "reason": ev.get("reason", ""),
                "note": ev.get("note", ""),
                "related": (ev.get("related") or {}).get("name"),
            }
        )
    return {k: sorted(v, key=lambda e: str(e["at"])) for k, v in out.items()}


def _credentials(replica: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The users whose logins the operator keeps in Secrets, and those Secrets' names:
    the analytics user, the extra users, the persistent users."""
    meta = replica.get("metadata") or {}
    name, ns = str(meta.get("name", "")), str(meta.get("namespace", ""))
    spec = replica.get("spec") or {}
    conn = (replica.get("status") or {}).get("connectionInfo") or {}
    analytics = conn.get("username") or spec.get("analyticsUsername") or DEFAULT_ANALYTICS_USERNAME
    users: list[tuple[str, str]] = [
        (analytics, conn.get("passwordSecret") or replica_creds_secret_name(name))
    ]
    for extra in spec.get("extraUsers") or []:
        user = extra if isinstance(extra, str) else extra.get("name")
        if user and user != analytics:
            users.append((user, extra_user_secret_name(name, user)))
    for persistent in spec.get("persistentUsers") or []:
        user = persistent.get("name")
        if user:
            secret = persistent.get("secretName") or f"{name}-user-{user_slug(user)}"
            users.append((user, secret))
    return [{"username": u, "secret": f"{ns}/{s}"} for u, s in users]
