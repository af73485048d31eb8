"""Restore failures published to a canopy-style `/events` endpoint over mTLS (`eventPublisher`).

Canopy's event API takes `{source, ref, message, description, severity, occurredAt,
active}` and folds events with the same `(source, ref)` into one rolling issue, so the ref
names the replica, not the restore: "this replica's restores are failing" is one issue.

Behaviour, as the reference's `event_publisher.rs`:

- one POST per failed restore, made after the failure is recorded;
- the client identity is read afresh from the Secret's `tls.crt` and `tls.key` for each
  publish (a rotated certificate is picked up; publishes are rare);
- a non-2xx answer, an unreachable endpoint, a missing Secret or an unusable key is a
  warning in the log and nothing else: no retry, no status, no effect on the reconcile.

Differences, on purpose: the POST runs on a background thread, so a slow endpoint never
holds up a reconcile pass (the reference awaited it inside the pass);
`clientCertificateSecretRef.namespace` defaults to the replica's (the reference refused
a ref without one); a Secret in *another* namespace than the replica's is used only if it
is labelled `pgro.bes.au/event-publisher-secret: "true"` (the reference used any: whoever
could write a replica could have the operator authenticate with another namespace's TLS
identity, the confused deputy the notification Secrets' opt-in label closes too); log
lines name the endpoint by its origin only and never quote the Secret, the key or the
server's answer beyond a short, single-line excerpt.

The server is verified against the system's trust store (`SSL_CERT_FILE` /
`SSL_CERT_DIR` name another one, as for every HTTPS client of pgro).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

from pgro import __version__
from pgro.api.names import LABEL_PREFIX, LABEL_TRUE
from pgro.api.notifications import url_origin
from pgro.api.replica import EventPublisherConfig, PostgresPhysicalReplica
from pgro.api.secret import SecretInvalid, decode_secret_data
from pgro.api.timestamp import format_rfc3339
from pgro.clock import utcnow
from pgro.core.secrets import scrub
from pgro.notifications import url_secrets

log = logging.getLogger("pgro.event_publisher")

CERT_KEY: Final = "tls.crt"
PRIVATE_KEY_KEY: Final = "tls.key"
SEVERITY_ERROR: Final = "error"
TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
USER_AGENT: Final = f"pgro/{__version__} (event publisher)"
# A client-certificate Secret in another namespace than the replica's is used only when it
# carries this label with value "true": the sibling of the notification Secrets' opt-in
# (`pgro.bes.au/notification-secret`). Without it, write access to a replica would lend
# its author every TLS identity the operator can read.
LABEL_EVENT_PUBLISHER_SECRET: Final = f"{LABEL_PREFIX}event-publisher-secret"
EVENT_PUBLISHER_SECRET_OPT_IN: Final = f"{LABEL_EVENT_PUBLISHER_SECRET}={LABEL_TRUE}"
# How much of a refusing server's answer a warning quotes.
_ANSWER_EXCERPT: Final = 200

# (namespace, name) → the Secret document (`data` base64, or `stringData`), None if absent.
SecretReader = Callable[[str, str], Mapping[str, Any] | None]


class PublishError(Exception):
    """An event was not delivered; the message names why and holds no secret."""


def restore_failed_ref(namespace: str, replica: str) -> str:
    return f"{namespace}/{replica}/restore-failed"


def restore_failed_event(
    source: str,
    namespace: str,
    replica: str,
    restore: str,
    snapshot_id: str,
    reason: str,
    occurred_at: datetime,
) -> dict[str, Any]:
    """The `POST /events` body for one failed restore."""
    return {
        "source": source,
        "ref": restore_failed_ref(namespace, replica),
        "message": f"{restore}, snapshot {snapshot_id}: {reason}",
        "description": f"Restore failed: {namespace}/{replica}",
        "severity": SEVERITY_ERROR,
        "occurredAt": format_rfc3339(occurred_at),
        "active": True,
    }


@dataclass(frozen=True)
class ClientIdentity:
    """The PEM certificate (chain) and private key; never in a repr."""

    certificate: bytes = field(repr=False)
    private_key: bytes = field(repr=False)


def identity_from_secret(where: str, doc: Mapping[str, Any]) -> ClientIdentity:
    """`tls.crt` and `tls.key` of a Secret document; `where` names it in errors."""
    try:
        data = decode_secret_data(doc)
    except SecretInvalid as exc:
        raise PublishError(f"Secret {where}: {exc}") from None
    missing = [k for k in (CERT_KEY, PRIVATE_KEY_KEY) if not data.get(k)]
    if missing:
        raise PublishError(f"Secret {where} has no key {' or '.join(missing)}")
    return ClientIdentity(data[CERT_KEY], data[PRIVATE_KEY_KEY])


def cross_namespace_refusal(
    replica_namespace: str, secret_namespace: str, name: str, doc: Mapping[str, Any]
) -> str | None:
    """Why the Secret `secret_namespace/name` may not lend its identity to a replica in
    `replica_namespace`, or None when it may: a Secret in the replica's own namespace
    always may, one in another namespace only if it opted in (`EVENT_PUBLISHER_SECRET_OPT_IN`)."""
    if secret_namespace == replica_namespace:
        return None
    labels = (doc.get("metadata") or {}).get("labels") or {}
    if labels.get(LABEL_EVENT_PUBLISHER_SECRET) == LABEL_TRUE:
        return None
    return (
        f"Secret {secret_namespace}/{name} is in another namespace than the replica "
        f"({replica_namespace}) and is not labelled {EVENT_PUBLISHER_SECRET_OPT_IN}, so it is "
        "not used (writing a replica must not lend it another namespace's TLS identity); "
        f"to share it, run: kubectl label secret -n {secret_namespace} {name} "
        f"{EVENT_PUBLISHER_SECRET_OPT_IN}, or copy the Secret into namespace "
        f"{replica_namespace} and drop clientCertificateSecretRef.namespace"
    )


def client_context(
    identity: ClientIdentity, verify: ssl.SSLContext | None = None
) -> ssl.SSLContext:
    """A TLS client context presenting `identity`.

    Python's `ssl` loads a certificate chain from files only: the PEMs are written to a
    private directory (0700, files 0600), loaded, and removed before this returns.
    """
    context = verify if verify is not None else httpx.create_ssl_context()
    with tempfile.TemporaryDirectory(prefix="pgro-event-identity-") as tmp:
        cert_path = Path(tmp) / "tls.crt"
        key_path = Path(tmp) / "tls.key"
        for path, content in ((cert_path, identity.certificate), (key_path, identity.private_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(content)
        try:
            context.load_cert_chain(str(cert_path), str(key_path))
        except (ssl.SSLError, OSError, ValueError) as exc:
            # The library's words name the problem (e.g. "KEY_VALUES_MISMATCH"), not the key.
            raise PublishError(
                f"the client certificate or key cannot be used ({type(exc).__name__}: "
                f"{getattr(exc, 'reason', None) or 'unreadable PEM'})"
            ) from None
    return context


def publish(
    url: str,
    identity: ClientIdentity,
    event: Mapping[str, Any],
    *,
    verify: ssl.SSLContext | None = None,
    timeout: httpx.Timeout = TIMEOUT,
) -> None:
    """One POST with a fresh client; raises `PublishError` unless the answer is 2xx."""
    where = url_origin(url)
    context = client_context(identity, verify)
    try:
        with httpx.Client(
            verify=context,
            timeout=timeout,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        ) as client:
            response = client.post(url, json=dict(event))
    except httpx.TimeoutException:
        raise PublishError(f"timed out posting to {where}") from None
    except (httpx.HTTPError, ssl.SSLError, OSError, ValueError) as exc:
        detail = scrub(str(exc), url_secrets(url)) or type(exc).__name__
        raise PublishError(f"posting to {where} failed: {detail}") from None
    if 200 <= response.status_code < 300:
        return
    answer = " ".join(response.text.split())[:_ANSWER_EXCERPT]
    raise PublishError(
        f"{where} answered HTTP {response.status_code}"
        + (f": {scrub(answer, url_secrets(url))}" if answer else "")
    )


class EventPublisher:
    """Publishes restore failures for the replicas that ask for it, off the caller's thread.

    `read_secret` is the runtime's: the operator reads the API server, `pgro run` its
    manifests. `verify` replaces the default trust store (tests).
    """

    def __init__(
        self,
        read_secret: SecretReader,
        *,
        clock: Callable[[], datetime] = utcnow,
        verify: Callable[[], ssl.SSLContext] | None = None,
        timeout: httpx.Timeout = TIMEOUT,
    ) -> None:
        self._read_secret = read_secret
        self._clock = clock
        self._verify = verify
        self._timeout = timeout
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def restore_failed(
        self,
        replica: PostgresPhysicalReplica,
        restore: str,
        snapshot_id: str,
        reason: str,
    ) -> bool:
        """Start publishing one failure; False when the replica has no eventPublisher."""
        config = replica.spec.event_publisher
        if config is None:
            return False
        event = restore_failed_event(
            config.source,
            replica.namespace,
            replica.name,
            restore,
            snapshot_id,
            reason,
            self._clock(),
        )
        thread = threading.Thread(
            target=self._deliver,
            args=(replica.key, replica.namespace, config, event),
            name=f"event-publisher-{replica.name}",
            daemon=True,
        )
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()
        return True

    def _deliver(
        self,
        key: str,
        namespace: str,
        config: EventPublisherConfig,
        event: Mapping[str, Any],
    ) -> None:
        ref = config.client_certificate_secret_ref
        secret_namespace = ref.namespace or namespace
        where = f"{secret_namespace}/{ref.name}"
        try:
            try:
                doc = self._read_secret(secret_namespace, ref.name)
            except Exception as exc:
                # The API server's refusal ("forbidden", "not found") names no value.
                raise PublishError(f"Secret {where} could not be read: {exc}") from None
            if doc is None:
                raise PublishError(
                    f"Secret {where} (eventPublisher.clientCertificateSecretRef) not found"
                )
            refusal = cross_namespace_refusal(namespace, secret_namespace, ref.name, doc)
            if refusal is not None:
                raise PublishError(refusal)
            identity = identity_from_secret(where, doc)
            verify = self._verify() if self._verify is not None else None
            publish(config.url, identity, event, verify=verify, timeout=self._timeout)
        except PublishError as exc:
            log.warning("%s: restore failure not published: %s", key, exc)
            return
        except Exception as exc:  # never let a publish take anything else down
            log.warning("%s: restore failure not published: %s", key, type(exc).__name__)
            return
        log.info("%s: restore failure published to %s", key, url_origin(config.url))

    def wait(self, timeout: float = 10.0) -> None:
        """Let publishes in flight finish (shutdown, tests)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def shutdown(self) -> None:
        self.wait(5.0)
