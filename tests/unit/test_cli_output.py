"""The terminal renderer prints untrusted values literally (issue 18, item 5).

Every field that can carry text from a snapshot, kopia or the restored server gets Rich
markup and terminal escapes; the output must hold the markup as text and no escape.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from pgro.cli.output import TerminalObserver, literal, render_report, strip_controls
from pgro.pipeline.report import VerificationReport
from pgro.postgres.health import Check

MARKUP = "[/][bold red]x[/][link=http://evil]y"
# CSI (clear screen, colour), OSC (retitle), a lone ESC, BEL, backspace, CR, DEL, 8-bit CSI.
ESCAPES = "\x1b[2J\x1b[31m\x1b]0;title\x07\x1b\x08\r\x7f\x9b1m"


def hostile(field: str) -> str:
    return f"{field}-{MARKUP}-{ESCAPES}-end"


def shown(field: str) -> str:
    return f"{field}-{MARKUP}--end"


def console(*, terminal: bool = False) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=400, force_terminal=terminal, color_system=None), buf


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_every_report_field_is_literal(outcome: str) -> None:
    report = VerificationReport(
        outcome=outcome,  # type: ignore[arg-type]
        snapshot_id=hostile("snap"),
        error=hostile("error"),
        reason=hostile("reason"),
        exit_code=0 if outcome == "success" else 1,
        postgres_version=hostile("version"),
        replica=hostile("replica"),
        snapshot_time=hostile("time"),
        snapshot_size=1,
        repository=hostile("repository"),
        sizes={hostile("database"): 10},
        fixes={hostile("fix"): True},
        checks=[Check(hostile("check"), "fail", hostile("detail"))],
        timings={hostile("timing"): 1.0},
    )
    out, buf = console()
    render_report(out, report)  # raised MarkupError before
    text = buf.getvalue()
    fields = ["snap", "replica", "time", "repository", "database", "fix", "check", "detail"]
    fields += ["timing"] + (["version"] if outcome == "success" else ["error", "reason"])
    for field in fields:
        assert shown(field) in text, field
    assert not set(text) & {"\x1b", "\x07", "\x08", "\r", "\x7f", "\x9b"}


def test_observer_steps_and_notes_are_literal() -> None:
    out, buf = console()
    observer = TerminalObserver(out)
    observer.step("restore", hostile("step"))
    observer.note(hostile("note"))  # a repair note quoting postgresql.auto.conf
    observer.close()
    text = buf.getvalue()
    assert shown("step") in text and shown("note") in text
    assert "\x1b" not in text and "\x07" not in text


def test_on_a_terminal_only_pgro_styles_reach_it() -> None:
    out, buf = console(terminal=True)
    out.print(literal(hostile("v")))
    text = buf.getvalue()
    assert shown("v") in text
    # color_system=None: Rich itself writes no escape, so none may appear at all.
    assert "\x1b" not in text and "\x07" not in text


def test_strip_controls_keeps_text_tabs_and_newlines() -> None:
    assert strip_controls("a\tb\nc") == "a\tb\nc"
    assert strip_controls("ünïcode ✔ [x]") == "ünïcode ✔ [x]"
    assert strip_controls("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\") == "link"
    assert strip_controls("x\x1b") == "x"
    assert strip_controls("\x00a\x1fb\x85c") == "abc"
