"""PgBouncer's files for the stable endpoint, and finding the binary (no PgBouncer run)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pgro.pgbouncer import InvalidEndpointConfig, PgBouncerMissing, find_pgbouncer
from pgro.pgbouncer import endpoint as endpoint_module
from pgro.pgbouncer.config import (
    BouncerFiles,
    BouncerSettings,
    parse_auth_file,
    render_auth_file,
    render_hba,
    render_ini,
    scram_verifier,
    verifier_matches,
)
from pgro.pgbouncer.endpoint import default_socket_dir
from pgro.postgres.server import Endpoint

SETTINGS = BouncerSettings(
    files=BouncerFiles(Path("/state/endpoints/r1")),
    listen_host="127.0.0.1",
    port=6432,
    socket_dir=Path("/state/endpoints/r1/socket"),
    admin_user="root",
)


def ini_values(text: str) -> dict[str, str]:
    return {
        k.strip(): v.strip()
        for k, sep, v in (line.partition("=") for line in text.splitlines())
        if sep and not k.startswith(";")
    }


def test_ini_routes_every_database_to_the_backend_socket_in_session_mode() -> None:
    text = render_ini(SETTINGS, Endpoint(Path("/run/restore-b"), 5433))
    values = ini_values(text)
    assert values["*"] == "host='/run/restore-b' port=5433"
    assert values["pool_mode"] == "session"
    assert values["auth_type"] == "hba"
    assert values["listen_addr"] == "127.0.0.1"
    assert values["listen_port"] == "6432"
    assert values["unix_socket_dir"] == "/state/endpoints/r1/socket"
    assert values["default_pool_size"] == values["max_client_conn"]
    assert values["pidfile"] == "/state/endpoints/r1/pgbouncer.pid"
    assert values["admin_users"] == "root"


def test_ini_without_backend_points_at_a_directory_that_holds_no_socket() -> None:
    values = ini_values(render_ini(SETTINGS, None))
    assert values["*"] == "host='/state/endpoints/r1/no-restore-serving' port=6432"


@pytest.mark.parametrize("bad", ["/tmp/it's", "/tmp/line\nbreak", " /tmp/lead"])
def test_paths_pgbouncer_cannot_carry_are_refused(bad: str) -> None:
    with pytest.raises(InvalidEndpointConfig):
        render_ini(SETTINGS, Endpoint(Path(bad), 5433))


def test_hba_rejects_clients_while_nothing_serves_and_keeps_the_console_local() -> None:
    serving = render_hba("root", serving=True, admin_is_client=False)
    idle = render_hba("root", serving=False, admin_is_client=False)
    for text in (serving, idle):
        rules = [line.split() for line in text.splitlines() if not line.startswith("#")]
        assert rules[0] == ["local", "pgbouncer", "root", "peer"]
        assert ["host", "pgbouncer", "all", "0.0.0.0/0", "reject"] in rules
        assert ["host", "all", "root", "0.0.0.0/0", "reject"] in rules
    assert "local  all  all  scram-sha-256" in serving
    assert "local  all  all  reject" in idle
    assert "scram" not in idle.split("# Clients")[1].splitlines()[1]


def test_hba_lets_the_admin_user_be_a_client_when_it_is_one() -> None:
    text = render_hba("analytics", serving=True, admin_is_client=True)
    assert "all  analytics  reject" not in text


def test_auth_file_holds_verifiers_and_reuses_them_while_passwords_stay() -> None:
    first = render_auth_file({"analytics": "pw-one", 'we"ird': "pw-two"}, "root")
    assert "pw-one" not in first
    assert "pw-two" not in first
    entries = parse_auth_file(first)
    assert set(entries) == {"analytics", 'we"ird', "root"}
    assert '"we""ird"' in first
    assert verifier_matches(entries["analytics"], "pw-one")
    assert verifier_matches(entries['we"ird'], "pw-two")

    again = render_auth_file({"analytics": "pw-one", 'we"ird': "pw-two"}, "root", entries)
    assert again == first
    changed = parse_auth_file(render_auth_file({"analytics": "pw-new"}, "root", entries))
    assert verifier_matches(changed["analytics"], "pw-new")
    assert not verifier_matches(changed["analytics"], "pw-one")
    assert changed["root"] == entries["root"]


def test_auth_file_keeps_passwords_saslprep_could_change_as_plain_text() -> None:
    entries = parse_auth_file(render_auth_file({"u": "pässwörd"}, "root"))
    assert entries["u"] == "pässwörd"


@pytest.mark.parametrize("password", ["", "two\nlines"])
def test_unusable_passwords_are_refused_without_showing_them(password: str) -> None:
    with pytest.raises(InvalidEndpointConfig) as failure:
        render_auth_file({"analytics": password}, "root")
    assert "analytics" in str(failure.value)
    if password:
        assert password not in str(failure.value)


def test_scram_verifier_has_postgresql_form() -> None:
    verifier = scram_verifier("pencil", salt=b"0123456789abcdef")
    assert re.fullmatch(
        r"SCRAM-SHA-256\$4096:MDEyMzQ1Njc4OWFiY2RlZg==\$[^:]{44}:[^:]{44}", verifier
    )
    assert verifier_matches(verifier, "pencil")
    assert not verifier_matches(verifier, "Pencil")
    assert not verifier_matches("md5abc", "pencil")


def test_socket_dir_is_in_run_dir_when_short_else_a_stable_short_one(tmp_path: Path) -> None:
    assert default_socket_dir(Path("/state/r1"), 6432) == Path("/state/r1/socket")
    deep = Path("/state") / ("x" * 120)
    chosen = default_socket_dir(deep, 6432)
    assert chosen == default_socket_dir(deep, 6432)  # a restarted pgro finds the same one
    assert chosen != default_socket_dir(deep / "other", 6432)
    assert len(str(chosen / ".s.PGSQL.65535")) <= 107


def test_pgbouncer_missing_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PGRO_PGBOUNCER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(endpoint_module, "DEFAULT_PGBOUNCER", tmp_path / "absent")
    with pytest.raises(PgBouncerMissing, match="apt-get install pgbouncer"):
        find_pgbouncer()

    monkeypatch.setenv("PGRO_PGBOUNCER", str(tmp_path / "nope"))
    with pytest.raises(PgBouncerMissing, match="PGRO_PGBOUNCER"):
        find_pgbouncer()


def test_pgbouncer_is_found_by_env_then_path_then_sbin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "bin" / "pgbouncer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    os.chmod(fake, 0o755)
    sbin = tmp_path / "sbin-pgbouncer"
    sbin.write_text("#!/bin/sh\n")
    os.chmod(sbin, 0o755)
    monkeypatch.setattr(endpoint_module, "DEFAULT_PGBOUNCER", sbin)

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("PGRO_PGBOUNCER", raising=False)
    assert find_pgbouncer() == str(sbin)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_pgbouncer() == str(fake)
    monkeypatch.setenv("PGRO_PGBOUNCER", str(sbin))
    assert find_pgbouncer() == str(sbin)
