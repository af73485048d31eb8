"""The canopy HTTP client: routes, bodies, error mapping, the SOCKS5 proxy and mTLS.

Most tests answer through `httpx.MockTransport`; the proxy and mTLS tests use real
sockets on loopback (a minimal SOCKS5 server, an HTTPS server that requires the device
certificate), so what they check is what goes over the wire.
"""

from __future__ import annotations

import gzip
import http.server
import json
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgro.canopy.client import (
    DEFAULT_SOCKS5_PROXY,
    GZIP_THRESHOLD,
    CanopyClient,
    CanopyError,
    CanopyForbidden,
    CanopyNotReady,
    CanopyProtocolError,
    CanopyRateLimited,
    CanopyRejected,
    CanopyTransient,
    connect,
)
from pgro.canopy.device_cert import DeviceIdentity
from pgro.canopy.wire import ProgressArgs, VerificationArgs, capabilities_request
from tests.unit.test_canopy_device_cert import mtls_server_context

REPLICA = "11111111-1111-1111-1111-111111111111"
GROUP = "22222222-2222-2222-2222-222222222222"
MACHINE = "33333333-3333-3333-3333-333333333333"
RUN = "44444444-4444-4444-8444-444444444444"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FQoGZXIvYXdzEXAMPLE"
REPO_PASSWORD = "stub-repo-password"

ENTRY: dict[str, Any] = {
    "replica_id": REPLICA,
    "group_id": GROUP,
    "machine_id": MACHINE,
    "server_id": MACHINE,
    "type": "tamanu-postgres",
    "intent": "verify",
    "name": "int-test",
    "overdue_after_seconds": None,
    "params": {},
    "snapshot_id": "k000000000000000000000000000000f",
    "snapshot_at": "2026-07-01T00:00:00Z",
    "storage": "s3",
    "bucket": "canopy-int-test",
    "prefix": "",
    "region": "us-east-1",
}
CREDENTIALS: dict[str, Any] = {
    "credentials": {
        "Version": 1,
        "AccessKeyId": "AKIAIOSFODNN7EXAMPLE",
        "SecretAccessKey": SECRET_KEY,
        "SessionToken": SESSION_TOKEN,
        "Expiration": "2099-12-31T23:59:59Z",
    },
    "repo_password": REPO_PASSWORD,
}


@dataclass
class Recorded:
    method: str
    path: str
    headers: httpx.Headers
    raw: bytes

    def json(self) -> Any:
        body = self.raw
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return json.loads(body)


@dataclass
class FakeCanopy:
    """Answers from a table of (method, path) → response; records every request."""

    routes: dict[tuple[str, str], httpx.Response | Callable[[], httpx.Response]] = field(
        default_factory=dict
    )
    requests: list[Recorded] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(
            Recorded(request.method, request.url.path, request.headers, request.read())
        )
        answer = self.routes.get((request.method, request.url.path))
        if answer is None:
            return httpx.Response(404, json={"type": "/errors/resource-not-found", "title": "no"})
        return answer() if callable(answer) else answer

    def client(self, base_url: str = "https://meta.example.org") -> CanopyClient:
        return CanopyClient(base_url, transport=httpx.MockTransport(self.handler))


def problem(
    status: int, slug: str, title: str, detail: str | None = None, **headers: str
) -> httpx.Response:
    body: dict[str, Any] = {"type": f"/errors/{slug}", "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    return httpx.Response(
        status, json=body, headers={"content-type": "application/problem+json", **headers}
    )


def report() -> VerificationArgs:
    return VerificationArgs.model_validate(
        {
            "replica_id": REPLICA,
            "group": GROUP,
            "server_id": MACHINE,
            "type": "tamanu-postgres",
            "intent": "verify",
            "outcome": "success",
            "replica_healthy": True,
            "observed_at": datetime(2026, 7, 1, tzinfo=UTC),
            "run_id": RUN,
        }
    )


# -- routes and bodies --------------------------------------------------------------------------


def test_the_tailnet_route_prefixes_public_and_the_public_route_does_not() -> None:
    canopy = FakeCanopy(
        {
            ("GET", "/public/restore-worklist"): httpx.Response(200, json=[]),
            ("GET", "/restore-worklist"): httpx.Response(200, json=[ENTRY]),
            ("GET", "/public/servers"): httpx.Response(200, json=[]),
        }
    )
    tailnet = canopy.client("https://canopy.tail53aef.ts.net")
    assert tailnet.tailnet
    assert tailnet.worklist().entries == ()
    tailnet.probe()
    public = canopy.client("https://meta.example.org")
    assert not public.tailnet
    assert [e.name for e in public.worklist().entries] == ["int-test"]
    assert [r.path for r in canopy.requests] == [
        "/public/restore-worklist",
        "/public/servers",
        "/restore-worklist",
    ]


def test_a_base_url_path_is_kept() -> None:
    canopy = FakeCanopy({("GET", "/api/restore-worklist"): httpx.Response(200, json=[])})
    canopy.client("https://meta.example.org/api").worklist()
    assert canopy.requests[0].path == "/api/restore-worklist"


def test_capabilities_go_gzipped_as_json_with_a_user_agent() -> None:
    canopy = FakeCanopy({("POST", "/restore-capabilities"): httpx.Response(204)})
    canopy.client().register_capabilities()
    (sent,) = canopy.requests
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["user-agent"].startswith("pgro/")
    # The analytics descriptor makes this body larger than the threshold.
    assert sent.headers["content-encoding"] == "gzip"
    assert len(gzip.decompress(sent.raw)) >= GZIP_THRESHOLD
    assert sent.json() == capabilities_request().to_wire()


def test_small_bodies_are_not_gzipped() -> None:
    canopy = FakeCanopy({("POST", "/restore-credentials"): httpx.Response(200, json=CREDENTIALS)})
    creds = canopy.client().restore_credentials(UUID(GROUP), "tamanu-postgres", RUN)
    (sent,) = canopy.requests
    assert "content-encoding" not in sent.headers
    assert json.loads(sent.raw) == {"group": GROUP, "type": "tamanu-postgres", "run_id": RUN}
    assert creds.repo_password.get_secret_value() == REPO_PASSWORD
    assert creds.credentials.expiration == datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_credentials_without_run_id_leave_it_out() -> None:
    canopy = FakeCanopy({("POST", "/restore-credentials"): httpx.Response(200, json=CREDENTIALS)})
    canopy.client().restore_credentials(GROUP, "tamanu-postgres")
    assert canopy.requests[0].json() == {"group": GROUP, "type": "tamanu-postgres"}


def test_a_bad_group_is_refused_before_sending() -> None:
    canopy = FakeCanopy()
    with pytest.raises(ValueError, match="group"):
        canopy.client().restore_credentials("not-a-uuid", "tamanu-postgres")
    assert canopy.requests == []


def test_verification_and_progress_bodies() -> None:
    canopy = FakeCanopy(
        {
            ("POST", "/restore-verification"): httpx.Response(204),
            ("POST", "/backup-progress"): httpx.Response(204),
        }
    )
    client = canopy.client()
    client.report_verification(report())
    sample = ProgressArgs.model_validate(
        {"run_id": RUN, "type": "tamanu-postgres", "s3_received_raw_bytes": 5}
    )
    client.backup_progress(sample)
    assert canopy.requests[0].json() == report().to_wire()
    assert canopy.requests[1].json() == sample.to_wire()


def test_the_worklist_is_decoded_leniently() -> None:
    oldest = {k: v for k, v in ENTRY.items() if k not in ("machine_id", "params")}
    canopy = FakeCanopy(
        {
            ("GET", "/restore-worklist"): httpx.Response(
                200, json=[oldest, {**ENTRY, "name": "broken", "region": None}]
            )
        }
    )
    worklist = canopy.client().worklist()
    assert [e.machine_id for e in worklist.entries] == [UUID(MACHINE)]
    assert [r.name for r in worklist.rejected] == ["broken"]


def test_a_gzipped_worklist_answer_is_read() -> None:
    body = gzip.compress(json.dumps([ENTRY]).encode())
    canopy = FakeCanopy(
        {
            ("GET", "/restore-worklist"): httpx.Response(
                200, content=body, headers={"content-encoding": "gzip"}
            )
        }
    )
    assert len(canopy.client().worklist().entries) == 1


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (httpx.Response(200, json={"entries": []}), "JSON array"),
        (httpx.Response(200, text="<html>hi</html>"), "not JSON"),
    ],
)
def test_an_unreadable_worklist_is_a_protocol_error(answer: httpx.Response, says: str) -> None:
    canopy = FakeCanopy({("GET", "/restore-worklist"): answer})
    with pytest.raises(CanopyProtocolError, match=says):
        canopy.client().worklist()


def test_unreadable_credentials_never_quote_the_secrets() -> None:
    broken = {"credentials": {**CREDENTIALS["credentials"], "Expiration": None}, "repo_password": 7}
    canopy = FakeCanopy({("POST", "/restore-credentials"): httpx.Response(200, json=broken)})
    with pytest.raises(CanopyProtocolError) as error:
        canopy.client().restore_credentials(GROUP, "tamanu-postgres")
    message = str(error.value)
    assert "credentials.Expiration" in message
    assert "repo_password" in message
    assert SECRET_KEY not in message
    assert SESSION_TOKEN not in message
    assert repr(error.value.__cause__) == "None"


# -- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "kind", "says"),
    [
        (
            problem(401, "auth-certificate-not-found", "Unknown certificate"),
            CanopyForbidden,
            "HTTP 401 (auth-certificate-not-found): Unknown certificate; canopy does not know "
            "this device's key",
        ),
        (
            problem(403, "auth-insufficient-permissions", "Forbidden", "role is server"),
            CanopyForbidden,
            "HTTP 403 (auth-insufficient-permissions): Forbidden (role is server); an enabled "
            "declaration of this consumer must cover this group and backup type, and the "
            "device needs the backup-restore role",
        ),
        (
            problem(403, "tagged-device-not-allowed", "Tagged devices not allowed"),
            CanopyForbidden,
            "tailnet devices may only use the /public routes",
        ),
        (
            problem(409, "conflict", "Backup config not ready"),
            CanopyNotReady,
            "Backup config not ready; the group's backup configuration is missing or not ready",
        ),
        (
            problem(502, "upstream", "STS failed"),
            CanopyTransient,
            "HTTP 502 (upstream): STS failed; canopy or a service behind it failed",
        ),
        (
            problem(503, "backup-rotation-in-progress", "Retry shortly"),
            CanopyTransient,
            "passphrase rotation is in progress",
        ),
        (httpx.Response(500, text="oops"), CanopyTransient, "HTTP 500 Internal Server Error"),
        (
            problem(400, "bad-request", "Bad request", "missing replica_id"),
            CanopyRejected,
            "(missing replica_id); canopy found the request malformed",
        ),
        (
            httpx.Response(302, headers={"location": "https://user:pw@elsewhere.example/x"}),
            CanopyRejected,
            "redirects to https://elsewhere.example are not followed",
        ),
    ],
)
def test_error_statuses_map_to_classes_with_canopys_reason(
    answer: httpx.Response, kind: type[CanopyError], says: str
) -> None:
    canopy = FakeCanopy({("POST", "/restore-credentials"): answer})
    with pytest.raises(kind) as error:
        canopy.client().restore_credentials(GROUP, "tamanu-postgres")
    message = str(error.value)
    assert message.startswith("canopy answered POST /restore-credentials with HTTP")
    assert says in message
    assert "pw@" not in message
    assert error.value.status == answer.status_code
    assert error.value.path == "/restore-credentials"


def test_a_403_elsewhere_names_the_role() -> None:
    canopy = FakeCanopy(
        {
            ("GET", "/restore-worklist"): problem(403, "auth-insufficient-permissions", "No"),
            ("POST", "/backup-progress"): problem(403, "auth-insufficient-permissions", "No"),
        }
    )
    client = canopy.client()
    with pytest.raises(CanopyForbidden, match=r"needs the backup-restore role in canopy$"):
        client.worklist()
    sample = ProgressArgs.model_validate({"run_id": RUN, "type": "tamanu-postgres"})
    with pytest.raises(CanopyForbidden, match="only from server devices"):
        client.backup_progress(sample)


def test_transience_flags() -> None:
    assert CanopyTransient.transient and CanopyNotReady.transient and CanopyRateLimited.transient
    assert not CanopyForbidden.transient and not CanopyRejected.transient


def test_a_retired_declaration_is_named_on_verification() -> None:
    canopy = FakeCanopy(
        {("POST", "/restore-verification"): problem(404, "resource-not-found", "No such replica")}
    )
    with pytest.raises(CanopyRejected, match="declaration no longer exists"):
        canopy.client().report_verification(report())


def test_rate_limiting_carries_retry_after_seconds() -> None:
    canopy = FakeCanopy(
        {
            ("POST", "/backup-progress"): problem(
                429, "rate-limited", "Too many reports", **{"retry-after": "7"}
            )
        }
    )
    sample = ProgressArgs.model_validate({"run_id": RUN, "type": "tamanu-postgres"})
    with pytest.raises(CanopyRateLimited) as error:
        canopy.client().backup_progress(sample)
    assert error.value.retry_after == 7.0
    assert "retry after 7 s" in str(error.value)


def test_rate_limiting_with_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(minutes=10), usegmt=True)
    canopy = FakeCanopy(
        {
            ("GET", "/restore-worklist"): problem(
                429, "rate-limited", "Slow", **{"retry-after": when}
            )
        }
    )
    with pytest.raises(CanopyRateLimited) as error:
        canopy.client().worklist()
    assert error.value.retry_after is not None
    assert 500 < error.value.retry_after <= 600


def test_rate_limiting_without_retry_after() -> None:
    canopy = FakeCanopy({("GET", "/restore-worklist"): problem(429, "rate-limited", "Slow")})
    with pytest.raises(CanopyRateLimited, match="back off") as error:
        canopy.client().worklist()
    assert error.value.retry_after is None


@pytest.mark.parametrize(
    ("raised", "says"),
    [
        (httpx.ConnectError("connection refused"), "could not reach https://meta.example.org"),
        (httpx.ReadTimeout("read timed out"), "timed out (ReadTimeout)"),
        (httpx.ProxyError("socks refused"), "SOCKS5 proxy"),
    ],
)
def test_transport_failures_are_transient(raised: Exception, says: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    client = CanopyClient("https://meta.example.org", transport=httpx.MockTransport(fail))
    with pytest.raises(CanopyTransient, match=re.escape(says)) as error:
        client.worklist()
    assert error.value.status is None
    assert error.value.__cause__ is None


def test_a_bad_base_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        CanopyClient("ftp://canopy.example.org")
    with pytest.raises(ValueError, match=r"not a valid URL|http:// or https://"):
        CanopyClient("not a url")


# -- connect (route selection, §2.2) ------------------------------------------------------------


def test_connect_prefers_the_tailnet_when_it_answers() -> None:
    canopy = FakeCanopy({("GET", "/public/servers"): httpx.Response(200, json=[])})
    client = connect("https://meta.example.org", transport=httpx.MockTransport(canopy.handler))
    assert client is not None
    assert client.tailnet
    assert canopy.requests[0].path == "/public/servers"


def test_connect_falls_back_to_the_base_url() -> None:
    canopy = FakeCanopy({("GET", "/public/servers"): httpx.Response(503)})
    client = connect("https://meta.example.org", transport=httpx.MockTransport(canopy.handler))
    assert client is not None
    assert not client.tailnet
    assert client.where == "https://meta.example.org"


def test_connect_without_tailnet_or_base_url_gives_none() -> None:
    canopy = FakeCanopy()
    assert connect(None, transport=httpx.MockTransport(canopy.handler)) is None
    assert connect(None, tailnet_url=None) is None


# -- the SOCKS5 proxy, for real ------------------------------------------------------------------


class Socks5Server:
    """A minimal SOCKS5 server (no auth, CONNECT) that connects every target to loopback
    and records the address each client asked for."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.targets: list[tuple[str, int]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _exactly(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("client went away")
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            _version, count = self._exactly(conn, 2)
            self._exactly(conn, count)
            conn.sendall(b"\x05\x00")
            _, _command, _, address_type = self._exactly(conn, 4)
            if address_type == 3:
                host = self._exactly(conn, self._exactly(conn, 1)[0]).decode()
            elif address_type == 1:
                host = socket.inet_ntoa(self._exactly(conn, 4))
            else:
                host = socket.inet_ntop(socket.AF_INET6, self._exactly(conn, 16))
            (port,) = struct.unpack(">H", self._exactly(conn, 2))
            self.targets.append((host, port))
            upstream = socket.create_connection(("127.0.0.1", port))
            conn.sendall(
                b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port)
            )
            with upstream:
                pump = threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True)
                pump.start()
                self._pipe(conn, upstream)
                pump.join(timeout=5)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    paths: list[str]

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[str]]]:
    class Handler(_Handler):
        paths: list[str] = []  # noqa: RUF012 - one list per fixture, written by the server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], Handler.paths
    server.shutdown()
    server.server_close()


@pytest.fixture
def socks5() -> Iterator[Socks5Server]:
    proxy = Socks5Server()
    yield proxy
    proxy.close()


def test_tailnet_hosts_go_through_the_socks5_proxy(
    http_server: tuple[int, list[str]], socks5: Socks5Server
) -> None:
    port, paths = http_server
    with CanopyClient(
        f"http://canopy.tail53aef.ts.net:{port}",
        socks5_proxy=f"socks5://127.0.0.1:{socks5.port}",
    ) as client:
        assert client.worklist().entries == ()
    # The name went to the proxy unresolved, so Tailscale's MagicDNS can resolve it.
    assert socks5.targets == [("canopy.tail53aef.ts.net", port)]
    assert paths == ["/public/restore-worklist"]


def test_other_hosts_never_touch_the_proxy(
    http_server: tuple[int, list[str]], socks5: Socks5Server
) -> None:
    port, paths = http_server
    with CanopyClient(
        f"http://127.0.0.1:{port}", socks5_proxy=f"socks5://127.0.0.1:{socks5.port}"
    ) as client:
        client.worklist()
    assert socks5.targets == []
    assert paths == ["/restore-worklist"]


def test_a_dead_proxy_is_a_transient_error_naming_the_sidecar(
    http_server: tuple[int, list[str]],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        dead = holder.getsockname()[1]
    port, _ = http_server
    with (
        CanopyClient(
            f"http://canopy.tail53aef.ts.net:{port}", socks5_proxy=f"socks5://127.0.0.1:{dead}"
        ) as client,
        pytest.raises(CanopyTransient) as error,
    ):
        client.probe()
    assert "canopy.tail53aef.ts.net" in str(error.value)


def test_the_default_proxy_is_the_sidecar() -> None:
    assert DEFAULT_SOCKS5_PROXY == "socks5://[::1]:1055"


# -- mTLS with the device certificate, for real ----------------------------------------------------


class _TlsHandler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, bytes | None]]

    def do_GET(self) -> None:
        assert isinstance(self.connection, ssl.SSLSocket)
        type(self).seen.append((self.path, self.connection.getpeercert(binary_form=True)))
        body = json.dumps([ENTRY]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_mtls_presents_the_device_certificate(tmp_path: Path) -> None:
    identity = DeviceIdentity(tmp_path / "device")
    cert_path, _, _ = identity.ensure()
    context = mtls_server_context(tmp_path / "server", cert_path)

    class Handler(_TlsHandler):
        seen: list[tuple[str, bytes | None]] = []  # noqa: RUF012 - per test

    handler = Handler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with CanopyClient(
            f"https://127.0.0.1:{server.server_address[1]}",
            device_cert=identity,
            ca_file=tmp_path / "server" / "server.crt",
            socks5_proxy=DEFAULT_SOCKS5_PROXY,  # not a ts.net host: never used
        ) as client:
            assert [e.name for e in client.worklist().entries] == ["int-test"]
            assert "mTLS" in repr(client)
    finally:
        server.shutdown()
        server.server_close()
    ((path, peer),) = handler.seen
    assert path == "/restore-worklist"
    assert peer is not None
    presented = x509.load_der_x509_certificate(peer).public_key()
    enrolled = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert presented.public_bytes(der, spki) == enrolled.public_bytes(der, spki)


def test_mtls_without_the_certificate_fails_as_transient(tmp_path: Path) -> None:
    identity = DeviceIdentity(tmp_path / "device")
    cert_path, _, _ = identity.ensure()
    context = mtls_server_context(tmp_path / "server", cert_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with (
            CanopyClient(
                f"https://127.0.0.1:{server.server_address[1]}",
                ca_file=tmp_path / "server" / "server.crt",
            ) as client,
            pytest.raises(CanopyTransient, match=re.escape("could not reach https://127.0.0.1")),
        ):
            client.worklist()
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_reloads_a_renewed_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [datetime.now(UTC)]
    identity = DeviceIdentity(tmp_path / "device", clock=lambda: clock[0])
    canopy = FakeCanopy({("GET", "/restore-worklist"): httpx.Response(200, json=[])})
    client = CanopyClient(
        "https://meta.example.org",
        device_cert=identity,
        transport=httpx.MockTransport(canopy.handler),
    )
    loads: list[Path] = []
    original = client._load_cert_chain

    def spy(cert: Path, key: Path) -> None:
        loads.append(cert)
        original(cert, key)

    monkeypatch.setattr(client, "_load_cert_chain", spy)
    client._next_identity_check = 0.0
    client.worklist()
    assert loads == []  # checked, nothing due
    clock[0] += timedelta(days=5)
    client._next_identity_check = 0.0
    client.worklist()
    assert loads == [tmp_path / "device" / "device.crt"]
