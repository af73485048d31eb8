"""Rewriting a source host's postgresql.conf (pure text transformation)."""

from __future__ import annotations

from pgro.postgres.config import (
    BLOCK_BEGIN,
    DISABLED_MARK,
    meaningful_lines,
    rewrite_config,
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
    assert disabled == ["shared_preload_libraries (timescaledb not installed)"]
    text, disabled = rewrite("shared_preload_libraries = 'pg_stat_statements'\n")
    assert disabled == []
    assert "shared_preload_libraries = 'pg_stat_statements'" in active(text)


def test_includes_outside_or_missing_are_disabled() -> None:
    text, disabled = rewrite("include_dir = 'conf.d'\ninclude '/etc/postgresql/15/main/x.conf'\n")
    assert disabled == ["include_dir conf.d", "include /etc/postgresql/15/main/x.conf"]
    assert not [ln for ln in active(text) if ln.startswith("include")]
    text, disabled = rewrite("include_dir = 'conf.d'\n", includes=True)
    assert disabled == []


def test_comments_and_quoted_hashes_are_left_alone() -> None:
    text, disabled = rewrite("# port = 5432\napplication_name = 'a#b'\n")
    assert "# port = 5432" in text
    assert "application_name = 'a#b'" in active(text)
    assert disabled == []
