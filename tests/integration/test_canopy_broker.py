"""The credential broker between `pgro canopy-proxy` and canopy (the stub), for real."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer

import httpx
import pytest

from pgro.canopy.broker import Callbacks, CredentialBroker, serve
from pgro.canopy.client import CanopyClient
from pgro.canopy.proxy import BrokerCredentialSource, CredentialsUnavailable
from pgro.canopy.syncer import fetch_tick
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


# -- the proxies' callbacks, served next to the broker -----------------------------------


@pytest.fixture
def with_callbacks(stub: CanopyStub) -> Iterator[tuple[Callbacks, str]]:
    client = CanopyClient(stub.url)
    callbacks = Callbacks(client)
    port = free_port()
    server = serve(CredentialBroker(client), "127.0.0.1", port, callbacks)
    yield callbacks, f"http://127.0.0.1:{port}"
    server.shutdown()
    client.close()


def test_final_stats_are_kept_until_taken(with_callbacks: tuple[Callbacks, str]) -> None:
    callbacks, url = with_callbacks
    body = {"sent_raw_bytes": 1, "sent_payload_bytes": 2, "received_raw_bytes": 3}
    answer = httpx.post(f"{url}/api/v1/canopy-stats/ns-1/r-1-restore", json=body)
    assert answer.status_code == 204
    assert callbacks.take_stats("ns-1/r-1-restore") == body
    assert callbacks.take_stats("ns-1/r-1-restore") is None
    assert httpx.post(f"{url}/api/v1/canopy-stats/ns-1/r-1", content=b"[1]").status_code == 400
    assert httpx.post(f"{url}/api/v1/canopy-other/ns-1/r-1", json={}).status_code == 404


def test_progress_is_relayed_to_canopy_and_bad_samples_dropped(
    stub: CanopyStub, with_callbacks: tuple[Callbacks, str]
) -> None:
    callbacks, url = with_callbacks
    run = str(uuid.uuid4())
    sample = {
        "run_id": run,
        "type": BACKUP_TYPE,
        "purpose": "restore",
        "s3_received_payload_bytes": 10,
        "extra": {},
    }
    assert httpx.post(f"{url}/api/v1/canopy-progress/ns-1/r-1", json=sample).status_code == 204
    [relayed] = stub.progress()
    assert relayed.body["run_id"] == run and relayed.body["s3_received_payload_bytes"] == 10
    # A malformed sample, or canopy refusing it, still gets the proxy its 204.
    bad = {"run_id": "not-a-uuid", "type": BACKUP_TYPE}
    assert httpx.post(f"{url}/api/v1/canopy-progress/ns-1/r-1", json=bad).status_code == 204
    stub.fail("backup-progress", 429)
    assert httpx.post(f"{url}/api/v1/canopy-progress/ns-1/r-1", json=sample).status_code == 204
    assert len(stub.progress()) == 1 and callbacks.relayed == 1


# -- one syncer tick --------------------------------------------------------------------


def test_a_tick_reads_passwords_through_the_broker_cache(stub: CanopyStub) -> None:
    stub.advertise(["verify"])
    client = CanopyClient(stub.url)
    broker = CredentialBroker(client)
    first = fetch_tick(client, broker)
    again = fetch_tick(client, broker)
    assert first.worklist is not None and len(first.worklist.entries) == 1
    assert first.passwords == {(GROUP_ID, BACKUP_TYPE): REPO_PASSWORD} == again.passwords
    assert REPO_PASSWORD not in repr(first)
    # Minted once for both ticks (the reference minted per entry per tick).
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE) == 1


@pytest.mark.parametrize("status", [403, 409])
def test_a_tick_names_a_refusal(stub: CanopyStub, status: int) -> None:
    stub.advertise(["verify"])
    stub.fail("restore-credentials", status)
    client = CanopyClient(stub.url)
    tick = fetch_tick(client, CredentialBroker(client))
    assert tick.worklist is not None and tick.passwords == {}
    message = tick.refusals[(GROUP_ID, BACKUP_TYPE)]
    assert f"HTTP {status}" in message and GROUP_ID in message


def test_a_tick_with_canopy_down_changes_nothing(stub: CanopyStub) -> None:
    stub.advertise(["verify"])
    stub.fail("restore-worklist", 503)
    client = CanopyClient(stub.url)
    tick = fetch_tick(client, CredentialBroker(client))
    assert tick.worklist is None and tick.error is not None and "503" in tick.error
    stub.clear_failures()
    stub.fail("restore-credentials", 502)
    tick = fetch_tick(client, CredentialBroker(client))
    # A transient credential failure is neither a password nor a refusal.
    assert tick.worklist is not None and tick.passwords == {} and tick.refusals == {}


def test_the_default_listen_address_serves_ipv6_and_ipv4() -> None:
    """`[::]:9091` is the reference's default; sidecars may come over either family."""
    server = serve(CredentialBroker(None), "::", 0)
    try:
        port = server.server_address[1]
        assert httpx.get(f"http://[::1]:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        server.shutdown()
