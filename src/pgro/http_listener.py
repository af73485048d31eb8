"""The HTTP listener every pgro server uses (metrics, broker and callbacks, canopy-proxy).

`http.server` as it comes binds IPv4 only, reads whatever Content-Length a client claims
(a negative one reads to EOF), and keeps a thread per connection for as long as the
client likes. `ListenerServer` picks the address family from the address (`::`, `::1`,
`127.0.0.1`, a host name; `::` also accepts IPv4 where the host has it), caps the
connections served at once, and `ListenerHandler` times idle connections out and reads
bodies only through `read_body`, which refuses what it cannot bound.
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseRequestHandler
from typing import Any, Final

# A client that sends nothing for this long loses its connection (and its thread).
IDLE_TIMEOUT_S: Final = 30.0
# Connections served at once; more are closed at accept, so a flood cannot take the
# process's threads and memory (the peers a listener expects open a handful).
MAX_CONNECTIONS: Final = 64
_DIGITS: Final = re.compile(r"[0-9]{1,19}")


class BodyRefused(Exception):
    """A request body `read_body` will not read: `status` is the answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def content_length(value: str | None, limit: int) -> int:
    """The request's Content-Length, or BodyRefused: 400 when it is not a plain decimal
    (negative, `+1`, `1_0`, spaces; Python's `int` accepts all of those), 413 above
    `limit`. A missing header is 0."""
    if value is None or value == "":
        return 0
    value = value.strip()
    if not _DIGITS.fullmatch(value):
        raise BodyRefused(400, "invalid Content-Length")
    length = int(value)
    if length > limit:
        raise BodyRefused(413, "request body too large")
    return length


def address_family(host: str) -> socket.AddressFamily:
    """The family to bind `host` with: an IPv6 literal, an IPv4 literal, or what a host
    name resolves to first."""
    if ":" in host:
        return socket.AF_INET6
    if host == "":
        return socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return socket.AF_INET  # bind() then names the problem
    return infos[0][0] if infos else socket.AF_INET


class ListenerServer(ThreadingHTTPServer):
    """A threading HTTP server for any address family, with a connection cap."""

    daemon_threads = True
    max_connections = MAX_CONNECTIONS

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseRequestHandler],
        *,
        max_connections: int | None = None,
    ) -> None:
        host = address[0].strip("[]")
        self.address_family = address_family(host)
        if max_connections is not None:
            self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__((host, address[1]), handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # `::` serves IPv4 too (where the kernel allows dual-stack sockets).
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer's version resolves the host's FQDN, a DNS round trip for nothing.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Over the cap: close at once rather than queue a thread.
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ListenerHandler(BaseHTTPRequestHandler):
    """Times idle connections out; bodies are read with `read_body` only."""

    timeout = IDLE_TIMEOUT_S

    def read_body(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes; BodyRefused otherwise (the connection
        is then closed: its unread body cannot be skipped safely)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise BodyRefused(411, "a Content-Length is required")
        try:
            length = content_length(self.headers.get("Content-Length"), limit)
        except BodyRefused:
            self.close_connection = True
            raise
        return self.rfile.read(length) if length else b""
