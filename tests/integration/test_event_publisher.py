"""`eventPublisher`: restore failures POSTed over mTLS to a real HTTPS endpoint on 127.0.0.1
that requires a client certificate (tests/fixtures/events_endpoint.py)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.event_publisher import (
    EVENT_PUBLISHER_SECRET_OPT_IN,
    LABEL_EVENT_PUBLISHER_SECRET,
    ClientIdentity,
    EventPublisher,
    PublishError,
    publish,
    restore_failed_event,
)
from tests.fixtures.events_endpoint import EventsEndpoint, serve_events_endpoint
from tests.fixtures.manifests import replica, secret_doc

WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.fixture
def endpoint(scratch: Path) -> Iterator[EventsEndpoint]:
    with serve_events_endpoint(scratch / "events") as served:
        yield served


def tls_secret(endpoint: EventsEndpoint, common_name: str, *, encoded: bool) -> dict[str, Any]:
    cert = endpoint.client(common_name)
    return secret_doc(
        "canopy-client", {"tls.crt": cert.cert_pem, "tls.key": cert.key_pem}, encoded=encoded
    )


def publisher_for(
    endpoint: EventsEndpoint, secrets: Mapping[tuple[str, str], Mapping[str, Any]]
) -> EventPublisher:
    return EventPublisher(
        lambda ns, name: secrets.get((ns, name)), clock=lambda: WHEN, verify=endpoint.trust
    )


def with_publisher(
    endpoint: EventsEndpoint, *, source: str | None = None, **ref: Any
) -> PostgresPhysicalReplica:
    config: dict[str, Any] = {
        "url": endpoint.url,
        "clientCertificateSecretRef": {"name": "canopy-client", **ref},
    }
    if source is not None:
        config["source"] = source
    return replica("orders", namespace="tenant-a", eventPublisher=config)


def test_the_event_body_is_the_reference_shape() -> None:
    event = restore_failed_event(
        "pgro", "tenant-a", "orders", "orders-abc12", "k1234", "NotPostgres: no PGDATA", WHEN
    )
    assert event == {
        "source": "pgro",
        "ref": "tenant-a/orders/restore-failed",
        "message": "orders-abc12, snapshot k1234: NotPostgres: no PGDATA",
        "description": "Restore failed: tenant-a/orders",
        "severity": "error",
        "occurredAt": "2026-03-04T05:06:07Z",
        "active": True,
    }


def test_a_failure_is_posted_with_the_secrets_client_certificate(
    endpoint: EventsEndpoint,
) -> None:
    secrets = {("tenant-a", "canopy-client"): tls_secret(endpoint, "pgro-tenant-a", encoded=True)}
    publisher = publisher_for(endpoint, secrets)
    assert publisher.restore_failed(
        with_publisher(endpoint), "orders-abc12", "k1234", "kopia said: boom"
    )
    publisher.wait()
    assert len(endpoint.received) == 1
    got = endpoint.received[0]
    assert got.client_common_name == "pgro-tenant-a"
    assert got.path == "/api/events"
    assert got.content_type == "application/json"
    assert got.body == {
        "source": "pgro",
        "ref": "tenant-a/orders/restore-failed",
        "message": "orders-abc12, snapshot k1234: kopia said: boom",
        "description": "Restore failed: tenant-a/orders",
        "severity": "error",
        "occurredAt": "2026-03-04T05:06:07Z",
        "active": True,
    }


def test_the_secret_namespace_and_source_are_honoured(endpoint: EventsEndpoint) -> None:
    # stringData as a manifest holds it, in another namespace than the replica's, which
    # lends its identity to other namespaces' replicas.
    shared = tls_secret(endpoint, "shared-client", encoded=False)
    shared["metadata"]["labels"] = {LABEL_EVENT_PUBLISHER_SECRET: "true"}
    secrets = {("certs", "canopy-client"): shared}
    publisher = publisher_for(endpoint, secrets)
    target = with_publisher(endpoint, source="pgro-staging", namespace="certs")
    publisher.restore_failed(target, "orders-x", "k9", "reason")
    publisher.wait()
    assert [(r.client_common_name, r.body["source"]) for r in endpoint.received] == [
        ("shared-client", "pgro-staging")
    ]


@pytest.mark.parametrize(
    "labels",
    [None, {LABEL_EVENT_PUBLISHER_SECRET: "false"}, {"pgro.bes.au/notification-secret": "true"}],
)
def test_a_secret_in_another_namespace_without_the_opt_in_is_not_used(
    endpoint: EventsEndpoint, caplog: pytest.LogCaptureFixture, labels: dict[str, str] | None
) -> None:
    other = tls_secret(endpoint, "other-namespace-identity", encoded=True)
    if labels is not None:
        other["metadata"]["labels"] = labels
    publisher = publisher_for(endpoint, {("certs", "canopy-client"): other})
    with caplog.at_level(logging.WARNING, logger="pgro.event_publisher"):
        publisher.restore_failed(
            with_publisher(endpoint, namespace="certs"), "orders-1", "k1", "reason"
        )
        publisher.wait()
    assert endpoint.received == []  # no POST: the identity was not lent
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "tenant-a/orders" in warning
    assert "Secret certs/canopy-client is in another namespace than the replica" in warning
    assert f"kubectl label secret -n certs canopy-client {EVENT_PUBLISHER_SECRET_OPT_IN}" in (
        warning
    )
    assert "-----BEGIN" not in caplog.text


def test_a_secret_in_the_replicas_namespace_needs_no_label(endpoint: EventsEndpoint) -> None:
    # Named with the replica's own namespace explicitly: the same as leaving it out.
    secrets = {("tenant-a", "canopy-client"): tls_secret(endpoint, "own-client", encoded=True)}
    publisher = publisher_for(endpoint, secrets)
    publisher.restore_failed(
        with_publisher(endpoint, namespace="tenant-a"), "orders-1", "k1", "reason"
    )
    publisher.wait()
    assert [r.client_common_name for r in endpoint.received] == ["own-client"]


def test_no_event_publisher_no_post(endpoint: EventsEndpoint) -> None:
    publisher = publisher_for(endpoint, {})
    assert not publisher.restore_failed(replica("plain"), "plain-1", "k1", "reason")
    publisher.wait()
    assert endpoint.received == []


def test_a_missing_or_unusable_secret_is_only_logged(
    endpoint: EventsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    good = tls_secret(endpoint, "pgro-client", encoded=False)
    key_pem = good["stringData"]["tls.key"]
    cases: list[tuple[Mapping[tuple[str, str], Mapping[str, Any]], str]] = [
        ({}, "Secret tenant-a/canopy-client (eventPublisher.clientCertificateSecretRef) not found"),
        (
            {("tenant-a", "canopy-client"): secret_doc("c", {"tls.crt": "x"})},
            "has no key tls.key",
        ),
        (
            {
                ("tenant-a", "canopy-client"): secret_doc(
                    "c", {"tls.crt": good["stringData"]["tls.crt"], "tls.key": "not a key"}
                )
            },
            "the client certificate or key cannot be used",
        ),
    ]
    for secrets, expected in cases:
        caplog.clear()
        publisher = publisher_for(endpoint, secrets)
        with caplog.at_level(logging.WARNING, logger="pgro.event_publisher"):
            publisher.restore_failed(with_publisher(endpoint), "orders-1", "k1", "reason")
            publisher.wait()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert expected in warnings[0]
        assert "tenant-a/orders" in warnings[0]
    assert endpoint.received == []
    assert key_pem.splitlines()[1] not in caplog.text


def test_a_refusing_endpoint_is_only_logged(
    endpoint: EventsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint.status = 403
    endpoint.answer = b'{"error": "source not permitted\\nfor this device"}'
    secrets = {("tenant-a", "canopy-client"): tls_secret(endpoint, "pgro-client", encoded=False)}
    publisher = publisher_for(endpoint, secrets)
    with caplog.at_level(logging.WARNING, logger="pgro.event_publisher"):
        publisher.restore_failed(with_publisher(endpoint), "orders-1", "k1", "reason")
        publisher.wait()
    assert len(endpoint.received) == 1  # it was delivered, and refused
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "answered HTTP 403" in warning
    assert "source not permitted" in warning
    assert "/api/events" not in warning  # the endpoint is named by its origin


def test_a_certificate_from_another_ca_is_refused_by_the_server(
    scratch: Path, endpoint: EventsEndpoint
) -> None:
    with serve_events_endpoint(scratch / "other") as other:
        stranger = other.client("stranger")
    identity = ClientIdentity(stranger.cert_pem.encode(), stranger.key_pem.encode())
    with pytest.raises(PublishError, match=r"posting to https://127\.0\.0\.1:"):
        publish(endpoint.url, identity, {"source": "pgro"}, verify=endpoint.trust())
    assert endpoint.received == []


def test_the_server_is_verified(scratch: Path, endpoint: EventsEndpoint) -> None:
    # The default trust store does not know the endpoint's CA: nothing is sent.
    cert = endpoint.client("pgro-client")
    identity = ClientIdentity(cert.cert_pem.encode(), cert.key_pem.encode())
    with pytest.raises(PublishError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        publish(endpoint.url, identity, {"source": "pgro"})
    assert endpoint.received == []


def test_data_values_are_base64_as_the_api_server_returns_them(endpoint: EventsEndpoint) -> None:
    doc = tls_secret(endpoint, "from-data", encoded=True)
    assert base64.b64decode(doc["data"]["tls.crt"]).startswith(b"-----BEGIN CERTIFICATE-----")
    publisher = publisher_for(endpoint, {("tenant-a", "canopy-client"): doc})
    publisher.restore_failed(with_publisher(endpoint), "orders-2", "k2", "reason")
    publisher.wait()
    assert [r.client_common_name for r in endpoint.received] == ["from-data"]


def test_a_secret_the_runtime_cannot_read_is_only_logged(
    endpoint: EventsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    def forbidden(namespace: str, name: str) -> Mapping[str, Any] | None:
        raise PermissionError(f'secrets "{name}" is forbidden in namespace "{namespace}"')

    publisher = EventPublisher(forbidden, clock=lambda: WHEN, verify=endpoint.trust)
    with caplog.at_level(logging.WARNING, logger="pgro.event_publisher"):
        publisher.restore_failed(with_publisher(endpoint), "orders-1", "k1", "reason")
        publisher.wait()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "Secret tenant-a/canopy-client could not be read" in warning
    assert "is forbidden" in warning
    assert endpoint.received == []
