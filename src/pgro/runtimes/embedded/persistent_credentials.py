"""The credential files of a replica's persistent users (`spec.persistentUsers`) in `pgro run`:
made once and never rotated like the other users' (credentials.py), so clients keep their
password across switchovers; removed with the user. The names last provisioned are kept in
the state database, so a user removed while pgro was stopped loses its file too."""

from __future__ import annotations

import json
import logging

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.users import PersistentUser
from pgro.postgres.users import RoleCredentials
from pgro.runtimes.embedded.credentials import CredentialStore
from pgro.runtimes.embedded.store import Store

log = logging.getLogger("pgro.run")


def _setting(replica_key: str) -> str:
    return f"persistent-users/{replica_key}"


def persistent_credentials(
    credentials: CredentialStore, replica: PostgresPhysicalReplica
) -> list[tuple[PersistentUser, RoleCredentials]]:
    """Each persistent user with its password (the file is written on first use)."""
    users = replica.spec.persistent_users or ()
    return [(u, credentials.ensure(replica.key, u.name)) for u in users]


def forget_removed_users(
    store: Store, credentials: CredentialStore, replica: PostgresPhysicalReplica
) -> list[str]:
    """Delete the credential files of persistent users no longer in the spec (unless the
    name is still the analytics or an extra user); returns their names. Writes nothing
    while the list is unchanged."""
    wanted = [u.name for u in replica.spec.persistent_users or ()]
    stored = store.setting(_setting(replica.key))
    before: list[str] = json.loads(stored) if stored else []
    if before == wanted:
        return []
    kept = {replica.spec.analytics_username, *(u.name for u in replica.spec.extra_users), *wanted}
    removed = [name for name in before if name not in kept]
    for name in removed:
        credentials.path_of(replica.key, name).unlink(missing_ok=True)
        log.info(
            "%s: persistent user %s removed: its credential file is deleted", replica.key, name
        )
    if wanted:
        store.set_setting(_setting(replica.key), json.dumps(wanted))
    else:
        store.delete_setting(_setting(replica.key))
    return removed
