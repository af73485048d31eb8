"""The redaction manifest (pgro.core.redaction_manifest): the reference's format, hostile
input, and the `version` / `versionQuery` / `{version}` rules with the URLs they give."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgro.api.replica import Redaction
from pgro.core.redaction_manifest import (
    COLUMN_KINDS,
    MAX_IDENTIFIER_BYTES,
    ColumnMask,
    ManifestInvalid,
    RedactionSpecInvalid,
    TableMask,
    base_version,
    check_spec,
    check_version,
    display_url,
    manifest_urls,
    parse_manifest,
    parse_range,
)


def doc(sources: dict[str, Any]) -> str:
    return json.dumps({"sources": sources})


def source(name: Any = "users", schema: Any = "public", **columns: Any) -> dict[str, Any]:
    return {"schema": schema, "name": name, "columns": columns}


def masked(mask: Any) -> dict[str, Any]:
    return {"config": {"meta": {"masking": mask}}}


def test_short_and_long_forms() -> None:
    m = parse_manifest(
        doc(
            {
                "source.x.users": source(
                    email=masked("email"),
                    heart_rate=masked({"kind": "integer", "range": "50-100"}),
                    sg=masked({"kind": "float", "range": "1.001-1.03"}),
                    key=masked({"kind": "email", "deterministic": True}),
                    plain={"description": "not masked"},
                )
            }
        )
    )
    assert m.columns == (
        ColumnMask("public", "users", "email", "email"),
        ColumnMask("public", "users", "heart_rate", "integer", (50.0, 100.0)),
        ColumnMask("public", "users", "sg", "float", (1.001, 1.03)),
        ColumnMask("public", "users", "key", "email", None, True),
    )
    assert m.tables == () and m.rejected == () and m.skipped == ()


def test_meta_fallback_paths_for_columns_and_tables() -> None:
    m = parse_manifest(
        doc(
            {
                "a": {
                    "schema": "public",
                    "name": "sync_lookup",
                    "meta": {"masking": "truncate"},
                    "columns": {"c": {"meta": {"masking": "name"}}},
                },
                "b": {"schema": "s", "name": "t", "config": {"meta": {"masking": "truncate"}}},
            }
        )
    )
    assert m.tables == (
        TableMask("public", "sync_lookup", "truncate"),
        TableMask("s", "t", "truncate"),
    )
    assert m.columns == (ColumnMask("public", "sync_lookup", "c", "name"),)


def test_config_meta_wins_over_meta() -> None:
    node = {"config": {"meta": {"masking": "email"}}, "meta": {"masking": "name"}}
    m = parse_manifest(doc({"x": source(c=node)}))
    assert m.columns[0].kind == "email"


def test_sources_without_schema_or_name_are_skipped_with_a_warning() -> None:
    m = parse_manifest(
        doc(
            {
                "a": {"name": "t", "columns": {"c": masked("email")}},
                "b": {"schema": "s", "columns": {"c": masked("email")}},
                "c": "not an object",
            }
        )
    )
    assert m.columns == () and m.rejected == ()
    assert len(m.skipped) == 3
    assert "`schema`" in m.skipped[0] and "`name`" in m.skipped[1]


def test_unknown_kinds_are_kept_as_rejections_naming_table_column_and_kind() -> None:
    m = parse_manifest(
        doc(
            {
                "x": {
                    **source(c=masked("brand_new"), d=masked({"range": "1-2"})),
                    "config": {"meta": {"masking": "shuffle"}},
                }
            }
        )
    )
    assert m.columns == () and m.tables == ()
    messages = [r.message() for r in m.rejected]
    assert messages[0].startswith("table public.users (kind 'shuffle')")
    assert "public.users.c (kind 'brand_new'): unknown mask kind" in messages[1]
    assert "public.users.d: the mask has no kind" in messages[2]
    assert (m.columns_rejected, m.tables_rejected) == (2, 1)


def test_a_column_kind_on_a_table_and_truncate_on_a_column_are_rejected() -> None:
    m = parse_manifest(doc({"x": {**source(c=masked("truncate")), "meta": {"masking": "email"}}}))
    assert [r.column for r in m.rejected] == [False, True]
    assert "only 'truncate'" in m.rejected[0].reason
    assert "table mask kind" in m.rejected[1].reason


@pytest.mark.parametrize(
    ("column", "problem"),
    [
        ("x" * (MAX_IDENTIFIER_BYTES + 1), "longer than 63 bytes"),
        ("é" * 32, "longer than 63 bytes"),  # 64 bytes in UTF-8
        ("", "is empty"),
        ("a\x00b", "NUL"),
    ],
)
def test_identifiers_are_validated(column: str, problem: str) -> None:
    m = parse_manifest(doc({"x": source(**{column: masked("email")})}))
    assert m.columns == ()
    assert problem in m.rejected[0].reason
    # What a message shows of a hostile name is printable and short.
    assert m.rejected[0].message().isprintable()
    assert len(m.rejected[0].target) <= 140


def test_a_bad_schema_name_rejects_the_table_and_its_columns() -> None:
    m = parse_manifest(
        doc({"x": {**source(schema="s" * 64, c=masked("email")), "meta": {"masking": "truncate"}}})
    )
    assert m.tables == () and m.columns == ()
    assert len(m.rejected) == 2 and all("schema name" in r.reason for r in m.rejected)
    non_string = parse_manifest(doc({"x": source(name=5, c=masked("email"))}))
    assert "table name is not a string" in non_string.rejected[0].reason


@pytest.mark.parametrize("schema", ["pg_catalog", "pg_toast", "information_schema"])
def test_system_schemas_are_refused(schema: str) -> None:
    m = parse_manifest(
        doc(
            {
                "x": {
                    **source("pg_authid", schema, rolpassword=masked("nil")),
                    "meta": {"masking": "truncate"},
                }
            }
        )
    )
    assert m.columns == () and m.tables == ()
    assert [r.reason for r in m.rejected] == ["the schema name is a system schema"] * 2


def test_ranges() -> None:
    assert parse_range("20-50") == (20.0, 50.0)
    assert parse_range("1.001-1.03") == (1.001, 1.03)
    assert parse_range("-5-5") == (-5.0, 5.0)
    # Split at the last `-`, as the reference: a negative upper bound cannot be written.
    assert parse_range("-10--5") is None
    for bad in ("nope", "1-x", "1.2", "5-1", "nan-1", "1-inf", "", "-"):
        assert parse_range(bad) is None, bad


def test_a_bad_range_is_rejected_not_widened() -> None:
    m = parse_manifest(
        doc(
            {
                "x": source(
                    a=masked({"kind": "integer", "range": "lots"}),
                    b=masked({"kind": "integer", "range": 5}),
                )
            }
        )
    )
    assert m.columns == ()
    assert [r.kind for r in m.rejected] == ["integer", "integer"]
    # A range on a kind that takes none is ignored, as in the reference.
    m = parse_manifest(doc({"x": source(a=masked({"kind": "email", "range": "lots"}))}))
    assert m.columns == (ColumnMask("public", "users", "a", "email"),)


def test_deterministic_must_be_a_boolean() -> None:
    m = parse_manifest(doc({"x": source(a=masked({"kind": "email", "deterministic": "yes"}))}))
    assert m.columns == () and "deterministic" in m.rejected[0].reason


def test_a_column_masked_twice_keeps_the_first() -> None:
    m = parse_manifest(doc({"x": source(a=masked("email")), "y": source(a=masked("name"))}))
    assert m.columns == (ColumnMask("public", "users", "a", "email"),)
    assert "masked twice" in m.rejected[0].reason


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"sources": []}', "`sources` is not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a":' * 100 + b"1" + b"}" * 100, "nests deeper"),
    ],
)
def test_documents_that_are_not_manifests_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(data)


def test_size_and_count_caps() -> None:
    with pytest.raises(ManifestInvalid, match="larger than"):
        parse_manifest(b" " * (32 * 1024 * 1024 + 1))
    many = {
        f"s{i}": source(name=f"t{i}", **{f"c{j}": masked("email") for j in range(100)})
        for i in range(1001)
    }
    with pytest.raises(ManifestInvalid, match="more than 100000 masks"):
        parse_manifest(doc(many))


def test_a_json_error_quotes_no_document_text() -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest('{"sources": {"x": "alice@example.com" oops}}')
    assert "alice" not in str(caught.value)


def test_no_sources_is_an_empty_manifest() -> None:
    m = parse_manifest("{}")
    assert (m.columns, m.tables, m.rejected) == ((), (), ())


# --- versions and URLs


def test_base_version() -> None:
    assert base_version("2.41.7") == "2.41.0"
    assert base_version("2.41.0") is None
    assert base_version("2.41") is None
    assert base_version("2.x.7") is None
    assert base_version("not-a-version") is None


def spec(
    url: str, version: str | None = None, query: str | None = None, fallback: bool = False
) -> Redaction:
    return Redaction(
        manifest_url=url, version=version, version_query=query, version_fallback_to_base=fallback
    )


@pytest.mark.parametrize(
    "ok",
    [
        spec("https://x/m.json"),
        spec("https://x/v{version}.json", version="1.0.0"),
        spec("http://127.0.0.1:8099/v{version}/manifest.json", query="SELECT 1"),
    ],
)
def test_valid_specs(ok: Redaction) -> None:
    check_spec(ok)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (spec("https://x/v{version}.json"), "neither"),
        (spec("https://x/m.json", version="1.0.0"), "no {version} placeholder"),
        (spec("https://x/m.json", query="SELECT 1"), "no {version} placeholder"),
        (spec("https://x/v{version}.json", "1.0.0", "SELECT 1"), "mutually exclusive"),
        (spec("file:///etc/passwd"), "http:// or https://"),
        (spec("ftp://x/m.json"), "http:// or https://"),
        (spec("https://{version}.example.com/m.json", version="1"), "in its host"),
    ],
)
def test_invalid_specs(bad: Redaction, message: str) -> None:
    with pytest.raises(RedactionSpecInvalid, match=message):
        check_spec(bad)


def test_versions_must_fit_a_url_path_and_bad_ones_are_not_quoted() -> None:
    assert check_version("2.41.7", "versionQuery") == "2.41.7"
    assert check_version("1.0.0-rc.1+build5", "versionQuery") == "1.0.0-rc.1+build5"
    for bad in ("../../admin", "1.0.0?x=1", "a b", "", "-1", "x" * 65, "1.0/evil", "Alice Apple"):
        with pytest.raises(RedactionSpecInvalid) as caught:
            check_version(bad, "versionQuery")
        assert bad not in str(caught.value) or bad == ""


def test_manifest_urls_with_and_without_fallback() -> None:
    url = "https://h/v{version}/manifest.json"
    assert manifest_urls(spec(url, "2.41.7"), "2.41.7") == ["https://h/v2.41.7/manifest.json"]
    assert manifest_urls(spec(url, "2.41.7", fallback=True), "2.41.7") == [
        "https://h/v2.41.7/manifest.json",
        "https://h/v2.41.0/manifest.json",
    ]
    # No base to fall back to: a .0 patch, or not MAJOR.MINOR.PATCH.
    assert len(manifest_urls(spec(url, "2.41.0", fallback=True), "2.41.0")) == 1
    assert len(manifest_urls(spec(url, "2.41", fallback=True), "2.41")) == 1
    assert manifest_urls(spec("https://h/m.json"), None) == ["https://h/m.json"]


def test_display_url_hides_credentials_and_tokens() -> None:
    shown = display_url("https://user:hunter2@h.example:8443/v1/m.json?X-Amz-Signature=abc#f")
    assert shown == "https://h.example:8443/v1/m.json?…"
    assert "hunter2" not in shown and "abc" not in shown


# --- any document: a Manifest or ManifestInvalid, nothing else

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=70), children, max_size=4)
    ),
    max_leaves=30,
)
_mask = st.one_of(
    st.sampled_from(sorted(COLUMN_KINDS | {"truncate", "shuffle"})),
    st.fixed_dictionaries(
        {"kind": st.text(max_size=10) | st.sampled_from(sorted(COLUMN_KINDS))},
        optional={"range": _json, "deterministic": _json},
    ),
    _json,
)
_source = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.text(max_size=70) | _json,
        "name": st.text(max_size=70) | _json,
        "meta": st.fixed_dictionaries({"masking": _mask}) | _json,
        "columns": st.dictionaries(
            st.text(max_size=70),
            st.fixed_dictionaries({"meta": st.fixed_dictionaries({"masking": _mask})}) | _json,
            max_size=5,
        )
        | _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=20), _source, max_size=5))
def test_any_document_parses_or_is_refused_cleanly(sources: dict[str, Any]) -> None:
    try:
        m = parse_manifest(json.dumps({"sources": sources}))
    except ManifestInvalid:
        return
    for c in m.columns:
        assert c.kind in COLUMN_KINDS
        for name in (c.schema, c.table, c.column):
            assert 0 < len(name.encode()) <= MAX_IDENTIFIER_BYTES and "\x00" not in name
        assert c.range is None or c.range[0] <= c.range[1]
    assert all(t.kind == "truncate" for t in m.tables)
    for r in m.rejected:
        assert r.message().isprintable()
