"""`postgresExtraConfig`: what is parsed, applied, rejected and rendered (features.md §2.10)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pgro.core.extra_config import (
    EVENT_EXTRA_CONFIG_IGNORED,
    extra_config_events,
    parse_extra_config,
)
from pgro.core.plan import EventType
from pgro.postgres.config import BLOCK_BEGIN, BLOCK_END, configured_value, rewrite_config
from tests.scenarios.world import T0, World, replica_doc, snapshot


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("work_mem = '64MB'", "work_mem", "64MB"),
        ("work_mem=64MB", "work_mem", "64MB"),
        ("work_mem 64MB", "work_mem", "64MB"),  # `=` is optional in postgresql.conf
        ("  Work_Mem = 64MB   # a comment", "work_mem", "64MB"),  # names are case-insensitive
        ("random_page_cost = 1.1", "random_page_cost", "1.1"),
        ("jit = off", "jit", "off"),
        ("search_path = '\"$user\", public'", "search_path", '"$user", public'),
        ("application_name = 'it''s'", "application_name", "it's"),
        (r"application_name = 'a\\b'", "application_name", "a\\b"),
        (r"application_name = 'it\'s'", "application_name", "it's"),
        ("auto_explain.log_min_duration = '5s'", "auto_explain.log_min_duration", "5s"),
        ("timezone = 'Pacific/Auckland'", "timezone", "Pacific/Auckland"),
        ("statement_timeout = 0x10", "statement_timeout", "0x10"),
        ("application_name = ''", "application_name", ""),
        ("application_name = 'a # not a comment'", "application_name", "a # not a comment"),
    ],
)
def test_a_setting_is_parsed_as_postgresql_parses_it(line: str, key: str, value: str) -> None:
    parsed = parse_extra_config(line)
    assert parsed.settings == {key: value}
    assert not parsed.ignored_anything


@pytest.mark.parametrize(
    "line",
    [
        "not a setting",
        "work_mem64MB",
        "work_mem =",
        "work_mem = '64MB",  # unterminated string
        r"work_mem = '64MB\'",  # the backslash escapes the closing quote
        "work_mem = '64MB' port = 1",  # two settings on one line
        "work_mem = 64MB listen_addresses",
        "= 64MB",
        "1work_mem = 64MB",
        "work_mem = 1.5GB",  # two tokens to PostgreSQL: a syntax error would stop the server
        r"application_name = 'a\nlisten_addresses = ''*'''",  # an escaped newline
        r"application_name = 'a\012b'",  # an octal newline
        "application_name = 'a\rb'",
    ],
)
def test_a_line_postgresql_would_refuse_is_ignored_by_number(line: str) -> None:
    parsed = parse_extra_config(f"# first\nwork_mem = '8MB'\n{line}\n")
    assert parsed.settings == {"work_mem": "8MB"}
    assert parsed.malformed_lines == (3,)
    assert parsed.ignored_keys == ()
    assert "line 3 " in parsed.describe_ignored()


def test_keys_pgro_keeps_are_rejected_and_named_once() -> None:
    parsed = parse_extra_config(
        "listen_addresses = '*'\n"
        "LC_MESSAGES = 'de_DE'\n"
        "lc_monetary = C\n"
        "port = 5433\n"
        "shared_buffers = 4GB\n"
        "default_transaction_read_only = off\n"
        "ssl = on\n"
        "archive_command = 'cp %p /x'\n"
        "include '/etc/evil.conf'\n"
        "include_dir 'conf.d'\n"
        "session_preload_libraries = 'auto_explain'\n"
        "plperl.on_init = 'system(1)'\n"
        "listen_addresses = 'localhost'\n"
        "work_mem = '64MB'\n"
    )
    assert parsed.settings == {"work_mem": "64MB"}
    assert parsed.ignored_keys == (
        "listen_addresses",
        "lc_messages",
        "lc_monetary",
        "port",
        "shared_buffers",
        "default_transaction_read_only",
        "ssl",
        "archive_command",
        "include",
        "include_dir",
        "session_preload_libraries",
        "plperl.on_init",
    )
    assert parsed.malformed_lines == ()
    assert parsed.describe_ignored().startswith("postgresExtraConfig not applied: listen_addr")


def test_the_last_line_wins_and_blank_or_comment_lines_are_nothing() -> None:
    parsed = parse_extra_config("\n# work_mem = 1GB\n   \nwork_mem = 4MB\r\nwork_mem = 8MB\n")
    assert parsed.settings == {"work_mem": "8MB"}
    assert not parsed.ignored_anything
    assert parse_extra_config(None) == parse_extra_config("")


def test_shared_preload_libraries_is_accepted_and_narrowed_by_the_repair() -> None:
    parsed = parse_extra_config("shared_preload_libraries = 'pg_stat_statements,not_here'")
    assert parsed.settings == {"shared_preload_libraries": "pg_stat_statements,not_here"}
    rewrite = rewrite_config(
        "shared_preload_libraries = 'pg_stat_statements'\n",
        parsed.settings,
        library_exists=lambda name: name == "pg_stat_statements",
    )
    assert configured_value(rewrite.text, "shared_preload_libraries") == "pg_stat_statements"
    assert rewrite.disabled == ["shared_preload_libraries (not_here not installed here)"]


def test_the_event_names_keys_and_lines_but_never_a_value() -> None:
    [event] = extra_config_events(
        "listen_addresses = 'secret-host'\nwork_mem = '64MB'\npassword 'hunter2' x\n", "r-1"
    )
    assert (event.type, event.reason, event.related) == (
        EventType.WARNING,
        EVENT_EXTRA_CONFIG_IGNORED,
        "r-1",
    )
    assert "listen_addresses" in event.note
    assert "line 3 " in event.note
    assert "secret-host" not in event.note and "hunter2" not in event.note
    assert extra_config_events("work_mem = '64MB'", "r-1") == ()
    assert extra_config_events(None, "r-1") == ()


# Rendering: a value is user input reaching postgresql.conf ------------------------------


def _block(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[lines.index(BLOCK_BEGIN) + 1 : lines.index(BLOCK_END)]


@pytest.mark.parametrize(
    "value",
    [
        "a'\nlisten_addresses = '*",
        "x\\'\nport = 1\n#",
        "tab\there\rand\x7f",
        "x\\",
        "\\'; listen_addresses = '*' #",
        "it's",
    ],
)
def test_no_value_can_end_its_line_or_string(value: str) -> None:
    rewrite = rewrite_config("", {"application_name": value}, library_exists=lambda _: False)
    [line] = _block(rewrite.text)
    assert line.startswith("application_name = '") and line.endswith("'")
    assert not any(ln.startswith(("listen_addresses", "port")) for ln in rewrite.text.splitlines())
    if value.isprintable():
        # It reads back as the value, decoded as PostgreSQL decodes a quoted string.
        assert parse_extra_config(line).settings == {"application_name": value}


def test_a_setting_name_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a postgresql\.conf setting name"):
        rewrite_config("", {"work_mem = 1\nport": "1"}, library_exists=lambda _: False)


def test_an_override_of_the_sources_setting_is_not_reported_as_a_source_host_fix() -> None:
    rewrite = rewrite_config(
        "work_mem = '4MB'\nlisten_addresses = '*'\n",
        {"work_mem": "64MB"},
        library_exists=lambda _: False,
    )
    assert configured_value(rewrite.text, "work_mem") == "64MB"
    assert rewrite.disabled == ["listen_addresses"]


# Once per restore, not per pass ----------------------------------------------------------


def test_the_event_comes_once_with_the_restore_that_ignores_it() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=1)))
    key = world.add_replica(
        replica_doc(
            "extra",
            postgresExtraConfig="work_mem = '64MB'\nlisten_addresses = '*'\n",
        )
    )
    world.run_for(timedelta(minutes=10))
    [restore] = world.all_restores()
    ignored = [e for _, k, e in world.events if k == key and e.reason == "ExtraConfigIgnored"]
    assert len(ignored) == 1
    assert ignored[0].related == restore.name
    assert "listen_addresses" in ignored[0].note
    assert world.event_reasons(key) == ["RestoreStarted", "ExtraConfigIgnored", "RestoreCompleted"]
