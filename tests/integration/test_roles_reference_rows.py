"""Reference role tests pgro covered only in part (issue 17 item 6), on a real server through
real logins over TCP (scram), on test_users.py's stand-in for a restored snapshot:

- `lifecycle.rs::analytics_create_schema_read_write`: a write-capable analytics user creates
  a schema in the application database and in `postgres`, a table in it, inserts, and
  rebuilds the table's index with `REINDEX TABLE`;
- `persistent_users.rs::identifiers_and_passwords_are_quoted`: a persistent user whose name
  holds a double quote and whose password holds quotes, a backslash and a dollar-quote logs
  in with exactly that password (pgro sends a SCRAM verifier, never the password's text).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgro.api.users import PersistentUser
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.persistent_users import provision_persistent_users
from pgro.postgres.users import RoleCredentials
from tests.integration.test_users import Cluster, _cluster, one

RESERVED = ("postgres", "analytics", "reporter", "viewer")


@pytest.fixture(scope="module")
def cluster(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Cluster]:
    yield from _cluster(scratch_root, account, binaries)


def test_write_capable_analytics_creates_schemas_in_both_databases_and_reindexes(
    cluster: Cluster,
) -> None:
    cluster.set_server_read_only(False)
    try:
        report = cluster.provision(read_only=False)
        assert report.analytics.privilege == "read_write"
        for dbname in ("myapp", "postgres"):
            with cluster.login("analytics", cluster.analytics.password, dbname) as conn:
                assert one(conn, "SHOW default_transaction_read_only") == "off"
                conn.execute("CREATE SCHEMA made_by_analytics")
                conn.execute(
                    "CREATE TABLE made_by_analytics.t (id int PRIMARY KEY, v text NOT NULL)"
                )
                conn.execute("CREATE INDEX t_v ON made_by_analytics.t (v)")
                conn.execute(
                    "INSERT INTO made_by_analytics.t SELECT g, 'v' || g FROM "
                    "generate_series(1, 50) g"
                )
                before = one(conn, "SELECT relfilenode FROM pg_class WHERE relname = 't_v'")
                conn.execute("REINDEX TABLE made_by_analytics.t")
                after = one(conn, "SELECT relfilenode FROM pg_class WHERE relname = 't_v'")
                assert after != before  # rebuilt, not refused or skipped
                assert one(conn, "SELECT count(*) FROM made_by_analytics.t WHERE v = 'v7'") == 1
                owner = "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s"
                assert one(conn, owner, "made_by_analytics") == "analytics"
                assert (
                    one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
                )
                conn.execute("DROP SCHEMA made_by_analytics CASCADE")
    finally:
        cluster.set_server_read_only(True)
        cluster.provision(read_only=True)


HOSTILE_NAME = 'we"ird'
HOSTILE_PASSWORD = "pass'wo\"rd\\ $$x$$ -- ;"


def test_a_quoted_name_and_a_quoted_password_log_in_exactly(cluster: Cluster) -> None:
    user = PersistentUser.model_validate({"name": HOSTILE_NAME, "readSchemas": ["public"]})
    cluster.provision(read_only=True, other_managed_roles=(HOSTILE_NAME,))
    report = provision_persistent_users(
        cluster.conninfo_for,
        [(user, RoleCredentials(HOSTILE_NAME, HOSTILE_PASSWORD))],
        reserved=RESERVED,
    )
    assert [o.name for o in report.users] == [HOSTILE_NAME]
    with cluster.login(HOSTILE_NAME, HOSTILE_PASSWORD) as conn:
        assert one(conn, "SELECT current_user") == HOSTILE_NAME
    # One character off is refused: the password is the literal text, not a re-quoted one.
    for wrong in ("pass''wo\"rd\\ $$x$$ -- ;", "pass'wo\"rd\\\\ $$x$$ -- ;", "pass'wo"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            cluster.login(HOSTILE_NAME, wrong)
    with cluster.superuser("postgres") as conn:
        stored = one(conn, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", HOSTILE_NAME)
    assert isinstance(stored, str) and stored.startswith("SCRAM-SHA-256$")
    assert HOSTILE_PASSWORD not in stored
