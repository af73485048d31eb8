"""Rewriting a restored `postgresql.conf` so the server starts here, not on the source host.

Settings that name the source machine (its paths, addresses, archive and replication
commands, log collector, locales, preload libraries that are not installed here) are
commented out with a `#pgro-disabled:` marker rather than deleted, so a reader can see
what the snapshot had. pgro's own settings go in one marked block at the end that is
replaced, never appended twice (the reference re-appends on every start and accumulates
duplicates).

The snapshot is untrusted: nothing it names may be loaded or run. The rewrite is the first
line of defence; the second is `forced_settings`, which the server's command line carries
(`-c` beats postgresql.conf, its includes and postgresql.auto.conf), so a setting the rewrite
missed still cannot load a library or run a program.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Which keys are pgro's is policy shared with `core.extra_config`; the names stay importable
# from here.
from pgro.core.setting_policy import CODE_RUNNING_PL_KEYS as CODE_RUNNING_PL_KEYS
from pgro.core.setting_policy import INCLUDE_KEYS, PRELOAD_KEYS, is_neutralised
from pgro.core.setting_policy import NEUTRALISED_KEYS as NEUTRALISED_KEYS
from pgro.core.setting_policy import NEUTRALISED_PREFIXES as NEUTRALISED_PREFIXES

DISABLED_MARK = "#pgro-disabled: "
BLOCK_BEGIN = "# --- pgro: settings for this restore (rewritten on every start) ---"
BLOCK_END = "# --- end pgro ---"

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


# A library name PostgreSQL looks up in `$libdir` (dynamic_library_path is forced to it):
# no directory separator, so no path into the restored tree or anywhere else on the host.
_BARE_LIBRARY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def bare_library(name: str) -> str | None:
    """`name` as a bare library name (`$libdir/x` -> `x`), or None if it is a path."""
    bare = name.strip().strip('"').removeprefix("$libdir/")
    if _BARE_LIBRARY.fullmatch(bare) and ".." not in bare:
        return bare
    return None


def printable_name(text: str, limit: int = 60) -> str:
    """A snapshot-supplied name made safe to show: visible ASCII only, no markup, bounded."""
    cleaned = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in "[]" else "?" for ch in text
    )
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def safe_preload_libraries(value: str, library_exists: Callable[[str], bool]) -> list[str]:
    """The libraries of a preload list that are bare names installed in the host's $libdir."""
    keep, _ = _preload_keep(value, library_exists)
    return keep


def _preload_keep(value: str, library_exists: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    return _keep_installed(_unquote(value), library_exists)


def _keep_installed(
    listed: str, library_exists: Callable[[str], bool]
) -> tuple[list[str], list[str]]:
    """(installed bare names, the rest) of a comma-separated library list."""
    keep: list[str] = []
    drop: list[str] = []
    for raw in listed.split(","):
        lib = raw.strip().strip('"')
        if not lib:
            continue
        bare = bare_library(lib)
        if bare is not None and library_exists(bare):
            keep.append(bare)
        else:
            drop.append(lib)
    return keep, drop


def configured_value(text: str, key: str) -> str | None:
    """The value the last active `key` line of a postgresql.conf sets (None if none does)."""
    found: str | None = None
    for line in text.splitlines():
        m = _SETTING.match(line)
        if m and not line.lstrip().startswith("#") and m["key"].lower() == key:
            found = _unquote(m["value"])
    return found


def _major_number(major: str) -> int:
    head = major.split(".")[0]
    return int(head) if head.isdigit() else 0


def forced_settings(
    major: str, pgdata: str, shared_preload_libraries: Sequence[str] = ()
) -> dict[str, str]:
    """Settings the restored server's command line forces, whatever its files say.

    `-c` on the command line (source "argv") overrides postgresql.conf, every include and
    postgresql.auto.conf, so these hold even if a file the rewrite did not see sets them.
    Per-role and per-database settings rank above argv; `catalog_guard` resets those that
    load code and pgro's sessions override them in their startup packet (`session`).
    `shared_preload_libraries` must be bare names already checked against the install.
    """
    for lib in shared_preload_libraries:
        if bare_library(lib) != lib:
            raise ValueError(f"shared_preload_libraries entry {lib!r} is not a bare library name")
    version = _major_number(major)
    forced = {
        # The files that decide who may connect, and where the data is, are pgro's.
        "data_directory": pgdata,
        "hba_file": f"{pgdata}/pg_hba.conf",
        "ident_file": f"{pgdata}/pg_ident.conf",
        "external_pid_file": "",
        # Libraries: only what the host installed, looked up only in the host's $libdir.
        "shared_preload_libraries": ",".join(shared_preload_libraries),
        "session_preload_libraries": "",
        "local_preload_libraries": "",
        "dynamic_library_path": "$libdir",
        # Programs: no archiving, no SSL passphrase helper, no log collector writing files.
        "archive_mode": "off",
        "archive_command": "",
        "ssl": "off",
        "logging_collector": "off",
    }
    if version >= 11:
        forced["jit_provider"] = "llvmjit"
        forced["ssl_passphrase_command"] = ""
    if version >= 12:
        # Recovery commands became ordinary settings in 12 (recovery.conf before).
        forced["restore_command"] = ""
        forced["archive_cleanup_command"] = ""
        forced["recovery_end_command"] = ""
    if version >= 15:
        forced["archive_library"] = ""
    if version >= 17:
        forced["event_triggers"] = "off"
    return forced


def forced_arguments(settings: Mapping[str, str]) -> list[str]:
    """`settings` as `postgres` argv entries (`-c key=value` each; no shell involved)."""
    args: list[str] = []
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    return args


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


# Values written bare; anything else is quoted. `1.5GB` is not one token to PostgreSQL.
_PLAIN_VALUE = re.compile(r"-?[0-9]+[a-zA-Z]*|-?[0-9]+\.[0-9]+|on|off|true|false")
# A setting name as postgresql.conf's lexer accepts it (one optional qualifier).
_SETTING_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?")


def render_value(value: str) -> str:
    """`value` as one postgresql.conf token that reads back as exactly `value`.

    Values can be user input (`postgresExtraConfig`): quotes are doubled, backslashes (an
    escape character in postgresql.conf strings) doubled, and control characters written
    as octal escapes, so nothing in a value can end the string or its line.
    """
    if _PLAIN_VALUE.fullmatch(value):
        return value
    out = []
    for ch in value:
        if ch == "'":
            out.append("''")
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def _block_line(key: str, value: str) -> str:
    if not _SETTING_KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a postgresql.conf setting name")
    return f"{key} = {render_value(value)}"


def rewrite_config(
    text: str,
    settings: Mapping[str, str],
    *,
    library_exists: Callable[[str], bool],
    include_allowed: Callable[[str], bool] | None = None,
) -> ConfigRewrite:
    """Neutralise source-host settings in `text` and append pgro's `settings` block.

    Every `include`, `include_dir` and `include_if_exists` is disabled: an included file is
    snapshot content the rewrite would otherwise have to inline and check line by line, and
    one that sets `shared_preload_libraries` or `hba_file` must not take effect. The source's
    tuning in them is lost, which never stops a restore from starting. `include_allowed` is
    no longer consulted (kept so existing callers need not change).

    Idempotent: running it on its own output changes nothing but the block's contents.
    """
    del include_allowed
    result = ConfigRewrite(text="")
    out: list[str] = []
    for line in remove_pgro_block(text).splitlines():
        m = _SETTING.match(line)
        if not m or line.lstrip().startswith("#"):
            out.append(line)
            continue
        key = m["key"].lower()
        if key in INCLUDE_KEYS:
            out.append(DISABLED_MARK + line)
            result.disabled.append(f"{key} {printable_name(_unquote(m['value']))}")
            continue
        if key in PRELOAD_KEYS and key not in settings:
            keep, drop = _preload_keep(m["value"], library_exists)
            if drop:
                out.append(DISABLED_MARK + line)
                if keep:
                    out.append(f"{key} = {render_value(','.join(keep))}")
                shown = ", ".join(printable_name(lib) for lib in drop)
                result.disabled.append(f"{key} ({shown} not installed here)")
            else:
                out.append(line)
            continue
        if is_neutralised(key) or key in settings:
            out.append(DISABLED_MARK + line)
            # Re-stating what pgro sets anyway (initdb writes `lc_messages = 'C'`) is no fix,
            # nor is a setting the replica's extra config overrides.
            overridden = key in settings and (
                not is_neutralised(key) or _unquote(m["value"]) == settings[key]
            )
            if not overridden:
                result.disabled.append(key)
            continue
        out.append(line)
    # A final line without a newline would swallow the first appended setting.
    body = "\n".join(out).rstrip("\n")
    block = [BLOCK_BEGIN]
    for key, value in settings.items():
        if key in PRELOAD_KEYS:
            # From the replica's extra config: only libraries installed here, as above.
            keep, drop = _keep_installed(value, library_exists)
            value = ",".join(keep)
            if drop:
                shown = ", ".join(printable_name(lib) for lib in drop)
                result.disabled.append(f"{key} ({shown} not installed here)")
        block.append(_block_line(key, value))
    block.append(BLOCK_END)
    result.text = (body + "\n\n" if body else "") + "\n".join(block) + "\n"
    return result


def meaningful_lines(text: str) -> list[str]:
    """Non-blank, non-comment lines (used to tell an empty postgresql.auto.conf)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
