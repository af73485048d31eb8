"""The opt-in anon engine's SQL (pgro.core.masks with engine="anon"), as text: the
reference's anon fragment for the kinds it took from postgresql_anonymizer, the native
expression for the others and for deterministic masks, NULL kept and varchar lengths cut as
natively, the same MaskUnfit for a kind that does not fit, and the annotation's values. The
same expressions run against a fake `anon` in tests/integration/test_redaction_anon.py."""

from __future__ import annotations

import pytest
from psycopg import sql

from pgro.api.names import ANNOTATION_REDACTION_ENGINE
from pgro.core.masks import (
    ANON_KINDS,
    ENGINES,
    ColumnInfo,
    MaskUnfit,
    UnknownEngine,
    assignment,
    mask_expression,
    parse_engine,
    uses_anon,
)
from pgro.core.redaction_manifest import COLUMN_KINDS, ColumnMask

TEXT = ColumnInfo("text", "S", "text", nullable=True, has_default=False)
VARCHAR10 = ColumnInfo("varchar", "S", "character varying(10)", True, False, max_length=10)
INT4 = ColumnInfo("int4", "N", "integer", nullable=True, has_default=False)
NUMERIC = ColumnInfo("numeric", "N", "numeric", nullable=True, has_default=False)
DATE = ColumnInfo("date", "D", "date", nullable=True, has_default=False)
TIMESTAMP = ColumnInfo("timestamp", "D", "timestamp without time zone", True, False)
TIMESTAMPTZ = ColumnInfo("timestamptz", "D", "timestamp with time zone", True, False)
TIME = ColumnInfo("time", "D", "time without time zone", True, False)
BOOL = ColumnInfo("bool", "B", "boolean", nullable=True, has_default=False)

FITS = {
    "date": DATE,
    "datetime": TIMESTAMPTZ,
    "text": TEXT,
    "string": TEXT,
    "email": TEXT,
    "name": TEXT,
    "phone": TEXT,
    "place": TEXT,
    "url": TEXT,
    "integer": INT4,
    "float": NUMERIC,
    "money": NUMERIC,
    "zero": TEXT,
    "empty": TEXT,
    "nil": TEXT,
    "default": ColumnInfo("text", "S", "text", nullable=True, has_default=True),
}
NOT_NULL_PRESERVING = {"zero", "empty", "nil", "default"}
PRESERVE = 'CASE WHEN "c" IS NULL THEN NULL ELSE '

# The reference's fragments (features §2.6), inside the null-preserving CASE.
REFERENCE = {
    "text": 'anon.lorem_ipsum(characters := length("c"))',
    "string": 'anon.random_string(length("c"))',
    "email": "anon.fake_email()",
    "name": "CASE WHEN \"c\" LIKE '% %' THEN anon.fake_name() ELSE anon.fake_first_name() END",
    "phone": "CASE WHEN length(\"c\") <= 4 THEN '****' "
    "ELSE anon.partial(\"c\"::text, 2, '****', 2) END",
    "place": "anon.fake_city()",
    "url": "'https://example.invalid/' || anon.random_string(8)",
}


def text(composable: sql.Composable) -> str:
    return " ".join(composable.as_string(None).split())


def mask(kind: str, column: str = "c", **kw: object) -> ColumnMask:
    return ColumnMask("public", "t", column, kind, **kw)  # type: ignore[arg-type]


def test_the_anon_kinds_are_the_references() -> None:
    assert frozenset({"date", *REFERENCE}) == ANON_KINDS
    assert ANON_KINDS <= COLUMN_KINDS
    assert set(FITS) == COLUMN_KINDS


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_string_kinds_call_the_references_anon_function(kind: str) -> None:
    assert text(mask_expression(mask(kind), TEXT, "anon")) == f"{PRESERVE}{REFERENCE[kind]} END"


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (DATE, "(anon.random_date())::date"),
        (TIMESTAMP, "(anon.random_date())::timestamp"),
        (TIMESTAMPTZ, "(anon.random_date())::timestamptz"),
        (TEXT, "to_char(anon.random_date(), 'YYYY-MM-DD')"),
    ],
)
def test_date_takes_anon_random_date_as_the_columns_type(info: ColumnInfo, expected: str) -> None:
    assert text(mask_expression(mask("date"), info, "anon")) == f"{PRESERVE}{expected} END"


@pytest.mark.parametrize("kind", sorted(COLUMN_KINDS - ANON_KINDS))
def test_other_kinds_keep_the_native_expression(kind: str) -> None:
    native = text(mask_expression(mask(kind), FITS[kind]))
    anon = text(mask_expression(mask(kind), FITS[kind], "anon"))
    assert anon == native and "anon." not in anon


@pytest.mark.parametrize("kind", sorted(ANON_KINDS))
def test_anon_kinds_differ_from_native_and_name_no_native_list(kind: str) -> None:
    native = text(mask_expression(mask(kind), FITS[kind]))
    anon = text(mask_expression(mask(kind), FITS[kind], "anon"))
    assert anon != native and "anon." in anon
    # The fakes come from anon, not from pgro's own lists or hex.
    assert (
        "ARRAY[" not in anon
        and "to_hex" not in anon
        and "example.invalid'" not in (anon.replace("'https://example.invalid/'", ""))
    )


@pytest.mark.parametrize("kind", sorted(COLUMN_KINDS))
def test_null_preservation_is_the_natives(kind: str) -> None:
    rendered = text(mask_expression(mask(kind), FITS[kind], "anon"))
    assert rendered.startswith(PRESERVE) == (kind not in NOT_NULL_PRESERVING), rendered


@pytest.mark.parametrize("kind", sorted(ANON_KINDS))
def test_deterministic_masks_keep_the_native_keyed_expression(kind: str) -> None:
    keyed = mask(kind, deterministic=True)
    assert not uses_anon(keyed, "anon") and uses_anon(mask(kind), "anon")
    assert text(mask_expression(keyed, FITS[kind], "anon")) == text(
        mask_expression(keyed, FITS[kind])
    )


def test_the_native_engine_never_calls_anon() -> None:
    for kind in COLUMN_KINDS:
        assert not uses_anon(mask(kind), "native")
        assert "anon." not in text(mask_expression(mask(kind), FITS[kind]))


def test_varchar_results_are_cut_to_length() -> None:
    rendered = text(mask_expression(mask("email"), VARCHAR10, "anon"))
    assert rendered == f"left(({PRESERVE}anon.fake_email() END)::text, 10)"
    date_text = text(mask_expression(mask("date"), VARCHAR10, "anon"))
    assert date_text.startswith("left((") and date_text.endswith("::text, 10)")


@pytest.mark.parametrize(
    ("kind", "info", "why"),
    [
        ("email", INT4, "email needs a text column"),
        ("phone", DATE, "phone needs a text column"),
        ("name", BOOL, "name needs a text column"),
        ("date", TIME, "date needs a date, timestamp or text column"),
        ("date", INT4, "date needs a date, timestamp or text column"),
        ("email", ColumnInfo("text", "S", "text", True, True, generated=True), "generated"),
        (
            "string",
            ColumnInfo("text", "S", "text", False, True, identity_always=True),
            "GENERATED ALWAYS",
        ),
    ],
)
def test_unfit_kinds_are_refused_alike(kind: str, info: ColumnInfo, why: str) -> None:
    messages = []
    for engine in ENGINES:
        with pytest.raises(MaskUnfit) as caught:
            mask_expression(mask(kind), info, engine)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert why in messages[0] and info.display_type in messages[0]


def test_hostile_column_names_stay_quoted() -> None:
    evil = 'c"; DROP TABLE users; --'
    rendered = text(assignment(mask("phone", column=evil), TEXT, "anon"))
    assert rendered.startswith('"c""; DROP TABLE users; --" = ')
    assert rendered.count('"c""; DROP TABLE users; --"') == 4  # SET, the CASE, length, partial


def test_engine_annotation_values() -> None:
    assert ENGINES == ("native", "anon")
    assert parse_engine(None) == "native"
    assert parse_engine("native") == "native"
    assert parse_engine("anon") == "anon"
    for bad in ("Anon", "anon ", "", "postgresql_anonymizer", "x\x00y"):
        with pytest.raises(UnknownEngine) as caught:
            parse_engine(bad)
        message = str(caught.value)
        assert ANNOTATION_REDACTION_ENGINE in message
        assert "accepted values: native, anon" in message
        assert "\x00" not in message
