"""The credential broker between `pgro canopy-proxy` and canopy (the stub), for real."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer

import httpx
import pytest

from pgro.canopy.broker import Callbacks, CredentialBroker, serve
from pgro.canopy.client import CanopyClient
from pgro.canopy.proxy import BrokerCredentialSource, CredentialsUnavailable
from pgro.canopy.syncer import fetch_tick
from pgro.canopy.tokens import BrokerTokens, TokenBinding, new_key
from pgro.http_listener import ListenerHandler, ListenerServer
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
TOKENS = BrokerTokens(new_key())
JOB = "ns-1/r-1-restore"


def token(run_id: str | None = None, *, group: str = GROUP_ID, job: str = JOB) -> str:
    return TOKENS.issue(TokenBinding(group=group, type=BACKUP_TYPE, run_id=run_id, job=job))


def auth(run_id: str | None = None, **kw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(run_id, **kw)}"}


@pytest.fixture
def make_broker(stub: CanopyStub) -> Iterator[BrokerFactory]:
    """Brokers on loopback in front of the stub, stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def make(clock: list[datetime] | None = None) -> tuple[CredentialBroker, str]:
        now = clock or [datetime.now(UTC)]
        broker = CredentialBroker(CanopyClient(stub.url), clock=lambda: now[0])
        port = free_port()
        servers.append(serve(broker, "127.0.0.1", port, tokens=TOKENS))
        return broker, f"http://127.0.0.1:{port}"

    yield make
    for server in servers:
        server.shutdown()


def test_the_proxy_gets_credentials_through_the_broker_once_per_run(
    stub: CanopyStub, make_broker: BrokerFactory
) -> None:
    _, url = make_broker()
    run = str(uuid.uuid4())
    source = BrokerCredentialSource(url, GROUP_ID, BACKUP_TYPE, run, token=token(run))
    first = source()
    again = source()
    assert first.secret_access_key == SECRET_ACCESS_KEY
    assert again.access_key_id == first.access_key_id
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=run) == 1  # cached
    other = str(uuid.uuid4())
    BrokerCredentialSource(url, GROUP_ID, BACKUP_TYPE, other, token=token(other))()
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=other) == 1  # one per run


def test_answer_carries_the_repository_password_and_healthz(make_broker: BrokerFactory) -> None:
    _, url = make_broker()
    answer = httpx.post(
        f"{url}/internal/restore-creds",
        json={"group": GROUP_ID, "type": BACKUP_TYPE},
        headers=auth(),
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
        BrokerCredentialSource(url, GROUP_ID, BACKUP_TYPE, token=token())()
    assert SECRET_ACCESS_KEY not in caplog.text and REPO_PASSWORD not in caplog.text
    assert "403" in caplog.text or "forbidden" in caplog.text.lower()


def test_no_canopy_is_a_503_and_bad_requests_a_400() -> None:
    binding = TokenBinding(group=GROUP_ID, type="t", run_id=None, job=JOB)
    broker = CredentialBroker(None)
    assert broker.handle(b'{"group": "%s", "type": "t"}' % GROUP_ID.encode(), binding)[0] == 503
    configured = CredentialBroker(CanopyClient("http://127.0.0.1:9"))
    assert configured.handle(b"not json", binding)[0] == 400
    assert configured.handle(b'{"type": "t"}', binding)[0] == 400
    bad = TokenBinding(group="not-a-uuid", type="t", run_id=None, job=JOB)
    assert configured.handle(b'{"group": "not-a-uuid", "type": "t"}', bad)[0] == 400


# -- the proxies' callbacks, served next to the broker -----------------------------------


@pytest.fixture
def with_callbacks(stub: CanopyStub) -> Iterator[tuple[Callbacks, str]]:
    client = CanopyClient(stub.url)
    callbacks = Callbacks(client)
    port = free_port()
    server = serve(CredentialBroker(client), "127.0.0.1", port, callbacks, tokens=TOKENS)
    yield callbacks, f"http://127.0.0.1:{port}"
    server.shutdown()
    client.close()


def test_final_stats_are_kept_until_taken(with_callbacks: tuple[Callbacks, str]) -> None:
    callbacks, url = with_callbacks
    body = {"sent_raw_bytes": 1, "sent_payload_bytes": 2, "received_raw_bytes": 3}
    answer = httpx.post(f"{url}/api/v1/canopy-stats/{JOB}", json=body, headers=auth())
    assert answer.status_code == 204
    assert callbacks.take_stats(JOB) == body
    assert callbacks.take_stats(JOB) is None
    stats = f"{url}/api/v1/canopy-stats/{JOB}"
    assert httpx.post(stats, content=b"[1]", headers=auth()).status_code == 400
    assert httpx.post(f"{url}/api/v1/canopy-other/{JOB}", json={}).status_code == 404


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
    progress = f"{url}/api/v1/canopy-progress/{JOB}"
    assert httpx.post(progress, json=sample, headers=auth(run)).status_code == 204
    [relayed] = stub.progress()
    assert relayed.body["run_id"] == run and relayed.body["s3_received_payload_bytes"] == 10
    # A malformed sample, or canopy refusing it, still gets the proxy its 204.
    bad = {"run_id": run, "type": BACKUP_TYPE, "purpose": 7}
    assert httpx.post(progress, json=bad, headers=auth(run)).status_code == 204
    stub.fail("backup-progress", 429)
    assert httpx.post(progress, json=sample, headers=auth(run)).status_code == 204
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
    server = serve(CredentialBroker(None), "::", 0, tokens=TOKENS)
    try:
        port = server.server_address[1]
        assert httpx.get(f"http://[::1]:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        server.shutdown()


# -- authentication (issue 18 item 9) ---------------------------------------------------------


def _creds(
    url: str, body: Mapping[str, object], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(f"{url}/internal/restore-creds", json=dict(body), headers=headers or {})


def test_a_caller_without_a_valid_token_gets_401_and_nothing_secret(
    stub: CanopyStub, make_broker: BrokerFactory
) -> None:
    _, url = make_broker()
    body = {"group": GROUP_ID, "type": BACKUP_TYPE}
    forged = BrokerTokens(new_key()).issue(
        TokenBinding(group=GROUP_ID, type=BACKUP_TYPE, run_id=None, job=JOB)
    )
    payload, _, _ = token().partition(".")
    for headers in (
        None,
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Bearer {forged}"},  # another key
        {"Authorization": f"Bearer {payload}.AAAA"},  # the right binding, no valid MAC
        {"Authorization": f"Bearer {token()}x"},
    ):
        answer = _creds(url, body, headers)
        assert answer.status_code == 401, headers
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert REPO_PASSWORD not in answer.text and SECRET_ACCESS_KEY not in answer.text
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE) == 0  # canopy was never asked


def test_a_token_answers_only_for_its_group_type_and_run(
    stub: CanopyStub, make_broker: BrokerFactory
) -> None:
    _, url = make_broker()
    run, other_run = str(uuid.uuid4()), str(uuid.uuid4())
    other_group = str(uuid.uuid4())
    mine = auth(run)
    for body in (
        {"group": other_group, "type": BACKUP_TYPE, "run_id": run},
        {"group": GROUP_ID, "type": "other-type", "run_id": run},
        {"group": GROUP_ID, "type": BACKUP_TYPE, "run_id": other_run},
        {"group": GROUP_ID, "type": BACKUP_TYPE},  # a run-less request with a run's token
    ):
        answer = _creds(url, body, mine)
        assert answer.status_code == 403, body
        assert REPO_PASSWORD not in answer.text
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=run) == 0
    ok = _creds(url, {"group": GROUP_ID, "type": BACKUP_TYPE, "run_id": run}, mine)
    assert ok.status_code == 200 and ok.json()["repo_password"] == REPO_PASSWORD


def test_callbacks_need_the_token_of_their_restore(
    stub: CanopyStub, with_callbacks: tuple[Callbacks, str]
) -> None:
    callbacks, url = with_callbacks
    run = str(uuid.uuid4())
    body = {"sent_raw_bytes": 1}
    stats = f"{url}/api/v1/canopy-stats/{JOB}"
    assert httpx.post(stats, json=body).status_code == 401
    other_job = auth(run, job="ns-2/r-2-restore")
    assert httpx.post(stats, json=body, headers=other_job).status_code == 403
    assert callbacks.take_stats(JOB) is None
    sample = {"run_id": str(uuid.uuid4()), "type": BACKUP_TYPE, "purpose": "restore", "extra": {}}
    progress = f"{url}/api/v1/canopy-progress/{JOB}"
    assert httpx.post(progress, json=sample).status_code == 401
    # Its own job, but a sample for another run: not relayed to canopy in pgro's name.
    assert httpx.post(progress, json=sample, headers=auth(run)).status_code == 403
    assert stub.progress() == []


def test_another_local_user_gets_nothing(stub: CanopyStub, make_broker: BrokerFactory) -> None:
    """The review's reproduction: `runuser -u nobody -- curl … /internal/restore-creds`."""
    _, url = make_broker()
    done = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "curl",
            "-s",
            "-w",
            "\\n%{http_code}",
            "-XPOST",
            f"{url}/internal/restore-creds",
            "-d",
            json.dumps({"group": GROUP_ID, "type": BACKUP_TYPE}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.rstrip().endswith("401"), done.stdout
    assert REPO_PASSWORD not in done.stdout and SECRET_ACCESS_KEY not in done.stdout
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE) == 0


# -- bodies and idle connections (issue 18 item 17) ---------------------------------------------


def _raw(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        chunks = []
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest.mark.parametrize(
    ("length", "status"),
    [("-1", b"400"), ("abc", b"400"), ("+5", b"400"), ("1_0", b"400"), ("99999999", b"413")],
)
def test_a_bad_content_length_is_refused_at_once(
    make_broker: BrokerFactory, length: str, status: bytes
) -> None:
    """Before: `Content-Length: -1` passed the size check and the broker read to EOF (the
    review measured 1.5 GiB in 3 s); now the answer comes without reading the body."""
    _, url = make_broker()
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    head = (
        f"POST /internal/restore-creds HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
        f"Authorization: Bearer {token()}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(head + b"x" * 65536)  # body bytes keep coming; the server must not wait
        answer = conn.recv(4096)
    assert answer.split(b" ", 2)[1] == status, answer
    assert time.monotonic() - started < 3


def test_an_idle_connection_is_closed(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that opens a connection and sends nothing loses it after the idle timeout
    (30 s in service; 1 s here), instead of holding a thread for ever."""
    monkeypatch.setattr(ListenerHandler, "timeout", 1.0)
    _, url = make_broker()
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    # Half a request line, then silence: the server closes (recv returns b"").
    assert _raw(port, b"POST /internal/restore-creds HTTP/1.1\r\n", timeout=10) == b""
    assert time.monotonic() - started < 5


def test_connections_beyond_the_cap_are_closed_at_once(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ListenerServer, "max_connections", 3)
    _, url = make_broker()
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.3)
        # The fourth is closed without an answer; the three idle ones hold their slots.
        assert _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.3)
    assert httpx.get(f"{url}/healthz").status_code == 200  # slots come back
