"""Offline page checksums of a stopped cluster: `pg_checksums --check`, before it starts.

A cluster initialised with data checksums stores one per page; `pg_checksums --check`
reads every page of every relation file and names each one whose checksum does not match
(file, block). Only a stopped server can be checked, so this runs between the restore and
the start. A file is mapped to its relation after the start (`relation_for_file`), through
the catalog (`pg_filenode_relation`).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pgro.core.verify_depth import CHECKSUMS, Finding

if TYPE_CHECKING:
    from pgro.postgres.account import RunAccount

# 1 GiB segments of 8 kB blocks: pg_checksums numbers blocks within each segment file.
BLOCKS_PER_SEGMENT = 131072

_CONTROL_CHECKSUMS = re.compile(r"^Data page checksum version:\s*(\d+)", re.MULTILINE)
_FAILED = re.compile(r'checksum verification failed in file "([^"]+)", block (\d+): (.*)$')
_READ_FAILED = re.compile(r'could not read block (\d+) in file "([^"]+)": (.*)$')
_BAD_COUNT = re.compile(r"^Bad checksums:\s*(\d+)", re.MULTILINE)
_SCANNED = re.compile(r"^Blocks scanned:\s*(\d+)", re.MULTILINE)
# base/<db>/<filenode>[.<segment>], global/<filenode>, pg_tblspc/<ts>/<version>/<db>/<filenode>
_RELFILE = re.compile(
    r"^(?:base/(?P<db>\d+)|global|pg_tblspc/(?P<ts>\d+)/[^/]+/(?P<tsdb>\d+))"
    r"/(?P<node>\d+)(?:\.(?P<seg>\d+))?$"
)


@dataclass
class ChecksumResult:
    """What `pg_checksums --check` found. `enabled` False: the cluster has no checksums."""

    enabled: bool
    findings: list[Finding] = field(default_factory=list)
    blocks_scanned: int = 0
    bad_checksums: int = 0
    error: str | None = None  # the tool failed for another reason than damage

    @property
    def healthy(self) -> bool:
        return self.enabled and not self.findings and self.error is None


def _run(
    argv: list[str], timeout: float, account: RunAccount | None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    kwargs: dict[str, object] = {}
    if account is not None and not account.is_current_user:
        env.update(account.env())
        kwargs = account.popen_kwargs()
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
        cwd="/",
        **kwargs,
    )


def checksums_enabled(
    bindir: Path, pgdata: Path, *, timeout: float = 60.0, account: RunAccount | None = None
) -> bool:
    """Whether `pg_controldata` says the cluster keeps data page checksums."""
    proc = _run([str(bindir / "pg_controldata"), "-D", str(pgdata)], timeout, account)
    m = _CONTROL_CHECKSUMS.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise ChecksumCheckFailed(
            f"pg_controldata could not read {pgdata}: "
            f"{(proc.stderr or proc.stdout).strip() or f'exit {proc.returncode}'}"
        )
    return int(m.group(1)) != 0


class ChecksumCheckFailed(Exception):
    reason = "ChecksumCheckFailed"


def _relative(path: str, pgdata: Path) -> str:
    try:
        return str(Path(path).relative_to(pgdata))
    except ValueError:
        return path


def check(
    bindir: Path,
    pgdata: Path,
    timeout: float,
    *,
    account: RunAccount | None = None,
) -> ChecksumResult:
    """`pg_checksums --check` on a stopped cluster, when it keeps checksums.

    Each damaged block is a finding naming its file (relative to `pgdata`) and block (the
    block of the relation, segments counted). `enabled` is False, and nothing is read, when
    the cluster has no checksums. A timeout or a tool failure that names no block is
    `error`, never a crash.
    """
    if not (bindir / "pg_checksums").exists():
        return ChecksumResult(enabled=False, error="pg_checksums is not installed")
    if not checksums_enabled(bindir, pgdata, account=account):
        return ChecksumResult(enabled=False)
    try:
        proc = _run([str(bindir / "pg_checksums"), "--check", "-D", str(pgdata)], timeout, account)
    except subprocess.TimeoutExpired:
        return ChecksumResult(
            enabled=True, error=f"pg_checksums did not finish within {timeout:.0f}s"
        )
    return parse_check(proc.stdout, proc.stderr, proc.returncode, pgdata)


def parse_check(stdout: str, stderr: str, returncode: int, pgdata: Path) -> ChecksumResult:
    """What `pg_checksums --check -D pgdata` said, on a cluster that keeps checksums: each
    damaged block a finding, a failure naming no block `error`. The text is untrusted (the
    operator reads it back from the pod that ran the tool): only the lines that match
    pg_checksums' own forms are taken."""
    result = ChecksumResult(enabled=True)
    for line in stderr.splitlines():
        failed = _FAILED.search(line)
        unread = _READ_FAILED.search(line)
        if failed:
            path, block, message = failed.group(1), int(failed.group(2)), failed.group(3)
            message = "checksum mismatch: " + message
        elif unread:
            block, path, message = int(unread.group(1)), unread.group(2), unread.group(3)
            message = "could not read the block: " + message
        else:
            continue
        rel = _relative(path, pgdata)
        m = _RELFILE.match(rel)
        if m and m.group("seg"):
            block += int(m.group("seg")) * BLOCKS_PER_SEGMENT
        result.findings.append(Finding(CHECKSUMS, message, file=rel, block=block))
    if m_scanned := _SCANNED.search(stdout):
        result.blocks_scanned = int(m_scanned.group(1))
    if m_bad := _BAD_COUNT.search(stdout):
        result.bad_checksums = int(m_bad.group(1))
    if returncode != 0 and not result.findings:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        result.error = f"pg_checksums failed: {lines[-1] if lines else f'exit {returncode}'}"
    return result


def relation_for_file(conninfo_for: Callable[[str], str], relfile: str) -> tuple[str, str] | None:
    """`(database, schema.relation)` of a data file (`base/<dboid>/<relfilenode>[.seg]`,
    `global/<relfilenode>`, or under `pg_tblspc`), on the started server; None when the
    catalog does not know it (a dropped relation's leftover, a file of another fork).

    `conninfo_for(dbname)` gives a superuser connection string (used with
    `session.connect`). Fork suffixes (`_fsm`, `_vm`, `_init`) are stripped first.
    """
    import psycopg
    from psycopg import sql

    from pgro.postgres.session import connect

    relfile = re.sub(r"_(fsm|vm|init)(?=(\.\d+)?$)", "", relfile)
    m = _RELFILE.match(relfile)
    if m is None:
        return None
    node = int(m.group("node"))
    dboid = m.group("db") or m.group("tsdb")
    tablespace = int(m.group("ts") or 0)
    try:
        with connect(conninfo_for("postgres"), application_name="pgro-verify") as conn:
            if dboid is None:
                dbname = "postgres"  # shared catalogs are visible from every database
            else:
                row = conn.execute(
                    "SELECT datname FROM pg_catalog.pg_database WHERE oid = %s", (int(dboid),)
                ).fetchone()
                if row is None:
                    return None
                dbname = str(row[0])
        with connect(conninfo_for(dbname), application_name="pgro-verify") as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = pg_catalog.pg_filenode_relation(%s, %s)"
                ),
                (tablespace, node),
            ).fetchone()
    except psycopg.Error:
        return None
    if row is None:
        return None
    return dbname, f"{quote_ident(str(row[0]))}.{quote_ident(str(row[1]))}"


def name_findings(conninfo_for: Callable[[str], str], findings: list[Finding]) -> list[Finding]:
    """The findings with the database and relation of their file, where the catalog has it."""
    named: list[Finding] = []
    cache: dict[str, tuple[str, str] | None] = {}
    for finding in findings:
        if finding.file is None:
            named.append(finding)
            continue
        key = re.sub(r"\.\d+$", "", finding.file)
        if key not in cache:
            cache[key] = relation_for_file(conninfo_for, key)
        where = cache[key]
        if where is None:
            named.append(finding)
        else:
            named.append(
                Finding(
                    finding.check,
                    finding.message,
                    database=where[0],
                    relation=where[1],
                    block=finding.block,
                    file=finding.file,
                )
            )
    return named


_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


def quote_ident(name: str) -> str:
    """A name as SQL would need it written: bare when plain, double-quoted otherwise."""
    return name if _PLAIN.match(name) else '"' + name.replace('"', '""') + '"'
