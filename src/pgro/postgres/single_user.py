"""Statements run in PostgreSQL's single-user mode (`postgres --single`), before any server.

Single-user mode is the only way into a cluster whose catalog must be changed before a
server may run on it (the locale rewrite, `locale_fix`). It reads one statement per line
from stdin, prints results on stdout and its log on stderr, and exits 0 even when a
statement failed: the output decides. It gets the server's forced settings (nothing the
snapshot names is loaded) and `default_transaction_read_only=off` (a read-only replica's
configuration would otherwise refuse every write). The session runs as the bootstrap
superuser whatever the OS user is called.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.config import forced_arguments
from pgro.postgres.server import StartupFailed, server_forced_settings
from pgro.processes import run_tied

# Any database opens the shared catalogs; template1 exists in every cluster.
DEFAULT_DATABASE: Final = "template1"
TIMEOUT_S: Final = 3600.0  # crash recovery of a large cluster happens here
# Whatever the log_line_prefix (the restored configuration's, possibly empty).
_FAILED = re.compile(r"\b(?:ERROR|FATAL|PANIC):  ")


class SingleUserFailed(StartupFailed):
    """The session did not start, or a statement failed. `log_tail` holds the log, which
    `server.classify_startup_failure` reads to decide on a WAL reset."""


@dataclass(frozen=True)
class SingleUserOutput:
    stdout: str
    stderr: str


def reports_failure(log_text: str) -> bool:
    """Whether a single-user session's log (stderr) reports an ERROR, FATAL or PANIC."""
    return _FAILED.search(log_text) is not None


def _line(statement: str) -> str:
    text = statement.strip()
    if "\n" in text or "\r" in text:
        raise ValueError("a single-user statement must fit on one line")
    return text if text.endswith(";") else text + ";"


def run_single_user(
    binaries: PostgresBinaries,
    pgdata: Path,
    account: RunAccount,
    statements: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    database: str = DEFAULT_DATABASE,
    timeout: float = TIMEOUT_S,
) -> SingleUserOutput:
    """Run `statements` (one line each) in one single-user session on `pgdata`.

    `env` is added to the process environment (e.g. `LocaleAliases.env()`). Raises
    `SingleUserFailed` when the session exits non-zero or its log reports an ERROR, FATAL or
    PANIC (the statement text is never logged: `log_min_error_statement=panic`)."""
    forced = forced_arguments(server_forced_settings(pgdata, binaries))
    script = "".join(_line(s) + "\n" for s in statements)
    command = [
        binaries.tool("postgres"),
        "--single",
        "-D",
        str(pgdata),
        *forced,
        *("-c", "default_transaction_read_only=off"),
        *("-c", "log_min_error_statement=panic"),
        database,
    ]
    try:
        # Tied to pgro and in a session of its own, as the server is: a killed pgro leaves
        # no single-user session holding the data directory.
        proc = run_tied(
            command,
            script,
            {
                "env": {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "LC_ALL": "C",
                    **account.env(),
                    **(env or {}),
                },
                "cwd": str(pgdata),
                **account.popen_kwargs(),
            },
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise SingleUserFailed(
            f"PostgreSQL {binaries.major} single-user session did not finish within {timeout:.0f}s"
        ) from exc
    out = SingleUserOutput(str(proc.stdout), str(proc.stderr))
    tail = "\n".join(out.stderr.splitlines()[-15:])
    if proc.returncode != 0:
        raise SingleUserFailed(
            f"PostgreSQL {binaries.major} single-user session exited with code {proc.returncode}",
            tail,
        )
    if reports_failure(out.stderr):
        raise SingleUserFailed(
            f"a statement failed in PostgreSQL {binaries.major}'s single-user session", tail
        )
    return out
