"""pgro's native masking engine: each mask kind of a redaction manifest (features §2.6) as a
plain SQL expression for `UPDATE t SET c = <expression>`, built from psycopg.sql objects and
PostgreSQL built-ins only (no `anon` extension, no function of the restored database).

What a kind makes, by the column's type (its base type, through domains); `r` is a random
number in [0, 1):

- date: a random day from 1900-01-01 to today; timestamp(tz): plus a random time; text:
  `YYYY-MM-DD`.
- datetime: `date_trunc('day', c)` plus a random time (timestamp(tz), date); text: the
  value's first 10 characters (its day) and a random `HH24:MI:SS`.
- text: lorem ipsum of the value's length. string: random hex characters, the value's length.
- email: `u<16 hex>@example.invalid`. url: `https://example.invalid/<8 hex>`.
- name: a first name, `First Last` when the value has a space. place: a city name.
- phone: the first and last 2 characters around `****` (only `****` for 4 or fewer).
- integer: `floor(r*(H-L+1))+L` (default the int4 range, int2's for int2); float:
  `r*(H-L)+L` as numeric (default 0-1); money: that rounded to 2 places (default 0-10000);
  on numbers, or on text as text.
- zero: numbers 0; text `repeat('0', length(c))`; bytea as many zero bytes.
- empty: numbers 0; text `''`; bytea empty; json(b) `{}`; arrays `{}`.
- nil: NULL (a NOT NULL column does not fit). default: `DEFAULT` (a column without a
  default or identity does not fit).
- The string kinds (text, string, email, name, phone, place, url) need a text column.

Every kind but `zero` (on numbers), `empty`, `nil` and `default` is null-preserving
(`CASE WHEN c IS NULL THEN NULL ELSE … END`), as in the reference, and yields a value for
every non-NULL input, so a NOT NULL column stays satisfied. Text results are cut to a
`varchar(n)`/`char(n)` column's length. A kind that does not fit its column's type, a
generated column, and anything but `default` on a `GENERATED ALWAYS` identity raise
MaskUnfit naming the kind, the column and its type.

Deterministic where the reference is: `phone`, `zero`, `empty`, `nil` and `default` depend
only on the value. The random kinds use `random()`; with `"deterministic": true` in the
manifest they derive their randomness from `sha256(key || kind tag || value)` instead, where
the key is the session setting `pgro.redaction_key` (set by the runner, one random key per
run unless it is given one), so equal values mask to equal values across every table of the
run and joins on masked keys still work.

The expressions call built-ins unqualified: the runner's session has `search_path =
pg_catalog` (pgro.postgres.session), so nothing the restored database defines is called.

The `anon` engine (opt-in, `engine="anon"`) is the same but for the kinds where the reference
called a `postgresql_anonymizer` function, which call it (schema-qualified, `anon.…`) instead:
date `anon.random_date()` (cast to the column's type, `YYYY-MM-DD` on text), text
`anon.lorem_ipsum(characters := length(c))`, string `anon.random_string(length(c))`, email
`anon.fake_email()`, name `anon.fake_name()` / `anon.fake_first_name()`, phone
`anon.partial(c, 2, '****', 2)` (still `****` for 4 characters or fewer), place
`anon.fake_city()`, url `'https://example.invalid/' || anon.random_string(8)`. They are
null-preserving and cut to a `varchar(n)` like the native ones, and a kind fits exactly the
types it fits natively. A `deterministic` mask keeps the native keyed expression under either
engine (anon's fakers are random), and so do the kinds the reference computed without anon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from psycopg import sql

from pgro.api.names import ANNOTATION_REDACTION_ENGINE
from pgro.core.redaction_manifest import ColumnMask, shown

KEY_SETTING: Final = "pgro.redaction_key"

# Which functions make the fake values: pgro's built-in expressions, or postgresql_anonymizer's.
Engine = Literal["native", "anon"]
ENGINES: Final[tuple[Engine, ...]] = get_args(Engine)
DEFAULT_ENGINE: Final[Engine] = "native"
# The kinds whose value the `anon` engine takes from an anon function.
ANON_KINDS: Final = frozenset({"date", "text", "string", "email", "name", "phone", "place", "url"})

INT4_RANGE: Final = (-(2**31), 2**31 - 1)
INT2_RANGE: Final = (-(2**15), 2**15 - 1)
FLOAT_RANGE: Final = (0.0, 1.0)
MONEY_RANGE: Final = (0.0, 10_000.0)

NUMBER_TYPES: Final = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8", "money"})
DATE_TYPES: Final = frozenset({"date", "timestamp", "timestamptz"})
JSON_TYPES: Final = frozenset({"json", "jsonb"})
STRING_CATEGORY: Final = "S"
ARRAY_CATEGORY: Final = "A"

STRING_KINDS: Final = frozenset({"text", "string", "email", "name", "phone", "place", "url"})

FIRST_NAMES: Final = (
    "Ari", "Bela", "Cato", "Dara", "Emrys", "Fenna", "Galen", "Hana", "Ilse", "Joss",
    "Kiri", "Lorne", "Mika", "Nell", "Oren", "Pia", "Quill", "Rhea", "Soren", "Tamsin",
    "Ula", "Vesna", "Wren", "Xavi", "Yara", "Zeno", "Anouk", "Bram", "Cleo", "Dov",
    "Elin", "Faro", "Greer", "Hollis", "Ines", "Jory", "Kaia", "Linus", "Maren", "Nico",
)  # fmt: skip
LAST_NAMES: Final = (
    "Abernethy", "Blackwood", "Calloway", "Dunmore", "Everly", "Fairbairn", "Galloway",
    "Hartigan", "Ingleby", "Jessop", "Kettering", "Lockhart", "Merriweather", "Northcott",
    "Oakhurst", "Pemberton", "Quenby", "Ravensworth", "Selwyn", "Thorncroft", "Underhill",
    "Vance", "Whitlock", "Yardley", "Ashdown", "Brackley", "Corrigan", "Delamere",
    "Esterby", "Fenwick", "Greystoke", "Halloran", "Ivesdale", "Jarrow", "Kinsale",
    "Larkspur", "Mowbray", "Netherby", "Ormsby", "Prideaux",
)  # fmt: skip
CITIES: Final = (
    "Ashford", "Brookhaven", "Caldermoor", "Dunwich", "Eastbridge", "Fairhaven", "Glenrock",
    "Highmere", "Ironvale", "Juniper Falls", "Kingsport", "Lakeside", "Millbrook",
    "Northwood", "Oakridge", "Pinecrest", "Queensbury", "Riverton", "Stonebridge",
    "Thornbury", "Upton", "Valemount", "Westfield", "Yarrowby", "Zephyr Bay",
)  # fmt: skip
LOREM: Final = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua "
)
EMAIL_DOMAIN: Final = "@example.invalid"
URL_PREFIX: Final = "https://example.invalid/"


class MaskUnfit(ValueError):
    """The mask cannot apply to its column; the message names kind, column and type."""


class UnknownEngine(ValueError):
    """The redaction-engine annotation names no engine; the message says which are."""


def parse_engine(value: str | None) -> Engine:
    """The engine the annotation `pgro.bes.au/redaction-engine` asks for (`value`; None when
    the replica has no such annotation): `native` by default. UnknownEngine otherwise."""
    if value is None:
        return DEFAULT_ENGINE
    for engine in ENGINES:
        if value == engine:
            return engine
    raise UnknownEngine(
        f"annotation {ANNOTATION_REDACTION_ENGINE} has the unknown value {shown(value)!r}; "
        f"accepted values: {', '.join(ENGINES)} (default {DEFAULT_ENGINE})"
    )


@dataclass(frozen=True)
class ColumnInfo:
    """What the engine needs to know of a masked column, read from the catalog."""

    type_name: str  # pg_type.typname of the base type (through domains): int4, varchar, …
    category: str  # pg_type.typcategory of the base type
    display_type: str  # format_type() of the column's own type, for messages
    nullable: bool
    has_default: bool  # a DEFAULT expression or an identity
    max_length: int | None = None  # varchar(n) / char(n)
    generated: bool = False
    identity_always: bool = False

    @property
    def is_string(self) -> bool:
        return self.category == STRING_CATEGORY

    @property
    def is_number(self) -> bool:
        return self.type_name in NUMBER_TYPES


def _num(value: float) -> sql.Literal:
    """A bound as a SQL number: an integer when it is one (exactly representable)."""
    if float(value).is_integer() and abs(value) < 2**53:
        return sql.Literal(int(value))
    return sql.Literal(value)


def _choice(options: tuple[str, ...], uniform: sql.Composable) -> sql.Composable:
    """One of `options`, picked by `uniform` in [0, 1) (a constant array, folded once)."""
    return sql.SQL("(ARRAY[{}]::text[])[1 + floor({} * {})::int]").format(
        sql.SQL(", ").join(sql.Literal(o) for o in options), uniform, sql.Literal(len(options))
    )


class _Randomness:
    """Where a kind's randomness comes from: `random()`, or, deterministic, a keyed hash
    of the value (a different one per `tag`, so the parts of one value are independent)."""

    def __init__(self, column: sql.Identifier, deterministic: bool) -> None:
        self.column = column
        self.deterministic = deterministic

    def _digest_hex(self, tag: str) -> sql.Composable:
        return sql.SQL(
            "encode(sha256(convert_to(current_setting({}) || {} || {}::text, 'UTF8')), 'hex')"
        ).format(sql.Literal(KEY_SETTING), sql.Literal(f"/{tag}/"), self.column)

    def uniform(self, tag: str) -> sql.Composable:
        """A double in [0, 1)."""
        if not self.deterministic:
            return sql.SQL("random()")
        # 52 bits of the digest over 2^52.
        return sql.SQL(
            "(('x' || substr({}, 1, 13))::bit(52)::int8::float8 / 4503599627370496)"
        ).format(self._digest_hex(tag))

    def hex(self, tag: str, count: int) -> sql.Composable:
        """`count` (1..64) hex characters."""
        if self.deterministic:
            return sql.SQL("substr({}, 1, {})").format(self._digest_hex(tag), sql.Literal(count))
        chunk = sql.SQL("lpad(to_hex(floor(random() * 4294967296)::int8), 8, '0')")
        chunks = sql.SQL(" || ").join([chunk] * ((count + 7) // 8))
        if count % 8 == 0:
            return sql.SQL("({})").format(chunks)
        return sql.SQL("left({}, {})").format(chunks, sql.Literal(count))


def _unfit(mask: ColumnMask, info: ColumnInfo, why: str) -> MaskUnfit:
    return MaskUnfit(
        f"mask kind {mask.kind!r} does not fit column {shown(mask.target, 200)} of type "
        f"{shown(info.display_type)}: {why}"
    )


def _null_preserving(column: sql.Identifier, expression: sql.Composable) -> sql.Composable:
    return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE {} END").format(column, expression)


_RANDOM_DATE: Final = sql.SQL(
    "(DATE '1900-01-01' + floor({} * (current_date - DATE '1900-01-01' + 1))::int)"
)
_RANDOM_SECONDS: Final = sql.SQL("floor({} * 86400) * INTERVAL '1 second'")


def _string_expression(mask: ColumnMask, column: sql.Identifier, r: _Randomness) -> sql.Composable:
    kind = mask.kind
    if kind == "text":
        start = sql.SQL("1 + floor({} * {})::int").format(
            r.uniform("text"), sql.Literal(len(LOREM))
        )
        return sql.SQL("substr(repeat({}, length({}) / {} + 2), {}, length({}))").format(
            sql.Literal(LOREM), column, sql.Literal(len(LOREM)), start, column
        )
    if kind == "string":
        return sql.SQL("left(repeat({}, length({}) / 32 + 1), length({}))").format(
            r.hex("string", 32), column, column
        )
    if kind == "email":
        return sql.SQL("'u' || {} || {}").format(r.hex("email", 16), sql.Literal(EMAIL_DOMAIN))
    if kind == "name":
        first = _choice(FIRST_NAMES, r.uniform("first"))
        last = _choice(LAST_NAMES, r.uniform("last"))
        return sql.SQL("CASE WHEN {} LIKE '% %' THEN {} || ' ' || {} ELSE {} END").format(
            column, first, last, first
        )
    if kind == "phone":
        return sql.SQL(
            "CASE WHEN length({}) <= 4 THEN '****' ELSE left({}, 2) || '****' || right({}, 2) END"
        ).format(column, column, column)
    if kind == "place":
        return _choice(CITIES, r.uniform("place"))
    if kind == "url":
        return sql.SQL("{} || {}").format(sql.Literal(URL_PREFIX), r.hex("url", 8))
    raise AssertionError(kind)


def _anon_string_expression(mask: ColumnMask, column: sql.Identifier) -> sql.Composable:
    """The reference's anon fragment of a string kind (a text column)."""
    kind = mask.kind
    if kind == "text":
        return sql.SQL("anon.lorem_ipsum(characters := length({}))").format(column)
    if kind == "string":
        return sql.SQL("anon.random_string(length({}))").format(column)
    if kind == "email":
        return sql.SQL("anon.fake_email()")
    if kind == "name":
        return sql.SQL(
            "CASE WHEN {} LIKE '% %' THEN anon.fake_name() ELSE anon.fake_first_name() END"
        ).format(column)
    if kind == "phone":
        # anon.partial shows a value of 4 characters or fewer whole: those stay `****`.
        return sql.SQL(
            "CASE WHEN length({}) <= 4 THEN '****' ELSE anon.partial({}::text, 2, '****', 2) END"
        ).format(column, column)
    if kind == "place":
        return sql.SQL("anon.fake_city()")
    if kind == "url":
        return sql.SQL("{} || anon.random_string(8)").format(sql.Literal(URL_PREFIX))
    raise AssertionError(kind)


def _number_expression(mask: ColumnMask, info: ColumnInfo, r: _Randomness) -> sql.Composable:
    u = r.uniform(mask.kind)
    if mask.kind == "integer":
        low, high = mask.range or (INT2_RANGE if info.type_name == "int2" else INT4_RANGE)
        return sql.SQL("(floor({} * {}) + {})::int8").format(u, _num(high - low + 1), _num(low))
    if mask.kind == "float":
        low, high = mask.range or FLOAT_RANGE
        return sql.SQL("({} * {} + {})::numeric").format(u, _num(high - low), _num(low))
    low, high = mask.range or MONEY_RANGE
    return sql.SQL("round(({} * {} + {})::numeric, 2)").format(u, _num(high - low), _num(low))


def _fitted(
    mask: ColumnMask, info: ColumnInfo, column: sql.Identifier, r: _Randomness, anon: bool
) -> sql.Composable:
    """The expression for a column whose generated/identity state allows a mask; `anon`:
    the anon engine's fragment where there is one."""
    kind = mask.kind
    if kind == "nil":
        if not info.nullable:
            raise _unfit(mask, info, "the column is NOT NULL")
        return sql.SQL("NULL")
    if kind == "default":
        if not info.has_default:
            raise _unfit(mask, info, "the column has no default")
        return sql.SQL("DEFAULT")
    if kind == "zero":
        if info.type_name == "bytea":
            return sql.SQL("decode(repeat('00', length({})), 'hex')").format(column)
        if info.is_string:
            return sql.SQL("repeat('0', length({}))").format(column)
        if info.is_number:
            return sql.SQL("0")
        raise _unfit(mask, info, "zero needs a text, number or bytea column")
    if kind == "empty":
        if info.is_number:
            return sql.SQL("0")
        if info.is_string:
            return sql.SQL("''")
        if info.type_name == "bytea":
            return sql.SQL("''::bytea")
        if info.type_name in JSON_TYPES:
            return sql.SQL("'{}'::jsonb" if info.type_name == "jsonb" else "'{}'::json")
        if info.category == ARRAY_CATEGORY:
            return sql.SQL("'{}'")
        raise _unfit(mask, info, "empty needs a text, number, bytea, json(b) or array column")

    if kind in STRING_KINDS:
        if not info.is_string:
            raise _unfit(mask, info, f"{kind} needs a text column")
        if anon:
            return _null_preserving(column, _anon_string_expression(mask, column))
        return _null_preserving(column, _string_expression(mask, column, r))
    if kind in ("integer", "float", "money"):
        if not (info.is_number or info.is_string):
            raise _unfit(mask, info, f"{kind} needs a number or text column")
        return _null_preserving(column, _number_expression(mask, info, r))
    if kind == "date" and anon:
        when = sql.SQL("anon.random_date()")
        if info.is_string:
            return _null_preserving(column, sql.SQL("to_char({}, 'YYYY-MM-DD')").format(when))
        if info.type_name in DATE_TYPES:
            # anon.random_date() is a timestamptz: cast to the column's own type.
            cast = sql.SQL(info.type_name)
            return _null_preserving(column, sql.SQL("({})::{}").format(when, cast))
        raise _unfit(mask, info, "date needs a date, timestamp or text column")
    if kind == "date":
        day = _RANDOM_DATE.format(r.uniform("date"))
        if info.is_string:
            return _null_preserving(column, sql.SQL("to_char({}, 'YYYY-MM-DD')").format(day))
        if info.type_name == "date":
            return _null_preserving(column, day)
        if info.type_name in DATE_TYPES:
            time = _RANDOM_SECONDS.format(r.uniform("time"))
            return _null_preserving(column, sql.SQL("{} + {}").format(day, time))
        raise _unfit(mask, info, "date needs a date, timestamp or text column")
    if kind == "datetime":
        time = _RANDOM_SECONDS.format(r.uniform("datetime"))
        if info.is_string:
            return _null_preserving(
                column,
                sql.SQL("left({}, 10) || ' ' || to_char(TIME '00:00' + {}, 'HH24:MI:SS')").format(
                    column, time
                ),
            )
        if info.type_name in DATE_TYPES:
            return _null_preserving(
                column, sql.SQL("date_trunc('day', {}) + {}").format(column, time)
            )
        raise _unfit(mask, info, "datetime needs a timestamp, date or text column")
    raise MaskUnfit(f"unknown mask kind {shown(kind)!r} on column {shown(mask.target, 200)}")


def uses_anon(mask: ColumnMask, engine: Engine) -> bool:
    """Whether `mask`'s value comes from an anon function under `engine` (deterministic masks
    keep the native keyed expression: anon's fakers are random)."""
    return engine == "anon" and mask.kind in ANON_KINDS and not mask.deterministic


def mask_expression(
    mask: ColumnMask, info: ColumnInfo, engine: Engine = DEFAULT_ENGINE
) -> sql.Composable:
    """The right-hand side of `SET <column> = …` for `mask` on a column described by `info`,
    with `engine`'s functions; MaskUnfit when the kind does not fit it (alike for both
    engines)."""
    if info.generated:
        raise _unfit(mask, info, "a generated column; mask the columns it is computed from")
    if info.identity_always and mask.kind != "default":
        raise _unfit(mask, info, "a GENERATED ALWAYS identity can only be set to DEFAULT")
    column = sql.Identifier(mask.column)
    expression = _fitted(
        mask, info, column, _Randomness(column, mask.deterministic), uses_anon(mask, engine)
    )
    if info.is_string and info.max_length is not None and mask.kind not in ("nil", "default"):
        # A varchar(n) refuses a longer value; text results are cut to fit.
        return sql.SQL("left(({})::text, {})").format(expression, sql.Literal(info.max_length))
    return expression


def assignment(
    mask: ColumnMask, info: ColumnInfo, engine: Engine = DEFAULT_ENGINE
) -> sql.Composable:
    """`<column> = <expression>`, for an UPDATE's SET list."""
    return sql.SQL("{} = {}").format(
        sql.Identifier(mask.column), mask_expression(mask, info, engine)
    )
