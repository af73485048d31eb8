"""Steps that keep failing: when to try them again and when to say so.

Both runtimes apply plans step by step (`plan.apply_in_order`). A step that fails every
pass used to be retried and logged at ERROR every pass (every second when the plan's
wake-up time had already passed), which buried the one useful line and hammered whatever
the step talks to. This module holds the rule both runtimes share:

- each (object, step) failing in a row waits 1 s, 2 s, 4 s, … up to 5 minutes before it is
  tried again, and the rest of that object's plan waits with it;
- a failure is reported (one log line, one Warning event, the `StepsSucceeding` condition)
  when it starts and whenever its error changes, not on every retry; an error "changes"
  when it differs once its numbers (pids, ports, times, counts) are masked.

Times are plain seconds on whatever clock the caller passes in as `now` (no clock is read
here); the caller owns any locking.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Final

from pgro.core.plan import Step

STEP_RETRY_FIRST: Final = 1.0
STEP_RETRY_MAX: Final = 300.0
# Past this the doubling has long hit the maximum; the cap keeps 2**n small.
_MAX_EXPONENT: Final = 20

# The replica condition that shows a step failing (False) and its recovery (True).
STEPS_CONDITION: Final = "StepsSucceeding"
STEP_FAILING: Final = "StepFailing"
RECOVERED: Final = "Recovered"
# The Warning event recorded once per change of failure.
EVENT_STEP_FAILED: Final = "StepFailed"
# Said in the one log line, so a reader knows why no further line follows.
RETRY_NOTE: Final = (
    "retried with backoff (1 s doubling to 5 min), logged again when the error changes"
)

_NUMBERS = re.compile(r"\d+")

StepKey = tuple[str, str]  # (the object the plan is for, `step_name` of the step)


def step_name(step: Step) -> str:
    """What a step's failures are counted under: its type, and the restore it acts on when
    it names one, so that deleting one restore working does not clear the failing delete of
    another (nor its backoff)."""
    target = getattr(step, "restore", None)
    kind = type(step).__name__
    # CreateRestore carries the new object (its name is new each pass): its type only.
    return f"{kind} {target}" if isinstance(target, str) and target else kind


def step_retry_delay(failures: int) -> float:
    """1 s after the first failure, doubling, at most 5 minutes (0 failures: 1 s)."""
    exponent = min(max(failures - 1, 0), _MAX_EXPONENT)
    return min(STEP_RETRY_MAX, STEP_RETRY_FIRST * float(1 << exponent))


def error_shape(exc: BaseException) -> str:
    """The error with its numbers masked: what decides that a failure changed.

    Pids, ports, timestamps and counters differ from one attempt to the next while the
    failure is the same; its type and words do not.
    """
    return _NUMBERS.sub("#", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class StepFailure:
    """One (object, step) failing in a row."""

    replica_key: str  # whose `StepsSucceeding` condition shows it
    failures: int
    retry_at: float  # seconds on the caller's clock
    shape: str
    message: str  # as reported (already free of secrets: the caller scrubs it)
    reported_at: float  # when this failure (or its latest change) was reported


@dataclass(frozen=True)
class Failed:
    """What a runtime does about a failure it has just recorded."""

    record: StepFailure
    # True on the first failure and when the error changed: log, event, condition.
    report: bool

    @property
    def delay(self) -> float:
        return step_retry_delay(self.record.failures)


class StepFailures:
    """The failing (object, step) pairs of one runtime. Not thread-safe: callers lock."""

    def __init__(self) -> None:
        self._records: dict[StepKey, StepFailure] = {}

    def get(self, key: StepKey) -> StepFailure | None:
        return self._records.get(key)

    def backing_off(self, key: StepKey, now: float) -> bool:
        """The step failed and its retry time has not come: do not try it (nor the rest
        of its plan) yet. This is not a new failure."""
        record = self._records.get(key)
        return record is not None and now < record.retry_at

    def failed(
        self, key: StepKey, replica_key: str, shape: str, message: str, now: float
    ) -> Failed:
        previous = self._records.get(key)
        failures = previous.failures + 1 if previous is not None else 1
        retry_at = now + step_retry_delay(failures)
        if previous is not None and previous.shape == shape:
            # The same failure again: keep the message and time it was reported with.
            record = replace(previous, failures=failures, retry_at=retry_at)
            self._records[key] = record
            return Failed(record, report=False)
        record = StepFailure(replica_key, failures, retry_at, shape, message, reported_at=now)
        self._records[key] = record
        return Failed(record, report=True)

    def succeeded(self, key: StepKey) -> StepFailure | None:
        """The step worked: its record (if it had been failing) is dropped and returned."""
        return self._records.pop(key, None)

    def settle(self, owner: str, planned: Iterable[str]) -> list[tuple[StepKey, StepFailure]]:
        """A plan for `owner` ran to its end: steps it no longer holds are no longer
        failing (the situation they were for has passed). Drops and returns them."""
        wanted = set(planned)
        gone = [k for k in self._records if k[0] == owner and k[1] not in wanted]
        return [(k, self._records.pop(k)) for k in gone]

    def retry_in(self, owner: str, now: float) -> float | None:
        """Seconds until the earliest retry still to come of `owner`'s failing steps (None:
        none). A record whose time has passed belongs to a step the plan did not reach
        this pass; counting it would requeue the object at once, and again, in a loop."""
        times = [r.retry_at for k, r in self._records.items() if k[0] == owner and r.retry_at > now]
        return min(times) - now if times else None

    def failing(self, replica_key: str) -> list[StepFailure]:
        """The failures a replica's condition shows, the latest reported first."""
        found = [r for r in self._records.values() if r.replica_key == replica_key]
        return sorted(found, key=lambda r: r.reported_at, reverse=True)

    def forget(self, which: Callable[[StepKey, StepFailure], bool]) -> None:
        for key in [k for k, r in self._records.items() if which(k, r)]:
            del self._records[key]

    def __len__(self) -> int:
        return len(self._records)
