"""`pgro check-data`: the operator's data checks (issue 16), in the Job `<restore>-data-check`.

The Job runs the operator's image against the restore's own Service, as the admin role
(`<replica>-admin-creds`), while the restore is Ready and before it is verified or serves.
It runs what `pgro verify` and pgro run's worker run (`pipeline.data_checks`):

- the offline page checksums, which the postgres pod's `setup` script took once the
  cluster was cleanly shut down (`<data root>/pgro-checksums.*`, read back here through the
  server with `pg_read_file`: this pod has neither the data volume nor the binaries);
- amcheck and the full read of the depth, on the running server.

The verdict (`api.data_checks.DataChecks`, JSON) is the termination message, which the
operator reads (`runtimes.kubernetes.observe`). Exit 0 with a verdict, damaged or not;
exit 1 with `error: <reason>` when the checks could not run at all.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pgro.api.data_checks import DataChecks
from pgro.core.secrets import scrub
from pgro.core.verify_depth import Depth, data_checks, parse_depth
from pgro.pipeline.data_checks import DataVerification, record
from pgro.postgres.checksums import ChecksumResult, parse_check
from pgro.postgres.health import HealthReport

if TYPE_CHECKING:
    import psycopg

ENV_HOST: Final = "PGRO_CHECK_HOST"
ENV_PORT: Final = "PGRO_CHECK_PORT"
ENV_USER: Final = "PGRO_CHECK_USER"
ENV_PASSWORD: Final = "PGRO_ADMIN_PASSWORD"  # noqa: S105 - the variable's name
ENV_DEPTH: Final = "PGRO_VERIFY_DEPTH"
ENV_BUDGET: Final = "PGRO_VERIFY_BUDGET_S"
ENV_WORKERS: Final = "PGRO_CHECK_WORKERS"
ENV_TERMINATION_LOG: Final = "PGRO_TERMINATION_LOG"
# The setup script's files, beside the `pgdata` link (`runtimes.kubernetes.scripts`).
CHECKSUMS_FILE: Final = "pgro-checksums"
# Kubernetes keeps at most 4096 bytes of a termination message.
MESSAGE_LIMIT: Final = 4096
# What is read back of pg_checksums' output: its damage lines come first, and a cluster
# with more damage than this is named by its first findings and its count.
OUTPUT_LIMIT: Final = 1 << 20
APPLICATION: Final = "pgro-data-check"


class CheckJobInvalid(Exception):
    reason = "InvalidJob"


@dataclass(frozen=True)
class CheckJob:
    host: str
    port: int
    user: str
    password: str
    depth: Depth
    budget_s: float
    workers: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CheckJob:
        missing = [v for v in (ENV_HOST, ENV_PASSWORD) if not env.get(v)]
        if missing:
            raise CheckJobInvalid(f"{', '.join(missing)} not set")
        try:
            return cls(
                host=env[ENV_HOST],
                port=int(env.get(ENV_PORT) or 5432),
                user=env.get(ENV_USER) or "postgres",
                password=env[ENV_PASSWORD],
                depth=parse_depth(env.get(ENV_DEPTH)),
                budget_s=float(env.get(ENV_BUDGET) or 1800),
                workers=max(1, int(env.get(ENV_WORKERS) or 2)),
            )
        except ValueError as exc:
            raise CheckJobInvalid(str(exc)) from None

    def conninfo_for(self, dbname: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname
        )


def _read(conn: psycopg.Connection[tuple[object, ...]], path: str, limit: int) -> str | None:
    """A file the server can read, or None when it does not exist."""
    row = conn.execute("SELECT pg_read_file(%s, 0, %s, true)", (path, limit)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def offline_checksums(job: CheckJob) -> tuple[ChecksumResult | None, str | None]:
    """What the pod's setup found with pg_checksums (None with the reason when it did not
    run). The files sit beside the server's data directory, the `pgdata` link."""
    from pgro.postgres.session import connect

    with connect(job.conninfo_for("postgres"), application_name=APPLICATION) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
        base = posixpath.join(posixpath.dirname(str(row[0] if row else "")), CHECKSUMS_FILE)
        status = _read(conn, base + ".status", 64 * 1024)
        if status is None:
            return None, (
                "the server's setup left no pg_checksums result (a pod started before this "
                "restore asked for the checks)"
            )
        fields = dict(line.split(" ", 1) for line in status.splitlines() if " " in line.strip())
        state = fields.get("status", "").strip()
        if state == "missing":
            return None, "pg_checksums is not in the server's image"
        if state == "disabled":
            return ChecksumResult(enabled=False), None
        if not state.lstrip("-").isdigit():
            return None, f"the setup's pg_checksums status is unreadable ({state[:40]!r})"
        stdout = _read(conn, base + ".stdout", OUTPUT_LIMIT) or ""
        stderr = _read(conn, base + ".stderr", OUTPUT_LIMIT) or ""
    pgdata = Path(fields.get("pgdata", "").strip() or "/")
    return parse_check(stdout, stderr, int(state), pgdata), None


def run(job: CheckJob) -> DataChecks:
    data = DataVerification(job.depth, job.budget_s, workers=job.workers)
    if data.plan.checksums:
        result, missing = offline_checksums(job)
        data.took_checksums(result, missing)
    verdicts = data.after_start(job.conninfo_for)
    health = HealthReport()
    record(health, verdicts)
    for verdict in verdicts:
        print(f"data check {verdict.name} ({job.depth}): {verdict.status}: {verdict.detail}")
    return data_checks(job.depth, verdicts, health.failure_message)


def fit(checks: DataChecks, limit: int = MESSAGE_LIMIT) -> str:
    """The verdict as JSON within `limit` bytes: findings, then details, give way first;
    the verdict and each check's name and status always fit."""
    text = json.dumps(checks.to_wire())
    if len(text.encode()) <= limit:
        return text
    for shown, detail in ((2, 400), (1, 200), (0, 120), (0, 40)):
        slim = checks.model_copy(
            update={
                "message": (checks.message or "")[:detail] or None,
                "checks": [
                    c.model_copy(
                        update={"detail": c.detail[:detail], "findings": c.findings[:shown]}
                    )
                    for c in checks.checks
                ],
            }
        )
        text = json.dumps(slim.to_wire())
        if len(text.encode()) <= limit:
            return text
    bare = DataChecks(depth=checks.depth, verdict=checks.verdict, message=None, checks=[])
    return json.dumps(bare.to_wire())


def parse_message(message: str) -> tuple[DataChecks | None, str]:
    """(the verdict, or None and why) from the Job's termination message."""
    text = message.strip()
    if not text:
        return None, "the data-check Job left no termination message"
    if text.startswith("error: "):
        return None, text.removeprefix("error: ")[:500]
    try:
        return DataChecks.model_validate(json.loads(text)), ""
    except ValueError as exc:
        return None, f"the data-check Job's result is unreadable: {str(exc)[:200]}"


def main() -> None:
    path = Path(os.environ.get(ENV_TERMINATION_LOG, "/dev/termination-log"))
    secret = os.environ.get(ENV_PASSWORD, "")
    try:
        job = CheckJob.from_env(os.environ)
        message = fit(run(job))
        code = 0
    except Exception as exc:
        reason = getattr(exc, "reason", type(exc).__name__)
        message = f"error: {reason}: {scrub(str(exc), [secret])}"[:MESSAGE_LIMIT]
        print(message, file=sys.stderr)
        code = 1
    try:
        path.write_bytes(message.encode()[:MESSAGE_LIMIT])
    except OSError as exc:
        print(f"cannot write the termination message to {path}: {exc}", file=sys.stderr)
    sys.exit(code)
