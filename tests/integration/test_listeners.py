"""Every HTTP listener pgro opens: IPv4 and IPv6 addresses, idle timeouts, `pgro run`'s
metrics address (issue 18 items 16 and 17), and canopy over plain http (item 14)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pgro.http_listener import ListenerHandler
from pgro.observability import Health, Metrics, serve
from pgro.postgres.server import free_port
from tests.fixtures.manifests import replica_doc, write_manifest

PGRO = str(Path(sys.executable).parent / "pgro")


StartServer = Callable[[str], int]


@pytest.fixture
def metrics_server() -> Iterator[StartServer]:
    started = []

    def start(host: str) -> int:
        server = serve(Metrics(), Health(), host, 0)
        started.append(server)
        return int(server.server_address[1])

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def test_metrics_serves_ipv6_any_with_ipv4_too(metrics_server: StartServer) -> None:
    """Before: `serve(..., "::", 0)` raised gaierror (the server was AF_INET only), so the
    operator's shipped METRICS_ADDR=[::]:8080 could not start."""
    port = metrics_server("::")
    assert httpx.get(f"http://[::1]:{port}/metrics").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost"])
def test_metrics_binds_loopback_addresses_and_names(metrics_server: StartServer, host: str) -> None:
    port = metrics_server(host)
    target = host.strip("[]")
    url_host = f"[{target}]" if ":" in target else target
    assert httpx.get(f"http://{url_host}:{port}/metrics").status_code == 200


def test_metrics_closes_an_idle_connection(
    metrics_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: no socket timeout, so idle connections each held a thread for ever."""
    monkeypatch.setattr(ListenerHandler, "timeout", 1.0)
    port = metrics_server("127.0.0.1")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /metr")
        assert conn.recv(100) == b""  # closed by the server, not by our 10 s timeout
    assert time.monotonic() - started < 5


# -- pgro run --metrics-addr --------------------------------------------------------------


def _manifest(scratch: Path) -> Path:
    return write_manifest(scratch / "m.yaml", replica_doc("r", secret=None))


def test_pgro_run_serves_metrics_on_ipv6_any(scratch: Path) -> None:
    """Before: `--metrics-addr [::]:P` ended in a gaierror traceback, exit 1."""
    port = free_port()
    log = scratch / "run.log"
    proc = subprocess.Popen(
        [
            PGRO,
            "run",
            "-f",
            str(_manifest(scratch)),
            "--state-dir",
            str(scratch / "state"),
            "--metrics-addr",
            f"[::]:{port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://[::1]:{port}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_pgro_run_with_its_metrics_port_taken_exits_2_with_a_message(scratch: Path) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                PGRO,
                "run",
                "-f",
                str(_manifest(scratch)),
                "--state-dir",
                str(scratch / "state"),
                "--metrics-addr",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"--metrics-addr 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# -- canopy over plain http ----------------------------------------------------------------


def test_pgro_run_refuses_plain_http_canopy_on_another_host(scratch: Path) -> None:
    """Before: accepted silently; repository passwords and S3 keys then cross in clear."""
    base = [PGRO, "run", "--state-dir", str(scratch / "state"), "--canopy-url"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    done = subprocess.run(
        [*base, "http://192.0.2.10:8080"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 2
    assert "--canopy-insecure-http" in done.stderr and "plain http" in done.stderr

    log = scratch / "insecure.log"
    proc = subprocess.Popen(
        [*base, "http://192.0.2.10:8080", "--canopy-insecure-http"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while "over plain http" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert '"level": "warning"' in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
