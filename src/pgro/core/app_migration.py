"""The application migration's decisions (`migrateTo`, features §2.2), without I/O.

A restore with `spec.migrateTo` runs the application's own migrator against itself (the
reference: the Tamanu image's `migrate`), then reads what it did back from the database:
Tamanu writes one row per batch into `logs.migrations`, with per-migration durations in its
`stats`. Everything here shapes those rows and the runner's output into
`status.migrationResult`; the runner (`pgro.pipeline.app_migration`) does the I/O.

The runner's output is untrusted and may quote patient data (a constraint violation names
the row it refused): `redact_log` and `error_from_stats` keep only what says *why* it failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote

from pgro.api.migration import MigrationResult, MigrationTiming
from pgro.core.observations import WorkState

EVENT_STARTED: Final = "MigrationStarted"
EVENT_FINISHED: Final = "MigrationFinished"
EVENT_FAILED: Final = "MigrationFailed"
EVENT_DROP_REFUSED: Final = "PreMigrateDropRefused"

UNKNOWN_MIGRATION: Final = "unknown"
# The log lines a failed run's error is built from, and what of them is kept.
LOG_TAIL_LINES: Final = 200
KEEP_LINES: Final = 40
MAX_ERROR_BYTES: Final = 2000
# The largest count or duration kept from a migrator's row: JSON's exact integers.
MAX_NUMBER: Final = 2**53 - 1
# What one `logs.migrations` row (written by the migrator, untrusted) can put in status:
# the first MAX_TIMINGS timings, each name (and `failedMigration`) cut to MAX_NAME_CHARS.
MAX_TIMINGS: Final = 1000
MAX_NAME_CHARS: Final = 200
# Lines that quote the row PostgreSQL refused (patient data): never kept.
_DROPPED_MARKERS: Final = ("DETAIL", "HINT:", "STATEMENT:", "Failing row", "parameters", "Key (")
# Lines that report an error may quote values: their quoted literals are blanked.
_ERROR_WORDS: Final = ("error", "violates", "invalid")
_QUOTED: Final = re.compile(r"""(["'])(?:(?!\1).)*(\1|$)""")
_RESERVED_SCHEMAS: Final = frozenset({"public", "information_schema"})
# `scheme://user:password@host`: a URL's password, whoever printed it.
_URL_PASSWORD: Final = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
MASK: Final = "***"

# What Tamanu's migrator reads its database from (the reference's Job sets these); versions
# that understand `DATABASE_URL` prefer it, so both are set.
ENV_HOST: Final = "CONFIG_SYNC_DB_HOST"
ENV_PORT: Final = "CONFIG_SYNC_DB_PORT"
ENV_USERNAME: Final = "CONFIG_SYNC_DB_USERNAME"
ENV_PASSWORD: Final = "CONFIG_SYNC_DB_PASSWORD"  # noqa: S105 - a variable name
ENV_NAME: Final = "CONFIG_SYNC_DB_NAME"
ENV_URL: Final = "DATABASE_URL"
# The target, for a migrator command that serves several versions (pgro's own addition).
ENV_VERSION: Final = "PGRO_MIGRATE_VERSION"
ENV_VERSION_ID: Final = "PGRO_MIGRATE_VERSION_ID"


@dataclass(frozen=True)
class Run:
    """The migrator as the runtime sees it: not started, running, or ended
    (`SUCCEEDED`/`FAILED` by its exit status). `log_tail` is the end of its output (at most
    LOG_TAIL_LINES lines), read only once it ended, with the secrets the runtime gave the
    migrator already replaced by `scrub`; untrusted until `redact_log`."""

    state: WorkState
    log_tail: str = ""

    @property
    def ended(self) -> bool:
        return self.state in (WorkState.SUCCEEDED, WorkState.FAILED)

    @property
    def failed(self) -> bool:
        return self.state is WorkState.FAILED


@dataclass(frozen=True)
class Batch:
    """The newest `up` row of `logs.migrations` written after the baseline."""

    migrations: Sequence[str]
    batch_duration_ms: int | None
    stats: Mapping[str, Any] | None


def droppable(schema: str) -> bool:
    """Whether `preMigrateDropSchemas` may drop `schema`: never `public`,
    `information_schema` or a `pg_*` catalog (dropping one leaves a restore that migrates
    but proves nothing, or no database at all)."""
    return bool(schema) and schema not in _RESERVED_SCHEMAS and not schema.startswith("pg_")


def split_droppable(schemas: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(droppable, refused), each in the order given, without repeats."""
    unique = list(dict.fromkeys(schemas or ()))
    return [s for s in unique if droppable(s)], [s for s in unique if not droppable(s)]


def refused_note(refused: Sequence[str]) -> str:
    return (
        f"preMigrateDropSchemas names {', '.join(refused)}, which pgro never drops "
        "(public, information_schema and pg_* hold the data being tested); the others "
        "were dropped and the migration ran"
    )


def whole_number(value: object) -> int | None:
    """A JSON number, numeric string or column value as an int (Tamanu writes numbers and
    strings; a table may give numeric or float); None for anything else, a fraction
    included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (Decimal, float)):
        try:
            return int(value) if value == int(value) else None
        except (ValueError, OverflowError):  # NaN, infinity
            return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _bounded(value: int) -> int:
    """A number the migrator wrote, within what status (int64) and canopy can hold."""
    return min(max(value, 0), MAX_NUMBER)


def result_from_batch(batch: Batch, data_bytes_after: int, failed: bool) -> MigrationResult:
    """Shape a batch into the result canopy is sent.

    Timings follow the batch's own `migrations` order (the order tells which migration
    blocked which; a JSON object has none), in whole seconds. The total is the batch's own
    wall clock where recorded (it includes the steps around the migrations), else the sum
    over all of them. `preSnapshot.databaseSizeBytes` of -1 is Tamanu's "could not read":
    the size after stands in rather than a negative growth. The row is the migrator's: at
    most MAX_TIMINGS timings are kept, and names are cut to MAX_NAME_CHARS."""
    stats = batch.stats or {}
    durations = stats.get("durationMsPerMigration")
    if not isinstance(durations, Mapping):
        durations = {}

    def seconds(name: str) -> int:
        return _bounded(whole_number(durations.get(name)) or 0) // 1000

    timings = [
        MigrationTiming(name=name[:MAX_NAME_CHARS], elapsed_seconds=seconds(name))
        for name in batch.migrations[:MAX_TIMINGS]
    ]
    pre = stats.get("preSnapshot")
    before = whole_number(pre.get("databaseSizeBytes")) if isinstance(pre, Mapping) else None
    total = (
        _bounded(batch.batch_duration_ms) // 1000
        if batch.batch_duration_ms is not None
        else _bounded(sum(seconds(name) for name in batch.migrations))
    )
    failed_migration = None
    if failed:
        named = stats.get("failedMigration")
        failed_migration = (
            named[:MAX_NAME_CHARS] if isinstance(named, str) and named else UNKNOWN_MIGRATION
        )
    return MigrationResult(
        total_elapsed_seconds=total,
        failed_migration=failed_migration,
        data_bytes_before=_bounded(before)
        if before is not None and before >= 0
        else data_bytes_after,
        data_bytes_after=data_bytes_after,
        timings=timings,
    )


def result(batch: Batch | None, data_bytes_after: int, run: Run) -> MigrationResult:
    """What the run did, from its batch (None: it wrote none, e.g. it died before
    applying anything) and its exit status; a failed run carries its redacted error."""
    if batch is None:
        shaped = MigrationResult(
            total_elapsed_seconds=0,
            failed_migration=UNKNOWN_MIGRATION if run.failed else None,
            data_bytes_before=data_bytes_after,
            data_bytes_after=data_bytes_after,
        )
    else:
        shaped = result_from_batch(batch, data_bytes_after, run.failed)
    if not run.failed:
        return shaped
    stats = batch.stats if batch is not None else None
    return shaped.model_copy(
        update={"error": error_from_stats(stats) or redact_log(run.log_tail) or None}
    )


def _blank_quoted(line: str) -> str:
    return _QUOTED.sub(lambda m: f"{m.group(1)}…{m.group(2)}", line)


def error_from_stats(stats: Mapping[str, Any] | None) -> str | None:
    """Tamanu's structured error (`stats.error`) as one line:
    `code-or-name: message [table.column, constraint]`. Unlike the reference, quoted
    literals in the message are blanked: PostgreSQL quotes the refused value there
    (`invalid input value for enum sex: "kangaroo"`)."""
    error = (stats or {}).get("error")
    if not isinstance(error, Mapping):
        return None

    def field(key: str) -> str | None:
        value = error.get(key)
        return value.strip() or None if isinstance(value, str) else None

    label = field("code") or field("name")
    message = field("message")
    head = ": ".join(_blank_quoted(p) for p in (label, message) if p)
    table, column = field("table"), field("column")
    context = [".".join(p for p in (table, column) if p)] if table or column else []
    if constraint := field("constraint"):
        context.append(constraint)
    where = f"[{', '.join(context)}]" if context else ""
    line = " ".join(p for p in (head, where) if p)
    return line[:MAX_ERROR_BYTES] or None


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret value (and any URL's password) replaced by MASK. Longest
    first, so a secret containing another is masked whole."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def redact_log(log: str) -> str:
    """The end of a migrator's output with anything that could carry row contents taken
    out: lines quoting a row are dropped, quoted literals on error lines blanked, and the
    last KEEP_LINES lines kept, at most MAX_ERROR_BYTES bytes (cut on a character)."""
    kept = []
    for line in scrub(log, ()).splitlines():
        if any(marker in line for marker in _DROPPED_MARKERS):
            continue
        lower = line.lower()
        kept.append(_blank_quoted(line) if any(w in lower for w in _ERROR_WORDS) else line)
    tail = "\n".join(kept[-KEEP_LINES:])
    encoded = tail.encode()
    if len(encoded) <= MAX_ERROR_BYTES:
        return tail
    return encoded[-MAX_ERROR_BYTES:].decode(errors="ignore")


def finished_note(restore: str, version: str, shaped: MigrationResult) -> str:
    growth = shaped.data_bytes_after - shaped.data_bytes_before
    verdict = "passed" if shaped.passed else f"failed at {shaped.failed_migration}"
    return (
        f"Migrations to {version} on {restore} {verdict}: {len(shaped.timings)} migration(s) "
        f"in {shaped.total_elapsed_seconds}s, database {growth:+d} bytes"
    )


def database_url(*, host: str, port: int, database: str, username: str, password: str) -> str:
    """A `postgresql://` URL libpq and node-postgres both read; a socket directory (a host
    starting with `/`) goes in the `host` parameter, an IPv6 address in brackets."""
    auth = f"{quote(username, safe='')}:{quote(password, safe='')}"
    db = quote(database, safe="")
    if host.startswith("/"):
        return f"postgresql://{auth}@/{db}?host={quote(host, safe='')}&port={port}"
    where = f"[{host}]" if ":" in host else host
    return f"postgresql://{auth}@{where}:{port}/{db}"


def migrator_env(
    *,
    host: str,
    port: int,
    database: str,
    username: str,
    password: str,
    version: str,
    version_id: str = "",
) -> dict[str, str]:
    """The environment a migrator command runs with (`pgro run --migrator`, `pgro verify
    --migrate-to`): the reference Job's variables, libpq's `PG*` for tools that read those,
    and the target version. It names the restore's own server, never the stable endpoint."""
    return {
        ENV_HOST: host,
        ENV_PORT: str(port),
        ENV_USERNAME: username,
        ENV_PASSWORD: password,
        ENV_NAME: database,
        ENV_URL: database_url(
            host=host, port=port, database=database, username=username, password=password
        ),
        "NODE_ENV": "production",
        "PGHOST": host,
        "PGPORT": str(port),
        "PGDATABASE": database,
        "PGUSER": username,
        "PGPASSWORD": password,
        ENV_VERSION: version,
        ENV_VERSION_ID: version_id,
    }
