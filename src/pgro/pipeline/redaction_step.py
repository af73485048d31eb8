"""The redaction switchover step (features §2.6, issue 15), run by both runtimes.

Re-entered on every pass while the core holds the switchover for it
(`RunSwitchoverStep(REDACTION)`); what it does is `core.redaction.next_action`'s answer for
the phase recorded for this restore and the state of its background task. The redaction
itself (`redact`: validate the spec, resolve the version, fetch the manifest, mask with
pgro's native engine) runs on a thread of the runtime's process (`BackgroundTasks`), never
on the reconcile thread: a large table takes minutes. Each runtime brings how to reach the
switching restore's server as its superuser.

Safety: the phase becomes `complete` or `partial` only after `apply_manifest` returned, and
the core moves the endpoint only then. A process killed at any point leaves `active` (or
nothing) for this restore; the next pass starts the redaction again.

Nothing here reads or reports a value from the data: the engine's results and errors hold
names, kinds, counts and SQLSTATEs only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pgro.api.names import ANNOTATION_REDACTION_ENGINE
from pgro.api.replica import PostgresPhysicalReplica, Redaction
from pgro.core import redaction as decide
from pgro.core.masks import UnknownEngine, parse_engine
from pgro.core.plan import EmitEvent, EventType, RunSwitchoverStep
from pgro.core.redaction import Action, Redacted, TaskState
from pgro.core.redaction_manifest import RedactionSpecInvalid, check_spec, display_url
from pgro.pipeline.background import BackgroundTasks
from pgro.pipeline.redaction_fetch import ManifestFetchFailed, fetch_manifest
from pgro.postgres.databases import main_database_or_maintenance
from pgro.postgres.login_hold import LoginHoldFailed, set_login
from pgro.postgres.redaction import APPLICATION, RedactionFailed, apply_manifest, resolve_version

log = logging.getLogger("pgro.redaction")

ConninfoFor = Callable[[str], str]
# The database `_pgro`, the catalog queries and the connection test use.
MAINTENANCE_DATABASE: Final = "postgres"


def redact(
    conninfo_for: ConninfoFor,
    redaction: Redaction,
    release: Sequence[str] = (),
    engine: str | None = None,
) -> Redacted:
    """Validate, resolve the version, fetch the manifest and apply it to the cluster's main
    database, then let the login roles `release` in again (provisioning held them:
    `core.redaction.holds_logins`). RedactionFailed (with a message fit for status and
    events) on any failure. `engine`: the replica's `pgro.bes.au/redaction-engine`
    annotation (None: native)."""
    import psycopg

    from pgro.postgres.session import connect

    try:
        check_spec(redaction)
        masks_with = parse_engine(engine)
    except (RedactionSpecInvalid, UnknownEngine) as error:
        raise RedactionFailed(str(error)) from None
    try:
        with connect(conninfo_for(MAINTENANCE_DATABASE), application_name=APPLICATION) as conn:
            database = main_database_or_maintenance(conn)
    except psycopg.Error as error:
        raise RedactionFailed(
            f"cannot reach the restored server to find its main database: {type(error).__name__}"
        ) from None
    conninfo = conninfo_for(database)
    version = resolve_version(conninfo, redaction)
    try:
        fetched = fetch_manifest(redaction, version)
    except ManifestFetchFailed as error:
        raise RedactionFailed(str(error)) from None
    log.info(
        "redacting database %s with the manifest %s (version %s)",
        database,
        display_url(fetched.url),
        fetched.version or "none",
    )
    result = apply_manifest(conninfo, fetched.manifest, engine=masks_with)
    if release:
        try:
            set_login(conninfo_for, release, login=True)
        except LoginHoldFailed as error:
            raise RedactionFailed(f"masked, but {error}") from None
    return Redacted(
        version=fetched.version,
        columns_masked=len(result.columns_masked),
        partial=result.partial,
        summary=f"database {database}, manifest version {fetched.version or 'none'}: "
        + result.summary(),
    )


@dataclass(eq=False)
class RedactionRetries:
    """Failed attempts per restore, in this process (a restart retries at once)."""

    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _failed: dict[str, tuple[int, float]] = field(default_factory=dict)

    def failed(self, key: str) -> float:
        """Record a failure; the seconds until the next attempt."""
        with self._lock:
            count = self._failed.get(key, (0, 0.0))[0] + 1
            self._failed[key] = (count, self.clock())
        return decide.retry_delay(count)

    def remaining(self, key: str) -> float:
        with self._lock:
            count, at = self._failed.get(key, (0, 0.0))
        if count == 0:
            return 0.0
        return max(0.0, at + decide.retry_delay(count) - self.clock())

    def forget(self, key: str) -> None:
        with self._lock:
            self._failed.pop(key, None)


@dataclass
class RedactionStep:
    replica: PostgresPhysicalReplica
    step: RunSwitchoverStep
    tasks: BackgroundTasks[Redacted]
    retries: RedactionRetries
    # How to reach the switching restore's server as its superuser (None: not reachable now).
    conninfo_for: Callable[[], ConninfoFor | None]
    patch: Callable[[Mapping[str, Any]], None]
    event: Callable[[EmitEvent], None]
    # Run the replica's decision again in that many seconds (thread-safe).
    wake: Callable[[float], None]
    # Scrubs secrets a driver's message might quote (the runtime's passwords).
    scrub: Callable[[str], str] = str

    @property
    def key(self) -> str:
        return f"{self.replica.key}/{self.step.restore}"

    def run(self) -> None:
        key = self.key
        if self.tasks.running(key):
            task = TaskState.RUNNING
        elif self.tasks.finished(key):
            task = TaskState.FINISHED
        else:
            task = TaskState.NONE
        phase = decide.phase_for(self.replica.status, self.step.restore)
        remaining = self.retries.remaining(key)
        action = decide.next_action(phase, task, remaining <= 0)
        log.debug("%s: redaction of %s: %s", self.replica.key, self.step.restore, action)
        match action:
            case Action.START:
                self._start()
            case Action.RECORD:
                self._record()
            case Action.RETRY_LATER:
                self.wake(remaining)
            case Action.WAIT | Action.DONE:
                pass

    def _start(self) -> None:
        redaction = self.replica.spec.redaction
        if redaction is None:
            return
        conninfo_for = self.conninfo_for()
        if conninfo_for is None:
            # Nothing recorded: the shell retries the step with its own backoff.
            raise RuntimeError(
                f"the server of restore {self.step.restore} is not reachable yet for redaction"
            )
        self.patch(decide.started(self.step.restore))
        self.event(
            EmitEvent(
                EventType.NORMAL,
                decide.EVENT_STARTED,
                f"Redacting restore {self.step.restore} before it serves",
                related=self.step.restore,
            )
        )
        roles = decide.held_roles(self.replica)
        engine = self.replica.metadata.annotations.get(ANNOTATION_REDACTION_ENGINE)
        self.tasks.start(
            self.key, lambda: redact(conninfo_for, redaction, roles, engine), lambda: self.wake(0)
        )

    def _record(self) -> None:
        outcome = self.tasks.take(self.key)
        if outcome is None:
            return
        restore = self.step.restore
        if outcome.value is not None:
            done = outcome.value
            self.retries.forget(self.key)
            self.patch(decide.finished(restore, done))
            summary = self.scrub(done.summary)[: decide.MAX_DETAIL]
            if done.partial:
                # Visible and alerting: it serves, but not everything was masked.
                self.event(EmitEvent(EventType.WARNING, decide.EVENT_PARTIAL, summary, restore))
            else:
                self.event(EmitEvent(EventType.NORMAL, decide.EVENT_COMPLETED, summary, restore))
            return
        error = outcome.error
        if isinstance(error, RedactionFailed):
            reason = str(error)
        else:
            # Not the engine's own: its text may quote anything; its type says enough.
            log.warning(
                "%s: redaction of %s raised %s", self.replica.key, restore, type(error).__name__
            )
            reason = f"redaction stopped on an unexpected {type(error).__name__}"
        reason = self.scrub(reason)[: decide.MAX_DETAIL]
        delay = self.retries.failed(self.key)
        self.patch(decide.failed(restore, reason))
        self.event(
            EmitEvent(
                EventType.WARNING,
                decide.EVENT_FAILED,
                f"Redaction of restore {restore} failed: {reason}; the serving restore keeps "
                f"serving, retried in {int(delay)}s",
                restore,
            )
        )
        self.wake(delay)
