"""The native masking engine's SQL (pgro.core.masks), as text: one expression per kind, which
kinds preserve NULL, which are deterministic, and which do not fit a column's type. The same
expressions are evaluated on a real PostgreSQL in tests/integration/test_redaction.py."""

from __future__ import annotations

import pytest
from psycopg import sql

from pgro.core.masks import KEY_SETTING, ColumnInfo, MaskUnfit, assignment, mask_expression
from pgro.core.redaction_manifest import COLUMN_KINDS, ColumnMask

TEXT = ColumnInfo("text", "S", "text", nullable=True, has_default=False)
VARCHAR10 = ColumnInfo("varchar", "S", "character varying(10)", True, False, max_length=10)
INT4 = ColumnInfo("int4", "N", "integer", nullable=True, has_default=False)
INT2 = ColumnInfo("int2", "N", "smallint", nullable=True, has_default=False)
NUMERIC = ColumnInfo("numeric", "N", "numeric", nullable=True, has_default=False)
DATE = ColumnInfo("date", "D", "date", nullable=True, has_default=False)
TIMESTAMPTZ = ColumnInfo("timestamptz", "D", "timestamp with time zone", True, False)
TIME = ColumnInfo("time", "D", "time without time zone", True, False)
BYTEA = ColumnInfo("bytea", "U", "bytea", nullable=True, has_default=False)
JSONB = ColumnInfo("jsonb", "U", "jsonb", nullable=True, has_default=False)
ARRAY = ColumnInfo("_text", "A", "text[]", nullable=True, has_default=False)
UUID = ColumnInfo("uuid", "U", "uuid", nullable=True, has_default=False)
BOOL = ColumnInfo("bool", "B", "boolean", nullable=True, has_default=False)

# A type each kind fits.
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


def text(composable: sql.Composable) -> str:
    """The SQL, spaces collapsed (psycopg writes a negative literal with a leading space)."""
    return " ".join(composable.as_string(None).split())


def mask(kind: str, column: str = "c", **kw: object) -> ColumnMask:
    return ColumnMask("public", "t", column, kind, **kw)  # type: ignore[arg-type]


def test_every_known_kind_has_a_fitting_type() -> None:
    assert set(FITS) == COLUMN_KINDS


@pytest.mark.parametrize("kind", sorted(COLUMN_KINDS))
def test_null_preservation(kind: str) -> None:
    rendered = text(mask_expression(mask(kind), FITS[kind]))
    preserving = rendered.startswith('CASE WHEN "c" IS NULL THEN NULL ELSE')
    assert preserving == (kind not in NOT_NULL_PRESERVING), rendered


@pytest.mark.parametrize(
    "kind", sorted(COLUMN_KINDS - {"phone", "zero", "empty", "nil", "default"})
)
def test_random_kinds_use_random_unless_deterministic(kind: str) -> None:
    rendered = text(mask_expression(mask(kind), FITS[kind]))
    assert "random()" in rendered and KEY_SETTING not in rendered
    keyed = text(mask_expression(mask(kind, deterministic=True), FITS[kind]))
    assert "random()" not in keyed
    assert f"current_setting('{KEY_SETTING}')" in keyed and "sha256" in keyed


@pytest.mark.parametrize("kind", ["phone", "zero", "empty", "nil", "default"])
def test_value_only_kinds_are_deterministic_already(kind: str) -> None:
    for deterministic in (False, True):
        rendered = text(mask_expression(mask(kind, deterministic=deterministic), FITS[kind]))
        assert "random()" not in rendered and "sha256" not in rendered


def test_fragments_follow_the_reference() -> None:
    assert text(mask_expression(mask("phone"), TEXT)) == (
        'CASE WHEN "c" IS NULL THEN NULL ELSE CASE WHEN length("c") <= 4 THEN \'****\' '
        'ELSE left("c", 2) || \'****\' || right("c", 2) END END'
    )
    name = text(mask_expression(mask("name"), TEXT))
    assert "LIKE '% %'" in name and "|| ' ' ||" in name
    integer = text(mask_expression(mask("integer", range=(50.0, 100.0)), INT4))
    assert "floor(random() * 51) + 50" in integer and "::int8" in integer
    assert "2147483647" not in integer
    default_int = text(mask_expression(mask("integer"), INT4))
    assert "4294967296) + -2147483648" in default_int
    smallint = text(mask_expression(mask("integer"), INT2))
    assert "65536) + -32768" in smallint
    flt = text(mask_expression(mask("float", range=(1.001, 1.03)), NUMERIC))
    assert "::numeric" in flt and "+ 1.001" in flt
    money = text(mask_expression(mask("money"), NUMERIC))
    assert money.count("round(") == 1 and "10000" in money and ", 2)" in money
    assert "'@example.invalid'" in text(mask_expression(mask("email"), TEXT))
    assert "'https://example.invalid/'" in text(mask_expression(mask("url"), TEXT))
    assert "date_trunc('day', \"c\")" in text(mask_expression(mask("datetime"), TIMESTAMPTZ))
    assert "to_char(" in text(mask_expression(mask("date"), TEXT))


def test_type_dispatched_kinds() -> None:
    assert text(mask_expression(mask("zero"), INT4)) == "0"
    assert text(mask_expression(mask("zero"), TEXT)) == "repeat('0', length(\"c\"))"
    assert (
        text(mask_expression(mask("zero"), BYTEA)) == "decode(repeat('00', length(\"c\")), 'hex')"
    )
    assert text(mask_expression(mask("empty"), INT4)) == "0"
    assert text(mask_expression(mask("empty"), TEXT)) == "''"
    assert text(mask_expression(mask("empty"), BYTEA)) == "''::bytea"
    assert text(mask_expression(mask("empty"), JSONB)) == "'{}'::jsonb"
    assert text(mask_expression(mask("empty"), ARRAY)) == "'{}'"
    assert text(mask_expression(mask("nil"), INT4)) == "NULL"
    with_default = ColumnInfo("int4", "N", "integer", nullable=False, has_default=True)
    assert text(mask_expression(mask("default"), with_default)) == "DEFAULT"


@pytest.mark.parametrize(
    ("kind", "info", "why"),
    [
        ("email", INT4, "email needs a text column"),
        ("phone", DATE, "phone needs a text column"),
        ("integer", DATE, "needs a number or text column"),
        ("integer", BOOL, "needs a number or text column"),
        ("date", TIME, "date needs a date, timestamp or text column"),
        ("datetime", UUID, "datetime needs a timestamp"),
        ("zero", JSONB, "zero needs a text, number or bytea column"),
        ("empty", UUID, "empty needs"),
        ("nil", ColumnInfo("text", "S", "text", nullable=False, has_default=False), "NOT NULL"),
        ("default", TEXT, "has no default"),
        ("email", ColumnInfo("text", "S", "text", True, True, generated=True), "generated"),
        (
            "integer",
            ColumnInfo("int4", "N", "integer", False, True, identity_always=True),
            "GENERATED ALWAYS",
        ),
    ],
)
def test_kinds_that_do_not_fit_name_kind_column_and_type(
    kind: str, info: ColumnInfo, why: str
) -> None:
    with pytest.raises(MaskUnfit) as caught:
        mask_expression(mask(kind), info)
    message = str(caught.value)
    assert why in message
    assert f"kind {kind!r}" in message and "public.t.c" in message
    assert info.display_type in message


def test_identity_always_takes_default() -> None:
    info = ColumnInfo("int4", "N", "integer", False, True, identity_always=True)
    assert text(mask_expression(mask("default"), info)) == "DEFAULT"


def test_unknown_kind_is_unfit() -> None:
    with pytest.raises(MaskUnfit, match="unknown mask kind 'shuffle'"):
        mask_expression(mask("shuffle"), TEXT)


def test_varchar_results_are_cut_to_length() -> None:
    rendered = text(mask_expression(mask("email"), VARCHAR10))
    assert rendered.startswith("left((CASE WHEN") and rendered.endswith("::text, 10)")
    assert text(mask_expression(mask("nil"), VARCHAR10)) == "NULL"


def test_hostile_column_names_are_quoted_identifiers() -> None:
    evil = 'c"; DROP TABLE users; --'
    rendered = text(assignment(mask("email", column=evil), TEXT))
    assert rendered.startswith('"c""; DROP TABLE users; --" = ')
    assert rendered.count('"c""; DROP TABLE users; --"') == 2  # SET target and the CASE


def test_deterministic_parts_are_independent_hashes() -> None:
    rendered = text(mask_expression(mask("name", deterministic=True), TEXT))
    assert "'/first/'" in rendered and "'/last/'" in rendered
