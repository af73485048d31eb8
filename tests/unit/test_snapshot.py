from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgro.core.snapshot import (
    Snapshot,
    SnapshotListParseError,
    SnapshotSource,
    parse_snapshot_list,
    start_time_ns,
)

# One entry exactly as kopia 0.22.3 prints it.
KOPIA_0_22_3 = (
    '{"id":"c6e9863aea1eb231ea6b4ba001936a97","source":{"host":"db1","userName":"postgres",'
    '"path":"/var/lib/postgresql"},"description":"nightly","startTime":'
    '"2026-11-27T11:02:44.458139381Z","endTime":"2026-11-27T11:02:44.460895172Z","stats":'
    '{"totalSize":3,"excludedTotalSize":0,"fileCount":1,"cachedFiles":0,"nonCachedFiles":1,'
    '"dirCount":4,"excludedFileCount":0,"excludedDirCount":0,"ignoredErrorCount":0,'
    '"errorCount":0},"rootEntry":{"name":"data","type":"d","mode":"0755","mtime":'
    '"2026-11-27T11:02:43.579369976Z","obj":"kd74f1323dce6e726ed7fbd8c27bed0c3","summ":'
    '{"size":3,"files":1,"symlinks":0,"dirs":4,"maxTime":"2026-11-27T11:02:43.583369975Z",'
    '"numFailed":0}},"tags":{"tag:env":"prod"},"retentionReason":["latest-1"]}'
)


def test_real_kopia_output() -> None:
    (snapshot,) = parse_snapshot_list(f"[{KOPIA_0_22_3}]")
    assert snapshot == Snapshot(
        id="c6e9863aea1eb231ea6b4ba001936a97",
        description="nightly",
        source=SnapshotSource(host="db1", user_name="postgres", path="/var/lib/postgresql"),
        tags={"tag:env": "prod"},
        start_time="2026-11-27T11:02:44.458139381Z",
        size_bytes=3,
    )


def test_bytes_and_decoded_lists_are_accepted() -> None:
    from_bytes = parse_snapshot_list(f"[{KOPIA_0_22_3}]".encode())
    from_list = parse_snapshot_list([json.loads(KOPIA_0_22_3)])
    assert from_bytes == from_list
    assert from_bytes[0].id == "c6e9863aea1eb231ea6b4ba001936a97"


def test_empty_list() -> None:
    assert parse_snapshot_list("[]") == []
    assert parse_snapshot_list(b"  [ ]\n") == []


def test_only_id_is_required() -> None:
    (snapshot,) = parse_snapshot_list('[{"id": "k1"}]')
    assert snapshot.description == ""
    assert snapshot.source == SnapshotSource(host="", user_name="", path="")
    assert dict(snapshot.tags) == {}
    assert snapshot.start_time == ""
    assert snapshot.size_bytes == 0


@pytest.mark.parametrize(
    ("entry", "size"),
    [
        ({"stats": {"totalSize": 42}, "rootEntry": {"summ": {"size": 7}}}, 42),
        ({"rootEntry": {"summ": {"size": 7}}}, 7),
        ({"stats": {}, "rootEntry": {"summ": {"size": 7}}}, 7),
        ({"stats": {"totalSize": "42"}, "rootEntry": {"summ": {"size": 7}}}, 7),
        ({"stats": {"totalSize": None}}, 0),
        ({"stats": {"totalSize": -1}}, 0),
        ({"stats": {"totalSize": True}}, 0),
        ({"stats": "nope", "rootEntry": {"summ": "nope"}}, 0),
        ({"rootEntry": {"name": "data"}}, 0),
        ({}, 0),
        ({"summary": {"size": 99}}, 0),
    ],
)
def test_size_falls_back_from_stats_to_root_summary_to_zero(
    entry: dict[str, Any], size: int
) -> None:
    (snapshot,) = parse_snapshot_list([{"id": "k", **entry}])
    assert snapshot.size_bytes == size


def test_backslash_paths_are_preserved() -> None:
    payload = json.dumps(
        [{"id": "w", "source": {"host": "win", "userName": "SYSTEM", "path": "D:\\Full\\pg"}}]
    )
    (snapshot,) = parse_snapshot_list(payload)
    assert snapshot.source.path == "D:\\Full\\pg"
    assert snapshot.source.user_name == "SYSTEM"


def test_order_is_kopias() -> None:
    snapshots = parse_snapshot_list([{"id": "b"}, {"id": "a"}, {"id": "c"}])
    assert [s.id for s in snapshots] == ["b", "a", "c"]


def test_tags_are_read_only_strings() -> None:
    (snapshot,) = parse_snapshot_list([{"id": "k", "tags": {"tag:n": 5}}])
    assert snapshot.tags == {"tag:n": "5"}
    with pytest.raises(TypeError):
        snapshot.tags["x"] = "y"  # type: ignore[index]


def test_snapshots_are_hashable_values() -> None:
    first, second = parse_snapshot_list([json.loads(KOPIA_0_22_3)] * 2)
    assert first == second
    assert len({first, second}) == 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("", "not valid JSON"),
        ("not json", "not valid JSON"),
        ("[{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("{}", "not a JSON array but dict"),
        ("null", "not a JSON array but NoneType"),
        ('"[]"', "not a JSON array but str"),
        ("[1]", "entry 0 is not an object"),
        ('[{"id": "a"}, {"description": "no id"}]', "entry 1 has no string 'id'"),
        ('[{"id": 5}]', "entry 0 has no string 'id'"),
        ('[{"id": ""}]', "entry 0 has no string 'id'"),
    ],
)
def test_garbage_is_a_parse_error_that_says_what_was_wrong(
    payload: str | bytes, fragment: str
) -> None:
    with pytest.raises(SnapshotListParseError) as caught:
        parse_snapshot_list(payload)
    assert fragment in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_error_quotes_at_most_about_200_characters_of_the_input() -> None:
    payload = "x" * 10_000
    with pytest.raises(SnapshotListParseError) as caught:
        parse_snapshot_list(payload)
    message = str(caught.value)
    assert "x" * 200 in message
    assert "x" * 201 not in message
    assert "10000 characters" in message
    assert len(message) < 400


def test_error_names_the_bad_entry() -> None:
    with pytest.raises(SnapshotListParseError, match="description"):
        parse_snapshot_list([{"id": "ok"}, {"description": "lost its id"}])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:01Z", 1_000_000_000),
        ("1970-01-01T00:00:00.000000001Z", 1),
        ("1970-01-01T00:00:00.5Z", 500_000_000),
        ("1970-01-01T00:00:00.1234567891Z", 123_456_789),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1969-12-31T23:59:59Z", -1_000_000_000),
        ("2026-11-27T11:02:44.458139381Z", 1795777364_458139381),
    ],
)
def test_start_time_ns(text: str, expected: int) -> None:
    assert start_time_ns(text) == expected


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-11-27", "2026-11-27T11:02:44", "2026-13-27T11:02:44Z"]
)
def test_start_time_ns_unparsable(text: str) -> None:
    assert start_time_ns(text) is None


_text = st.text(max_size=20)


@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": st.text(min_size=1, max_size=10)},
            optional={
                "description": _text,
                "source": st.fixed_dictionaries({"host": _text, "userName": _text, "path": _text}),
                "tags": st.dictionaries(_text, _text, max_size=3),
                "startTime": _text,
                "stats": st.fixed_dictionaries(
                    {"totalSize": st.integers(min_value=0, max_value=2**62)}
                ),
            },
        ),
        max_size=5,
    )
)
def test_any_well_formed_list_parses_field_for_field(entries: list[dict[str, Any]]) -> None:
    snapshots = parse_snapshot_list(json.dumps(entries))
    assert len(snapshots) == len(entries)
    for entry, snapshot in zip(entries, snapshots, strict=True):
        assert snapshot.id == entry["id"]
        assert snapshot.description == entry.get("description", "")
        assert snapshot.source.path == entry.get("source", {}).get("path", "")
        assert dict(snapshot.tags) == entry.get("tags", {})
        assert snapshot.start_time == entry.get("startTime", "")
        assert snapshot.size_bytes == entry.get("stats", {}).get("totalSize", 0)
