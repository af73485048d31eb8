"""`status.dataChecks`: what the checks that read a restore's data found (issue 16).

Recorded once per restore by whichever runtime ran them (pgro run's restore worker, the
operator's `<restore>-data-check` Job), then read by the restore machine (damage fails the
restore) and by the canopy report (the checks, findings included). The values come from a
restored, untrusted catalog: `from_verdicts` (core) caps every text and list before they
reach status.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pgro.api.base import ApiModel

DataCheckStatus = Literal["pass", "fail", "not_checked", "incomplete"]
# passed: every check passed or could not apply; damaged: a check failed; incomplete: the
# time budget (or the checking Job) cut them short before any failed; not_run: the
# runtime could not run them for this restore (the note says why).
DataVerdict = Literal["passed", "damaged", "incomplete", "not_run"]


class DataCheckFinding(ApiModel):
    message: str
    database: str | None = None
    relation: str | None = None
    table: str | None = None
    file: str | None = None
    block: int | None = Field(default=None, ge=0)


class DataCheck(ApiModel):
    omit_when_empty = frozenset({"findings"})

    name: str
    status: DataCheckStatus
    detail: str = ""
    count: int | None = Field(default=None, ge=0)
    findings: list[DataCheckFinding] = Field(default_factory=list)

    def as_report(self) -> dict[str, object]:
        """The check as `health_details.checks` carries it (snake_case, like pgro verify's
        JSON report)."""
        out: dict[str, object] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.count:
            out["count"] = self.count
            out["findings"] = [f.model_dump(mode="json", exclude_none=True) for f in self.findings]
        return out


class DataChecks(ApiModel):
    omit_when_empty = frozenset({"checks"})

    depth: Literal["quick", "standard", "full"]
    verdict: DataVerdict
    message: str | None = None
    checks: list[DataCheck] = Field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return self.verdict == "damaged"
