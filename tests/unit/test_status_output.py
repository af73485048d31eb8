"""`pgro status` prints what manifests, canopy, snapshots and servers wrote literally."""

from __future__ import annotations

import io

from rich.console import Console

from pgro.cli.status_view import print_replica as _print_replica

HOSTILE = "evil[/][/] [bold]x[/bold] \x1b[2J\x1b]0;title\x07 \x9b31m"


def entry() -> dict[str, object]:
    return {
        "namespace": "default",
        "name": "orders",
        "status": {
            "phase": "Active",
            "currentRestore": f"orders-1 {HOSTILE}",
            "conditions": [
                {
                    "type": "StepsSucceeding",
                    "status": "False",
                    "reason": "StepFailing",
                    "message": f"server said: {HOSTILE}",
                }
            ],
        },
        "endpoint": {"host": "127.0.0.1", "port": 6432},
        "restores": [
            {"name": "orders-1", "status": {"phase": "Ready"}, "spec": {"snapshot": HOSTILE}}
        ],
        "credentials": [{"username": "analytics", "file": "/state/credentials/x.json"}],
    }


def test_status_prints_untrusted_text_literally() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=300, color_system="truecolor")
    _print_replica(console, entry())
    text = out.getvalue()
    assert "evil[/][/] [bold]x[/bold]" in text
    assert "server said: evil[/][/]" in text
    # pgro's own styling may use escapes; none of the hostile ones survive.
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x07" not in text
    assert "\x9b" not in text
