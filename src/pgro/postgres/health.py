"""Checking that a restored server is healthy: it answers, is a primary, and holds data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    # Imported where used: psycopg takes a fifth of a second to import, which `pgro verify`
    # overlaps with kopia's work instead of paying up front (see pipeline.verify).
    import psycopg

    from pgro.postgres.collation_refresh import CollationMismatch, CollationRefreshResult

COLLATION_CHECK = "collation_versions"
COLLATION_MISMATCH = "CollationVersionMismatch"
SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})
CONNECT_TIMEOUT_S = 10

# `not_checked`: a check that could not or must not run here (no pg_checksums, a hash index),
# never a failure; `incomplete`: the time budget ran out before the check covered everything.
CheckStatus = Literal["pass", "fail", "not_checked", "incomplete"]


class Endpoint(Protocol):
    """A server to check: a local socket (`pgro.postgres.server.Endpoint`) or TCP."""

    def conninfo(self, dbname: str, user: str) -> str: ...


@dataclass(frozen=True)
class Check:
    name: str
    status: CheckStatus
    detail: str
    # The data checks' damage: how many findings in all, and the first few
    # (database, relation, table, file, block, message).
    count: int = 0
    findings: tuple[Mapping[str, object], ...] = ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.count:
            out["count"] = self.count
            out["findings"] = [dict(f) for f in self.findings]
        return out


@dataclass
class HealthReport:
    checks: list[Check] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    server_version: str = ""
    failure_reason: str | None = None  # e.g. NoApplicationDatabase
    failure_message: str | None = None

    @property
    def healthy(self) -> bool:
        """No failure recorded and no check failed (`not_checked` is no failure; an
        `incomplete` check records its own failure reason, `VerificationIncomplete`)."""
        return self.failure_reason is None and all(c.status != "fail" for c in self.checks)

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "pass", detail))

    def failed(self, name: str, detail: str, reason: str) -> None:
        self.checks.append(Check(name, "fail", detail))
        if self.failure_reason is None:
            self.failure_reason = reason
            self.failure_message = detail


def _connect(endpoint: Endpoint, dbname: str, user: str) -> psycopg.Connection[tuple[object, ...]]:
    # Startup options beat the restored catalog's per-role and per-database settings, so
    # nothing the snapshot names is preloaded into pgro's (superuser) session.
    from pgro.postgres.session import connect

    return connect(
        endpoint.conninfo(dbname, user),
        application_name="pgro-verify",
        connect_timeout=CONNECT_TIMEOUT_S,
    )


def _maintenance_connection(
    endpoint: Endpoint, user: str
) -> tuple[psycopg.Connection[tuple[object, ...]], str]:
    import psycopg

    last: psycopg.Error | None = None
    for dbname in ("postgres", "template1"):
        try:
            return _connect(endpoint, dbname, user), dbname
        except psycopg.OperationalError as exc:
            last = exc
            if "does not exist" not in str(exc) or f'role "{user}"' in str(exc):
                break
    assert last is not None
    raise last


def _server_message(exc: Exception) -> str:
    """The server's own words for a failed query: its primary message (one line, without
    the statement echo), or the client library's text when the server sent none."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return str(primary or exc).strip() or type(exc).__name__


_USER_TABLES = (
    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p', 'm') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg_toast%'"
)


def check_health(endpoint: Endpoint, user: str) -> HealthReport:
    """Connect, list databases with sizes, run `SELECT 1` in each.

    Every query's failure is that check's failure (`QueryFailed`, with the server's
    message): a restored server that errors on a query is an unhealthy backup, never a
    pgro bug. Fails with `NoApplicationDatabase` when only system databases exist: a
    backup of an empty cluster restores fine but proves nothing about the application's
    data.
    """
    import psycopg

    report = HealthReport()
    try:
        conn, maint = _maintenance_connection(endpoint, user)
    except psycopg.Error as exc:
        report.failed("connect", f"cannot connect as {user}: {exc}".strip(), "ConnectionFailed")
        return report
    with conn:
        # Reported by the server at connection start: no query, no function call.
        version = conn.info.parameter_status("server_version") or "(unknown version)"
        report.server_version = version
        report.passed("connect", f"connected to {maint} as {user}; PostgreSQL {version}")
        try:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error as exc:
            report.failed(
                "primary", f"pg_is_in_recovery() failed: {_server_message(exc)}", "QueryFailed"
            )
            return report
        if row is None:
            report.failed("primary", "pg_is_in_recovery() returned no row", "QueryFailed")
        elif row[0]:
            report.failed(
                "primary",
                "the server is still in recovery (a standby): it would never accept writes",
                "StillInRecovery",
            )
        else:
            report.passed("primary", "not in recovery: the restore runs as a primary")
        try:
            rows = conn.execute(
                "SELECT datname, pg_database_size(oid) FROM pg_database "
                "WHERE datallowconn AND NOT datistemplate ORDER BY datname"
            ).fetchall()
            sizes = {str(name): int(str(size)) for name, size in rows}
        except (psycopg.Error, ValueError) as exc:
            report.failed(
                "list_databases",
                f"listing the databases failed: {_server_message(exc)}",
                "QueryFailed",
            )
            return report
    report.sizes = sizes
    listing = ", ".join(f"{n} ({s} bytes)" for n, s in report.sizes.items())
    report.passed("list_databases", f"{len(report.sizes)} databases: {listing}")

    for dbname in report.sizes:
        try:
            with _connect(endpoint, dbname, user) as db:
                one = db.execute("SELECT 1").fetchone()
                tables = db.execute(_USER_TABLES).fetchone()
            if one != (1,):
                report.failed(f"select_1:{dbname}", f"SELECT 1 returned {one!r}", "QueryFailed")
            else:
                count = tables[0] if tables else 0
                report.passed(f"select_1:{dbname}", f"SELECT 1 ok; {count} user tables")
        except psycopg.Error as exc:
            report.failed(f"select_1:{dbname}", f"{dbname}: {_server_message(exc)}", "QueryFailed")

    apps = sorted(set(report.sizes) - SYSTEM_DATABASES)
    if apps:
        report.passed("application_database", f"application databases: {', '.join(apps)}")
    else:
        report.failed(
            "application_database",
            "the cluster holds only system databases (postgres, template0, template1): "
            "the backup restores but contains no application data",
            "NoApplicationDatabase",
        )
    return report


def record_remaining_collations(
    report: HealthReport, mismatches: Sequence[CollationMismatch]
) -> None:
    """The collation-version verdict at report time (the runtimes' verification reports): the
    repair ran before the restore was ready, so a mismatch still in the catalog is one it
    could not fix, and fails the check naming the collations."""
    if not mismatches:
        report.passed(COLLATION_CHECK, "every recorded collation version matches the library's")
        return
    shown = ", ".join(str(m) for m in mismatches[:10])
    more = f" (and {len(mismatches) - 10} more)" if len(mismatches) > 10 else ""
    report.failed(
        COLLATION_CHECK,
        f"{len(mismatches)} collation version mismatch(es) remain: {shown}{more}; indexes on "
        "them may return wrong results (pgro could not rebuild them: see the restore's notes "
        "and events)",
        COLLATION_MISMATCH,
    )


def record_collation_versions(report: HealthReport, result: CollationRefreshResult) -> None:
    """The collation-version verdict (features.md §2.4) as a check: it fails, naming the
    collations and the indexes whose rebuild failed, when a mismatch remains after the
    repair (an index built under another library version can silently miss rows)."""
    if not result.needed:
        report.passed(COLLATION_CHECK, "every recorded collation version matches the library's")
        return
    refreshed = ", ".join(str(m) for m in result.refreshed)
    if not result.remaining:
        report.passed(
            COLLATION_CHECK,
            f"refreshed {len(result.refreshed)} collation version(s) after rebuilding "
            f"{len(result.rebuilt)} dependent index(es): {refreshed}",
        )
        return
    failed = "; ".join(str(f) for f in result.failures[:10])
    more = f" (and {len(result.failures) - 10} more)" if len(result.failures) > 10 else ""
    report.failed(
        COLLATION_CHECK,
        f"{len(result.remaining)} collation version mismatch(es) remain: "
        + ", ".join(str(m) for m in result.remaining)
        + f"; not refreshed because rebuilding the dependent indexes failed: {failed}{more}",
        COLLATION_MISMATCH,
    )
