"""Rewriting a source host's postgresql.conf (pure text transformation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgro.postgres.catalog_guard import library_is_trusted
from pgro.postgres.config import (
    BLOCK_BEGIN,
    DISABLED_MARK,
    bare_library,
    configured_value,
    forced_arguments,
    forced_settings,
    meaningful_lines,
    rewrite_config,
    safe_preload_libraries,
)

SETTINGS = {"logging_collector": "off", "shared_buffers": "128MB", "lc_messages": "C"}


def rewrite(
    text: str, *, libs: tuple[str, ...] = ("pg_stat_statements",), includes: bool = False
) -> tuple[str, list[str]]:
    result = rewrite_config(
        text,
        SETTINGS,
        library_exists=lambda lib: lib in libs,
        include_allowed=lambda target: includes,
    )
    return result.text, result.disabled


def active(text: str) -> list[str]:
    return meaningful_lines(text)


def test_source_host_settings_are_disabled_not_deleted() -> None:
    text, disabled = rewrite(
        "listen_addresses = 'localhost'\nport 5433\n"
        "archive_command='cp %p /x'\nmax_connections = 50\n"
    )
    assert DISABLED_MARK + "listen_addresses = 'localhost'" in text
    assert DISABLED_MARK + "port 5433" in text  # `key value` without `=` is valid syntax
    assert DISABLED_MARK + "archive_command='cp %p /x'" in text
    assert "max_connections = 50" in active(text)
    assert disabled == ["listen_addresses", "port", "archive_command"]


def test_prefixed_families() -> None:
    text, disabled = rewrite(
        "ssl = on\nssl_cert_file = '/etc/x'\nlc_monetary = 'en_NZ'\nrecovery_target_time = 'x'\n"
    )
    assert not any(line.startswith(("ssl", "lc_monetary", "recovery")) for line in active(text))
    assert disabled == ["ssl", "ssl_cert_file", "lc_monetary", "recovery_target_time"]


def test_restating_pgro_values_is_not_a_fix() -> None:
    _, disabled = rewrite("lc_messages = 'C'\nshared_buffers = 128MB\n")
    assert disabled == []
    _, disabled = rewrite("shared_buffers = 64GB\n")
    assert disabled == ["shared_buffers"]


def test_pgro_block_is_appended_once_and_replaced() -> None:
    first, _ = rewrite("max_connections = 50")  # no trailing newline
    second, disabled = rewrite(first)
    assert first == second
    assert second.count(BLOCK_BEGIN) == 1
    assert disabled == []
    lines = active(second)
    assert "max_connections = 50" in lines  # not merged with the first appended line
    assert "logging_collector = off" in lines
    assert "shared_buffers = 128MB" in lines
    assert "lc_messages = 'C'" in lines


def test_preload_libraries_keep_only_installed_ones() -> None:
    text, disabled = rewrite(
        "shared_preload_libraries = 'pg_stat_statements, timescaledb'  # ext\n"
    )
    assert "shared_preload_libraries = pg_stat_statements" in active(text) or (
        "shared_preload_libraries = 'pg_stat_statements'" in active(text)
    )
    assert disabled == ["shared_preload_libraries (timescaledb not installed here)"]
    text, disabled = rewrite("shared_preload_libraries = 'pg_stat_statements'\n")
    assert disabled == []
    assert "shared_preload_libraries = 'pg_stat_statements'" in active(text)


def test_every_include_is_disabled() -> None:
    text, disabled = rewrite("include_dir = 'conf.d'\ninclude '/etc/postgresql/15/main/x.conf'\n")
    assert disabled == ["include_dir conf.d", "include /etc/postgresql/15/main/x.conf"]
    assert not [ln for ln in active(text) if ln.startswith("include")]
    # Even one inside PGDATA: its settings are snapshot content nobody checked (issue 18).
    text, disabled = rewrite("include 'evil.conf'\ninclude_if_exists = 'x.conf'\n", includes=True)
    assert disabled == ["include evil.conf", "include_if_exists x.conf"]
    assert not [ln for ln in active(text) if ln.startswith("include")]


def test_code_loading_settings_are_disabled() -> None:
    text, disabled = rewrite(
        "jit_provider = '../../../../../proc/self/cwd/lib/evil'\n"
        "dynamic_library_path = '$libdir:/var/lib/postgresql/15/main/lib'\n"
        "plperl.on_init = 'system(1)'\n"
    )
    assert not [ln for ln in active(text) if ln.startswith(("jit_provider", "dynamic", "plperl"))]
    assert disabled == ["jit_provider", "dynamic_library_path", "plperl.on_init"]


def test_preload_paths_are_refused_even_if_the_file_exists() -> None:
    # A path into the restored tree is not a library installed here, whatever exists.
    text, disabled = rewrite(
        "shared_preload_libraries = 'pg_stat_statements,lib/evil.so'\n"
        "session_preload_libraries = '$libdir/../../../proc/self/cwd/lib/evil'\n",
        libs=("pg_stat_statements", "lib/evil.so", "../../../proc/self/cwd/lib/evil"),
    )
    assert "shared_preload_libraries = 'pg_stat_statements'" in active(text)
    assert not [ln for ln in active(text) if ln.startswith("session_preload")]
    assert disabled == [
        "shared_preload_libraries (lib/evil.so not installed here)",
        "session_preload_libraries ($libdir/../../../proc/self/cwd/lib/evil not installed here)",
    ]


def test_snapshot_names_in_notes_are_printable() -> None:
    _, disabled = rewrite("shared_preload_libraries = 'ev[/]il\x1b[31m'\n")
    assert disabled == ["shared_preload_libraries (ev?/?il??31m not installed here)"]


def test_bare_library_names() -> None:
    assert bare_library("pg_stat_statements") == "pg_stat_statements"
    assert bare_library("$libdir/auto_explain") == "auto_explain"
    assert bare_library("uuid-ossp") == "uuid-ossp"
    for path in ("lib/evil", "/tmp/evil", "../evil", "$libdir/../evil", "..", ""):
        assert bare_library(path) is None, path


def test_configured_value_is_the_last_active_line() -> None:
    text = "shared_preload_libraries = 'a'\n#shared_preload_libraries = 'b'\nx = 1\n"
    assert configured_value(text, "shared_preload_libraries") == "a"
    assert (
        configured_value(text + "shared_preload_libraries 'c'\n", "shared_preload_libraries") == "c"
    )
    assert configured_value("x = 1\n", "shared_preload_libraries") is None
    installed = {"pg_stat_statements"}.__contains__
    assert safe_preload_libraries("'pg_stat_statements, lib/evil, x'", installed) == [
        "pg_stat_statements"
    ]


def test_forced_settings_cover_every_code_loading_setting() -> None:
    forced = forced_settings("15", "/r/data/15/main", ["pg_stat_statements"])
    assert forced["shared_preload_libraries"] == "pg_stat_statements"
    for empty in (
        "session_preload_libraries",
        "local_preload_libraries",
        "archive_command",
        "archive_library",
        "restore_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "ssl_passphrase_command",
        "external_pid_file",
    ):
        assert forced[empty] == "", empty
    assert forced["jit_provider"] == "llvmjit"
    assert forced["dynamic_library_path"] == "$libdir"
    assert forced["hba_file"] == "/r/data/15/main/pg_hba.conf"
    assert forced["ident_file"] == "/r/data/15/main/pg_ident.conf"
    assert forced["data_directory"] == "/r/data/15/main"
    assert forced["archive_mode"] == "off"
    assert forced["ssl"] == "off"
    assert "event_triggers" not in forced  # 17+ only: an unknown -c stops the server
    assert forced_settings("17", "/d")["event_triggers"] == "off"
    old = forced_settings("10", "/d")
    assert not {"archive_library", "restore_command", "jit_provider"} & set(old)
    assert forced_arguments({"a": "", "b": "x y"}) == ["-c", "a=", "-c", "b=x y"]
    with pytest.raises(ValueError, match="bare library"):
        forced_settings("15", "/d", ["lib/evil"])


def test_trusted_c_function_libraries() -> None:
    for ok in ("$libdir/plpgsql", "pg_stat_statements", "$libdir/plugins/x"):
        assert library_is_trusted(ok), ok
    for bad in (
        "lib/evil",
        "/var/lib/postgresql/15/main/lib/evil",
        "$libdir/../../../proc/self/cwd/lib/evil",
        "$libdir//x",
        "./evil",
    ):
        assert not library_is_trusted(bad), bad


def test_comments_and_quoted_hashes_are_left_alone() -> None:
    text, disabled = rewrite("# port = 5432\napplication_name = 'a#b'\n")
    assert "# port = 5432" in text
    assert "application_name = 'a#b'" in active(text)
    assert disabled == []


def test_a_postgresql_conf_that_is_not_a_file_reads_as_empty(tmp_path: Path) -> None:
    from pgro.postgres.server import _read_own_config

    (tmp_path / "postgresql.conf").mkdir()  # a hostile snapshot's
    assert _read_own_config(tmp_path) == ""
    (tmp_path / "postgresql.conf").rmdir()
    (tmp_path / "postgresql.conf").symlink_to("/etc/passwd")
    assert _read_own_config(tmp_path) == ""
    (tmp_path / "postgresql.conf").unlink()
    (tmp_path / "postgresql.conf").write_text("shared_preload_libraries = 'x'\n")
    assert "shared_preload_libraries" in _read_own_config(tmp_path)
