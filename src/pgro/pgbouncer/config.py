"""Rendering PgBouncer's files for a stable endpoint: pgbouncer.ini, the auth file and the HBA.

Pure functions (no I/O) so the exact text is unit-tested. The choices, and why:

- `[databases] * = host=<backend socket dir> port=<backend port>`: every database name routes
  to the serving restore over its private Unix socket (PostgreSQL trusts that socket, see
  `pgro.postgres.repair.DEFAULT_HBA`), with the client's own user name.
- With no restore serving, `*` points at a directory that never holds a socket *and* the HBA
  rejects every client login. The reject is what clients see ("login rejected", at once): a
  `*` that merely points nowhere makes PgBouncer 1.18 hold clients until
  `client_login_timeout` (60 s), and removing `*` does not unroute auto-databases PgBouncer
  has already registered.
- `auth_type = hba`: clients authenticate with SCRAM-SHA-256 against the auth file, over TCP
  and over the endpoint's socket alike; only the invoking OS user may reach the admin console,
  by `peer` over the Unix socket (that is how pgro issues a synchronous `RELOAD`).
- `pool_mode = session`: a client keeps its server connection for its whole session, so a
  reload that moves `*` to a new restore leaves open sessions on the old one. PgBouncer marks
  the old server connections `close_needed` and closes each one when its client disconnects;
  idle ones are never handed out again.
- `default_pool_size = max_client_conn`: the pool is per (database, user), not per backend,
  and during a switchover the old sessions still hold their server connections; a smaller
  pool would queue new clients behind old ones. PostgreSQL's max_connections is the limit.
- The auth file holds SCRAM-SHA-256 verifiers, not passwords, for printable-ASCII passwords
  (the generated ones): no password on disk here, and no password that merely *looks* like an
  md5 or SCRAM secret can be misread as one. Other passwords are written as plain text, which
  PgBouncer also accepts for SCRAM, so that it applies SASLprep exactly as PostgreSQL does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pgro.pgbouncer.errors import InvalidEndpointConfig
from pgro.postgres.server import Endpoint

SCRAM_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
SCRAM_PREFIX = "SCRAM-SHA-256$"
# The user pgro reaches the admin console as; the auth file must know it even though
# `peer` checks no password. A verifier of a random secret nobody keeps.
_ADMIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Startup parameters PgBouncer should not refuse: pgJDBC (DBeaver, Metabase...) sends it.
IGNORE_STARTUP_PARAMETERS = "extra_float_digits"
SERVER_LOGIN_RETRY = 1  # seconds; 15 by default, which delays recovery from a restarted server


@dataclass(frozen=True)
class BouncerFiles:
    """Where one endpoint's files live: all in its run directory."""

    run_dir: Path

    @property
    def ini(self) -> Path:
        return self.run_dir / "pgbouncer.ini"

    @property
    def auth_file(self) -> Path:
        return self.run_dir / "users.txt"

    @property
    def hba_file(self) -> Path:
        return self.run_dir / "pgbouncer_hba.conf"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "pgbouncer.pid"

    @property
    def routing(self) -> Path:
        """The last route() (backend, no secrets), so a start can render the files again."""
        return self.run_dir / "routing.json"

    @property
    def listening(self) -> Path:
        """Where the running PgBouncer listens, recorded when pgro started it."""
        return self.run_dir / "pgbouncer.listening"

    @property
    def log(self) -> Path:
        return self.run_dir / "pgbouncer.log"

    @property
    def nowhere(self) -> Path:
        """The socket directory `*` names while no restore serves: never holds a socket."""
        return self.run_dir / "no-restore-serving"


@dataclass(frozen=True)
class BouncerSettings:
    files: BouncerFiles
    listen_host: str  # "" = Unix socket only
    port: int
    socket_dir: Path
    admin_user: str
    max_client_conn: int = 100


def _check_text(value: str, what: str) -> str:
    if any(ch in value for ch in "\n\r\0"):
        raise InvalidEndpointConfig(
            f"{what} contains a line break or NUL, which PgBouncer's files cannot hold: remove it"
        )
    return value


def _check_path(path: Path, what: str) -> str:
    text = _check_text(str(path), what)
    if "'" in text or text != text.strip():
        raise InvalidEndpointConfig(
            f"{what} {text!r} has a quote or leading/trailing space, which PgBouncer's "
            "configuration cannot carry: use a plainer path"
        )
    return text


def check_admin_user(name: str) -> str:
    if not _ADMIN_NAME.match(name):
        raise InvalidEndpointConfig(
            f"the OS user {name!r} pgro runs as cannot be named in PgBouncer's HBA file: "
            "run pgro as a user with a plain name"
        )
    return name


def render_ini(settings: BouncerSettings, backend: Endpoint | None) -> str:
    files = settings.files
    if backend is None:
        target_dir, target_port = files.nowhere, settings.port
    else:
        target_dir, target_port = backend.socket_dir, backend.port
    host = _check_path(target_dir, "the backend socket directory")
    listen = _check_text(settings.listen_host, "the listen address")
    if "'" in listen or " " in listen:
        raise InvalidEndpointConfig(f"listen address {listen!r} is not a host name or address")
    if not 0 < settings.port < 65536:
        raise InvalidEndpointConfig(f"port {settings.port} is outside 1-65535")
    if settings.max_client_conn < 1:
        raise InvalidEndpointConfig("max_client_conn must be at least 1")
    serving = "no restore is serving" if backend is None else "the serving restore"
    lines = [
        "; Written by pgro: the stable endpoint of one replica. Rewritten at every switchover.",
        "[databases]",
        f"; every database name routes to {serving}",
        f"* = host='{host}' port={target_port}",
        "",
        "[pgbouncer]",
        f"listen_addr = {listen}",
        f"listen_port = {settings.port}",
        f"unix_socket_dir = {_check_path(settings.socket_dir, 'the socket directory')}",
        "unix_socket_mode = 0777",
        "auth_type = hba",
        f"auth_hba_file = {_check_path(files.hba_file, 'the HBA file')}",
        f"auth_file = {_check_path(files.auth_file, 'the auth file')}",
        f"admin_users = {check_admin_user(settings.admin_user)}",
        f"pidfile = {_check_path(files.pidfile, 'the pidfile')}",
        "pool_mode = session",
        f"max_client_conn = {settings.max_client_conn}",
        f"default_pool_size = {settings.max_client_conn}",
        "max_db_connections = 0",
        "max_user_connections = 0",
        f"server_login_retry = {SERVER_LOGIN_RETRY}",
        f"ignore_startup_parameters = {IGNORE_STARTUP_PARAMETERS}",
        "; logs go to stderr, which pgro sends to pgbouncer.log next to this file",
        "syslog = 0",
        "",
    ]
    return "\n".join(lines)


def render_hba(admin_user: str, *, serving: bool, admin_is_client: bool) -> str:
    admin = check_admin_user(admin_user)
    client_method = "scram-sha-256" if serving else "reject"
    lines = [
        "# Written by pgro. First match wins.",
        "# The admin console: only pgro's own OS user, only over the Unix socket.",
        f"local  pgbouncer  {admin}  peer",
        "local  pgbouncer  all  reject",
        "host   pgbouncer  all  0.0.0.0/0  reject",
        "host   pgbouncer  all  ::/0       reject",
    ]
    if not admin_is_client:
        lines += [
            f"local  all  {admin}  reject",
            f"host   all  {admin}  0.0.0.0/0  reject",
            f"host   all  {admin}  ::/0       reject",
        ]
    lines += [
        "# Clients: SCRAM against the auth file"
        + ("." if serving else "; rejected while no restore is serving."),
        f"local  all  all  {client_method}",
        f"host   all  all  0.0.0.0/0  {client_method}",
        f"host   all  all  ::/0       {client_method}",
        "",
    ]
    return "\n".join(lines)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """A SCRAM-SHA-256 secret in PostgreSQL's `pg_authid.rolpassword` form (RFC 5802/7677).

    Only for passwords SASLprep leaves unchanged (printable ASCII): see `needs_plaintext`.
    """
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    return f"{SCRAM_PREFIX}{iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


_VERIFIER = re.compile(
    r"^SCRAM-SHA-256\$(?P<iterations>\d+):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<stored>[A-Za-z0-9+/=]+):(?P<server>[A-Za-z0-9+/=]+)$"
)


def verifier_matches(verifier: str, password: str) -> bool:
    """Whether `verifier` (a SCRAM secret) was made from `password`."""
    m = _VERIFIER.match(verifier)
    if not m or needs_plaintext(password):
        return False
    try:
        salt = base64.b64decode(m["salt"], validate=True)
    except ValueError:
        return False
    again = scram_verifier(password, salt=salt, iterations=int(m["iterations"]))
    return hmac.compare_digest(again, verifier)


def needs_plaintext(password: str) -> bool:
    """True when SASLprep might change the password, so PgBouncer must see it as it is."""
    return not all(" " <= ch <= "~" for ch in password)


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


_AUTH_LINE = re.compile(r'^"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"')


def parse_auth_file(text: str) -> dict[str, str]:
    """user -> secret (verifier or plain text) from an auth file pgro wrote."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        m = _AUTH_LINE.match(line)
        if m:
            entries[m[1].replace('""', '"')] = m[2].replace('""', '"')
    return entries


def render_auth_file(
    users: Mapping[str, str], admin_user: str, previous: Mapping[str, str] | None = None
) -> str:
    """`"user" "secret"` lines. Reuses a previous verifier when the password is unchanged, so
    routing again with the same users rewrites the same text."""
    previous = previous or {}
    lines = ["; Written by pgro: who may log in through the stable endpoint (SCRAM-SHA-256)."]
    for user, password in users.items():
        if not user:
            raise InvalidEndpointConfig("a user name is empty: give every user a name")
        _check_text(user, f"user name {user!r}")
        if not password:
            raise InvalidEndpointConfig(f"the password of user {user!r} is empty: set one")
        _check_text(password, f"the password of user {user!r}")
        old = previous.get(user, "")
        if needs_plaintext(password):
            secret = password
        elif verifier_matches(old, password):
            secret = old
        else:
            secret = scram_verifier(password)
        lines.append(f"{_quote(user)} {_quote(secret)}")
    if admin_user not in users:
        # pgro's console login (peer): PgBouncer wants the user in the auth file; the HBA
        # only allows it by peer on the console, and this secret belongs to no password.
        old = previous.get(admin_user, "")
        secret = old if _VERIFIER.match(old) else scram_verifier(_b64(os.urandom(24)))
        lines.append(f"{_quote(admin_user)} {_quote(secret)}")
    return "\n".join(lines) + "\n"
