"""What people see: progress on stderr while work runs, and the verification report."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

from pgro.kopia.repository import RestoreProgress
from pgro.pipeline.report import VerificationReport


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
            self.console.print(f"[bold cyan]•[/] {message}", highlight=False)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"  [dim]{message}[/]", highlight=False)

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
                    f"  restored {done} of {total} bytes ({pct:.0f}%)", highlight=False
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
    if report.outcome == "success":
        console.print(
            f"[bold green]✔ VERIFIED[/] snapshot {report.snapshot_id} restores and PostgreSQL "
            f"{report.postgres_version} comes up healthy "
            f"({report.restore_duration_sec or 0:.1f}s)",
            highlight=False,
        )
    else:
        verdict = "NOT VERIFIED" if report.exit_code == 2 else "FAILED"
        console.print(
            f"[bold red]✘ {verdict}[/] ({report.reason}): {report.error}", highlight=False
        )
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("replica", report.replica or "")
    facts.add_row("repository", report.repository or "")
    if report.snapshot_id:
        size = f", {_human_bytes(report.snapshot_size)}" if report.snapshot_size is not None else ""
        facts.add_row("snapshot", f"{report.snapshot_id} (taken {report.snapshot_time}{size})")
    if report.postgres_version:
        facts.add_row("postgres", report.postgres_version)
    applied = [name for name, done in report.fixes.items() if done]
    if report.fixes:
        facts.add_row("repairs", ", ".join(applied) if applied else "none needed")
    if report.timings:
        facts.add_row("timings", ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    console.print(facts)
    if report.sizes:
        sizes = Table(title="databases", title_justify="left", show_edge=False)
        sizes.add_column("database")
        sizes.add_column("size", justify="right")
        for db, db_size in report.sizes.items():
            sizes.add_row(db, _human_bytes(db_size))
        console.print(sizes)
    if report.checks:
        checks = Table(title="checks", title_justify="left", show_edge=False)
        checks.add_column("check")
        checks.add_column("result")
        checks.add_column("detail", overflow="fold")
        for check in report.checks:
            mark = "[green]pass[/]" if check.status == "pass" else "[red]FAIL[/]"
            checks.add_row(check.name, mark, check.detail)
        console.print(checks)
