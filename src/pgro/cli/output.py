"""What people see: progress on stderr while work runs, and the verification report.

Most of what is printed comes from the backup (host names, paths, repair notes with keys from
`postgresql.auto.conf`, database names), from kopia or from the restored server's log: it is
untrusted. It is never parsed as Rich markup (`[/]` in a setting name must not crash a
verification, nor `[link=...]` restyle the report) and its control characters are removed so
it cannot move the cursor, retitle the terminal or hide lines. Only the fixed labels written
here carry styles; every value goes through `literal()`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

from pgro.kopia.repository import RestoreProgress
from pgro.pipeline.report import EXIT_MIGRATION_FAILED, VerificationReport

# ESC-introduced sequences (CSI `ESC [ ... final`, OSC `ESC ] ... BEL|ST`, and the two-byte
# forms), then every other C0/C1 control except tab and newline, and DEL.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC, terminated or not
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]?"  # two-byte escapes and a lone ESC
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    """`text` without terminal escape sequences and control characters (tab, newline kept)."""
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", text))


def literal(value: object, style: str = "") -> Text:
    """Untrusted text as printed: no markup parsing, no control characters."""
    return Text(strip_controls("" if value is None else str(value)), style=style)


class TerminalObserver:
    """Prints steps and a restore progress bar to stderr (plain lines when not a terminal)."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_plain = 0.0

    def _end_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

    def step(self, name: str, message: str) -> None:
        self._end_progress()
        if not self.quiet:
            self.console.print(
                Text.assemble(("•", "bold cyan"), " ", literal(message)), highlight=False
            )

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(Text.assemble("  ", literal(message, "dim")), highlight=False)

    def restore_progress(self, progress: RestoreProgress) -> None:
        if self.quiet:
            return
        if not self.console.is_terminal:
            # A log wants occasional lines, not a redrawn bar.
            now = time.monotonic()
            if now - self._last_plain >= 10 or progress.done_bytes >= progress.total_bytes > 0:
                self._last_plain = now
                pct = (
                    100 * progress.done_bytes / progress.total_bytes if progress.total_bytes else 0
                )
                done, total = progress.done_bytes, progress.total_bytes
                self.console.print(
                    f"  restored {done} of {total} bytes ({pct:.0f}%)",
                    highlight=False,
                    markup=False,
                )
            return
        if self._progress is None:
            # Imported on first use: with --json or a log as stderr there is no bar to draw.
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("  restoring"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("restore", total=progress.total_bytes or None)
        assert self._task is not None
        self._progress.update(
            self._task, completed=progress.done_bytes, total=progress.total_bytes or None
        )

    def close(self) -> None:
        self._end_progress()


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render_report(console: Console, report: VerificationReport) -> None:
    from rich.table import Table

    console.print()
    if report.outcome == "success" or report.exit_code == EXIT_MIGRATION_FAILED:
        console.print(
            Text.assemble(
                ("✔ VERIFIED", "bold green"),
                " snapshot ",
                literal(report.snapshot_id),
                " restores and PostgreSQL ",
                literal(report.postgres_version),
                f" comes up healthy ({report.restore_duration_sec or 0:.1f}s)",
            ),
            highlight=False,
        )
    else:
        verdict = "NOT VERIFIED" if report.exit_code == 2 else "FAILED"
        console.print(
            Text.assemble(
                (f"✘ {verdict}", "bold red"),
                " (",
                literal(report.reason),
                "): ",
                literal(report.error),
            ),
            highlight=False,
        )
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("replica", literal(report.replica))
    facts.add_row("repository", literal(report.repository))
    if report.snapshot_id:
        size = f", {_human_bytes(report.snapshot_size)}" if report.snapshot_size is not None else ""
        facts.add_row(
            "snapshot", literal(f"{report.snapshot_id} (taken {report.snapshot_time}{size})")
        )
    if report.postgres_version:
        facts.add_row("postgres", literal(report.postgres_version))
    if report.depth:
        facts.add_row("depth", literal(report.depth))
    applied = [name for name, done in report.fixes.items() if done]
    if report.fixes:
        facts.add_row("repairs", literal(", ".join(applied) if applied else "none needed"))
    if report.timings:
        facts.add_row(
            "timings", literal(", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
        )
    console.print(facts)
    if report.sizes:
        sizes = Table(title="databases", title_justify="left", show_edge=False)
        sizes.add_column("database")
        sizes.add_column("size", justify="right")
        for db, db_size in report.sizes.items():
            sizes.add_row(literal(db), _human_bytes(db_size))
        console.print(sizes)
    if report.checks:
        checks = Table(title="checks", title_justify="left", show_edge=False)
        checks.add_column("check")
        checks.add_column("result")
        checks.add_column("detail", overflow="fold")
        for check in report.checks:
            checks.add_row(literal(check.name), _MARKS[check.status], literal(check.detail))
        console.print(checks)
        damaged = [c for c in report.checks if c.status == "fail" and c.findings]
        for check in damaged:
            render_findings(console, check.name, check.count, check.findings)
    if report.migration is not None:
        render_migration(console, report.migration)


_MARKS: Final[dict[str, Text]] = {
    "pass": Text("pass", "green"),
    "fail": Text("FAIL", "red"),
    "not_checked": Text("not checked", "yellow"),
    "incomplete": Text("INCOMPLETE", "yellow"),
}


def render_findings(
    console: Console, name: str, count: int, findings: Sequence[Mapping[str, object]]
) -> None:
    """The damage one data check found: where (database, relation, block) and the words of
    the tool, the first few and how many in all."""
    from rich.table import Table

    table = Table(
        title=f"damage found by {name} ({count} in all, first {len(findings)} shown)",
        title_justify="left",
        show_edge=False,
    )
    for column in ("database", "relation", "block", "message"):
        table.add_column(column, overflow="fold")
    for finding in findings:
        relation = finding.get("relation") or finding.get("file")
        if finding.get("table") is not None:
            relation = f"{relation} (of {finding.get('table')})"
        block = finding.get("block")
        table.add_row(
            literal(finding.get("database") or ""),
            literal(relation or ""),
            literal("" if block is None else block),
            literal(finding.get("message")),
        )
    console.print(table)


def _delta(before: int, after: int) -> str:
    change = after - before
    sign = "+" if change >= 0 else "-"
    return f"{sign}{_human_bytes(abs(change))}"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def render_migration(console: Console, migration: Mapping[str, Any]) -> None:
    """The upgrade rehearsal (`pgro verify --migrate-to`): each migration's seconds in
    batch order, the total, and the database's size before and after."""
    from rich.table import Table

    version = literal(migration.get("version"))
    failed = migration.get("failedMigration")
    timings = migration.get("timings") or []
    # A heading of its own: a table's title wraps to the table's (narrow) width.
    console.print(Text.assemble(("migrations to ", "italic"), version), highlight=False)
    table = Table(show_edge=False)
    table.add_column("migration")
    table.add_column("seconds", justify="right")
    for timing in timings:
        table.add_row(literal(timing.get("name")), str(_int(timing.get("elapsedSeconds"))))
    if failed:
        table.add_row(literal(failed, "red"), Text("FAILED", "red"))
    table.add_section()
    table.add_row(Text("total", "bold"), str(_int(migration.get("totalElapsedSeconds"))))
    console.print(table)
    before = _int(migration.get("dataBytesBefore"))
    after = _int(migration.get("dataBytesAfter"))
    console.print(
        Text.assemble(
            ("database size ", "dim"),
            f"{_human_bytes(before)} → {_human_bytes(after)} ({_delta(before, after)})",
        ),
        highlight=False,
    )
    if failed:
        console.print(
            Text.assemble(
                ("✘ MIGRATION FAILED", "bold red"),
                " at ",
                literal(failed),
                ": ",
                literal(migration.get("error") or "no error recorded"),
            ),
            highlight=False,
        )
    else:
        console.print(
            Text.assemble(
                ("✔ MIGRATED", "bold green"),
                " to ",
                version,
                f": {len(timings)} migration(s) in {_int(migration.get('totalElapsedSeconds'))}s",
            ),
            highlight=False,
        )
