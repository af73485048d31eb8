"""The redaction manifest (`spec.redaction`, features §2.6), read without I/O.

The manifest is the reference's: a Tamanu/dbt `manifest.json` whose `sources` name tables by
`schema` and `name`, with a mask under `config.meta.masking` (else `meta.masking`) on the
source (a table mask: only `truncate`) or on its `columns.<name>` (a column mask). A mask is
a kind, `"email"`, or an object, `{"kind": "integer", "range": "50-100"}`; `range` "L-H" is
split at the last `-`, so `-5-5` is (-5, 5). pgro also reads `"deterministic": true` in the
object form (the same value masks the same way everywhere in one run, so joins on masked
keys still work; pgro.core.masks).

The manifest is fetched from a URL and is hostile until checked: its size, the number of its
entries and its identifiers are bounded, and every entry pgro cannot apply is kept as a
`Rejected` entry naming its table, column and kind, never dropped silently: the runner
counts them as failures, so the redaction is `partial`, not `complete`. Sources without
`schema` or `name` are skipped with a warning, as in the reference. Only a document that is
not a manifest at all (not JSON, too large, too deep, too many entries) is refused whole.

Also here: the `version` / `versionQuery` / `{version}` rules of `spec.redaction`, a resolved
version's shape, and the URLs to fetch (with the `versionFallbackToBase` retry).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from pgro.api.replica import VERSION_PLACEHOLDER, Redaction

# Limits on what a fetched manifest may hold. A real Tamanu manifest is a few MiB with a few
# hundred masked columns.
MAX_MANIFEST_BYTES: Final = 32 * 1024 * 1024
MAX_SOURCES: Final = 50_000
MAX_MASKS: Final = 100_000
MAX_DEPTH: Final = 64
# PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes): a longer name would mask
# another column than the one the manifest names.
MAX_IDENTIFIER_BYTES: Final = 63
MAX_KIND_CHARS: Final = 40
# How much of a hostile string a message quotes.
SHOWN_CHARS: Final = 60
MAX_VERSION_CHARS: Final = 64

COLUMN_KINDS: Final = frozenset(
    {
        "date",
        "datetime",
        "text",
        "string",
        "email",
        "name",
        "phone",
        "place",
        "url",
        "integer",
        "float",
        "money",
        "zero",
        "empty",
        "nil",
        "default",
    }
)
TABLE_KINDS: Final = frozenset({"truncate"})
# Kinds whose value depends on nothing random: `deterministic` changes nothing for them.
DETERMINISTIC_KINDS: Final = frozenset({"phone", "zero", "empty", "nil", "default"})
RANGED_KINDS: Final = frozenset({"integer", "float", "money"})

_VERSION: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]*")


class ManifestInvalid(ValueError):
    """The document is not a manifest pgro will read (the whole redaction fails)."""


class RedactionSpecInvalid(ValueError):
    """`spec.redaction` breaks a rule; the message names the field and the fix."""


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """A hostile string as a message may quote it: printable, at most `limit` characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


@dataclass(frozen=True)
class TableMask:
    schema: str
    table: str
    kind: str

    @property
    def target(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class ColumnMask:
    schema: str
    table: str
    column: str
    kind: str
    range: tuple[float, float] | None = None
    deterministic: bool = False

    @property
    def target(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"


@dataclass(frozen=True)
class Rejected:
    """An entry of the manifest that cannot be applied: counted as a failure."""

    target: str  # `schema.table` or `schema.table.column`, made printable
    kind: str  # made printable; "" when the entry has none
    reason: str
    column: bool  # a column mask (else a table mask)

    def message(self) -> str:
        what = "column" if self.column else "table"
        kind = f" (kind {self.kind!r})" if self.kind else ""
        return f"{what} {self.target}{kind}: {self.reason}"


@dataclass(frozen=True)
class Manifest:
    columns: tuple[ColumnMask, ...] = ()
    tables: tuple[TableMask, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    # Sources skipped as the reference skips them (no `schema` or `name`): warnings only.
    skipped: tuple[str, ...] = field(default=())

    @property
    def columns_rejected(self) -> int:
        return sum(1 for r in self.rejected if r.column)

    @property
    def tables_rejected(self) -> int:
        return sum(1 for r in self.rejected if not r.column)


def parse_range(text: str) -> tuple[float, float] | None:
    """`"L-H"` split at the last `-` (`"1.001-1.03"`, `"-5-5"`); None when it is not one, or
    when a bound is not finite or L > H."""
    low, sep, high = text.rpartition("-")
    if not sep or len(text) > 64:
        return None
    try:
        bounds = (float(low), float(high))
    except ValueError:
        return None
    if not all(math.isfinite(b) for b in bounds) or bounds[0] > bounds[1]:
        return None
    return bounds


def base_version(version: str) -> str | None:
    """`MAJOR.MINOR.0` of a `MAJOR.MINOR.PATCH` version with PATCH != 0, else None."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        return None
    if int(parts[2]) == 0:
        return None
    return f"{parts[0]}.{int(parts[1])}.0"


def identifier_problem(name: object) -> str | None:
    """Why `name` cannot name a schema, table or column, or None."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL character"
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        return (
            f"is longer than {MAX_IDENTIFIER_BYTES} bytes (PostgreSQL would truncate it "
            "and mask another column)"
        )
    return None


def schema_problem(name: object) -> str | None:
    """Why `name` cannot be a masked table's schema, or None. The system schemas are
    refused: pgro's session is a superuser's, and UPDATE on a catalog table would work."""
    problem = identifier_problem(name)
    system = isinstance(name, str) and (name.startswith("pg_") or name == "information_schema")
    return "is a system schema" if problem is None and system else problem


def _masking(node: Mapping[str, Any]) -> tuple[bool, Any]:
    """(present, value) of `node.config.meta.masking`, else `node.meta.masking`."""
    for path in (("config", "meta", "masking"), ("meta", "masking")):
        value: Any = node
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None:
            return True, value
    return False, None


def _kind(mask: Any) -> str | None:
    """The kind of a short-form (`"email"`) or long-form (`{"kind": "email"}`) mask."""
    if isinstance(mask, str):
        return mask
    if isinstance(mask, Mapping) and isinstance(mask.get("kind"), str):
        return str(mask["kind"])
    return None


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ManifestInvalid(f"the manifest nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        for child in value.values():
            _check_depth(child, depth + 1)
    elif isinstance(value, list):
        for child in value:
            _check_depth(child, depth + 1)


def load_document(data: bytes | str) -> Mapping[str, Any]:
    """The manifest's JSON object; ManifestInvalid when it is too large or not one."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as error:
        # The position only: the message of a JSON error quotes no document text.
        where = f" at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise ManifestInvalid(f"the manifest is not valid JSON{where}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("the manifest is not a JSON object")
    _check_depth(doc)
    return doc


def parse_manifest(data: bytes | str) -> Manifest:
    """Read a manifest document (ManifestInvalid when it is not one)."""
    doc = load_document(data)
    sources = doc.get("sources")
    if sources is None:
        return Manifest()
    if not isinstance(sources, dict):
        raise ManifestInvalid("the manifest's `sources` is not an object")
    if len(sources) > MAX_SOURCES:
        raise ManifestInvalid(f"the manifest has more than {MAX_SOURCES} sources")

    columns: list[ColumnMask] = []
    tables: list[TableMask] = []
    rejected: list[Rejected] = []
    skipped: list[str] = []
    seen_columns: set[tuple[str, str, str]] = set()
    seen_tables: set[tuple[str, str]] = set()
    masks = 0

    for source_id, source in sources.items():
        if not isinstance(source, dict):
            skipped.append(f"source {shown(source_id)!r} is not an object")
            continue
        schema, name = source.get("schema"), source.get("name")
        if schema is None or name is None:
            missing = "schema" if schema is None else "name"
            skipped.append(f"source {shown(source_id)!r} has no `{missing}`")
            continue
        present, table_mask = _masking(source)
        column_map = source.get("columns")
        column_items = list(column_map.items()) if isinstance(column_map, dict) else []
        masks += int(present) + len(column_items)
        if masks > MAX_MASKS:
            raise ManifestInvalid(f"the manifest has more than {MAX_MASKS} masks")

        table_target = f"{shown(str(schema))}.{shown(str(name))}"
        table_problem = next(
            (
                f"the {what} name {problem}"
                for what, value, check in (
                    ("schema", schema, schema_problem),
                    ("table", name, identifier_problem),
                )
                if (problem := check(value)) is not None
            ),
            None,
        )
        if present:
            kind = _kind(table_mask)
            if table_problem is not None:
                rejected.append(Rejected(table_target, shown(kind or ""), table_problem, False))
            elif kind is None:
                rejected.append(Rejected(table_target, "", "the mask has no kind", False))
            elif kind not in TABLE_KINDS:
                reason = (
                    "is a column mask kind; a table takes only 'truncate'"
                    if kind in COLUMN_KINDS
                    else "unknown table mask kind; only 'truncate' is supported"
                )
                rejected.append(Rejected(table_target, shown(kind), reason, False))
            elif (schema, name) not in seen_tables:
                seen_tables.add((schema, name))
                tables.append(TableMask(schema, name, kind))

        for column, node in column_items:
            present, mask = _masking(node) if isinstance(node, dict) else (False, None)
            if not present:
                continue
            target = f"{table_target}.{shown(column)}"
            kind = _kind(mask)
            problem = table_problem
            if problem is None and (column_problem := identifier_problem(column)) is not None:
                problem = f"the column name {column_problem}"
            if problem is not None:
                rejected.append(Rejected(target, shown(kind or ""), problem, True))
                continue
            if kind is None:
                rejected.append(Rejected(target, "", "the mask has no kind", True))
                continue
            if kind not in COLUMN_KINDS:
                reason = (
                    "is a table mask kind, not a column's"
                    if kind in TABLE_KINDS
                    else f"unknown mask kind; known: {', '.join(sorted(COLUMN_KINDS))}"
                )
                rejected.append(Rejected(target, shown(kind), reason, True))
                continue
            options = mask if isinstance(mask, dict) else {}
            bounds: tuple[float, float] | None = None
            if kind in RANGED_KINDS and options.get("range") is not None:
                raw = options["range"]
                bounds = parse_range(raw) if isinstance(raw, str) else None
                if bounds is None:
                    rejected.append(
                        Rejected(target, kind, 'range is not "LOW-HIGH" with LOW <= HIGH', True)
                    )
                    continue
            deterministic = options.get("deterministic", False)
            if not isinstance(deterministic, bool):
                rejected.append(Rejected(target, kind, "deterministic is not true or false", True))
                continue
            key = (schema, name, column)
            if key in seen_columns:
                rejected.append(
                    Rejected(
                        target, kind, "the column is masked twice; the first mask is kept", True
                    )
                )
                continue
            seen_columns.add(key)
            columns.append(ColumnMask(schema, name, column, kind, bounds, deterministic))

    return Manifest(tuple(columns), tuple(tables), tuple(rejected), tuple(skipped))


# --- spec.redaction: the version rules and the URLs


def check_spec(redaction: Redaction) -> None:
    """RedactionSpecInvalid when `spec.redaction` cannot run: the reference's rules on
    `version`, `versionQuery` and `{version}` (Redaction.problem), and a manifest URL that is
    http(s) with a host and no placeholder in its host."""
    problem = redaction.problem()
    if problem is not None:
        raise RedactionSpecInvalid(problem)
    parts = urlsplit(redaction.manifest_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RedactionSpecInvalid(
            "redaction.manifestUrl must be an http:// or https:// URL with a host, "
            f"not {display_url(redaction.manifest_url)!r}"
        )
    if VERSION_PLACEHOLDER in parts.netloc:
        raise RedactionSpecInvalid(
            f"redaction.manifestUrl has {VERSION_PLACEHOLDER} in its host; put it in the path"
        )


def check_version(version: str, source: str) -> str:
    """`version` when it can go into a URL: 1..64 letters, digits, `.`, `_`, `+`, `-`,
    starting with a letter or digit. The message does not quote a bad value (a versionQuery
    may return anything, even personal data)."""
    if len(version) > MAX_VERSION_CHARS or _VERSION.fullmatch(version) is None:
        raise RedactionSpecInvalid(
            f"{source} gave a value that is not a version ({len(version)} characters; "
            f"expected at most {MAX_VERSION_CHARS} letters, digits, '.', '_', '+' or '-')"
        )
    return version


def manifest_urls(redaction: Redaction, version: str | None) -> list[str]:
    """The URLs to try in order: the manifest of `version`, then, on a 404, that of its
    base version when `versionFallbackToBase` is set and it has one."""
    urls = [redaction.manifest_url_for(version)]
    if redaction.version_fallback_to_base and version is not None:
        base = base_version(version)
        if base is not None:
            urls.append(redaction.manifest_url_for(base))
    return urls


def display_url(url: str) -> str:
    """`url` for a message: no user info (a password) and no query or fragment (a token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    hidden = "?…" if parts.query or parts.fragment else ""
    return shown(urlunsplit((parts.scheme, host + port, parts.path, "", "")) + hidden, 200)
