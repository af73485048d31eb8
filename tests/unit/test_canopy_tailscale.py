"""The canopy `url` semantic: the MagicDNS suffix from a LocalAPI on a real unix socket
(`socketserver.UnixStreamServer`, speaking HTTP as tailscaled does), the URL it makes, and
the report the courier sends with it."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingUnixStreamServer
from typing import Any
from uuid import UUID

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.verification import PendingVerificationReport
from pgro.canopy.courier import ReportCourier
from pgro.canopy.materialise import materialise
from pgro.canopy.naming import canopy_labels
from pgro.canopy.settings import settings_from_env
from pgro.canopy.tailscale import (
    DEFAULT_SOCKET,
    TailnetUrls,
    magic_dns_suffix,
    replica_url,
    socket_from_env,
    suffix_from_status,
)
from pgro.canopy.wire import VerificationArgs, WorklistEntry
from tests.fixtures.manifests import replica

STATUS = b'{"CurrentTailnet":{"MagicDNSSuffix":"tailnet-abc.ts.net"}}'
HOSTNAME = "infra-replica-nauru"
EXPOSED = {"tailscale.com/expose": "true", "tailscale.com/hostname": HOSTNAME}
URL = f"https://{HOSTNAME}.tailnet-abc.ts.net"


@dataclass
class FakeLocalApi:
    """tailscaled's LocalAPI as far as pgro uses it: answers `status, body` to every GET
    and records each request's path and Host header."""

    socket: Path
    status: int = 200
    body: bytes = STATUS
    requests: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture
def local_api() -> Iterator[FakeLocalApi]:
    # A short directory: a unix socket's path is limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="ts-") as tmp:
        api = FakeLocalApi(Path(tmp) / "tailscaled.sock")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append((self.path, self.headers.get("Host")))
                self.send_response(api.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(api.body)))
                self.end_headers()
                self.wfile.write(api.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a unix peer has no address to log

        server = ThreadingUnixStreamServer(str(api.socket), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield api
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


def exposed(annotations: dict[str, str] | None = EXPOSED) -> PostgresPhysicalReplica:
    return replica(
        "canopy-replica",
        None,
        namespace="ns",
        metadata={"labels": LABELS},
        status={"pendingVerificationReports": [REPORT.to_wire()]},
        schedule="H * * * *",
        canopySource={"group": str(UUID(int=2)), "type": "t"},
        serviceAnnotations=annotations,
    )


# -- the suffix and the URL ------------------------------------------------------------------


def test_the_suffix_is_read_from_the_localapi_over_the_socket(local_api: FakeLocalApi) -> None:
    assert magic_dns_suffix(str(local_api.socket)) == "tailnet-abc.ts.net"
    assert local_api.requests == [("/localapi/v0/status", "local-tailscaled.sock")]


def test_an_exposed_replica_gets_its_https_url(local_api: FakeLocalApi) -> None:
    urls = TailnetUrls(str(local_api.socket))
    assert urls.url_for(exposed()) == URL


def test_a_leading_dot_on_the_suffix_is_tolerated(local_api: FakeLocalApi) -> None:
    local_api.body = b'{"CurrentTailnet":{"Name":"x","MagicDNSSuffix":".tailnet-abc.ts.net"}}'
    assert TailnetUrls(str(local_api.socket)).url_for(exposed()) == URL
    assert replica_url("h", ".tailnet-abc.ts.net") == "https://h.tailnet-abc.ts.net"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"{}"),  # no CurrentTailnet (logged out)
        (200, b'{"CurrentTailnet":null}'),
        (200, b'{"CurrentTailnet":{"Name":"x"}}'),
        (200, b'{"CurrentTailnet":{"MagicDNSSuffix":""}}'),
        (200, b'{"CurrentTailnet":{"MagicDNSSuffix":42}}'),
        (200, b'{"CurrentTailnet":{"MagicDNSSu'),  # garbled
        (200, b"<html>not json</html>"),
        (200, b"[]"),
        (403, STATUS),  # refused
        (500, STATUS),
    ],
)
def test_anything_but_a_suffix_omits_the_url(
    local_api: FakeLocalApi, status: int, body: bytes
) -> None:
    local_api.status, local_api.body = status, body
    assert TailnetUrls(str(local_api.socket)).url_for(exposed()) is None
    assert len(local_api.requests) == 1


def test_no_socket_omits_the_url() -> None:
    with tempfile.TemporaryDirectory(prefix="ts-") as tmp:
        assert TailnetUrls(str(Path(tmp) / "absent.sock")).url_for(exposed()) is None
        # A path that is no socket at all.
        (Path(tmp) / "file").write_text("x")
        assert magic_dns_suffix(str(Path(tmp) / "file")) is None


def test_the_suffix_is_kept_after_the_first_success_and_a_failure_is_retried(
    local_api: FakeLocalApi,
) -> None:
    urls = TailnetUrls(str(local_api.socket))
    local_api.body = b"garbled"
    assert urls.url_for(exposed()) is None
    local_api.body = STATUS
    assert urls.url_for(exposed()) == URL
    local_api.body = b'{"CurrentTailnet":{"MagicDNSSuffix":"other.ts.net"}}'
    assert urls.url_for(exposed()) == URL  # cached: the tailnet's suffix is fixed
    assert len(local_api.requests) == 2


@pytest.mark.parametrize(
    "annotations",
    [
        None,
        {"tailscale.com/hostname": HOSTNAME},
        {"tailscale.com/expose": "false", "tailscale.com/hostname": HOSTNAME},
        {"tailscale.com/expose": "true"},
        {"tailscale.com/expose": "true", "tailscale.com/hostname": " "},
    ],
)
def test_a_replica_not_exposed_gets_no_url_and_asks_nothing(
    local_api: FakeLocalApi, annotations: dict[str, str] | None
) -> None:
    assert TailnetUrls(str(local_api.socket)).url_for(exposed(annotations)) is None
    assert local_api.requests == []


def test_an_exposed_analytics_entry_gets_the_annotations_the_url_reads(
    local_api: FakeLocalApi,
) -> None:
    entry = WorklistEntry.model_validate(
        {
            "replica_id": str(UUID(int=1)),
            "group_id": str(UUID(int=2)),
            "machine_id": str(UUID(int=3)),
            "server_id": str(UUID(int=3)),
            "type": "tamanu-postgres",
            "intent": "analytics",
            "name": "nauru",
            "params": {"expose": True},
            "snapshot_id": "kA",
            "snapshot_at": "2026-07-01T00:00:00Z",
            "storage": "s3",
            "bucket": "b",
            "prefix": "",
            "region": "us-east-1",
        }
    )
    desired = materialise(entry).replica()
    assert TailnetUrls(str(local_api.socket)).url_for(desired) == URL


def test_the_socket_setting() -> None:
    assert socket_from_env({}) == DEFAULT_SOCKET == "/var/run/tailscale/tailscaled.sock"
    assert socket_from_env({"PGRO_TAILSCALED_SOCKET": ""}) is None
    assert socket_from_env({"PGRO_TAILSCALED_SOCKET": " /run/ts.sock "}) == "/run/ts.sock"
    base = {"CANOPY_BASE_URL": "https://meta.example"}
    settings, _ = settings_from_env(base, "pgro")
    assert settings is not None and settings.tailscaled_socket == DEFAULT_SOCKET
    settings, _ = settings_from_env({**base, "PGRO_TAILSCALED_SOCKET": ""}, "pgro")
    assert settings is not None and settings.tailscaled_socket is None


def test_suffix_from_status_reads_only_the_current_tailnet() -> None:
    body = b'{"CurrentTailnet":{"MagicDNSSuffix":"a.ts.net"},"Self":{"DNSName":"op.b.ts.net."}}'
    assert suffix_from_status(body) == "a.ts.net"
    assert suffix_from_status(b'{"Self":{"DNSName":"op.b.ts.net."}}') is None
    assert suffix_from_status(b"\xff\xfe") is None


# -- the report ------------------------------------------------------------------------------

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
LABELS = canopy_labels(
    replica_id=UUID(int=1),
    group_id=UUID(int=2),
    server_id=UUID(int=3),
    type="t",
    intent="analytics",
)
REPORT = PendingVerificationReport.model_validate(
    {
        "restore": "r-1",
        "snapshotId": "kA",
        "outcome": "success",
        "observedAt": "2026-11-27T11:59:00Z",
        "healthDetails": {"sizes": {"app": 1024}, "restore_duration_sec": 30},
    }
)


class Inline(Executor):
    """Runs a submitted call at once, on the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def deliver(
    replica: PostgresPhysicalReplica,
    url_for: Callable[[PostgresPhysicalReplica], str | None] | None,
) -> dict[str, Any]:
    """The wire body the courier sends for the replica's waiting report."""
    sent: list[VerificationArgs] = []
    courier = ReportCourier(sent.append, Inline(), lambda: NOW)
    courier.url_for = url_for
    courier.step(replica)
    [args] = sent
    return args.to_wire()


def test_the_report_of_an_exposed_replica_carries_the_url(local_api: FakeLocalApi) -> None:
    body = deliver(exposed(), TailnetUrls(str(local_api.socket)).url_for)
    assert body["health_details"] == {
        "restore_duration_sec": 30,
        "sizes": {"app": 1024},
        "url": URL,
    }
    assert body["outcome"] == "success" and body["replica_healthy"] is True


def test_a_report_without_other_details_gets_one_with_the_url(local_api: FakeLocalApi) -> None:
    bare = exposed()
    bare = bare.model_copy(
        update={
            "status": bare.status.model_copy(
                update={
                    "pending_verification_reports": [
                        REPORT.model_copy(update={"health_details": None})
                    ]
                }
            )
        }
    )
    body = deliver(bare, TailnetUrls(str(local_api.socket)).url_for)
    assert body["health_details"] == {"url": URL}


def test_without_a_suffix_the_report_goes_without_the_url(local_api: FakeLocalApi) -> None:
    local_api.body = b"garbled"
    body = deliver(exposed(), TailnetUrls(str(local_api.socket)).url_for)
    assert body["health_details"] == {"restore_duration_sec": 30, "sizes": {"app": 1024}}


def test_a_failing_url_lookup_never_holds_back_the_report() -> None:
    def broken(replica: PostgresPhysicalReplica) -> str | None:
        raise RuntimeError("boom")

    body = deliver(exposed(), broken)
    assert body["outcome"] == "success" and "url" not in body["health_details"]
    # pgro run: no url lookup at all.
    assert "url" not in deliver(exposed(), None)["health_details"]
