"""A replica's `postgresExtraConfig`: which of its lines the restored server gets.

The text is parsed as PostgreSQL parses postgresql.conf (`key = value`, `key value`,
`#` comments, quoted strings with `''` and backslash escapes), one setting per line.
Accepted settings go into pgro's settings block (`postgres.config.rewrite_config`), which
renders each value again, quoted and escaped: the user's text never reaches the file as
written, so a value cannot end its line and start another setting.

Not applied, and named in one `ExtraConfigIgnored` Warning event when the restore is
created (the reference strips them silently):
- keys pgro keeps for itself (`core.setting_policy`: the source-host, connection, logging,
  archiving and code-loading settings and every `lc_*`), the `include` directives, and
  the preload settings pgro forces empty on the server's command line;
- lines PostgreSQL would refuse (a syntax error stops the server), and values holding a
  control character (a newline in a value is what an injection needs).

`shared_preload_libraries` is accepted here; the repair keeps only the libraries installed
on the host that serves the restore, as it does for the snapshot's own setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from pgro.core.plan import EmitEvent, EventType
from pgro.core.setting_policy import INCLUDE_KEYS, is_neutralised

EVENT_EXTRA_CONFIG_IGNORED: Final = "ExtraConfigIgnored"

# Set to '' on the restored server's command line (`postgres.config.forced_settings`),
# which beats postgresql.conf: a value here would be silently without effect.
FORCED_EMPTY_KEYS: Final = frozenset(
    {"session_preload_libraries", "local_preload_libraries", "event_triggers"}
)

# postgresql.conf's lexer (src/backend/utils/misc/guc-file.l), ASCII names only.
_ID = r"[A-Za-z_][A-Za-z0-9_$]*"
_LINE = re.compile(
    rf"\s*(?P<key>{_ID}(?:\.{_ID})?)"
    r"(?:\s*=\s*|\s+)"
    r"(?P<value>'(?:[^'\\\n]|\\.|'')*'|[^\s#']+)"
    r"\s*(?:#.*)?"
)
_UNQUOTED = re.compile(
    r"[-+]?(?:0x[0-9A-Fa-f]+|[0-9]+)[A-Za-z]*"  # integer, with a unit
    r"|[-+]?(?:[0-9]+\.[0-9]*|[0-9]*\.[0-9]+)(?:[Ee][-+]?[0-9]+)?"  # real
    r"|[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff\-.:/]*"  # unquoted string
)
_ESCAPES: Final = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_OCTAL = re.compile(r"[0-7]{1,3}")


def _unescape(quoted: str) -> str:
    """A quoted postgresql.conf string's value (GUC_scanstr)."""
    body, out, i = quoted[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "'":  # `''`, the lexer allows no lone quote inside
            out.append("'")
            i += 2
        elif ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            octal = _OCTAL.match(body, i + 1)
            if octal:
                out.append(chr(int(octal.group(), 8)))
                i = octal.end()
            else:
                out.append(_ESCAPES.get(nxt, nxt))
                i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _has_control(value: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)


@dataclass(frozen=True)
class ExtraConfig:
    """`settings`: what the restored server gets (key lower case -> value, unquoted; the
    last line setting a key wins). `ignored_keys`: keys not applied because they are
    pgro's. `malformed_lines`: 1-based numbers of lines that are not one valid setting."""

    settings: Mapping[str, str] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()
    malformed_lines: tuple[int, ...] = ()

    @property
    def ignored_anything(self) -> bool:
        return bool(self.ignored_keys or self.malformed_lines)

    def describe_ignored(self) -> str:
        """What was not applied and why: key names and line numbers, never a value."""
        parts = []
        if self.ignored_keys:
            parts.append(
                f"{', '.join(self.ignored_keys)} (pgro sets these itself: they name the "
                "host, its connections, logs, locales or code to load)"
            )
        if self.malformed_lines:
            lines = ", ".join(str(n) for n in self.malformed_lines)
            word = "line" if len(self.malformed_lines) == 1 else "lines"
            parts.append(
                f"{word} {lines} (not one `key = value` setting as postgresql.conf "
                "accepts it, or a value with a control character)"
            )
        return "postgresExtraConfig not applied: " + "; ".join(parts)


def _rejected(key: str) -> bool:
    return is_neutralised(key) or key in INCLUDE_KEYS or key in FORCED_EMPTY_KEYS


def parse_extra_config(text: str | None) -> ExtraConfig:
    """Split `postgresExtraConfig` into what is applied and what is not (see the module)."""
    settings: dict[str, str] = {}
    ignored: list[str] = []
    malformed: list[int] = []
    for number, line in enumerate((text or "").split("\n"), start=1):
        stripped = line.strip(" \t\r")
        if not stripped or stripped.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        raw = m["value"] if m else ""
        if m is None or not (raw.startswith("'") or _UNQUOTED.fullmatch(raw)):
            malformed.append(number)
            continue
        value = _unescape(raw) if raw.startswith("'") else raw
        if _has_control(value):
            malformed.append(number)
            continue
        key = m["key"].lower()
        if _rejected(key):
            if key not in ignored:
                ignored.append(key)
            continue
        settings.pop(key, None)  # the last line wins, in its place
        settings[key] = value
    return ExtraConfig(settings, tuple(ignored), tuple(malformed))


def extra_config_events(text: str | None, restore: str) -> tuple[EmitEvent, ...]:
    """The Warning a new restore gets when its replica's extra config is not all applied
    (emitted once, where the restore is created)."""
    parsed = parse_extra_config(text)
    if not parsed.ignored_anything:
        return ()
    return (
        EmitEvent(
            EventType.WARNING,
            EVENT_EXTRA_CONFIG_IGNORED,
            parsed.describe_ignored(),
            related=restore,
        ),
    )
