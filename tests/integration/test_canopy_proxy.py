"""The canopy S3 proxy with real parts: kopia in front, moto (signatures checked) behind.

moto validates SigV4 and session tokens once its IAM authentication is switched on
(`/moto-api/reset-auth`): credentials minted by its STS `AssumeRole` are the only ones it
accepts, so kopia's dummy keys are refused unless the proxy re-signs. A second, in-test
upstream checks every signature with botocore and can answer `ExpiredToken`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from click.testing import CliRunner

from pgro.api.secret import KopiaCredentials, S3Location
from pgro.canopy.proxy import (
    REPLAY_LIMIT,
    BrokerCredentialSource,
    CanopyProxy,
    CredentialCache,
    CredentialsUnavailable,
    ProgressReporter,
    SidecarSettings,
    TemporaryCredentials,
    TrafficSnapshot,
    http_progress_sender,
    parse_credentials,
    run_sidecar,
    wait_for_port_file,
)
from pgro.canopy.sigv4 import SigningCredentials, canonical_path, sign
from pgro.cli.canopy_proxy import canopy_proxy
from pgro.kopia.repository import KopiaRepository
from pgro.postgres.server import free_port
from tests.fixtures.authed_moto import authed_moto as start_authed_moto

DUMMY_ACCESS = "PROXY_DUMMY_ACCESS_KEY"
DUMMY_SECRET = "PROXY_DUMMY_SECRET_KEY"
# What kopia signs with and the proxy checks (per proxy in service; fixed here).
CLIENT = SigningCredentials(DUMMY_ACCESS, DUMMY_SECRET)
BROKER_TOKEN = "broker-token-for-this-restore"
BUCKET = "canopy-int-test"
WRITE_BUCKET = "canopy-write-test"
REGION = "us-east-1"
GROUP = "22222222-2222-2222-2222-222222222222"
BACKUP_TYPE = "tamanu-postgres"
FAR = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    return server


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


# -- moto with signature checking ------------------------------------------------------------


@dataclass
class AuthedMoto:
    endpoint: str  # http://host:port
    minted: list[dict[str, Any]]  # STS credentials, credential_process shape
    snapshot_id: str
    repo_password: str


@pytest.fixture(scope="module")
def authed_moto(
    s3_repo: tuple[KopiaCredentials, str], moto_s3: str, scratch_root: Path
) -> Iterator[AuthedMoto]:
    """A moto of our own holding a copy of the `s3_repo` repository, with IAM auth on."""
    creds, snapshot_id = s3_repo
    assert isinstance(creds.location, S3Location)
    with start_authed_moto(
        moto_s3,
        creds.location.bucket,
        [BUCKET, WRITE_BUCKET],
        scratch_root / "moto-authed.log",
        mint=6,
    ) as s3:
        yield AuthedMoto(s3.endpoint, s3.minted, snapshot_id, creds.repository_password)


class Supply:
    """A credential source handing out the sets in turn, counting calls.

    With a clock, each set expires an hour after it is handed out (as canopy's STS ones do).
    """

    def __init__(
        self, sets: list[dict[str, Any]], clock: Callable[[], datetime] | None = None
    ) -> None:
        self._sets = sets
        self._clock = clock
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> TemporaryCredentials:
        with self.lock:
            doc = dict(self._sets[self.calls % len(self._sets)])
            self.calls += 1
        if self._clock is not None:
            doc["Expiration"] = (self._clock() + timedelta(hours=1)).isoformat()
        return parse_credentials(doc)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _kopia(endpoint: str, bucket: str, password: str, state: Path) -> KopiaRepository:
    creds = KopiaCredentials(
        location=S3Location(bucket=bucket, region=REGION, endpoint=endpoint, disable_tls=True),
        repository_password=password,
        access_key_id=DUMMY_ACCESS,
        secret_access_key=DUMMY_SECRET,
    )
    return KopiaRepository(creds, state)


def _secrets(sets: list[dict[str, Any]]) -> list[str]:
    return [d[k] for d in sets for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")]


def _assert_absent(secrets: list[str], root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, f"nothing under {root}"
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"a real credential is in {path}"


def test_moto_refuses_kopias_dummy_keys(authed_moto: AuthedMoto, scratch: Path) -> None:
    """The control experiment: without the proxy, kopia cannot get in."""
    host = authed_moto.endpoint.removeprefix("http://")
    repo = _kopia(host, BUCKET, authed_moto.repo_password, scratch / "k")
    with pytest.raises(Exception) as err:
        repo.connect()
    assert "ccess" in str(err.value) or "nvalid" in str(err.value)


def test_kopia_connects_and_lists_through_the_proxy_with_cached_then_refreshed_credentials(
    authed_moto: AuthedMoto, scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    supply = Supply(authed_moto.minted, clock)
    cache = CredentialCache(supply, clock=clock)
    state = scratch / "kopia"
    with CanopyProxy(
        cache, region=REGION, upstream=authed_moto.endpoint, client_credentials=CLIENT
    ) as proxy:
        assert proxy.endpoint.startswith("[::1]:")
        repo = _kopia(proxy.endpoint, BUCKET, authed_moto.repo_password, state)
        repo.connect()
        ids = {s.id for s in repo.list_snapshots()}
        assert authed_moto.snapshot_id in ids
        first = proxy.stats.snapshot()
        assert first.requests > 5
        assert supply.calls == 1  # one fetch served every request

        # An hour later the first set is inside the two-minute margin: fetched again.
        clock.now += timedelta(minutes=59)
        ids = {s.id for s in repo.list_snapshots()}
        assert authed_moto.snapshot_id in ids
        assert supply.calls == 2
        second = proxy.stats.snapshot()
        assert second.requests > first.requests
        assert second.received_payload_bytes > first.received_payload_bytes
        assert second.received_raw_bytes > second.received_payload_bytes
        _assert_absent(_secrets(authed_moto.minted), state)
        repo.close()
    logged = caplog.text
    for secret in _secrets(authed_moto.minted):
        assert secret not in logged
    assert "Signature=" not in logged


def test_kopia_writes_through_the_proxy(authed_moto: AuthedMoto, scratch: Path) -> None:
    """minio-go sends PUTs aws-chunked over plain HTTP; the proxy unwraps and re-signs them."""
    supply = Supply(authed_moto.minted[3:])
    source = scratch / "tree"
    source.mkdir()
    (source / "small.txt").write_text("hello\n")
    (source / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    with CanopyProxy(
        supply, region=REGION, upstream=authed_moto.endpoint, client_credentials=CLIENT
    ) as proxy:
        repo = _kopia(proxy.endpoint, WRITE_BUCKET, "write-test-password", scratch / "kw")
        repo.create()
        snap = repo.snapshot_create(source, description="through the proxy")
        assert snap in {s.id for s in repo.list_snapshots()}
        target = scratch / "restored"
        repo.restore(snap, target)
        repo.close()
        assert (target / "big.bin").read_bytes() == (source / "big.bin").read_bytes()
        assert proxy.stats.snapshot().sent_payload_bytes > 3 * 1024 * 1024
    assert supply.calls == 1


# -- the sidecar, as the restore pod runs it -------------------------------------------------


class Recorder:
    """The operator's side: the credential broker and the two callbacks, recording bodies."""

    def __init__(self, sets: list[dict[str, Any]], broker_status: int = 200) -> None:
        self.posts: dict[str, list[Any]] = defaultdict(list)
        self.auth: dict[str, list[str | None]] = defaultdict(list)
        self.sets = sets
        self.broker_status = broker_status
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
                recorder.posts[self.path].append(body)
                recorder.auth[self.path].append(self.headers.get("Authorization"))
                if self.path == "/internal/restore-creds":
                    if recorder.broker_status != 200:
                        reply = json.dumps({"error": "canopy said no"}).encode()
                        self.send_response(recorder.broker_status)
                    else:
                        n = len(recorder.posts[self.path]) - 1
                        reply = json.dumps(
                            {
                                "credentials": recorder.sets[n % len(recorder.sets)],
                                "repo_password": "not-for-the-proxy",
                            }
                        ).encode()
                        self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _serve(Handler)
        self.url = _url(self.server)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_sidecar_restores_the_clean_snapshot_and_reports_traffic(
    authed_moto: AuthedMoto, scratch: Path
) -> None:
    recorder = Recorder(authed_moto.minted)
    run_id = str(uuid.uuid4())
    port_file = scratch / "run" / "proxy-port"
    progress_path = "/api/v1/canopy-progress/ns/r1-restore"
    stats_path = "/api/v1/canopy-stats/ns/r1-restore"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGRO_", "AWS_", "KOPIA_"))} | {
        "PGRO_BROKER_URL": recorder.url,
        "PGRO_GROUP": GROUP,
        "PGRO_TYPE": BACKUP_TYPE,
        "PGRO_REGION": REGION,
        "PGRO_S3_ENDPOINT": authed_moto.endpoint,
        "PGRO_RUN_ID": run_id,
        "PGRO_PROGRESS_CALLBACK_URL": recorder.url + progress_path,
        "PGRO_STATS_CALLBACK_URL": recorder.url + stats_path,
        "PGRO_PROXY_PORT_FILE": str(port_file),
        "PGRO_BROKER_TOKEN": BROKER_TOKEN,
        "PGRO_PROXY_ACCESS_KEY_ID": DUMMY_ACCESS,
        "PGRO_PROXY_SECRET_ACCESS_KEY": DUMMY_SECRET,
    }
    log_file = scratch / "sidecar.log"
    with log_file.open("wb") as sink:  # a file: a full pipe would block the sidecar's logs
        sidecar = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from pgro.cli.canopy_proxy import canopy_proxy; canopy_proxy()",
                "--progress-interval=0.05",
                "--log-level=debug",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        port = wait_for_port_file(port_file)
        state = scratch / "kopia"
        repo = _kopia(f"[::1]:{port}", BUCKET, authed_moto.repo_password, state)
        repo.connect()
        assert authed_moto.snapshot_id in {s.id for s in repo.list_snapshots()}

        def received() -> list[int]:
            return [s["s3_received_payload_bytes"] for s in recorder.posts[progress_path]]

        # A sample taken after connect and list, then one that also counts the restore.
        wait_until(lambda: any(b > 0 for b in received()), "a progress sample with traffic")
        before_restore = max(received())
        target = scratch / "restored"
        repo.restore(authed_moto.snapshot_id, target)
        assert list(target.glob("*/main/PG_VERSION")), "the clean cluster was not restored"
        _assert_absent(_secrets(authed_moto.minted), state)
        repo.close()
        wait_until(lambda: max(received()) > before_restore + 1_000_000, "a post-restore sample")
    finally:
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(30)
        recorder.close()
    logs = log_file.read_text()
    assert sidecar.returncode == 0, logs[-3000:]

    assert recorder.posts["/internal/restore-creds"] == [
        {"group": GROUP, "type": BACKUP_TYPE, "run_id": run_id}
    ]
    # Every call to the operator carries the restore's token.
    for path in ("/internal/restore-creds", progress_path, stats_path):
        assert set(recorder.auth[path]) == {f"Bearer {BROKER_TOKEN}"}, path
    samples = recorder.posts[progress_path]
    assert len(samples) >= 2
    for sample in samples:
        assert set(sample) == {
            "run_id",
            "type",
            "purpose",
            "s3_sent_raw_bytes",
            "s3_sent_payload_bytes",
            "s3_received_raw_bytes",
            "s3_received_payload_bytes",
            "extra",
        }
        assert (sample["run_id"], sample["type"], sample["purpose"]) == (
            run_id,
            BACKUP_TYPE,
            "restore",
        )
    counts = [s["s3_received_payload_bytes"] for s in samples]
    assert counts == sorted(counts)
    [final] = recorder.posts[stats_path]
    assert set(final) == {
        "sent_raw_bytes",
        "sent_payload_bytes",
        "received_raw_bytes",
        "received_payload_bytes",
    }
    assert final["received_payload_bytes"] >= counts[-1] > 1_000_000
    assert final["received_raw_bytes"] > final["received_payload_bytes"]
    assert final["sent_raw_bytes"] > 0
    assert "canopy proxy listening" in logs
    for secret in _secrets(authed_moto.minted):
        assert secret not in logs
    assert "Signature=" not in logs


def test_sidecar_without_required_environment_exits_2() -> None:
    result = CliRunner().invoke(
        canopy_proxy, [], env={"PGRO_BROKER_URL": "http://broker", "PGRO_GROUP": GROUP}
    )
    assert result.exit_code == 2
    assert "PGRO_TYPE" in result.output or "--type" in result.output


def test_failed_stats_post_is_not_fatal(scratch: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stop = threading.Event()
    ready: list[int] = []

    def on_ready(proxy: CanopyProxy) -> None:
        ready.append(proxy.port)
        stop.set()

    settings = SidecarSettings(
        broker_url=dead,
        group=GROUP,
        backup_type=BACKUP_TYPE,
        region=REGION,
        broker_token=BROKER_TOKEN,
        client_credentials=CLIENT,
        s3_endpoint=dead,
        listen_host="127.0.0.1",
        port_file=scratch / "port",
        run_id="not-a-uuid",
        progress_url=dead + "/progress",
        stats_url=dead + "/stats",
    )
    totals = run_sidecar(settings, stop, on_ready=on_ready)
    assert ready
    assert totals == TrafficSnapshot()
    assert (scratch / "port").read_text() == str(ready[0])
    assert not (scratch / "port.tmp").exists()


# -- an upstream that checks every signature with botocore -----------------------------------


@dataclass
class Seen:
    method: str
    path: str
    access_key: str
    headers: dict[str, str]
    body: bytes


@dataclass
class VerifyingS3:
    """Accepts only correctly signed requests from known temporary credentials."""

    keys: dict[str, tuple[str, str]]  # access key -> (secret, session token)
    expired: set[str] = field(default_factory=set)
    objects: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    chunked_responses: bool = False

    def start(self) -> str:
        s3 = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                headers = headers or {}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if s3.chunked_responses and body and self.command != "HEAD":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 100_000):
                        piece = body[i : i + 100_000]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                self._reply(status, f"<Error><Code>{code}</Code></Error>".encode())

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                verdict = s3.check(self.command, self.path, dict(self.headers.items()))
                if verdict is not None:
                    s3.rejected.append(verdict)
                    self._error(403, verdict)
                    return
                access_key = _credential(self.headers["Authorization"])[0]
                s3.seen.append(
                    Seen(self.command, self.path, access_key, dict(self.headers.items()), body)
                )
                if access_key in s3.expired:
                    self._error(400, "ExpiredToken")
                    return
                path, _, query = self.path.partition("?")
                key = unquote(path.split("/", 2)[2]) if path.count("/") >= 2 else ""
                if self.command == "PUT":
                    s3.objects[key] = body
                    self._reply(200, headers={"ETag": '"x"'})
                elif self.command == "DELETE":
                    s3.objects.pop(key, None)
                    self._reply(204)
                elif self.command in ("GET", "HEAD") and "list-type=2" in query:
                    items = "".join(
                        f"<Contents><Key>{k}</Key></Contents>" for k in sorted(s3.objects)
                    )
                    self._reply(200, f"<ListBucketResult>{items}</ListBucketResult>".encode())
                elif key not in s3.objects:
                    self._error(404, "NoSuchKey")
                elif self.command == "HEAD":
                    self._reply(200, headers={"Content-Length": str(len(s3.objects[key]))})
                elif rng := self.headers.get("Range"):
                    start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
                    data = s3.objects[key]
                    self._reply(
                        206,
                        data[start : end + 1],
                        {"Content-Range": f"bytes {start}-{end}/{len(data)}"},
                    )
                else:
                    self._reply(200, s3.objects[key])

            do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _serve(Handler)
        return _url(self.server)

    def check(self, method: str, path: str, headers: dict[str, str]) -> str | None:
        lower = {k.lower(): v for k, v in headers.items()}
        auth = lower.get("authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return "MissingSecurityHeader"
        access_key, region, service = _credential(auth)
        if access_key not in self.keys or (region, service) != (REGION, "s3"):
            return "InvalidAccessKeyId"
        secret, token = self.keys[access_key]
        signed_names = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        if lower.get("x-amz-security-token") != token or "x-amz-security-token" not in signed_names:
            return "InvalidToken"
        if lower.get("x-amz-content-sha256") != "UNSIGNED-PAYLOAD":
            return "XAmzContentSHA256Mismatch"
        request = AWSRequest(
            method=method,
            url=f"http://{lower['host']}{path}",
            headers={k: v for k, v in headers.items() if k.lower() in signed_names},
        )
        request.context["timestamp"] = lower["x-amz-date"]
        signer = S3SigV4Auth(Credentials(access_key, secret, token), "s3", REGION)
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        if auth.rsplit("Signature=", 1)[1] != expected:
            return "SignatureDoesNotMatch"
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _credential(auth: str) -> tuple[str, str, str]:
    parts = auth.split("Credential=")[1].split(",")[0].split("/")
    return parts[0], parts[2], parts[3]


TEMP_SETS = [
    {
        "AccessKeyId": f"ASIATEMP{i}",
        "SecretAccessKey": f"temp-secret-{i}/+x",
        "SessionToken": f"session-token-{i}==",
        "Expiration": FAR.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    for i in range(3)
]


@pytest.fixture
def verifying() -> Iterator[tuple[VerifyingS3, str]]:
    s3 = VerifyingS3(
        keys={d["AccessKeyId"]: (d["SecretAccessKey"], d["SessionToken"]) for d in TEMP_SETS}
    )
    url = s3.start()
    yield s3, url
    s3.stop()


def _kopia_like(
    method: str,
    url: str,
    path: str,
    *,
    keys: SigningCredentials = CLIENT,
    client: httpx.Client | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """A request signed with the proxy's client keys, as kopia sends it."""
    headers = dict(kwargs.pop("headers", {}))
    payload_hash = headers.pop("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
    host = url.removeprefix("http://")
    raw_path, _, query = path.partition("?")
    dummy = sign(
        method=method,
        path=canonical_path(raw_path),
        query=query,
        headers={"host": host},
        credentials=keys,
        region=REGION,
        service="s3",
        when=datetime.now(UTC),
        payload_hash=payload_hash,
    )
    headers.update(dummy.headers)
    if client is not None:
        return client.request(method, url + path, headers=headers, timeout=30, **kwargs)
    return httpx.request(method, url + path, headers=headers, timeout=30, **kwargs)


def _aws_chunked(payload: bytes, chunk: int = 65536) -> bytes:
    out = b""
    for i in range(0, len(payload), chunk):
        piece = payload[i : i + chunk]
        out += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(piece), b"0" * 64, piece)
    return out + b"0;chunk-signature=" + b"0" * 64 + b"\r\n\r\n"


def test_every_request_is_re_signed_with_the_session_token(
    verifying: tuple[VerifyingS3, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    s3, upstream = verifying
    supply = Supply(TEMP_SETS)
    big = os.urandom(5 * 1024 * 1024 + 17)
    with CanopyProxy(
        supply, region=REGION, upstream=upstream, host="127.0.0.1", client_credentials=CLIENT
    ) as proxy:
        base = f"http://{proxy.endpoint}"
        # Plain PUT with Content-Length, streamed (larger than the replay buffer).
        assert _kopia_like("PUT", base, "/bkt/big blob", content=big).status_code == 200
        # aws-chunked PUT, as minio-go sends over plain HTTP.
        small = b"hello kopia" * 1000
        reply = _kopia_like(
            "PUT",
            base,
            "/bkt/p0chunked",
            content=_aws_chunked(small),
            headers={
                "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                "x-amz-decoded-content-length": str(len(small)),
                "Content-Encoding": "aws-chunked",
                "Content-Type": "application/x-kopia",
                "x-amz-meta-kind": "blob",
            },
        )
        assert reply.status_code == 200
        head = _kopia_like("HEAD", base, "/bkt/big%20blob")
        assert head.status_code == 200
        assert head.headers["Content-Length"] == str(len(big))
        got = _kopia_like("GET", base, "/bkt/big%20blob")
        assert got.content == big
        part = _kopia_like("GET", base, "/bkt/big%20blob", headers={"Range": "bytes=100-4195"})
        assert part.status_code == 206
        assert part.content == big[100:4196]
        assert part.headers["Content-Range"] == f"bytes 100-4195/{len(big)}"
        listing = _kopia_like("GET", base, "/bkt/?list-type=2&prefix=p0")
        assert b"<Key>p0chunked</Key>" in listing.content
        assert _kopia_like("DELETE", base, "/bkt/p0chunked").status_code == 204
        missing = _kopia_like("GET", base, "/bkt/p0chunked")
        assert missing.status_code == 404
        assert b"NoSuchKey" in missing.content
        stats = proxy.stats.snapshot()

    assert s3.rejected == []
    assert s3.objects["big blob"] == big
    chunked_put = next(s for s in s3.seen if s.path == "/bkt/p0chunked" and s.method == "PUT")
    assert chunked_put.body == small
    names = {k.lower() for k in chunked_put.headers}
    assert "x-amz-decoded-content-length" not in names
    assert "content-encoding" not in names
    assert chunked_put.headers["x-amz-meta-kind"] == "blob"
    assert {s.access_key for s in s3.seen} == {"ASIATEMP0"}
    assert supply.calls == 1
    assert stats.requests == 8
    assert stats.sent_payload_bytes == len(big) + len(small)
    assert stats.received_payload_bytes > len(big) + 4096
    for secret in _secrets(TEMP_SETS):
        assert secret not in caplog.text


def test_chunked_upstream_responses_are_relayed(verifying: tuple[VerifyingS3, str]) -> None:
    s3, upstream = verifying
    s3.objects["k"] = os.urandom(1_000_003)
    s3.chunked_responses = True
    with CanopyProxy(
        Supply(TEMP_SETS), region=REGION, upstream=upstream, host="::1", client_credentials=CLIENT
    ) as proxy:
        base = f"http://{proxy.endpoint}"
        with httpx.Client() as client:  # one keep-alive connection for both requests
            for _ in range(2):
                reply = _kopia_like("GET", base, "/bkt/k", client=client)
                assert reply.content == s3.objects["k"]
    assert s3.rejected == []


def test_expired_token_refreshes_and_retries_once(verifying: tuple[VerifyingS3, str]) -> None:
    s3, upstream = verifying
    s3.objects["k"] = b"payload"
    s3.expired.add("ASIATEMP0")
    supply = Supply(TEMP_SETS)
    with CanopyProxy(
        supply, region=REGION, upstream=upstream, host="127.0.0.1", client_credentials=CLIENT
    ) as proxy:
        reply = _kopia_like("GET", f"http://{proxy.endpoint}", "/bkt/k")
    assert reply.status_code == 200
    assert reply.content == b"payload"
    assert supply.calls == 2
    assert [s.access_key for s in s3.seen] == ["ASIATEMP0", "ASIATEMP1"]


def test_expired_token_on_a_streamed_upload_is_passed_back_for_kopia_to_retry(
    verifying: tuple[VerifyingS3, str],
) -> None:
    s3, upstream = verifying
    s3.expired.add("ASIATEMP0")
    supply = Supply(TEMP_SETS)
    body = os.urandom(REPLAY_LIMIT + 1)
    with CanopyProxy(
        supply, region=REGION, upstream=upstream, host="127.0.0.1", client_credentials=CLIENT
    ) as proxy:
        base = f"http://{proxy.endpoint}"
        first = _kopia_like("PUT", base, "/bkt/big", content=body)
        assert first.status_code == 400
        assert b"ExpiredToken" in first.content
        # kopia (minio-go) retries ExpiredToken; by then the proxy has fresh credentials.
        assert _kopia_like("PUT", base, "/bkt/big", content=body).status_code == 200
    assert supply.calls == 2
    assert s3.objects["big"] == body


def test_no_credentials_is_a_retryable_s3_error(verifying: tuple[VerifyingS3, str]) -> None:
    s3, upstream = verifying

    def broken() -> TemporaryCredentials:
        raise CredentialsUnavailable("credential broker answered 502: canopy down")

    with CanopyProxy(
        broken, region=REGION, upstream=upstream, host="127.0.0.1", client_credentials=CLIENT
    ) as proxy:
        reply = _kopia_like("GET", f"http://{proxy.endpoint}", "/bkt/k")
    assert reply.status_code == 503
    assert b"<Code>ServiceUnavailable</Code>" in reply.content
    assert b"canopy down" in reply.content
    assert s3.seen == []


def test_unreachable_upstream_is_a_bad_gateway() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with CanopyProxy(
        Supply(TEMP_SETS), region=REGION, upstream=dead, host="127.0.0.1", client_credentials=CLIENT
    ) as proxy:
        reply = _kopia_like("GET", f"http://{proxy.endpoint}", "/bkt/k")
    assert reply.status_code == 502
    assert b"BadGateway" in reply.content


# -- progress reporter ---------------------------------------------------------------------------


def test_progress_reporter_posts_cumulative_samples() -> None:
    recorder = Recorder([])
    try:
        from pgro.canopy.proxy import TrafficStats

        stats = TrafficStats()
        run_id = str(uuid.uuid4())
        with httpx.Client() as client:
            send = http_progress_sender(client, recorder.url + "/p", run_id, BACKUP_TYPE)
            reporter = ProgressReporter(stats, send, interval=0.02).start()
            stats.received(1000, 200)
            wait_until(
                lambda: any(s["s3_received_payload_bytes"] == 1000 for s in recorder.posts["/p"]),
                "a first sample",
            )
            stats.received(5000, 100)
            stats.sent(10, 90)
            wait_until(
                lambda: any(s["s3_received_payload_bytes"] == 6000 for s in recorder.posts["/p"]),
                "a later sample",
            )
            reporter.stop()
    finally:
        recorder.close()
    last = recorder.posts["/p"][-1]
    assert last == {
        "run_id": run_id,
        "type": BACKUP_TYPE,
        "purpose": "restore",
        "s3_sent_raw_bytes": 100,
        "s3_sent_payload_bytes": 10,
        "s3_received_raw_bytes": 6300,
        "s3_received_payload_bytes": 6000,
        "extra": {},
    }


# -- credential source and cache ---------------------------------------------------------------


def test_broker_source_sends_group_type_run_id_and_reads_only_credentials() -> None:
    recorder = Recorder(TEMP_SETS)
    try:
        source = BrokerCredentialSource(
            recorder.url, GROUP, BACKUP_TYPE, "run-1", token=BROKER_TOKEN
        )
        creds = source()
        no_run = BrokerCredentialSource(recorder.url + "/", GROUP, BACKUP_TYPE, token="t2")()
    finally:
        recorder.close()
    assert recorder.posts["/internal/restore-creds"] == [
        {"group": GROUP, "type": BACKUP_TYPE, "run_id": "run-1"},
        {"group": GROUP, "type": BACKUP_TYPE},
    ]
    assert (creds.access_key_id, creds.session_token) == ("ASIATEMP0", "session-token-0==")
    assert creds.expiration == FAR
    assert no_run.access_key_id == "ASIATEMP1"
    assert recorder.auth["/internal/restore-creds"] == [f"Bearer {BROKER_TOKEN}", "Bearer t2"]


def test_broker_errors_carry_its_message_but_no_secret() -> None:
    recorder = Recorder(TEMP_SETS, broker_status=502)
    try:
        with pytest.raises(CredentialsUnavailable) as err:
            BrokerCredentialSource(recorder.url, GROUP, BACKUP_TYPE, token=BROKER_TOKEN)()
    finally:
        recorder.close()
    assert "502" in str(err.value)
    assert "canopy said no" in str(err.value)
    with pytest.raises(CredentialsUnavailable, match="unreachable"):
        BrokerCredentialSource(
            f"http://127.0.0.1:{free_port()}", GROUP, BACKUP_TYPE, token=BROKER_TOKEN
        )()


def test_parse_credentials_names_missing_fields_without_values() -> None:
    with pytest.raises(CredentialsUnavailable, match="SecretAccessKey"):
        parse_credentials({"AccessKeyId": "AKIA-VISIBLE?"})
    with pytest.raises(CredentialsUnavailable) as err:
        parse_credentials({"AccessKeyId": "AK", "SecretAccessKey": "s3cr3t", "Expiration": "soon"})
    assert "s3cr3t" not in str(err.value)
    creds = parse_credentials(
        {"AccessKeyId": "AK", "SecretAccessKey": "s3cr3t", "Expiration": "2026-07-01T01:00:00.5Z"}
    )
    assert creds.session_token is None
    assert creds.expiration == datetime(2026, 7, 1, 1, 0, 0, 500000, tzinfo=UTC)
    assert "s3cr3t" not in repr(creds)


def _expiring(at: datetime, n: int = 0) -> TemporaryCredentials:
    return TemporaryCredentials(f"AK{n}", f"secret{n}", f"token{n}", expiration=at)


def test_cache_serves_until_the_margin_then_refreshes() -> None:
    clock = FakeClock()
    start = clock.now
    handed: list[TemporaryCredentials] = []

    def source() -> TemporaryCredentials:
        handed.append(_expiring(clock.now + timedelta(hours=1), len(handed)))
        return handed[-1]

    cache = CredentialCache(source, clock=clock)
    first = cache.get()
    clock.now = start + timedelta(minutes=57, seconds=59)
    assert cache.get() is first
    clock.now = start + timedelta(minutes=58)
    second = cache.get()
    assert second is not first
    assert len(handed) == cache.fetches == 2


def test_cache_keeps_a_still_valid_set_when_refresh_fails() -> None:
    clock = FakeClock()
    start = clock.now
    calls: list[int] = []
    current = _expiring(start + timedelta(hours=1))

    def source() -> TemporaryCredentials:
        calls.append(1)
        if len(calls) > 1:
            raise CredentialsUnavailable("broker down")
        return current

    cache = CredentialCache(source, clock=clock)
    assert cache.get() is current
    clock.now = start + timedelta(minutes=59)  # inside the margin, not expired
    assert cache.get() is current
    assert cache.get() is current
    assert len(calls) == 2  # the failure is not retried at once
    clock.now = start + timedelta(hours=1, seconds=1)  # expired, and the source still fails
    with pytest.raises(CredentialsUnavailable, match="broker down"):
        cache.get()


def test_cache_invalidate_forgets_only_the_rejected_set() -> None:
    sets = iter([_expiring(FAR, 0), _expiring(FAR, 1), _expiring(FAR, 2)])
    cache = CredentialCache(lambda: next(sets))
    a = cache.get()
    cache.invalidate(a)
    b = cache.get()
    assert b.access_key_id == "AK1"
    cache.invalidate(a)  # a late report about the old set does not drop the new one
    assert cache.get() is b


# -- the proxy signs only for its own kopia (issue 18 item 9) -----------------------------------


def test_requests_not_signed_with_the_client_keys_are_refused_and_not_forwarded(
    verifying: tuple[VerifyingS3, str],
) -> None:
    """Before: anyone who could reach the loopback port got any S3 request signed."""
    s3, upstream = verifying
    s3.objects["k"] = b"secret backup bytes"
    supply = Supply(TEMP_SETS)
    with CanopyProxy(supply, region=REGION, upstream=upstream, host="127.0.0.1") as proxy:
        base = f"http://{proxy.endpoint}"
        other_keys = SigningCredentials(proxy.client_credentials.access_key_id, "guessed")
        stranger = SigningCredentials("PROXY_DUMMY_ACCESS_KEY", "PROXY_DUMMY_SECRET_KEY")
        refused = [
            httpx.get(base + "/bkt/k"),  # unsigned
            httpx.get(base + "/bkt/k", headers={"Authorization": "AWS4-HMAC-SHA256 x"}),
            _kopia_like("GET", base, "/bkt/k", keys=other_keys),  # right id, wrong secret
            _kopia_like("GET", base, "/bkt/k", keys=stranger),  # the old fixed dummy keys
        ]
        # A genuine signature replayed for another object.
        signed = _kopia_like("GET", base, "/bkt/k", keys=proxy.client_credentials)
        assert signed.status_code == 200 and signed.content == b"secret backup bytes"
        for reply in refused:
            assert reply.status_code == 403, reply.text
            assert b"<Code>AccessDenied</Code>" in reply.content
            assert b"secret backup bytes" not in reply.content
        stats = proxy.stats.snapshot()
    assert len(s3.seen) == 1  # only the genuine request went upstream
    assert supply.calls == 1 and stats.requests == 1


def test_a_signature_for_another_request_is_refused(verifying: tuple[VerifyingS3, str]) -> None:
    s3, upstream = verifying
    s3.objects["a"] = b"A"
    s3.objects["b"] = b"B"
    with CanopyProxy(
        Supply(TEMP_SETS), region=REGION, upstream=upstream, host="127.0.0.1"
    ) as proxy:
        base = f"http://{proxy.endpoint}"
        good = sign(
            method="GET",
            path="/bkt/a",
            query="",
            headers={"host": proxy.endpoint},
            credentials=proxy.client_credentials,
            region=REGION,
            service="s3",
            when=datetime.now(UTC),
            payload_hash="UNSIGNED-PAYLOAD",
        )
        assert httpx.get(base + "/bkt/a", headers=good.headers).content == b"A"
        assert httpx.get(base + "/bkt/b", headers=good.headers).status_code == 403
        stale = sign(
            method="GET",
            path="/bkt/a",
            query="",
            headers={"host": proxy.endpoint},
            credentials=proxy.client_credentials,
            region=REGION,
            service="s3",
            when=datetime.now(UTC) - timedelta(hours=1),
            payload_hash="UNSIGNED-PAYLOAD",
        )
        assert httpx.get(base + "/bkt/a", headers=stale.headers).status_code == 403
    assert [s.path for s in s3.seen] == ["/bkt/a"]


@pytest.mark.parametrize("length", ["-1", "abc", "1_0"])
def test_a_bad_content_length_is_a_400(verifying: tuple[VerifyingS3, str], length: str) -> None:
    s3, upstream = verifying
    with CanopyProxy(
        Supply(TEMP_SETS), region=REGION, upstream=upstream, host="127.0.0.1"
    ) as proxy:
        signed = sign(
            method="PUT",
            path="/bkt/x",
            query="",
            headers={"host": proxy.endpoint},
            credentials=proxy.client_credentials,
            region=REGION,
            service="s3",
            when=datetime.now(UTC),
            payload_hash="UNSIGNED-PAYLOAD",
        )
        head = "".join(f"{k}: {v}\r\n" for k, v in signed.headers.items())
        request = (
            f"PUT /bkt/x HTTP/1.1\r\nHost: {proxy.endpoint}\r\n{head}"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
            conn.sendall(request + b"x" * 1000)
            answer = conn.recv(4096)
    assert answer.split(b" ", 2)[1] == b"400", answer
    assert s3.seen == []


def test_sidecar_without_its_secrets_exits_2() -> None:
    env = {
        "PGRO_BROKER_URL": "http://broker",
        "PGRO_GROUP": GROUP,
        "PGRO_TYPE": BACKUP_TYPE,
        "PGRO_REGION": REGION,
        "PGRO_PROXY_ACCESS_KEY_ID": DUMMY_ACCESS,
        "PGRO_PROXY_SECRET_ACCESS_KEY": DUMMY_SECRET,
    }
    result = subprocess.run(
        [sys.executable, "-m", "pgro", "canopy-proxy", "--port-file="],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PGRO_BROKER_TOKEN" in result.stderr


def test_sidecar_secrets_file_must_be_private(scratch: Path) -> None:
    secrets_file = scratch / "secrets.json"
    secrets_file.write_text(
        json.dumps(
            {"brokerToken": "t", "accessKeyId": DUMMY_ACCESS, "secretAccessKey": DUMMY_SECRET}
        )
    )
    secrets_file.chmod(0o644)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgro",
            "canopy-proxy",
            "--broker-url=http://broker",
            f"--group={GROUP}",
            f"--type={BACKUP_TYPE}",
            f"--region={REGION}",
            "--port-file=",
            f"--secrets-from={secrets_file}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "chmod 600" in result.stderr and DUMMY_SECRET not in result.stderr
