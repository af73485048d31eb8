"""Whether a restore is served read-only (reference restore-pipeline §4.6)."""

from __future__ import annotations

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore


def effective_read_only(replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore) -> bool:
    """`readOnly` unless a step after the restore must write: persistent schemas carried
    over, redaction, or a migration. Both the data directory's default
    (`default_transaction_read_only`) and the analytics user's grant follow it, in both
    runtimes."""
    spec = replica.spec
    return (
        spec.read_only
        and not spec.persistent_schemas
        and spec.redaction is None
        and restore.spec.migrate_to is None
    )
