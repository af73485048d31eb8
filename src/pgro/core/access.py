"""Whether a restore is served read-only (reference restore-pipeline §4.6), and what a
write-capable analytics user owns. What each role may do: docs/roles.md."""

from __future__ import annotations

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore


def effective_read_only(replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore) -> bool:
    """`readOnly` unless a step after the restore must write as the analytics user:
    persistent schemas carried over, or a migration. Both the data directory's default
    (`default_transaction_read_only`) and the analytics user's grant follow it, in both
    runtimes. Write-capable never means superuser: the analytics user then gets DML, CREATE
    and its persistent schemas (pgro.postgres.users), nothing that reaches the host.

    Redaction does not make a restore writable (the reference's did, then handed it back to
    read-only after masking): its superuser session turns `default_transaction_read_only`
    off for itself, so a read-only replica is read-only for its users from the first
    moment, and there is no window where the analytics role could write."""
    spec = replica.spec
    return spec.read_only and not spec.persistent_schemas and restore.spec.migrate_to is None


def analytics_owned_schemas(
    replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
) -> tuple[str, ...]:
    """The schemas the analytics user is made owner of (`persistent_schemas` of
    pgro.postgres.users.provision_users): the persistent schemas, which the persistent-schema
    migration drops and re-creates as that user. None on a read-only restore: a read-only
    role owns nothing, since an owner can write whatever its grants say."""
    if effective_read_only(replica, restore):
        return ()
    return tuple(dict.fromkeys(s for s in replica.spec.persistent_schemas or () if s))
