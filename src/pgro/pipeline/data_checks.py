"""The checks that read the data (issue 16), run the same way by every verification.

`pgro verify`, the restore worker of `pgro run` (ephemeral replicas) and the operator call
this one module: `DataVerification.before_start` runs the offline page checksums on the
stopped, restored cluster (`pg_checksums --check`, at `standard` and `full` depth, when
the cluster keeps checksums and the binaries ship `pg_checksums`); `after_start` names
what they found through the catalog and runs the online checks of the depth (amcheck, the
full read: `pgro.postgres.integrity`), all within one time budget; `record` appends the
verdicts to the health report's checks and turns them into its verdict:

- a failed check: `DataDamaged` (exit 1, `replica_healthy: false`), the message naming the
  database, relation and block of the first findings, with a count;
- a check the budget cut short (and nothing failed): `VerificationIncomplete` (exit 2: the
  backup was not judged);
- "not checked" (no checksums, no `pg_checksums`, a hash index, ...): never a failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pgro.core.timeouts import readiness_timeout
from pgro.core.verify_depth import (
    CHECKSUMS,
    CheckVerdict,
    Depth,
    DepthChoice,
    DepthPlan,
    Finding,
    depth_for,
    not_checked,
    plan_for,
    replica_depth,
    shape,
)
from pgro.postgres.health import Check, HealthReport

if TYPE_CHECKING:
    from pgro.api.data_checks import DataChecks
    from pgro.pipeline.restore import RestoredDataDirectory
    from pgro.postgres.account import RunAccount
    from pgro.postgres.binaries import PostgresBinaries
    from pgro.postgres.checksums import ChecksumResult
    from pgro.postgres.server import PostgresServer

DATA_DAMAGED: Final = "DataDamaged"
VERIFICATION_INCOMPLETE: Final = "VerificationIncomplete"
MAX_WORKERS: Final = 8
# Tries of the checksums after recovery: after single-user mode, then after a first start.
MAX_RECHECKS: Final = 2
# Chosen from the replica by the restore machine; re-exported for the runtimes.
__all__ = ["DepthChoice", "depth_for", "replica_depth"]
DEFAULT_CHECKING_SUPERUSER: Final = "postgres"


class DataDamaged(Exception):
    """The data checks found damage (a restore that must not count as verified);
    `data_checks` names it for the restore's status and report."""

    reason = DATA_DAMAGED

    def __init__(self, message: str, data_checks: DataChecks | None = None) -> None:
        super().__init__(message)
        self.data_checks = data_checks


def default_workers() -> int:
    """Sessions checking relations in parallel: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def default_budget_s(snapshot_bytes: int) -> float:
    """The time the data checks may take unless told: 30 min + 15 min per 100 GiB (the
    same allowance as the server's readiness)."""
    return readiness_timeout(snapshot_bytes).total_seconds()


def checking_superuser(
    server: PostgresServer, restored: RestoredDataDirectory, timeout: float
) -> str:
    """`postgres` unless the source cluster was initialised by another OS user (then the
    bootstrap superuser, found with the server stopped; it is started again)."""
    import psycopg

    from pgro.postgres.server import bootstrap_superuser
    from pgro.postgres.session import connect

    try:
        connect(
            server.endpoint.conninfo("template1", DEFAULT_CHECKING_SUPERUSER),
            application_name="pgro-verify",
        ).close()
        return DEFAULT_CHECKING_SUPERUSER
    except psycopg.OperationalError as exc:
        missing = f'role "{DEFAULT_CHECKING_SUPERUSER}" does not exist' in str(exc)
        # pgro's safe startup options need a superuser: a `postgres` role that is not one
        # is refused them, and the bootstrap superuser is the role to use instead.
        not_superuser = "permission denied to set parameter" in str(exc)
        if not (missing or not_superuser):
            return DEFAULT_CHECKING_SUPERUSER  # the health check reports the real problem
    server.stop()
    # With the server's env: a snapshot's private locales (LOCPATH) open its databases.
    name = bootstrap_superuser(
        restored.binaries, restored.data.path, server.account, env=server.env or None
    )
    server.start(timeout)
    return name


def _checksum_verdict(result: ChecksumResult, budget_s: float) -> CheckVerdict | None:
    """The verdict of an offline check that found nothing to name (None: it found damage,
    named once the server runs)."""
    if result.findings:
        return None
    if result.error == "pg_checksums is not installed":
        return None  # said by the caller, with the binaries' directory
    if not result.enabled:
        return not_checked(
            CHECKSUMS, "the cluster keeps no data checksums (initialised without -k)"
        )
    if result.error is None:
        return shape(CHECKSUMS, [], result.blocks_scanned, "blocks")
    if "did not finish" in result.error:
        return CheckVerdict(
            CHECKSUMS,
            "incomplete",
            f"incomplete: pg_checksums did not finish within the time budget ({budget_s:.0f}s)",
        )
    if "shut down" in result.error:
        return not_checked(
            CHECKSUMS,
            "pg_checksums needs a cleanly stopped cluster and this backup was taken from a "
            "running server (replaying its WAL at start repairs torn pages)",
        )
    return not_checked(CHECKSUMS, result.error)


@dataclass
class DataVerification:
    """One verification's data checks, at `depth`, within `budget_s` seconds in all."""

    depth: Depth
    budget_s: float
    workers: int = field(default_factory=default_workers)
    clock: Callable[[], float] = time.monotonic
    _started: float | None = None
    _findings: list[Finding] = field(default_factory=list)
    _blocks: int = 0
    _checksums: CheckVerdict | None = None
    # pg_checksums refused the cluster: not cleanly shut down (a copy of a running server).
    _unclean: bool = False
    _rechecks: int = 0

    @property
    def plan(self) -> DepthPlan:
        return plan_for(self.depth)

    def _start_clock(self) -> float:
        if self._started is None:
            self._started = self.clock()
        return self._started

    def _left(self) -> float:
        return self._start_clock() + self.budget_s - self.clock()

    def before_start(self, binaries: PostgresBinaries, pgdata: Path, account: RunAccount) -> None:
        """`pg_checksums --check` on the stopped cluster, where the depth asks for it."""
        from pgro.postgres import checksums

        self._start_clock()
        if not self.plan.checksums:
            return
        if not (binaries.bindir / "pg_checksums").exists():
            self._checksums = not_checked(
                CHECKSUMS,
                f"pg_checksums is not installed with the PostgreSQL {binaries.major} binaries "
                f"({binaries.bindir})",
            )
            return
        try:
            result = checksums.check(
                binaries.bindir, pgdata, max(1.0, self._left()), account=account
            )
        except checksums.ChecksumCheckFailed as exc:
            self._checksums = not_checked(CHECKSUMS, str(exc))
            return
        self._findings = list(result.findings)
        self._blocks = result.blocks_scanned
        self._checksums = _checksum_verdict(result, self.budget_s)
        self._unclean = result.error is not None and "shut down" in result.error

    @property
    def wants_clean_stop(self) -> bool:
        """The checksums could not be read because the copy was not cleanly shut down: once
        its first start has replayed the WAL, a clean stop lets `recheck_stopped` read them
        (what the operator's pod setup does after single-user mode)."""
        return self._unclean and self.plan.checksums and self._rechecks < MAX_RECHECKS

    def recheck_stopped(
        self, binaries: PostgresBinaries, pgdata: Path, account: RunAccount
    ) -> None:
        """`before_start` again, on a cluster that single-user mode or a first start has
        recovered and a clean stop left consistent (still refused: "not checked")."""
        self._rechecks += 1
        self.before_start(binaries, pgdata, account)

    def took_checksums(self, result: ChecksumResult | None, missing: str | None = None) -> None:
        """The offline check as another process ran it (the operator's pod setup):
        recorded as `before_start` records its own; `missing` says why there is none."""
        self._start_clock()
        if not self.plan.checksums:
            return
        if result is None:
            self._checksums = not_checked(CHECKSUMS, missing or "no pg_checksums result")
            return
        self._findings = list(result.findings)
        self._blocks = result.blocks_scanned
        self._checksums = _checksum_verdict(result, self.budget_s)

    def after_start(self, conninfo_for: Callable[[str], str]) -> list[CheckVerdict]:
        """The verdicts of the depth, on the started server (`conninfo_for(dbname)`: a
        superuser's connection string): the checksum findings named by the catalog, then
        amcheck and the full read."""
        from pgro.postgres import checksums, integrity

        started = self._start_clock()
        verdicts: list[CheckVerdict] = []
        if self._findings:
            named = checksums.name_findings(conninfo_for, self._findings)
            verdicts.append(shape(CHECKSUMS, named, self._blocks, "blocks"))
        elif self._checksums is not None:
            verdicts.append(self._checksums)
        if self.plan.reads_data:
            report = integrity.check(
                conninfo_for,
                self.depth,
                workers=self.workers,
                deadline=started + self.budget_s,
                clock=self.clock,
            )
            verdicts.extend(report.verdicts)
        return verdicts


def damage_message(failed: Sequence[CheckVerdict]) -> str:
    return "the data is damaged: " + " | ".join(f"{v.name}: {v.detail}" for v in failed)


def record(health: HealthReport, verdicts: Sequence[CheckVerdict]) -> None:
    """The data checks' verdicts as health checks, and the report's verdict: `DataDamaged`
    when one failed, else `VerificationIncomplete` when one was cut short."""
    for v in verdicts:
        health.checks.append(
            Check(v.name, v.status, v.detail, v.count, tuple(f.as_dict() for f in v.findings))
        )
    if health.failure_reason is not None:
        return
    failed = [v for v in verdicts if v.status == "fail"]
    cut = [v for v in verdicts if v.status == "incomplete"]
    if failed:
        health.failure_reason = DATA_DAMAGED
        health.failure_message = damage_message(failed)
    elif cut:
        health.failure_reason = VERIFICATION_INCOMPLETE
        health.failure_message = (
            "the data checks did not finish within the time budget, so the backup was not "
            "judged: " + " | ".join(v.detail for v in cut)
        )
