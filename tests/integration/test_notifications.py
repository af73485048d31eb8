"""Notifications over real HTTP: a local server on 127.0.0.1 that records every request and
can be told to fail a number of times or to hold its answer.

Delays are shortened to (0, 0.2, 0.4) so retries and exhaustion run in about a second.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pgro.api.notifications import NotificationStatus, target_name
from pgro.notifications import EVENT, Notifier
from pgro.observability import Health, Metrics, serve
from tests.fixtures.manifests import replica

DELAYS = (0.0, 0.2, 0.4)
KEY = "team-a/analytics"
NAMESPACE = "team-a"
PASSWORD = "Analytics-pw-0123456789abcdefXYZ"
TOKEN = "hook-token-5f4e3d2c1b0a"
CONNECTION = {
    "host": "127.0.0.1",
    "port": 6432,
    "database": "postgres",
    "username": "analytics",
    "passwordSecret": "analytics-creds",
}
SECRETS = {(NAMESPACE, "hook"): {"stringData": {"token": TOKEN}}}


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: datetime


@dataclass
class HookServer:
    """What arrived, per path; `fail[path]` failures (HTTP 500) to give before succeeding;
    a path in `hold` waits for `release` before answering."""

    url: str
    received: list[Received] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    hold: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture
def hook_server() -> Iterator[HookServer]:
    state = HookServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            with state.lock:
                state.received.append(
                    Received(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw) if raw else None,
                        datetime.now(UTC),
                    )
                )
                failures = state.fail.get(self.path, 0)
                if failures:
                    state.fail[self.path] = failures - 1
            if self.path in state.hold:
                state.release.wait(5)
            code = 500 if failures else 200
            body = b'{"ok": true}\n'
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with state.lock:
                state.answered += 1

        do_POST = _handle
        do_PUT = _handle

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not take loopback traffic elsewhere."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def notifier(metrics: Metrics) -> Iterator[Notifier]:
    n = Notifier(metrics, delays=DELAYS, http_timeout=5.0)
    yield n
    n.shutdown()


# The replica of these tests, with the notification targets given.
analytics = functools.partial(replica, "analytics", namespace=NAMESPACE)


def notify(notifier: Notifier, *targets: dict[str, Any]) -> None:
    notifier.notify(
        KEY,
        analytics(notifications=list(targets)),
        "analytics-20260304050607",
        "k1a2b3c4",
        "16",
        CONNECTION,
        PASSWORD,
        SECRETS,
    )


def wait_status(notifier: Notifier, timeout: float = 15.0) -> list[NotificationStatus]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = notifier.take_status(KEY)
        if statuses is not None:
            return statuses
        time.sleep(0.02)
    raise AssertionError(f"the notification round did not finish within {timeout}s")


def counter(metrics: Metrics, kind: str, name: str) -> float:
    value = metrics.registry.get_sample_value(
        f"postgres_restore_notifications_{kind}_total", {"name": name, "event": EVENT}
    )
    return value or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_success_on_the_first_try(
    hook_server: HookServer, notifier: Notifier, metrics: Metrics
) -> None:
    url = f"{hook_server.url}/ok"
    before = datetime.now(UTC).replace(microsecond=0)
    notify(notifier, {"target": "webhook", "url": url})
    [status] = wait_status(notifier)

    assert status.name == target_name("POST", url)
    assert status.success is True
    assert status.last_error is None
    assert status.last_sent_at is not None
    [request] = hook_server.on("/ok")
    assert before <= status.last_sent_at <= request.at
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {
        "timestamp": request.body["timestamp"],
        "replica": {"name": "analytics", "namespace": NAMESPACE},
        "restore": {
            "name": "analytics-20260304050607",
            "snapshot": "k1a2b3c4",
            "postgresVersion": "16",
        },
        "connectionInfo": CONNECTION,  # no password: includePassword is false
    }
    assert datetime.fromisoformat(request.body["timestamp"]) >= before
    assert counter(metrics, "sent", target_name("POST", url)) == 1
    assert counter(metrics, "failed", target_name("POST", url)) == 0


def test_success_after_two_failures(
    hook_server: HookServer, notifier: Notifier, metrics: Metrics
) -> None:
    url = f"{hook_server.url}/flaky"
    hook_server.fail["/flaky"] = 2
    notify(notifier, {"target": "webhook", "url": url})
    [status] = wait_status(notifier)

    assert status.success is True
    assert status.last_error is None
    attempts = hook_server.on("/flaky")
    assert len(attempts) == 3
    # The schedule's delays separate the attempts (0.2 s, then 0.4 s).
    assert (attempts[1].at - attempts[0].at).total_seconds() >= 0.19
    assert (attempts[2].at - attempts[1].at).total_seconds() >= 0.39
    assert counter(metrics, "sent", target_name("POST", url)) == 1
    assert counter(metrics, "failed", target_name("POST", url)) == 0


def test_exhaustion_keeps_the_last_error(
    hook_server: HookServer, notifier: Notifier, metrics: Metrics
) -> None:
    url = f"{hook_server.url}/down"
    hook_server.fail["/down"] = 99
    notify(notifier, {"target": "webhook", "url": url})
    [status] = wait_status(notifier)

    assert status.success is False
    assert status.last_error == f"HTTP 500 Internal Server Error from {hook_server.url}"
    assert len(hook_server.on("/down")) == len(DELAYS)
    assert counter(metrics, "failed", target_name("POST", url)) == 1
    assert counter(metrics, "sent", target_name("POST", url)) == 0


def test_connection_refused_is_the_last_error(notifier: Notifier, metrics: Metrics) -> None:
    origin = f"http://127.0.0.1:{free_port()}"
    url = f"{origin}/nobody"
    notify(notifier, {"target": "webhook", "url": url})
    [status] = wait_status(notifier)

    assert status.success is False
    assert status.last_error is not None
    assert status.last_error.startswith(f"connection to {origin} failed: ")
    assert "refused" in status.last_error.lower()
    assert counter(metrics, "failed", target_name("POST", url)) == 1


def test_put_is_honoured_and_anything_else_is_post(
    hook_server: HookServer, notifier: Notifier
) -> None:
    notify(
        notifier,
        {"target": "webhook", "url": f"{hook_server.url}/put", "method": "PUT"},
        {"target": "webhook", "url": f"{hook_server.url}/get", "method": "GET"},
        {"target": "webhook", "url": f"{hook_server.url}/default"},
    )
    statuses = wait_status(notifier)

    assert [s.success for s in statuses] == [True, True, True]
    assert [s.name for s in statuses] == [
        target_name("PUT", f"{hook_server.url}/put"),
        target_name("GET", f"{hook_server.url}/get"),
        target_name("POST", f"{hook_server.url}/default"),
    ]
    assert [r.method for r in hook_server.on("/put")] == ["PUT"]
    assert [r.method for r in hook_server.on("/get")] == ["POST"]
    assert [r.method for r in hook_server.on("/default")] == ["POST"]


def test_secret_headers_and_password_arrive(hook_server: HookServer, notifier: Notifier) -> None:
    notify(
        notifier,
        {
            "target": "webhook",
            "url": f"{hook_server.url}/hook",
            "includePassword": True,
            "headers": {
                "Authorization": {"secretKeyRef": {"name": "hook", "key": "token"}},
                "X-Plain": "plain-value",
            },
        },
        {
            "target": "graphQL",
            "url": f"{hook_server.url}/graphql",
            "mutation": "mutation R($i: In!) { restored(input: $i) { ok } }",
            "variablesTemplate": (
                '{"i": {"replica": "{{Replica}}", "port": {{ConnectionInfo.Port}}, '
                '"password": {{#if IncludePassword}}"{{ConnectionInfo.Password}}"'
                "{{else}}null{{/if}}}}"
            ),
            "headers": {"X-Token": {"secretKeyRef": {"name": "hook", "key": "token"}}},
        },
    )
    statuses = wait_status(notifier)

    assert [s.success for s in statuses] == [True, True]
    [hook] = hook_server.on("/hook")
    assert hook.headers["authorization"] == TOKEN
    assert hook.headers["x-plain"] == "plain-value"
    assert hook.body["connectionInfo"]["password"] == PASSWORD
    [gql] = hook_server.on("/graphql")
    assert gql.method == "POST"
    assert gql.headers["x-token"] == TOKEN
    assert gql.body == {
        "query": "mutation R($i: In!) { restored(input: $i) { ok } }",
        "variables": {"i": {"replica": "analytics", "port": 6432, "password": None}},
    }


def test_a_missing_secret_fails_without_sending(
    hook_server: HookServer, notifier: Notifier, metrics: Metrics
) -> None:
    url = f"{hook_server.url}/guarded"
    notify(
        notifier,
        {
            "target": "webhook",
            "url": url,
            "headers": {"Authorization": {"secretKeyRef": {"name": "hook", "key": "absent"}}},
        },
    )
    [status] = wait_status(notifier)

    assert status.success is False
    assert status.last_error == "header 'Authorization': Secret team-a/hook has no key 'absent'"
    assert hook_server.on("/guarded") == []
    assert counter(metrics, "failed", target_name("POST", url)) == 1


def test_notify_does_not_block_the_caller(hook_server: HookServer, notifier: Notifier) -> None:
    hook_server.hold.add("/slow")
    started = time.monotonic()
    notify(notifier, {"target": "webhook", "url": f"{hook_server.url}/slow"})
    returned_after = time.monotonic() - started

    # The server holds its answer until released (up to 5 s): a blocking notify would only
    # have returned once it had answered.
    with hook_server.lock:
        answered = hook_server.answered
    assert answered == 0
    assert returned_after < 1.0
    assert notifier.running(KEY)
    assert notifier.take_status(KEY) is None

    deadline = time.monotonic() + 5
    while not hook_server.on("/slow") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(hook_server.on("/slow")) == 1  # the request is in flight meanwhile
    hook_server.release.set()
    [status] = wait_status(notifier)
    assert status.success is True


def test_metrics_count_each_target_once_per_round(
    hook_server: HookServer, notifier: Notifier, metrics: Metrics
) -> None:
    flaky, down = f"{hook_server.url}/m-flaky", f"{hook_server.url}/m-down"
    hook_server.fail["/m-flaky"] = 1
    hook_server.fail["/m-down"] = 99
    notify(notifier, {"target": "webhook", "url": flaky}, {"target": "webhook", "url": down})
    assert [s.success for s in wait_status(notifier)] == [True, False]
    notify(notifier, {"target": "webhook", "url": flaky}, {"target": "webhook", "url": down})
    assert [s.success for s in wait_status(notifier)] == [True, False]

    # Round 1: a failure, then a success; round 2: a success.
    assert len(hook_server.on("/m-flaky")) == 3
    assert counter(metrics, "sent", target_name("POST", flaky)) == 2
    assert counter(metrics, "failed", target_name("POST", flaky)) == 0
    assert counter(metrics, "sent", target_name("POST", down)) == 0
    assert counter(metrics, "failed", target_name("POST", down)) == 2
    rendered = metrics.render().decode()
    assert f'event="{EVENT}"' in rendered


SECRET_PARTS = ("hookuser", "USERINFO-PASS-999", "T0000", "B0000", "URL-PATH-TOKEN-555", "/hooks")


def test_a_secret_url_appears_in_no_metric_status_or_log(
    hook_server: HookServer,
    notifier: Notifier,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Slack/Teams-style webhook URLs carry their secret in the path, others in
    `user:password@`: neither may reach /metrics, the status or any log line, at any level
    (httpx logs full request URLs at INFO)."""
    caplog.set_level(logging.DEBUG)  # everything: pgro's own lines, httpx, httpcore
    origin = hook_server.url
    secret_url = origin.replace("http://", "http://hookuser:USERINFO-PASS-999@")
    ok_url = f"{secret_url}/hooks/T0000/B0000/URL-PATH-TOKEN-555"
    down_url = f"{secret_url}/hooks/T0000/B0000/URL-PATH-TOKEN-555-down"
    refused_url = f"http://hookuser:USERINFO-PASS-999@127.0.0.1:{free_port()}/hooks/T0000/B0000/URL-PATH-TOKEN-555"
    hook_server.fail["/hooks/T0000/B0000/URL-PATH-TOKEN-555-down"] = 99
    server = serve(metrics, Health(), "127.0.0.1", 0)
    try:
        notify(
            notifier,
            {"target": "webhook", "url": ok_url},
            {"target": "webhook", "url": down_url},
            {"target": "graphQL", "url": refused_url, "mutation": "m", "variablesTemplate": "{}"},
        )
        statuses = wait_status(notifier)
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            metrics_body = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()

    # The URL is still used in full to send: user information becomes Basic auth.
    [arrived] = hook_server.on("/hooks/T0000/B0000/URL-PATH-TOKEN-555")
    assert (
        arrived.headers["authorization"]
        == "Basic " + base64.b64encode(b"hookuser:USERINFO-PASS-999").decode()
    )
    assert [s.success for s in statuses] == [True, False, False]
    # Each target is named and counted under its secret-free name...
    ok_name = target_name("POST", ok_url)
    assert ok_name.startswith(f"POST {origin} #")
    assert f'name="{ok_name}"' in metrics_body
    assert f'name="{target_name("POST", down_url)}"' in metrics_body
    assert len({s.name for s in statuses}) == 3
    # ...and the secret parts are nowhere.
    status_text = json.dumps([s.to_wire() for s in statuses])
    assert "HTTP Request" in caplog.text or "delivered" in caplog.text
    for where, text in (("/metrics", metrics_body), ("status", status_text), ("log", caplog.text)):
        for part in SECRET_PARTS:
            assert part not in text, f"{part!r} leaked into the {where}"
