"""The credential broker between `pgro canopy-proxy` and canopy (the stub), for real."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer

import httpx
import pytest

from pgro.canopy.broker import CredentialBroker, serve
from pgro.canopy.client import CanopyClient
from pgro.canopy.proxy import BrokerCredentialSource, CredentialsUnavailable
from pgro.postgres.server import free_port
from tests.fixtures.canopy_stub import (
    BACKUP_TYPE,
    GROUP_ID,
    REPO_PASSWORD,
    SECRET_ACCESS_KEY,
    CanopyStub,
    start_canopy_stub,
)


@pytest.fixture
def stub() -> Iterator[CanopyStub]:
    with start_canopy_stub() as s:
        yield s


BrokerFactory = Callable[..., tuple[CredentialBroker, str]]


@pytest.fixture
def make_broker(stub: CanopyStub) -> Iterator[BrokerFactory]:
    """Brokers on loopback in front of the stub, stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def make(clock: list[datetime] | None = None) -> tuple[CredentialBroker, str]:
        now = clock or [datetime.now(UTC)]
        broker = CredentialBroker(CanopyClient(stub.url), clock=lambda: now[0])
        port = free_port()
        servers.append(serve(broker, "127.0.0.1", port))
        return broker, f"http://127.0.0.1:{port}"

    yield make
    for server in servers:
        server.shutdown()


def test_the_proxy_gets_credentials_through_the_broker_once_per_run(
    stub: CanopyStub, make_broker: BrokerFactory
) -> None:
    _, url = make_broker()
    run = str(uuid.uuid4())
    source = BrokerCredentialSource(url, GROUP_ID, BACKUP_TYPE, run)
    first = source()
    again = source()
    assert first.secret_access_key == SECRET_ACCESS_KEY
    assert again.access_key_id == first.access_key_id
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=run) == 1  # cached
    other = str(uuid.uuid4())
    BrokerCredentialSource(url, GROUP_ID, BACKUP_TYPE, other)()
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=other) == 1  # one per run


def test_answer_carries_the_repository_password_and_healthz(make_broker: BrokerFactory) -> None:
    _, url = make_broker()
    answer = httpx.post(
        f"{url}/internal/restore-creds", json={"group": GROUP_ID, "type": BACKUP_TYPE}
    )
    assert answer.status_code == 200
    assert answer.json()["repo_password"] == REPO_PASSWORD
    assert set(answer.json()["credentials"]) >= {"AccessKeyId", "SecretAccessKey", "Expiration"}
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_refreshed_two_minutes_before_expiry(stub: CanopyStub, make_broker: BrokerFactory) -> None:
    clock = [datetime.now(UTC)]
    broker, _ = make_broker(clock)
    broker.credentials(GROUP_ID, BACKUP_TYPE, None)
    clock[0] += timedelta(minutes=57)  # the stub's credentials live an hour
    broker.credentials(GROUP_ID, BACKUP_TYPE, None)
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=None) == 1
    clock[0] += timedelta(minutes=2)  # now within two minutes of expiry
    broker.credentials(GROUP_ID, BACKUP_TYPE, None)
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=None) == 2
    assert broker.issued == 2


def test_canopy_refusal_is_a_502_without_secrets(
    stub: CanopyStub, make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = make_broker()
    stub.fail("restore-credentials", 403)
    caplog.set_level(logging.WARNING)
    with pytest.raises(CredentialsUnavailable, match="502"):
        BrokerCredentialSource(url, GROUP_ID, BACKUP_TYPE)()
    assert SECRET_ACCESS_KEY not in caplog.text and REPO_PASSWORD not in caplog.text
    assert "403" in caplog.text or "forbidden" in caplog.text.lower()


def test_no_canopy_is_a_503_and_bad_requests_a_400() -> None:
    broker = CredentialBroker(None)
    assert broker.handle(b'{"group": "%s", "type": "t"}' % GROUP_ID.encode())[0] == 503
    configured = CredentialBroker(CanopyClient("http://127.0.0.1:9"))
    assert configured.handle(b"not json")[0] == 400
    assert configured.handle(b'{"type": "t"}')[0] == 400
    assert configured.handle(b'{"group": "not-a-uuid", "type": "t"}')[0] == 400
