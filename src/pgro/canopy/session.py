"""What a pgro process holds to talk to canopy, for both runtimes.

The client, the credential broker and the proxies' callbacks it serves, a small thread
pool for whatever waits on canopy, the report courier, and the syncer's bookkeeping
(`pgro.canopy.sync_state`). `pgro run` (`runtimes/embedded/canopy.py`) and the operator
(`runtimes/kubernetes/canopy.py`) subclass it and add only how they hold replicas and
credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from http.server import ThreadingHTTPServer
from typing import Protocol

from pgro.api.replica import CanopySource, PostgresPhysicalReplica
from pgro.api.secret import KopiaCredentials
from pgro.canopy.access import CanopyRepository, broker_source, listing_access
from pgro.canopy.broker import Callbacks, CredentialBroker
from pgro.canopy.client import CanopyClient
from pgro.canopy.courier import ReportCourier
from pgro.canopy.proxy import valid_run_id
from pgro.canopy.sync_state import CapabilityRetries, SyncBook
from pgro.canopy.syncer import SyncTick, fetch_tick, jittered
from pgro.canopy.tokens import BrokerTokens, TokenBinding


class SyncSettings(Protocol):
    """What both runtimes' canopy settings say about syncing."""

    @property
    def s3_endpoint(self) -> str | None: ...
    @property
    def interval(self) -> timedelta: ...
    @property
    def removal_grace(self) -> timedelta: ...


class CanopySession:
    def __init__(
        self,
        client: CanopyClient,
        sync: SyncSettings,
        *,
        clock: Callable[[], datetime],
        rnd: Callable[[], float],
        stats_key: Callable[[str, str], str] = lambda namespace, job: f"{namespace}/{job}",
    ) -> None:
        self.client = client
        self.clock = clock
        self.rnd = rnd
        self.sync = sync
        self.broker = CredentialBroker(client, clock=clock)
        self.callbacks = Callbacks(client)
        self.pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="canopy")
        self.courier = ReportCourier(
            client.report_verification, self.pool, clock, self.callbacks, stats_key
        )
        self.book = SyncBook(sync.removal_grace)
        self.capabilities = CapabilityRetries()

    def fetch_tick(self) -> SyncTick:
        return fetch_tick(self.client, self.broker)

    def next_tick_in(self) -> float:
        """Seconds to the next tick: the interval, jittered."""
        return jittered(self.sync.interval, self.rnd)

    def listing_through(
        self, replica: PostgresPhysicalReplica, repo: CanopyRepository
    ) -> AbstractContextManager[KopiaCredentials]:
        """Kopia's credentials for one listing, through an in-process proxy."""
        source = _source(replica)
        return listing_access(
            repo,
            broker_source(self.broker, source.group, source.type),
            s3_endpoint=self.sync.s3_endpoint,
        )

    def close(self, server: ThreadingHTTPServer | None) -> None:
        if server is not None:
            server.shutdown()
            server.server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def restore_token(
    tokens: BrokerTokens, replica: PostgresPhysicalReplica, run_id: str | None, job: str
) -> str:
    """A restore's broker token: credentials for its group, type and run id, and the
    callbacks of `job` (`namespace/job`)."""
    source = _source(replica)
    binding = TokenBinding(source.group, source.type, valid_run_id(run_id), job)
    return tokens.issue(binding)


def _source(replica: PostgresPhysicalReplica) -> CanopySource:
    source = replica.spec.canopy_source
    if source is None:
        raise ValueError(f"{replica.key} is not a canopy replica (it has no canopySource)")
    return source
