"""One syncer tick's I/O, shared by both runtimes (reference canopy-protocol §6.1).

`fetch_tick` asks canopy for the worklist and, for each `(group, type)` it names, the
repository password, through the broker's cache: credentials are minted when the cached
ones are about to expire, not on every tick (the reference minted them per entry per
tick, an audited STS call each time). The runtime then applies
`pgro.canopy.materialise.plan_sync` to what it holds.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from pgro.canopy.broker import BrokerError, CredentialBroker
from pgro.canopy.client import CanopyClient, CanopyError
from pgro.canopy.wire import Worklist

log = logging.getLogger("pgro.canopy.syncer")

DEFAULT_INTERVAL: Final = timedelta(seconds=30)
# How long a replica canopy stopped listing is kept before it is removed. The reference
# removes it on the next tick; a declaration disabled by mistake, or an entry skipped for
# one tick, would then cost a long-lived replica its data and a full restore. A `verify`
# replica canopy settled with `once` holds no data by then, so keeping it a while costs
# nothing, and when canopy offers the next snapshot within the grace, the same replica
# (with its `verifiedSnapshotId`) restores it.
DEFAULT_REMOVAL_GRACE: Final = timedelta(minutes=10)
JITTER: Final = 0.2
# Capabilities: 8 attempts with 1, 2, 4 … 64 s between them, as the reference; then
# pgro keeps trying hourly instead of giving up until a restart.
CAPABILITY_ATTEMPTS: Final = 8
CAPABILITY_RETRY_AFTER_GIVING_UP: Final = timedelta(hours=1)

GroupType = tuple[str, str]
# Canopy answers that name a configuration problem rather than an outage: 401/403 (this
# device or declaration), 409 (the group has no ready backup configuration).
DEFINITIVE: Final = frozenset({401, 403, 409})


@dataclass(frozen=True)
class SyncTick:
    """What one tick learnt. `worklist` None: the fetch failed (`error` says why) and the
    tick must change nothing."""

    worklist: Worklist | None
    error: str | None = None
    # (group, type) → the repository password; never logged (repr hides it).
    passwords: dict[GroupType, str] = field(default_factory=dict, repr=False)
    # (group, type) → why canopy refused its credentials (403) or is not ready (409).
    refusals: dict[GroupType, str] = field(default_factory=dict)


def jittered(interval: timedelta, rnd: Callable[[], float] = random.random) -> float:
    """Seconds to the next tick: the interval ±20 %, uniformly."""
    return interval.total_seconds() * (1 - JITTER + 2 * JITTER * rnd())


def capability_retry_delay(attempt: int) -> timedelta:
    """After failed attempt `attempt` (1-based): 1, 2, 4 … 64 s, then hourly."""
    if attempt >= CAPABILITY_ATTEMPTS:
        return CAPABILITY_RETRY_AFTER_GIVING_UP
    return timedelta(seconds=min(2 ** (attempt - 1), 300))


def fetch_tick(client: CanopyClient, broker: CredentialBroker) -> SyncTick:
    try:
        worklist = client.worklist()
    except CanopyError as exc:
        log.warning("canopy worklist not fetched; nothing changes this tick: %s", exc)
        return SyncTick(worklist=None, error=str(exc))
    passwords: dict[GroupType, str] = {}
    refusals: dict[GroupType, str] = {}
    for key in sorted({(str(e.group_id), e.type) for e in worklist.entries}):
        group, backup_type = key
        try:
            issued = broker.credentials(group, backup_type, None)
        except BrokerError as exc:
            if exc.upstream_status in DEFINITIVE:
                refusals[key] = (
                    f"canopy refused credentials for group {group} type {backup_type}: "
                    f"{exc.message}"
                )
            log.warning(
                "canopy credentials for group %s type %s: %s", group, backup_type, exc.message
            )
            continue
        passwords[key] = issued.repo_password.get_secret_value()
    return SyncTick(worklist=worklist, passwords=passwords, refusals=refusals)
