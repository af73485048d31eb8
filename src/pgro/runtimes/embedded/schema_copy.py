"""The persistent-schema copy in `pgro run`: both restores' servers over their private
sockets as the bootstrap superuser, the copy a local process group in the switching
restore's directory (`pgro.pipeline.schema_transfer.LocalCopy`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pgro.clock import utcnow
from pgro.core.schema_migration import Transfer
from pgro.pipeline.schema_migration import Copy
from pgro.pipeline.schema_transfer import LocalCopy
from pgro.postgres.schema_migration import Conninfo
from pgro.postgres.server import Endpoint
from pgro.runtimes.embedded.work import SCHEMA_COPY_DIRECTORY, Restores

SUPERUSER = "postgres"


@dataclass(frozen=True)
class EmbeddedCopy(Copy):
    restores: Restores
    namespace: str
    replica: str
    source: str
    target: str

    @property
    def _local(self) -> LocalCopy:
        target = self.restores.store.restore(f"{self.namespace}/{self.target}")
        if target is None:
            raise RuntimeError(f"restore {self.target} is gone")
        return LocalCopy(
            self.restores.directory(target) / SCHEMA_COPY_DIRECTORY, self.restores.account
        )

    def _endpoint(self, restore: str) -> Endpoint:
        found = self.restores.server_endpoint(f"{self.namespace}/{restore}")
        if found is None:
            raise RuntimeError(f"restore {restore} has no running server to copy schemas with")
        return found

    def conninfo_for(self, restore: str) -> Conninfo:
        endpoint = self._endpoint(restore)
        return lambda dbname: endpoint.conninfo(dbname, SUPERUSER)

    def observe(self) -> Transfer:
        return self._local.observe()

    def start(self, *, source_db: str, target_db: str, owner: str, schemas: Sequence[str]) -> str:
        # pg_dump must be at least the source's major: the newer of the two servers' binaries.
        binaries = max(
            (self.restores.binaries(f"{self.namespace}/{r}") for r in (self.source, self.target)),
            key=lambda b: int(b.major),
        )
        self._local.start(
            bindir=binaries.bindir,
            source=self._endpoint(self.source).conninfo(source_db, SUPERUSER),
            target=self._endpoint(self.target).conninfo(target_db, SUPERUSER),
            owner=owner,
            schemas=schemas,
            started_at=utcnow(),
        )
        return f"{self.replica}-schema-migration"

    def discard(self) -> None:
        self._local.discard()
