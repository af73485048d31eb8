"""Rewriting a restored `postgresql.conf` so the server starts here, not on the source host.

Settings that name the source machine (its paths, addresses, archive and replication
commands, log collector, locales, preload libraries that are not installed here) are
commented out with a `#pgro-disabled:` marker rather than deleted, so a reader can see
what the snapshot had. pgro's own settings go in one marked block at the end that is
replaced, never appended twice (the reference re-appends on every start and accumulates
duplicates).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DISABLED_MARK = "#pgro-disabled: "
BLOCK_BEGIN = "# --- pgro: settings for this restore (rewritten on every start) ---"
BLOCK_END = "# --- end pgro ---"

# Exact keys that point at the source host or would stop startup here.
NEUTRALISED_KEYS = frozenset(
    {
        "data_directory",
        "hba_file",
        "ident_file",
        "external_pid_file",
        "config_file",
        "listen_addresses",
        "port",
        "unix_socket_directories",
        "unix_socket_directory",
        "unix_socket_group",
        "unix_socket_permissions",
        "dynamic_shared_memory_type",
        "shared_buffers",
        "huge_pages",
        "log_destination",
        "logging_collector",
        "log_directory",
        "log_filename",
        "log_file_mode",
        "log_rotation_age",
        "log_rotation_size",
        "log_truncate_on_rotation",
        "archive_mode",
        "archive_command",
        "archive_library",
        "restore_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "primary_conninfo",
        "primary_slot_name",
        "promote_trigger_file",
        "stats_temp_directory",
        "default_transaction_read_only",
        "password_encryption",
        "krb_server_keyfile",
    }
)
NEUTRALISED_PREFIXES = ("lc_", "ssl", "recovery_target")
PRELOAD_KEYS = frozenset(
    {"shared_preload_libraries", "session_preload_libraries", "local_preload_libraries"}
)
INCLUDE_KEYS = frozenset({"include", "include_dir", "include_if_exists"})

# `key = value`, `key value` and `key=value` are all valid postgresql.conf syntax.
_SETTING = re.compile(r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_.]*)\s*(?:=\s*|\s+)(?P<value>.*?)\s*$")

# A Debian cluster keeps its configuration in /etc, so the snapshot often has none.
MINIMAL_CONFIG = """\
# Written by pgro: the snapshot had no postgresql.conf (a Debian-style cluster keeps it in /etc).
max_connections = 100
max_prepared_transactions = 16
log_timezone = 'UTC'
datestyle = 'iso, mdy'
timezone = 'UTC'
default_text_search_config = 'pg_catalog.english'
"""


@dataclass
class ConfigRewrite:
    text: str
    disabled: list[str] = field(default_factory=list)  # keys commented out

    @property
    def changed_anything(self) -> bool:
        return bool(self.disabled)


def _strip_comment(value: str) -> str:
    out, quoted = [], False
    for ch in value:
        if ch == "'":
            quoted = not quoted
        if ch == "#" and not quoted:
            break
        out.append(ch)
    return "".join(out).strip()


def _unquote(value: str) -> str:
    value = _strip_comment(value)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    return value


def _is_neutralised(key: str) -> bool:
    return key in NEUTRALISED_KEYS or key.startswith(NEUTRALISED_PREFIXES)


def _preload_keep(value: str, library_exists: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    keep: list[str] = []
    drop: list[str] = []
    for raw in _unquote(value).split(","):
        lib = raw.strip().strip('"')
        if not lib:
            continue
        (keep if library_exists(lib.removeprefix("$libdir/")) else drop).append(lib)
    return keep, drop


def remove_pgro_block(text: str) -> str:
    lines = text.splitlines()
    out, inside = [], False
    for line in lines:
        if line.strip() == BLOCK_BEGIN:
            inside = True
            continue
        if inside and line.strip() == BLOCK_END:
            inside = False
            continue
        if not inside:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + ("\n" if out else "")


def render_value(value: str) -> str:
    if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?[a-zA-Z]*|on|off|true|false", value):
        return value
    return "'" + value.replace("'", "''") + "'"


def rewrite_config(
    text: str,
    settings: Mapping[str, str],
    *,
    library_exists: Callable[[str], bool],
    include_allowed: Callable[[str], bool],
) -> ConfigRewrite:
    """Neutralise source-host settings in `text` and append pgro's `settings` block.

    Idempotent: running it on its own output changes nothing but the block's contents.
    """
    result = ConfigRewrite(text="")
    out: list[str] = []
    for line in remove_pgro_block(text).splitlines():
        m = _SETTING.match(line)
        if not m or line.lstrip().startswith("#"):
            out.append(line)
            continue
        key = m["key"].lower()
        if key in INCLUDE_KEYS:
            target = _unquote(m["value"])
            if include_allowed(target):
                out.append(line)
            else:
                out.append(DISABLED_MARK + line)
                result.disabled.append(f"{key} {target}")
            continue
        if key in PRELOAD_KEYS:
            keep, drop = _preload_keep(m["value"], library_exists)
            if drop:
                out.append(DISABLED_MARK + line)
                if keep:
                    out.append(f"{key} = {render_value(','.join(keep))}")
                result.disabled.append(f"{key} ({', '.join(drop)} not installed)")
            else:
                out.append(line)
            continue
        if _is_neutralised(key) or key in settings:
            out.append(DISABLED_MARK + line)
            # Re-stating what pgro sets anyway (initdb writes `lc_messages = 'C'`) is no fix.
            if key not in settings or _unquote(m["value"]) != settings[key]:
                result.disabled.append(key)
            continue
        out.append(line)
    # A final line without a newline would swallow the first appended setting.
    body = "\n".join(out).rstrip("\n")
    block = [BLOCK_BEGIN, *(f"{k} = {render_value(v)}" for k, v in settings.items()), BLOCK_END]
    result.text = (body + "\n\n" if body else "") + "\n".join(block) + "\n"
    return result


def meaningful_lines(text: str) -> list[str]:
    """Non-blank, non-comment lines (used to tell an empty postgresql.auto.conf)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
