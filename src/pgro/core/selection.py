"""Choosing the snapshot to restore on the legacy path: filter, then take the newest.

Globs follow the reference's globset configuration (`literal_separator = false`):

- `*` matches any run of characters, `/` included; `?` matches one character;
- `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]` are classes (a leading `]` or `-` is literal);
- `{a,b}` is alternation, nestable; empty alternatives are dropped (`x{a,}` is `xa`), as
  globset does by default;
- `\\` escapes the next character; `**` keeps globset's directory meaning (`a/**/b` also
  matches `a/b`, `**/b` also matches `b`);
- case-sensitive, whole-string; an invalid pattern matches nothing.

One deliberate difference: `?` and classes match one character, where globset matches
one byte of UTF-8 — the same for the ASCII names snapshots carry.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pgro.api.replica import SnapshotFilter
from pgro.core.snapshot import Snapshot, start_time_ns


class GlobError(ValueError):
    """A pattern globset would refuse."""


@dataclass(frozen=True)
class _Literal:
    char: str


@dataclass(frozen=True)
class _Any:
    pass


@dataclass(frozen=True)
class _Star:
    pass


@dataclass(frozen=True)
class _RecursivePrefix:
    pass


@dataclass(frozen=True)
class _RecursiveSuffix:
    pass


@dataclass(frozen=True)
class _RecursiveZeroOrMore:
    pass


@dataclass(frozen=True)
class _Class:
    negated: bool
    ranges: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Alternates:
    branches: tuple[tuple[_Token, ...], ...]


_Token = (
    _Literal
    | _Any
    | _Star
    | _RecursivePrefix
    | _RecursiveSuffix
    | _RecursiveZeroOrMore
    | _Class
    | _Alternates
)

_SEPARATOR: Final = "/"


class _Parser:
    """A port of globset's parser, so `**` and edge cases mean what they mean there."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.position = 0
        self.previous: str | None = None
        self.current: str | None = None
        # The token list being filled, innermost alternative last.
        self.stack: list[list[_Token]] = [[]]
        # Finished alternatives of each open `{`, innermost last.
        self.open_groups: list[list[tuple[_Token, ...]]] = []

    def error(self, message: str) -> GlobError:
        return GlobError(f"invalid glob {self.pattern!r}: {message}")

    def bump(self) -> str | None:
        self.previous = self.current
        if self.position >= len(self.pattern):
            self.current = None
        else:
            self.current = self.pattern[self.position]
            self.position += 1
        return self.current

    def peek(self) -> str | None:
        return self.pattern[self.position] if self.position < len(self.pattern) else None

    def push(self, token: _Token) -> None:
        self.stack[-1].append(token)

    def parse(self) -> tuple[_Token, ...]:
        while (char := self.bump()) is not None:
            if char == "?":
                self.push(_Any())
            elif char == "*":
                self.parse_star()
            elif char == "[":
                self.parse_class()
            elif char == "{":
                self.open_groups.append([])
                self.stack.append([])
            elif char == "}":
                if not self.open_groups:
                    raise self.error("'}' without a matching '{'")
                branches = self.open_groups.pop()
                branches.append(tuple(self.stack.pop()))
                self.push(_Alternates(tuple(branches)))
            elif char == "," and self.open_groups:
                self.open_groups[-1].append(tuple(self.stack.pop()))
                self.stack.append([])
            elif char == "\\":
                escaped = self.bump()
                if escaped is None:
                    raise self.error("dangling '\\' at the end")
                self.push(_Literal(escaped))
            else:
                self.push(_Literal(char))
        if self.open_groups:
            raise self.error("'{' is never closed")
        return tuple(self.stack[0])

    def parse_star(self) -> None:
        previous = self.previous
        if self.peek() != "*":
            self.push(_Star())
            return
        self.bump()
        in_group = bool(self.open_groups)
        if not self.stack[-1]:
            following = self.peek()
            if following is not None and following != _SEPARATOR:
                self.push(_Star())
                self.push(_Star())
            else:
                self.push(_RecursivePrefix())
                self.bump()
            return
        if (previous is None or previous != _SEPARATOR) and (
            not in_group or previous not in (",", "{")
        ):
            self.push(_Star())
            self.push(_Star())
            return
        following = self.peek()
        if following is None or (following in (",", "}") and in_group):
            is_suffix = True
        elif following == _SEPARATOR:
            self.bump()
            is_suffix = False
        else:
            self.push(_Star())
            self.push(_Star())
            return
        last = self.stack[-1].pop()
        if isinstance(last, _RecursivePrefix | _RecursiveSuffix):
            self.push(last)
        elif is_suffix:
            self.push(_RecursiveSuffix())
        else:
            self.push(_RecursiveZeroOrMore())

    def parse_class(self) -> None:
        negated = self.peek() in ("!", "^")
        if negated:
            self.bump()
        ranges: list[tuple[str, str]] = []
        first = True
        in_range = False
        while True:
            char = self.bump()
            if char is None:
                raise self.error("'[' is never closed")
            if char == "]" and not first:
                break
            if char == "-" and not first:
                if in_range:
                    self.extend_range(ranges, "-")
                    in_range = False
                else:
                    in_range = True
            elif in_range:
                self.extend_range(ranges, char)
                in_range = False
            else:
                ranges.append((char, char))
            first = False
        if in_range:
            ranges.append(("-", "-"))
        self.push(_Class(negated, tuple(ranges)))

    def extend_range(self, ranges: list[tuple[str, str]], end: str) -> None:
        start = ranges[-1][0]
        if end < start:
            raise self.error(f"invalid range {start}-{end}")
        ranges[-1] = (start, end)


def _regex(tokens: tuple[_Token, ...]) -> str:
    parts = []
    for token in tokens:
        match token:
            case _Literal(char):
                parts.append(re.escape(char))
            case _Any():
                parts.append(".")
            case _Star():
                parts.append(".*")
            case _RecursivePrefix():
                parts.append("(?:/?|.*/)")
            case _RecursiveSuffix():
                parts.append("/.*")
            case _RecursiveZeroOrMore():
                parts.append("(?:/|/.*/)")
            case _Class(negated, ranges):
                body = "".join(
                    re.escape(a) if a == b else f"{re.escape(a)}-{re.escape(b)}" for a, b in ranges
                )
                parts.append(f"[{'^' if negated else ''}{body}]")
            case _Alternates(branches):
                alternatives = [r for r in (_regex(b) for b in branches) if r]
                if alternatives:
                    parts.append(f"(?:{'|'.join(alternatives)})")
    return "".join(parts)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """The regular expression `pattern` means; `GlobError` if globset would refuse it."""
    tokens = _Parser(pattern).parse()
    # globset's special case: a lone `**` matches everything.
    regex = ".*" if tokens == (_RecursivePrefix(),) else _regex(tokens)
    return re.compile(regex, re.DOTALL)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return compile_glob(pattern)
    except GlobError:
        return None


def glob_match(pattern: str, value: str) -> bool:
    compiled = _compiled(pattern)
    return compiled is not None and compiled.fullmatch(value) is not None


_DRIVE: Final = re.compile(r"([A-Za-z]):(.*)", re.DOTALL)


def normalize_windows_path(path: str) -> str:
    """Windows paths in Unix form: `D:\\Full` → `/D/Full`, `C:/x` → `/C/x`; others kept
    apart from backslashes becoming `/`."""
    slashed = path.replace("\\", "/")
    drive = _DRIVE.fullmatch(slashed)
    if drive is None:
        return slashed
    letter, rest = drive.groups()
    return f"/{letter}{rest if not rest or rest.startswith('/') else '/' + rest}"


def _tags_match(snapshot: Snapshot, required: dict[str, str]) -> bool:
    # Kopia stores user tags as `tag:<key>`; a filter may name either form.
    return all(
        snapshot.tags.get(key) == value or snapshot.tags.get(f"tag:{key}") == value
        for key, value in required.items()
    )


def snapshot_matches(snapshot: Snapshot, snapshot_filter: SnapshotFilter | None) -> bool:
    """Every criterion the filter sets must match; no filter matches everything."""
    if snapshot_filter is None:
        return True
    checks = (
        (snapshot_filter.host_pattern, snapshot.source.host),
        (snapshot_filter.description_pattern, snapshot.description),
        # Only the value is normalised, so patterns are written in Unix form.
        (snapshot_filter.path_pattern, normalize_windows_path(snapshot.source.path)),
    )
    if snapshot_filter.tags and not _tags_match(snapshot, snapshot_filter.tags):
        return False
    return all(pattern is None or glob_match(pattern, value) for pattern, value in checks)


def _recency(snapshot: Snapshot) -> tuple[int, int, str, str]:
    instant = start_time_ns(snapshot.start_time)
    if instant is None:
        return (0, 0, snapshot.start_time, snapshot.id)
    return (1, instant, "", snapshot.id)


def newest(snapshots: Iterable[Snapshot]) -> Snapshot | None:
    """The snapshot that started last.

    Times are compared as instants, not strings (the reference compares strings, which
    orders `…:05Z` after `…:05.4Z`). A snapshot whose `startTime` is not RFC 3339 ranks
    below every one that is, and among themselves such snapshots compare as strings.
    Equal times are settled by the larger id, so the choice never depends on list order.
    """
    return max(snapshots, key=_recency, default=None)


def select_snapshot(
    snapshots: Iterable[Snapshot], snapshot_filter: SnapshotFilter | None
) -> Snapshot | None:
    """The newest snapshot the filter admits, or None if it admits none."""
    return newest(s for s in snapshots if snapshot_matches(s, snapshot_filter))


def find_snapshot(snapshots: Iterable[Snapshot], snapshot_id: str) -> Snapshot | None:
    """The snapshot with this id (the canopy path picks by id, without filtering)."""
    return next((s for s in snapshots if s.id == snapshot_id), None)
