"""The copy of the persistent schemas from the serving restore to the switching one: one
POSIX shell program both runtimes run (the operator in a `postgres:<major>` Job, whose image
has no pgro; `pgro run` as a local process group), and its local supervision.

Deliberate differences from the reference (`pg_dump | psql`, `--no-owner`, as `postgres`):

- `pg_dump --format=custom | pg_restore`, never psql. A hostile catalog can make pg_dump emit
  psql meta-commands (`\\!` runs a shell command; CVE-2025-8714); pg_restore sends SQL only.
- pg_restore runs with `--role=<analytics user>`, so every object the copy creates (the
  schemas included) is owned by that user, the persistent schemas' owner. With
  `--no-owner` as `postgres` they became superuser-owned, and a SECURITY DEFINER function
  an analytics user wrote on restore N ran as superuser on restore N+1.
- A failed pg_dump fails the copy (retried on the next pass); the reference fed psql half
  a dump and could call that `partial`. Statement errors of the restore are counted, never fatal:
  pg_restore continues past them (no `--exit-on-error`), as the reference's psql did.

Its inputs come by environment: `PGRO_SOURCE`/`PGRO_TARGET` (libpq conninfos without a
password; `PGPASSWORD` when one is needed), `PGRO_OWNER`, `PGRO_WORK` (a private directory
for the tools' error output; the dump itself is streamed, never written) and `PGRO_RESULT`
(where the one-line result goes: `success`, `partial: N statement error(s)` or
`failed: <why>`); the schemas as `--schema` arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from pgro.core.observations import WorkState
from pgro.core.schema_migration import Transfer
from pgro.postgres.account import RunAccount
from pgro.postgres.schema_migration import COPY_APPLICATION
from pgro.postgres.session import safe_options
from pgro.processes import process_args, spawn

MARKER: Final = "# pgro persistent-schema copy"
SCRIPT: Final = (
    MARKER
    + r"""
set -u
work=$PGRO_WORK
rm -f "$work/dump.rc" "$work/dump.err" "$work/restore.err"
# Streamed: no copy of the data on disk. The dump's status comes back through a file (no
# pipefail in POSIX sh).
{
  pg_dump --dbname="$PGRO_SOURCE" --format=custom --compress=0 --no-owner --no-privileges \
    --no-publications --no-subscriptions --strict-names "$@" 2>"$work/dump.err"
  echo $? >"$work/dump.rc"
} | pg_restore --dbname="$PGRO_TARGET" --no-owner --no-privileges --role="$PGRO_OWNER" \
  2>"$work/restore.err"
rc=$?
errors=$(sed -n 's/^pg_restore: warning: errors ignored on restore: \([0-9][0-9]*\)$/\1/p' \
  "$work/restore.err")
# Either side may have failed first (pg_restore refusing to connect breaks pg_dump's pipe; a
# source gone mid-dump truncates pg_restore's input): both tails are kept.
why=""
if [ "$(cat "$work/dump.rc" 2>/dev/null)" != 0 ]; then
  why="pg_dump: $(tail -c 300 "$work/dump.err" | tr '\n' ' ')"
fi
if [ "$rc" -ne 0 ] && [ -z "$errors" ]; then
  why="${why:+$why; }pg_restore: $(tail -c 300 "$work/restore.err" | tr '\n' ' ')"
fi
if [ -n "$why" ]; then
  printf 'failed: %s\n' "$why" >"$PGRO_RESULT"
  exit 1
fi
if [ -z "$errors" ] || [ "$errors" -eq 0 ]; then
  echo success >"$PGRO_RESULT"
else
  echo "partial: $errors statement error(s)" >"$PGRO_RESULT"
fi
exit 0
"""
)


def schema_arguments(schemas: Sequence[str]) -> list[str]:
    """`--schema` arguments naming exactly these schemas: pg_dump reads a pattern, so each
    name is double-quoted (where `*`, `?` and `.` are literal) with its quotes doubled."""
    return ["--schema=" + '"' + s.replace('"', '""') + '"' for s in schemas]


def copy_environment(
    *, source: str, target: str, owner: str, work: str, result: str
) -> dict[str, str]:
    """The program's environment (without PATH and any password)."""
    return {
        "PGRO_SOURCE": source,
        "PGRO_TARGET": target,
        "PGRO_OWNER": owner,
        "PGRO_WORK": work,
        "PGRO_RESULT": result,
        "PGAPPNAME": COPY_APPLICATION,
        # Nothing the restored catalog names is loaded into the copy's sessions, and a
        # read-only default does not stop the restore.
        "PGOPTIONS": safe_options() + " -c default_transaction_read_only=off",
    }


def read_result(text: str) -> Transfer:
    """A finished copy's result line as a Transfer."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if line.startswith("failed:"):
        return Transfer(WorkState.FAILED, failure=line.removeprefix("failed:").strip())
    if not line:
        return Transfer(WorkState.FAILED, failure="the copy ended without a result")
    return Transfer(WorkState.SUCCEEDED, result=line)


# -- pgro run: the copy as a local process group --------------------------------------------

_STATE = "copy.json"  # {"pid": …, "startedAt": …}
_RESULT = "result"
_LOG = "copy.log"


@dataclass(frozen=True)
class LocalCopy:
    """The copy of one switching restore, in its own directory (`<restore dir>/schemas/`)."""

    directory: Path
    account: RunAccount

    def start(
        self,
        *,
        bindir: Path,
        source: str,
        target: str,
        owner: str,
        schemas: Sequence[str],
        started_at: datetime,
    ) -> None:
        """Start the copy, after stopping and removing whatever an earlier attempt left."""
        self.discard()
        self.directory.mkdir(mode=0o700)
        os.chown(self.directory, self.account.uid, self.account.gid)
        env = {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            **self.account.env(),
            **copy_environment(
                source=source,
                target=target,
                owner=owner,
                work=str(self.directory),
                result=str(self.directory / _RESULT),
            ),
        }
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with os.fdopen(os.open(self.directory / _LOG, flags, 0o600), "wb") as log:
            proc = spawn(
                ["sh", "-c", SCRIPT, "sh", *schema_arguments(schemas)],
                # The shell dies with pgro; its pg_dump and pg_restore are found by their
                # process group (the shell's pid) and stopped by `discard`.
                death_signal=signal.SIGKILL,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.directory,
                **self.account.popen_kwargs(),
            )
        state = {"pid": proc.pid, "startedAt": started_at.isoformat()}
        (self.directory / _STATE).write_text(json.dumps(state))
        # Reaped by `observe` (poll); the pid stays findable through copy.json.
        _children[str(self.directory)] = proc

    def observe(self) -> Transfer:
        state = self._state()
        if state is None:
            return Transfer.absent()
        pid, started_at = state
        proc = _children.get(str(self.directory))
        if proc is not None:
            proc.poll()
        if _is_copy_shell(pid):
            return Transfer(WorkState.RUNNING, started_at=started_at)
        # The shell is gone: no result will come from what it left running (`discard`
        # stops those).
        try:
            text = (self.directory / _RESULT).read_text(errors="replace")
        except OSError:
            return Transfer(
                WorkState.FAILED,
                started_at=started_at,
                failure="the copy stopped without a result (pgro or the copy was killed)",
            )
        found = read_result(text)
        return Transfer(found.state, started_at, found.result, found.failure)

    def discard(self) -> None:
        """Stop the copy (its whole process group) and remove its directory."""
        state = self._state()
        if state is not None:
            pid = state[0]
            for member in _members(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
            proc = _children.pop(str(self.directory), None)
            if proc is not None:
                proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _state(self) -> tuple[int, datetime] | None:
        try:
            doc = json.loads((self.directory / _STATE).read_text())
            return int(doc["pid"]), datetime.fromisoformat(doc["startedAt"]).astimezone(UTC)
        except (OSError, ValueError, KeyError, TypeError):
            return None


_children: dict[str, subprocess.Popen[bytes]] = {}
_PROGRAMS: Final = frozenset({"sh", "pg_dump", "pg_restore", "grep", "sed", "tail", "tr"})


def _is_copy_shell(pid: int) -> bool:
    args = process_args(pid) or []
    return len(args) > 2 and args[2].startswith(MARKER)


def _members(pgid: int) -> list[int]:
    """The live processes of the copy's process group (`pgid` is its shell's pid): only
    programs the copy runs, so a reused pid never gets an unrelated process killed."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) < 3 or fields[0] == "Z" or int(fields[2]) != pgid:
            continue
        args = process_args(int(entry.name))
        if args and os.path.basename(args[0]) in _PROGRAMS:
            found.append(int(entry.name))
    return found
