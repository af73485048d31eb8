"""The stable endpoint for real: PgBouncer in front of two real PostgreSQL servers.

The two clusters stand for an old and a new restore of one replica: each has a database
`myapp` whose `marker` table says which one it is, and a login role `analytics`.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgro.pgbouncer import (
    EndpointPortInUse,
    StableEndpoint,
    pgbouncer_pids,
)
from pgro.pgbouncer.config import scram_verifier, verifier_matches
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import init_cluster
from pgro.postgres.server import PostgresServer, free_port, make_conninfo, socket_dir_for
from tests.fixtures.clusters import run_sql
from tests.fixtures.waiting import wait_for

PASSWORD = "Analytics-pw-0123456789abcdefXYZ"
USERS = {"analytics": PASSWORD}
MARKERS = ("old", "new")


@pytest.fixture(scope="module")
def restore_data(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[dict[str, Path]]:
    """Two stopped clusters, `old` and `new`, built once for the module."""
    base = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=scratch_root))
    os.chmod(base, 0o711)
    data = {}
    for marker in MARKERS:
        pgdata = base / marker
        init_cluster(binaries, pgdata, account)
        server = _server(pgdata, binaries, account, base / f"{marker}-sock")
        server.start(60)
        try:
            run_sql(
                server,
                "postgres",
                "CREATE DATABASE myapp",
                f"CREATE ROLE analytics LOGIN PASSWORD '{PASSWORD}'",
            )
            run_sql(
                server,
                "myapp",
                "CREATE TABLE marker (v text)",
                f"INSERT INTO marker VALUES ('{marker}')",
                "GRANT SELECT ON marker TO analytics",
            )
        finally:
            server.stop()
            _remove_socket_dir(server.socket_dir, base)
        data[marker] = pgdata
    yield data


def _server(
    pgdata: Path, binaries: PostgresBinaries, account: RunAccount, socket_dir: Path
) -> PostgresServer:
    return PostgresServer(
        pgdata,
        binaries,
        account,
        socket_dir=socket_dir_for(socket_dir),
        log_path=pgdata.parent / f"{pgdata.name}.log",
    )


def _remove_socket_dir(path: Path, inside: Path) -> None:
    if not path.is_relative_to(inside):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def restores(
    restore_data: dict[str, Path], scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[dict[str, PostgresServer]]:
    """Both restores running, socket only (as the runtime runs them)."""
    servers = {m: _server(restore_data[m], binaries, account, scratch / m) for m in MARKERS}
    try:
        for server in servers.values():
            server.start(60)
        yield servers
    finally:
        for server in servers.values():
            server.stop()
            _remove_socket_dir(server.socket_dir, scratch)


EndpointFactory = Callable[..., StableEndpoint]


@pytest.fixture
def make_endpoint(scratch: Path, account: RunAccount) -> Iterator[EndpointFactory]:
    """StableEndpoints for this test; whatever they started is stopped afterwards."""
    made: list[StableEndpoint] = []

    def make(run_dir: Path | None = None, port: int | None = None) -> StableEndpoint:
        endpoint = StableEndpoint(
            "analytics-replica",
            run_dir or scratch / "endpoint",
            account,
            port=port or free_port(),
        )
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.stop()
    for endpoint in made:
        for pid in pgbouncer_pids(endpoint.files.ini):  # only PgBouncers on our configs
            os.kill(pid, signal.SIGKILL)
        assert not pgbouncer_pids(endpoint.files.ini)


def tcp(endpoint: StableEndpoint, user: str = "analytics", password: str = PASSWORD) -> str:
    address = endpoint.address
    assert address.host is not None
    return make_conninfo(
        host=address.host,
        port=str(address.port),
        dbname="myapp",
        user=user,
        password=password,
        connect_timeout="5",
    )


def via_socket(endpoint: StableEndpoint, dbname: str = "myapp") -> str:
    address = endpoint.address
    return make_conninfo(
        host=str(address.socket_dir),
        port=str(address.port),
        dbname=dbname,
        user="analytics",
        password=PASSWORD,
        connect_timeout="5",
    )


def marker(conn: psycopg.Connection[tuple[object, ...]]) -> object:
    row = conn.execute("SELECT v FROM marker").fetchone()
    assert row is not None
    return row[0]


def read_marker(conninfo: str) -> object:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return marker(conn)


def backend_pid(conn: psycopg.Connection[tuple[object, ...]]) -> object:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return row[0]


def analytics_sessions(server: PostgresServer) -> int:
    """Connections PgBouncer holds open to this restore (the superuser's own excluded)."""
    with psycopg.connect(server.endpoint.conninfo("postgres", "postgres")) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'analytics'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_switchover_sends_new_connections_to_new_restore_and_keeps_open_sessions(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory
) -> None:
    old, new = restores["old"], restores["new"]
    endpoint = make_endpoint()
    endpoint.route(old.endpoint, USERS)
    address, pgbouncer = endpoint.address, endpoint.pid
    assert address.host == "127.0.0.1"
    assert read_marker(tcp(endpoint)) == "old"
    assert read_marker(via_socket(endpoint)) == "old"

    held = psycopg.connect(tcp(endpoint), autocommit=True)
    leaving = psycopg.connect(via_socket(endpoint), autocommit=True)
    held_backend = backend_pid(held)
    assert marker(held) == marker(leaving) == "old"

    endpoint.route(new.endpoint, USERS)

    assert endpoint.address == address
    assert endpoint.pid == pgbouncer  # reloaded, not restarted
    assert read_marker(tcp(endpoint)) == "new"
    assert read_marker(via_socket(endpoint)) == "new"
    for _ in range(3):  # the open session stays on its server
        assert marker(held) == "old"
        assert backend_pid(held) == held_backend
    assert marker(leaving) == "old"

    # A session that ends releases its old server connection, which PgBouncer then closes
    # (idle ones from before the switchover too): only `held` is left on the old restore.
    leaving.close()
    wait_for("the open session on the old restore", lambda: analytics_sessions(old) == 1, 10)
    assert read_marker(tcp(endpoint)) == "new"

    # The grace period ends: the runtime stops the old restore.
    old.stop()
    with pytest.raises(psycopg.OperationalError):
        marker(held)
    held.close()
    assert read_marker(tcp(endpoint)) == "new"
    assert endpoint.address == address
    assert endpoint.pid == pgbouncer

    # The runtime reconciles again with nothing changed: PgBouncer is left alone.
    reloads = endpoint.log_tail(10_000).count("RELOAD command issued")
    assert reloads >= 1
    endpoint.route(new.endpoint, USERS)
    assert endpoint.log_tail(10_000).count("RELOAD command issued") == reloads


def test_reload_falls_back_to_sighup_when_the_console_is_unreachable(
    restores: dict[str, PostgresServer],
    make_endpoint: EndpointFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = make_endpoint()
    endpoint.route(restores["old"].endpoint, USERS)
    held = psycopg.connect(tcp(endpoint), autocommit=True)
    assert marker(held) == "old"
    pid = endpoint.pid

    def console_down(command: str) -> list[tuple[object, ...]]:
        raise psycopg.OperationalError("console unreachable (simulated)")

    monkeypatch.setattr(endpoint, "_admin", console_down)
    endpoint.route(restores["new"].endpoint, USERS)

    assert endpoint.pid == pid
    assert "got SIGHUP" in endpoint.log_tail(50)
    assert read_marker(tcp(endpoint)) == "new"  # route() returned after the reload ran
    assert marker(held) == "old"
    held.close()


def test_any_database_name_routes_to_the_restore(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory
) -> None:
    endpoint = make_endpoint()
    endpoint.route(restores["new"].endpoint, USERS)
    with psycopg.connect(via_socket(endpoint, dbname="postgres")) as conn:
        row = conn.execute("SELECT current_database(), current_user").fetchone()
    assert row == ("postgres", "analytics")


def test_wrong_password_unknown_user_and_console_over_tcp_are_refused(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory, account: RunAccount
) -> None:
    endpoint = make_endpoint()
    endpoint.route(restores["old"].endpoint, USERS)
    assert read_marker(tcp(endpoint)) == "old"

    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(tcp(endpoint, password="not-the-password"))
    # `postgres` exists in the restore (and is trusted on its private socket), but is not a
    # user of the endpoint.
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(tcp(endpoint, user="postgres", password=PASSWORD))
    # The admin console is only for pgro's own OS user, over the Unix socket.
    address = endpoint.address
    with pytest.raises(psycopg.OperationalError, match="login rejected"):
        psycopg.connect(
            make_conninfo(
                host="127.0.0.1",
                port=str(address.port),
                dbname="pgbouncer",
                user=endpoint.admin_user,
                password="",
                connect_timeout="5",
            )
        )

    # The auth file holds a SCRAM verifier, only the account can read it, and the password
    # is in none of the endpoint's files.
    st = endpoint.files.auth_file.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, account.uid)
    for path in endpoint.run_dir.iterdir():
        if path.is_file():
            assert PASSWORD not in path.read_text(errors="replace"), path
    assert PASSWORD not in endpoint.log_tail(10_000)
    assert "SCRAM-SHA-256$" in endpoint.files.auth_file.read_text()


def test_auth_file_verifier_is_the_one_postgresql_computes(
    restores: dict[str, PostgresServer],
) -> None:
    with psycopg.connect(restores["old"].endpoint.conninfo("postgres", "postgres")) as conn:
        row = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'analytics'"
        ).fetchone()
    assert row is not None
    postgres_secret = str(row[0])
    m = re.match(r"SCRAM-SHA-256\$(\d+):([^$]+)\$", postgres_secret)
    assert m, "PostgreSQL stores SCRAM secrets"
    ours = scram_verifier(PASSWORD, salt=base64.b64decode(m[2]), iterations=int(m[1]))
    assert ours == postgres_secret
    assert verifier_matches(postgres_secret, PASSWORD)
    assert not verifier_matches(postgres_secret, PASSWORD + "x")


def test_no_restore_yet_endpoint_is_up_and_refuses_at_once(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory
) -> None:
    endpoint = make_endpoint()
    endpoint.route(None, USERS)
    assert endpoint.running()
    for conninfo in (tcp(endpoint), via_socket(endpoint)):
        started = time.monotonic()
        # A hang would end in libpq's 5 s connect_timeout, not in PgBouncer's rejection.
        with pytest.raises(psycopg.OperationalError, match="login rejected"):
            psycopg.connect(conninfo)
        assert time.monotonic() - started < 4

    endpoint.route(restores["old"].endpoint, USERS)
    assert read_marker(tcp(endpoint)) == "old"

    # Back to nothing after serving: PgBouncer keeps auto-databases it has registered, so
    # routing away must still refuse new clients (while the open session carries on).
    held = psycopg.connect(tcp(endpoint), autocommit=True)
    assert marker(held) == "old"  # a session gets its server at its first query
    endpoint.route(None, USERS)
    with pytest.raises(psycopg.OperationalError, match="login rejected"):
        psycopg.connect(tcp(endpoint))
    assert marker(held) == "old"
    held.close()


def test_restarted_runtime_adopts_the_running_pgbouncer(
    restores: dict[str, PostgresServer],
    make_endpoint: EndpointFactory,
    scratch: Path,
) -> None:
    run_dir, port = scratch / "endpoint", free_port()
    first = make_endpoint(run_dir, port)
    first.route(restores["old"].endpoint, USERS)
    pid = first.pid
    assert pid is not None
    held = psycopg.connect(tcp(first), autocommit=True)
    assert marker(held) == "old"

    second = make_endpoint(run_dir, port)  # a new pgro process, same state directory
    assert second.running()
    assert second.pid == pid
    assert second.address == first.address
    second.start()  # already running: nothing to do
    second.route(restores["new"].endpoint, USERS)

    assert pgbouncer_pids(second.files.ini) == [pid]
    assert read_marker(tcp(second)) == "new"
    assert marker(held) == "old"
    held.close()

    second.stop()  # stops a PgBouncer it did not start
    assert not pgbouncer_pids(second.files.ini)
    assert not first.running()


def test_stale_pidfile_does_not_block_a_start(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory, scratch: Path
) -> None:
    run_dir, port = scratch / "endpoint", free_port()
    crashed = make_endpoint(run_dir, port)
    crashed.route(restores["old"].endpoint, USERS)
    pid = crashed.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the whole machine went down, say
    wait_for("PgBouncer to be seen gone", lambda: not crashed.running(), 10)
    assert crashed.files.pidfile.exists()
    assert (crashed.address.socket_dir / f".s.PGSQL.{port}").exists()

    restarted = make_endpoint(run_dir, port)
    assert not restarted.running()
    restarted.route(restores["new"].endpoint, USERS)
    assert restarted.pid not in (None, pid)
    assert read_marker(tcp(restarted)) == "new"
    restarted.stop()

    # A pidfile whose pid now belongs to another live process (here: the test itself).
    restarted.files.pidfile.write_text(f"{os.getpid()}\n")
    restarted.start()
    assert restarted.pid not in (None, os.getpid())
    assert pgbouncer_pids(restarted.files.ini) == [restarted.pid]
    assert read_marker(tcp(restarted)) == "new"  # start() kept the last routing


def test_stop_leaves_no_process_pidfile_or_socket(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory
) -> None:
    endpoint = make_endpoint()
    endpoint.route(restores["old"].endpoint, USERS)
    held = psycopg.connect(tcp(endpoint), autocommit=True)
    assert marker(held) == "old"
    socket_path = endpoint.address.socket_dir / f".s.PGSQL.{endpoint.port}"
    assert socket_path.is_socket()

    endpoint.stop()

    assert not endpoint.running()
    assert not pgbouncer_pids(endpoint.files.ini)
    assert not endpoint.files.pidfile.exists()
    assert not socket_path.exists()
    with pytest.raises(psycopg.OperationalError):
        marker(held)
    held.close()
    assert endpoint.stop() is None  # nothing left to stop


def test_a_new_port_restarts_pgbouncer_on_it(
    restores: dict[str, PostgresServer], make_endpoint: EndpointFactory, scratch: Path
) -> None:
    run_dir = scratch / "endpoint"
    before = make_endpoint(run_dir, free_port())
    before.route(restores["old"].endpoint, USERS)
    first_pid = before.pid
    after = make_endpoint(run_dir, free_port())
    after.route(restores["old"].endpoint, USERS)
    assert after.pid not in (None, first_pid)
    assert pgbouncer_pids(after.files.ini) == [after.pid]
    assert read_marker(tcp(after)) == "old"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(tcp(before))


def test_port_in_use_is_named_and_leaves_nothing_running(
    restores: dict[str, PostgresServer],
    make_endpoint: EndpointFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        endpoint = make_endpoint(port=port)
        with pytest.raises(EndpointPortInUse, match=rf"127\.0\.0\.1:{port}.*another port"):
            endpoint.route(restores["old"].endpoint, USERS)
        assert not pgbouncer_pids(endpoint.files.ini)

        # Without pgro's own check, PgBouncer 1.18 itself only warns and serves the socket
        # alone; pgro must still refuse to call that an endpoint.
        monkeypatch.setattr(StableEndpoint, "_check_port_free", lambda self: None)
        with pytest.raises(EndpointPortInUse, match=rf"127\.0\.0\.1:{port}") as failure:
            endpoint.route(restores["old"].endpoint, USERS)
        assert "cannot listen" in failure.value.log_tail
        assert not pgbouncer_pids(endpoint.files.ini)
        assert not endpoint.running()
