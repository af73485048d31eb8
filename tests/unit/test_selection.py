from __future__ import annotations

import itertools
import string
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgro.api import SnapshotFilter
from pgro.core.selection import (
    GlobError,
    compile_glob,
    find_snapshot,
    glob_match,
    newest,
    normalize_windows_path,
    select_snapshot,
    snapshot_matches,
)
from pgro.core.snapshot import Snapshot, SnapshotSource


def _snapshot(
    id: str = "k1",
    *,
    host: str = "fiji-prod-01",
    path: str = "/var/lib/postgresql",
    description: str = "nightly",
    tags: dict[str, str] | None = None,
    start_time: str = "2026-01-01T00:00:00Z",
) -> Snapshot:
    return Snapshot(
        id=id,
        description=description,
        source=SnapshotSource(host=host, user_name="postgres", path=path),
        tags=MappingProxyType(tags or {}),
        start_time=start_time,
        size_bytes=1,
    )


def _filter(**fields: Any) -> SnapshotFilter:
    return SnapshotFilter.model_validate(fields)


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        # The reference's own cases.
        ("fiji-prod-*", "fiji-prod-01", True),
        ("fiji-prod-*", "fiji-prod-abc", True),
        ("fiji-prod-*", "fiji-dev-01", False),
        ("ab?d", "abcd", True),
        ("ab?d", "abxd", True),
        ("ab?c", "abc", False),
        ("ab?d", "abccd", False),
        ("exact", "exact", True),
        ("exact", "not-exact", False),
        ("exact", "exactnot", False),
        ("*.example.com", "foo.example.com", True),
        ("*.example.com", "foo.other.com", False),
        ("a+b", "a+b", True),
        ("a+b", "aab", False),
        # Regex metacharacters are literal.
        ("a.b", "axb", False),
        ("(a)|b", "(a)|b", True),
        ("a$^", "a$^", True),
        # `*` crosses `/` (literal_separator = false).
        ("/var/*", "/var/lib/postgresql", True),
        ("*", "", True),
        ("*", "a/b/c", True),
        ("?", "/", True),
        ("?", "", False),
        ("?", "ab", False),
        # Case-sensitive, whole string.
        ("Fiji-*", "fiji-prod", False),
        ("prod", "fiji-prod", False),
        ("", "", True),
        ("", "a", False),
        # Classes.
        ("[abc]x", "bx", True),
        ("[abc]x", "dx", False),
        ("[a-c]", "b", True),
        ("[a-c]", "d", False),
        ("[!a-c]", "d", True),
        ("[!a-c]", "a", False),
        ("[^a-c]", "d", True),
        ("[^a-c]", "/", True),
        ("[]]", "]", True),
        ("[!]]", "a", True),
        ("[!]]", "]", False),
        ("[-a]", "-", True),
        ("[a-]", "-", True),
        ("[a-c-e]", "d", True),
        ("[\\]", "\\", True),
        ("[*?]", "*", True),
        ("[*?]", "x", False),
        # Alternation.
        ("{a,b}", "a", True),
        ("{a,b}", "b", True),
        ("{a,b}", "c", False),
        ("{a,b}", "{a,b}", False),
        ("db-{prod,staging}-*", "db-staging-2", True),
        ("db-{prod,staging}-*", "db-dev-2", False),
        ("{a,{b,c}}", "c", True),
        ("x{a,}", "xa", True),
        ("x{a,}", "x", False),
        ("x{,}y", "xy", True),
        ("a,b", "a,b", True),
        # Escapes.
        ("a\\*", "a*", True),
        ("a\\*", "ab", False),
        ("\\{a\\}", "{a}", True),
        # `**` keeps its directory meaning.
        ("**", "any/thing", True),
        ("**/b", "b", True),
        ("**/b", "a/b", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**", "a/x/y", True),
        ("a/**", "a", False),
        ("a**b", "a/x/b", True),
        ("{**/a,b}", "x/a", True),
        # Invalid patterns match nothing, not even themselves.
        ("[", "[", False),
        ("[abc", "a", False),
        ("{a,b", "a", False),
        ("a}", "a}", False),
        ("a\\", "a\\", False),
        ("[z-a]", "m", False),
    ],
)
def test_glob_match(pattern: str, value: str, matches: bool) -> None:
    assert glob_match(pattern, value) is matches


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("[", "'[' is never closed"),
        ("{a", "'{' is never closed"),
        ("}", "'}' without a matching '{'"),
        ("a\\", "dangling"),
        ("[z-a]", "invalid range z-a"),
    ],
)
def test_invalid_patterns_say_why(pattern: str, fragment: str) -> None:
    with pytest.raises(GlobError) as caught:
        compile_glob(pattern)
    assert fragment in str(caught.value)
    assert repr(pattern) in str(caught.value)


_plain = st.text(alphabet=string.ascii_letters + string.digits + "-_./:@ +()$^|", max_size=30)


@given(_plain)
def test_a_pattern_without_metacharacters_matches_exactly_itself(text: str) -> None:
    assert glob_match(text, text)
    assert not glob_match(text, text + "x")


@given(_plain, _plain)
def test_prefix_star_matches_every_extension(prefix: str, rest: str) -> None:
    assert glob_match(prefix + "*", prefix + rest)


@given(st.text(max_size=30))
def test_star_matches_everything(value: str) -> None:
    assert glob_match("*", value)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("D:\\Full", "/D/Full"),
        ("D:\\Full\\pgdata", "/D/Full/pgdata"),
        ("C:/x", "/C/x"),
        ("c:\\Program Files\\PostgreSQL", "/c/Program Files/PostgreSQL"),
        ("C:", "/C"),
        ("C:\\", "/C/"),
        ("C:rel", "/C/rel"),
        ("/var/lib/postgresql", "/var/lib/postgresql"),
        ("relative/path", "relative/path"),
        ("relative\\path", "relative/path"),
        ("\\\\server\\share", "//server/share"),
        ("", ""),
        ("1:\\x", "1:/x"),
        ("ab:\\x", "ab:/x"),
    ],
)
def test_normalize_windows_path(path: str, expected: str) -> None:
    assert normalize_windows_path(path) == expected


@given(st.text(max_size=30))
def test_normalize_windows_path_is_idempotent_and_backslash_free(path: str) -> None:
    once = normalize_windows_path(path)
    assert "\\" not in once
    assert normalize_windows_path(once) == once


def test_no_filter_admits_everything() -> None:
    snapshots = [_snapshot("a"), _snapshot("b", host="other")]
    assert all(snapshot_matches(s, None) for s in snapshots)
    assert all(snapshot_matches(s, _filter()) for s in snapshots)


@pytest.mark.parametrize(
    ("tags", "required", "matches"),
    [
        ({"tag:env": "prod"}, {"env": "prod"}, True),
        ({"env": "prod"}, {"env": "prod"}, True),
        ({"tag:env": "prod"}, {"tag:env": "prod"}, True),
        ({"tag:env": "dev"}, {"env": "prod"}, False),
        ({}, {"env": "prod"}, False),
        ({"tag:env": "prod"}, {"env": "prod", "site": "fiji"}, False),
        ({"tag:env": "prod", "tag:site": "fiji"}, {"env": "prod", "site": "fiji"}, True),
        ({"env": "dev", "tag:env": "prod"}, {"env": "prod"}, True),
        ({"tag:env": "Prod"}, {"env": "prod"}, False),
        ({"tag:env": "prod"}, {}, True),
    ],
)
def test_tag_filter_accepts_bare_and_tag_prefixed_keys(
    tags: dict[str, str], required: dict[str, str], matches: bool
) -> None:
    assert snapshot_matches(_snapshot(tags=tags), _filter(tags=required)) is matches


@pytest.mark.parametrize(
    ("snapshot_fields", "filter_fields", "matches"),
    [
        ({"host": "fiji-prod-01"}, {"hostPattern": "fiji-prod-*"}, True),
        ({"host": "fiji-dev-01"}, {"hostPattern": "fiji-prod-*"}, False),
        ({"description": "nightly"}, {"descriptionPattern": "night*"}, True),
        ({"description": ""}, {"descriptionPattern": "*"}, True),
        ({"description": ""}, {"descriptionPattern": "?*"}, False),
        ({"path": "D:\\Full\\pg"}, {"pathPattern": "/D/Full/*"}, True),
        ({"path": "D:\\Full\\pg"}, {"pathPattern": "D:\\Full\\*"}, False),
        ({"path": "/var/lib/postgresql"}, {"pathPattern": "/var/lib/*"}, True),
        ({"host": "h"}, {"hostPattern": "["}, False),
    ],
)
def test_pattern_criteria(
    snapshot_fields: dict[str, Any], filter_fields: dict[str, str], matches: bool
) -> None:
    assert snapshot_matches(_snapshot(**snapshot_fields), _filter(**filter_fields)) is matches


_CRITERIA: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (criterion that passes, criterion that fails) for `_snapshot()` defaults
    "tags": ({"tags": {"env": "prod"}}, {"tags": {"env": "dev"}}),
    "host": ({"hostPattern": "fiji-*"}, {"hostPattern": "samoa-*"}),
    "description": ({"descriptionPattern": "nightly"}, {"descriptionPattern": "weekly"}),
    "path": ({"pathPattern": "/var/*"}, {"pathPattern": "/srv/*"}),
}


@pytest.mark.parametrize("outcomes", list(itertools.product([True, False], repeat=len(_CRITERIA))))
def test_criteria_are_anded(outcomes: tuple[bool, ...]) -> None:
    fields: dict[str, Any] = {}
    for (passing, failing), passes in zip(_CRITERIA.values(), outcomes, strict=True):
        fields.update(passing if passes else failing)
    snapshot = _snapshot(tags={"tag:env": "prod"})
    assert snapshot_matches(snapshot, _filter(**fields)) is all(outcomes)


def test_newest_compares_instants_not_strings() -> None:
    # As strings "…:05Z" sorts after "…:05.9Z" ('Z' > '.'), which is backwards.
    whole = _snapshot("whole", start_time="2026-11-27T11:02:05Z")
    later = _snapshot("later", start_time="2026-11-27T11:02:05.9Z")
    nanos = _snapshot("nanos", start_time="2026-11-27T11:02:05.900000001Z")
    assert max([whole.start_time, later.start_time]) == whole.start_time
    assert newest([whole, later]) == later
    assert newest([nanos, whole, later]) == nanos


def test_newest_handles_offsets() -> None:
    utc = _snapshot("utc", start_time="2026-01-01T00:30:00Z")
    auckland = _snapshot("akl", start_time="2026-01-01T12:00:00+13:00")
    assert newest([utc, auckland]) == utc


def test_newest_ranks_unparsable_times_below_parsable_ones() -> None:
    good = _snapshot("good", start_time="2000-01-01T00:00:00Z")
    bad = _snapshot("bad", start_time="zzzz")
    empty = _snapshot("empty", start_time="")
    assert newest([bad, good, empty]) == good
    assert newest([empty, bad]) == bad


def test_newest_breaks_ties_by_id_whatever_the_order() -> None:
    a = _snapshot("a", start_time="2026-01-01T00:00:00Z")
    b = _snapshot("b", start_time="2026-01-01T00:00:00.000Z")
    assert newest([a, b]) == b
    assert newest([b, a]) == b


def test_newest_of_nothing() -> None:
    assert newest([]) is None


_instants = st.integers(min_value=0, max_value=4_000_000_000)


@given(st.lists(st.tuples(_instants, st.integers(0, 999_999_999)), min_size=1, max_size=8))
def test_newest_is_the_latest_instant_in_any_order(times: list[tuple[int, int]]) -> None:
    snapshots = []
    for index, (seconds, nanos) in enumerate(times):
        stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        fraction = f".{nanos:09d}".rstrip("0").rstrip(".")
        snapshots.append(_snapshot(f"id{index:02d}", start_time=f"{stamp}{fraction}Z"))
    best = max(
        range(len(times)), key=lambda i: (times[i][0] * 1_000_000_000 + times[i][1], f"id{i:02d}")
    )
    assert newest(snapshots) == snapshots[best]
    assert newest(reversed(snapshots)) == snapshots[best]


def test_select_snapshot_filters_then_takes_the_newest() -> None:
    snapshots = [
        _snapshot("old-prod", start_time="2026-01-01T00:00:00Z", tags={"tag:env": "prod"}),
        _snapshot("new-dev", start_time="2026-01-03T00:00:00Z", tags={"tag:env": "dev"}),
        _snapshot("new-prod", start_time="2026-01-02T00:00:00Z", tags={"tag:env": "prod"}),
    ]
    chosen = select_snapshot(snapshots, _filter(tags={"env": "prod"}))
    assert chosen is not None
    assert chosen.id == "new-prod"
    unfiltered = select_snapshot(snapshots, None)
    assert unfiltered is not None
    assert unfiltered.id == "new-dev"
    assert select_snapshot(snapshots, _filter(hostPattern="nowhere")) is None
    assert select_snapshot([], None) is None


def test_find_snapshot_by_id() -> None:
    snapshots = [_snapshot("a"), _snapshot("b", host="elsewhere")]
    found = find_snapshot(snapshots, "b")
    assert found is not None
    assert found.source.host == "elsewhere"
    assert find_snapshot(snapshots, "c") is None
