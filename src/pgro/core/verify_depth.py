"""How deep a verification reads the data, and how its findings become verdicts (pure).

`quick` is what a verification always did (the server starts, is a primary, each database
answers `SELECT 1`). `standard` adds the offline page checksums (`pg_checksums --check`,
when the cluster has them) and `bt_index_check` on every btree index: it catches a heap
page overwritten in a cluster with checksums and a btree leaf page that is out of place.
`full` adds `heapallindexed` (every heap tuple has its index entry), `verify_heapam` on
every heap and TOAST relation (PostgreSQL 14+) and a read of every page of every table,
TOAST included.

A verdict names the damage: the first `MAX_SHOWN` findings of a check (database, relation,
block, the server's message) and how many there were in all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from pgro.api.data_checks import DataCheck, DataCheckFinding, DataChecks, DataVerdict
from pgro.api.names import ANNOTATION_VERIFY_DEPTH

if TYPE_CHECKING:
    from pgro.api.replica import PostgresPhysicalReplica

Depth = Literal["quick", "standard", "full"]
DEPTHS: Final[tuple[Depth, ...]] = ("quick", "standard", "full")
# The cheapest depth that fails both damaged fixtures of issue 16 (a heap page overwritten
# with checksums on: pg_checksums; a btree leaf replaced with checksums off: bt_index_check).
DEFAULT_DEPTH: Final[Depth] = "standard"

MAX_SHOWN: Final = 5

# Check names, as they appear in health_details.checks.
CHECKSUMS: Final = "checksums"
BTREE: Final = "btree"
HEAP: Final = "heap"
FULL_READ: Final = "full_read"
NOT_CHECKED: Final = "not_checked"
COMPLETENESS: Final = "integrity_complete"


@dataclass(frozen=True)
class DepthPlan:
    """What one depth runs, beyond the quick checks every depth runs."""

    depth: Depth
    checksums: bool
    btree: bool
    heapallindexed: bool
    heap: bool
    full_read: bool

    @property
    def reads_data(self) -> bool:
        """Whether the online integrity checks (amcheck, full read) run at all."""
        return self.btree or self.heap or self.full_read

    @property
    def checks(self) -> tuple[str, ...]:
        names = []
        if self.checksums:
            names.append(CHECKSUMS)
        if self.btree:
            names.append(BTREE)
        if self.heap:
            names.append(HEAP)
        if self.full_read:
            names.append(FULL_READ)
        return tuple(names)


PLANS: Final[dict[Depth, DepthPlan]] = {
    "quick": DepthPlan("quick", False, False, False, False, False),
    "standard": DepthPlan("standard", True, True, False, False, False),
    "full": DepthPlan("full", True, True, True, True, True),
}


class UnknownDepth(ValueError):
    reason = "UnknownVerifyDepth"


def parse_depth(value: str | None) -> Depth:
    """A depth from a flag or setting; None or blank is the default."""
    text = (value or "").strip().lower()
    if not text:
        return DEFAULT_DEPTH
    for depth in DEPTHS:
        if depth == text:
            return depth
    raise UnknownDepth(
        f"unknown verification depth {value!r}: use one of {', '.join(DEPTHS)} "
        f"(default {DEFAULT_DEPTH})"
    )


def plan_for(depth: str | None) -> DepthPlan:
    return PLANS[parse_depth(depth)]


# "invalid page in block 7 of relation …", "… tid=(7,12) …" (amcheck's details).
_BLOCK = re.compile(r"\bblock (\d+)|\btid=\((\d+),")


def block_in_message(message: str) -> int | None:
    """The first block a server message names, if any."""
    m = _BLOCK.search(message)
    if m is None:
        return None
    return int(m.group(1) or m.group(2))


@dataclass(frozen=True)
class Finding:
    """One piece of damage: where it is and the words of the tool that found it."""

    check: str
    message: str
    database: str | None = None
    relation: str | None = None  # schema-qualified
    block: int | None = None
    table: str | None = None  # the table an index or TOAST relation belongs to
    file: str | None = None  # a data file, relative to the data directory

    def where(self) -> str:
        parts = []
        if self.relation is not None:
            name = f"{self.database}.{self.relation}" if self.database else self.relation
            if self.table is not None:
                name += f" (of {self.table})"
            parts.append(name)
        elif self.database is not None:
            parts.append(self.database)
        if self.file is not None:
            parts.append(f"file {self.file}")
        if self.block is not None:
            parts.append(f"block {self.block}")
        return " ".join(parts)

    def describe(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"message": self.message}
        for key in ("database", "relation", "table", "file", "block"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class Skip:
    """A relation a check leaves alone on purpose, and why (never a failure)."""

    database: str
    relation: str
    reason: str


VerdictStatus = Literal["pass", "fail", "not_checked", "incomplete"]


@dataclass(frozen=True)
class CheckVerdict:
    name: str
    status: VerdictStatus
    detail: str
    findings: tuple[Finding, ...] = ()
    count: int = 0

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.count:
            out["count"] = self.count
            out["findings"] = [f.as_dict() for f in self.findings]
        return out


def shape(name: str, findings: Sequence[Finding], checked: int, what: str) -> CheckVerdict:
    """A check's verdict: pass with how much it covered, or fail naming the first findings."""
    if not findings:
        return CheckVerdict(name, "pass", f"{checked} {what} checked, no damage found")
    shown = tuple(findings[:MAX_SHOWN])
    more = len(findings) - len(shown)
    detail = f"{len(findings)} problem{'s' if len(findings) != 1 else ''} in {checked} {what}: "
    detail += "; ".join(f.describe() for f in shown)
    if more:
        detail += f"; and {more} more"
    return CheckVerdict(name, "fail", detail, shown, len(findings))


def not_checked(name: str, reason: str) -> CheckVerdict:
    return CheckVerdict(name, "not_checked", f"not checked: {reason}")


def shape_skips(skips: Iterable[Skip]) -> CheckVerdict | None:
    """Relations left alone on purpose, grouped by reason: first few names and a count."""
    by_reason: dict[str, list[Skip]] = {}
    for skip in skips:
        by_reason.setdefault(skip.reason, []).append(skip)
    if not by_reason:
        return None
    parts = []
    total = 0
    for reason in sorted(by_reason):
        group = by_reason[reason]
        total += len(group)
        names = ", ".join(f"{s.database}.{s.relation}" for s in group[:MAX_SHOWN])
        more = f" and {len(group) - MAX_SHOWN} more" if len(group) > MAX_SHOWN else ""
        parts.append(f"{reason}: {names}{more}")
    return CheckVerdict(
        NOT_CHECKED, "not_checked", f"{total} relations not checked: " + "; ".join(parts)
    )


def incomplete(done: int, total: int) -> CheckVerdict:
    return CheckVerdict(
        COMPLETENESS,
        "incomplete",
        f"incomplete after {done} of {total} relations: the time budget ran out "
        "(raise the verification timeout or choose a lower depth)",
    )


@dataclass(frozen=True)
class DepthChoice:
    depth: Depth
    # Why the replica's own setting was not used (an invalid annotation), for a warning.
    warning: str | None = None


def depth_for(
    annotations: Mapping[str, str], explicit: str | None = None, *, fallback: Depth = DEFAULT_DEPTH
) -> DepthChoice:
    """The depth of a replica's verification: `explicit` (a flag, already valid), else its
    `pgro.bes.au/verify-depth` annotation, else `fallback`. An invalid annotation is the
    fallback with a warning, never a failure."""
    if explicit is not None:
        return DepthChoice(parse_depth(explicit))
    value = annotations.get(ANNOTATION_VERIFY_DEPTH)
    if value is None:
        return DepthChoice(fallback)
    try:
        return DepthChoice(parse_depth(value))
    except UnknownDepth as exc:
        return DepthChoice(
            fallback, f"annotation {ANNOTATION_VERIFY_DEPTH}: {exc}; verifying at {fallback}"
        )


def replica_depth(replica: PostgresPhysicalReplica) -> DepthChoice:
    """The depth of a replica's verification in `pgro run` and the operator: its
    annotation, else `standard` for a verify replica (`ephemeral`) and `quick` for an
    analytics replica (whose switchover the checks would delay)."""
    fallback: Depth = DEFAULT_DEPTH if replica.spec.ephemeral else "quick"
    return depth_for(replica.metadata.annotations, fallback=fallback)


# What one restore's status may carry of a hostile catalog's names and a tool's words.
MAX_CHECKS: Final = 16
MAX_TEXT: Final = 1000
MAX_NAME: Final = 200


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _finding(f: Finding) -> DataCheckFinding:
    return DataCheckFinding(
        message=_cut(f.message, MAX_TEXT) or "",
        database=_cut(f.database, MAX_NAME),
        relation=_cut(f.relation, MAX_NAME),
        table=_cut(f.table, MAX_NAME),
        file=_cut(f.file, MAX_NAME),
        block=f.block if f.block is not None and f.block >= 0 else None,
    )


def verdict_of(verdicts: Sequence[CheckVerdict]) -> DataVerdict:
    if any(v.status == "fail" for v in verdicts):
        return "damaged"
    if any(v.status == "incomplete" for v in verdicts):
        return "incomplete"
    return "passed"


def data_checks(
    depth: Depth, verdicts: Sequence[CheckVerdict], message: str | None = None
) -> DataChecks:
    """The verdicts as `status.dataChecks`, every text and list capped: failures first, so
    a cap never hides one."""
    ordered = sorted(verdicts, key=lambda v: v.status != "fail")[:MAX_CHECKS]
    return DataChecks(
        depth=depth,
        verdict=verdict_of(verdicts),
        message=_cut(message, MAX_TEXT),
        checks=[
            DataCheck(
                name=_cut(v.name, MAX_NAME) or "",
                status=v.status,
                detail=_cut(v.detail, MAX_TEXT) or "",
                count=v.count or None,
                findings=[_finding(f) for f in v.findings[:MAX_SHOWN]],
            )
            for v in ordered
        ],
    )


def damage_summary(checks: DataChecks) -> str:
    """`DataDamaged: …` naming the failed checks' first findings, as a failure reason."""
    failed = [c for c in checks.checks if c.status == "fail"]
    return "DataDamaged: the data is damaged: " + " | ".join(
        f"{c.name}: {c.detail}" for c in failed
    )
