"""Persistent users (pgro.postgres.persistent_users) on a real server, checked through real
logins over TCP (scram), as the switchover step runs them: provision_users first, with the
persistent users' names in `other_managed_roles`, then the persistent users.

The cluster is test_users.py's stand-in for a restored snapshot (served read-only), plus a
`warehouse` schema owned by the application's role and a hostile role named like the
persistent user: a superuser, member of `pg_write_all_data` and `pg_execute_server_program`,
with a password, a per-role setting, a table it owns, a write grant and write default
privileges.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pgro.api.users import PersistentUser
from pgro.pipeline.switchover_users import provision_switchover_users
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.persistent_users import PersistentUsersReport, provision_persistent_users
from pgro.postgres.restore_info import DATABASE, RestoreInfo, record_restore
from pgro.postgres.users import RoleCredentials, generate_password
from tests.fixtures.manifests import replica, restore
from tests.integration.test_users import Cluster, _cluster, one, role_state

PU = "tupaia_read"
HOSTILE_PASSWORD = "hostile-source-secret"

SOURCE_ROLE = f"""
CREATE ROLE {PU} LOGIN SUPERUSER CREATEDB CREATEROLE BYPASSRLS REPLICATION
    PASSWORD '{HOSTILE_PASSWORD}' IN ROLE pg_write_all_data;
GRANT pg_execute_server_program TO {PU};
ALTER ROLE {PU} SET work_mem = '64MB'
"""
SOURCE_DATA = f"""
CREATE SCHEMA warehouse AUTHORIZATION app_owner;
SET ROLE app_owner;
CREATE TABLE warehouse.facts (id serial PRIMARY KEY, v text);
INSERT INTO warehouse.facts (v) SELECT 'row ' || g FROM generate_series(1, 7) g;
RESET ROLE;
CREATE TABLE public.pu_owned (id int);
ALTER TABLE public.pu_owned OWNER TO {PU};
GRANT INSERT ON warehouse.facts TO {PU};
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA warehouse
    GRANT INSERT, UPDATE ON TABLES TO {PU};
"""
# Every role test_users.py's cluster provisions otherwise.
RESERVED = ("postgres", "analytics", "reporter", "viewer")


@pytest.fixture(scope="module")
def cluster(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Cluster]:
    made = _cluster(scratch_root, account, binaries)
    c = next(made)
    try:
        yield _with_source(c)
    finally:
        # Runs the fixture's teardown (the server stops).
        next(made, None)


def _with_source(c: Cluster) -> Cluster:
    with c.superuser("postgres") as conn:
        for statement in SOURCE_ROLE.split(";\n"):
            conn.execute(statement.encode())
    with c.superuser("myapp") as conn:
        conn.execute(SOURCE_DATA.encode())
    return c


@pytest.fixture(scope="module")
def password() -> str:
    return generate_password()


def switchover_step(
    c: Cluster, users: list[tuple[PersistentUser, RoleCredentials]]
) -> PersistentUsersReport:
    """What the ProvisionUsers step runs on the switching restore."""
    c.provision(read_only=True, other_managed_roles=tuple(u.name for u, _ in users))
    return provision_persistent_users(c.conninfo_for, users, reserved=RESERVED)


def tupaia(password: str, **kw: object) -> list[tuple[PersistentUser, RoleCredentials]]:
    spec = {"name": PU, "readSchemas": ["warehouse", "nonexistent"], **kw}
    return [(PersistentUser.model_validate(spec), RoleCredentials(PU, password))]


def test_reads_its_schema_unqualified_and_cannot_write(cluster: Cluster, password: str) -> None:
    report = switchover_step(cluster, tupaia(password, searchPath=["warehouse"]))
    assert report.database == "myapp"  # the largest database other than postgres
    with cluster.login(PU, password) as conn:
        assert one(conn, "SELECT count(*) FROM warehouse.facts") == 7
        assert one(conn, "SELECT count(*) FROM facts") == 7  # through search_path
        assert one(conn, "SELECT last_value FROM warehouse.facts_id_seq") == 7
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("INSERT INTO warehouse.facts (v) VALUES ('no')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE warehouse.mine (id int)")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM private.secrets")  # a schema it was not given


def test_password_is_stable_across_runs(cluster: Cluster, password: str) -> None:
    """Each switchover provisions again with the kept password; the source's never works."""
    for _ in range(2):
        switchover_step(cluster, tupaia(password))
        with cluster.login(PU, password) as conn:
            assert one(conn, "SELECT current_user") == PU
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        cluster.login(PU, HOSTILE_PASSWORD)


def test_a_table_the_owner_creates_later_is_readable_not_writable(
    cluster: Cluster, password: str
) -> None:
    switchover_step(cluster, tupaia(password))
    with cluster.superuser() as conn:
        conn.execute("SET ROLE app_owner")
        conn.execute("DROP TABLE IF EXISTS warehouse.later")
        conn.execute("CREATE TABLE warehouse.later AS SELECT 1 AS n")
    with cluster.login(PU, password) as conn:
        assert one(conn, "SELECT n FROM warehouse.later") == 1
        conn.execute("SET default_transaction_read_only = off")
        # The source's write default privileges for this name are gone.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO warehouse.later VALUES (2)")


def test_a_missing_schema_is_skipped_and_reported(cluster: Cluster, password: str) -> None:
    report = switchover_step(cluster, tupaia(password))
    assert report.missing == [f"{PU}/nonexistent"]
    [outcome] = report.users
    assert outcome.schemas_granted == ("warehouse",)
    assert password not in repr(report) and password not in report.summary()


def test_a_hostile_source_role_of_that_name_ends_unprivileged(
    cluster: Cluster, password: str
) -> None:
    switchover_step(cluster, tupaia(password))
    state = role_state(cluster, PU)
    assert state["super"] is False
    assert state["createdb"] is False and state["createrole"] is False
    assert state["replication"] is False and state["bypassrls"] is False
    assert state["inherit"] is False
    assert state["member_of"] == []
    assert state["settings"] == [("*", ["default_transaction_read_only=on"])]
    with cluster.superuser() as conn:
        assert one(conn, "SELECT tableowner FROM pg_tables WHERE tablename = 'pu_owned'") == (
            "postgres"
        )
    with cluster.login(PU, password) as conn:
        conn.execute("SET default_transaction_read_only = off")
        for statement in (
            "INSERT INTO public.pu_owned VALUES (1)",
            "INSERT INTO warehouse.facts (v) VALUES ('no')",
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "INSERT INTO reporting.sales (amount) VALUES (1)",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


def test_a_reserved_name_is_ignored(cluster: Cluster) -> None:
    creds = RoleCredentials("reporter", "not-the-reporters-password")
    report = provision_persistent_users(
        cluster.conninfo_for, [(PersistentUser(name="reporter"), creds)], reserved=RESERVED
    )
    assert report.ignored == ("reporter",) and report.users == ()
    with pytest.raises(psycopg.OperationalError):
        cluster.login("reporter", creds.password)


def test_the_step_grants_extra_users_the_objects_a_migration_created(
    cluster: Cluster, password: str
) -> None:
    """Reference `extra_user_grants.rs`: the migration's dump carries no privileges, so the
    step's second provisioning is what lets an extra user read the carried schema."""
    with cluster.superuser() as conn:
        # As the copy leaves it: created by the superuser, no grants at all.
        conn.execute("DROP SCHEMA IF EXISTS persistent_data CASCADE")
        conn.execute("CREATE SCHEMA persistent_data")
        conn.execute("CREATE TABLE persistent_data.important_records AS SELECT 42 AS n")
    spec: dict[str, Any] = {
        "extraUsers": [{"name": "reporter", "schemas": ["persistent_data"]}],
        "persistentUsers": [{"name": PU, "readSchemas": ["persistent_data", "absent"]}],
    }
    done = provision_switchover_users(
        cluster.conninfo_for,
        replica("orders", **spec),
        restore("orders-20260101-000000", "orders"),
        analytics=cluster.analytics,
        extra_users=[cluster.reporter],
        persistent_users=tupaia(password, readSchemas=["persistent_data", "absent"]),
    )
    for user, secret in (("reporter", cluster.reporter.password), (PU, password)):
        with cluster.login(user, secret) as conn:
            assert one(conn, "SELECT n FROM persistent_data.important_records") == 42
    with cluster.login("reporter", cluster.reporter.password) as conn:
        assert one(conn, "SELECT has_schema_privilege('public', 'USAGE')") is False
    [event] = done.events()
    assert event.reason == "PersistentUserSchemaMissing" and f"{PU}/absent" in event.note
    assert password not in done.summary() + event.note


def test_the_step_puts_restore_info_privileges_back_for_a_writing_analytics_user(
    cluster: Cluster, password: str
) -> None:
    """provision_users grants a writing analytics user DML on every table and CREATE on every
    schema; after the step it may still only read and UPDATE `_pgro.restore_info`."""
    info = RestoreInfo("snap-1", "2026-11-30T01:02:03Z", {})
    postgres_db = cluster.conninfo_for(DATABASE)
    record_restore(postgres_db, info, analytics="analytics", analytics_may_write=True)
    writable = replica("orders", readOnly=False, persistentUsers=[{"name": PU}])
    try:
        provision_switchover_users(
            cluster.conninfo_for,
            writable,
            restore("orders-20260101-000000", "orders"),
            analytics=cluster.analytics,
            extra_users=[],
            persistent_users=tupaia(password),
        )
        with cluster.superuser(DATABASE) as conn:
            acl = conn.execute(
                "SELECT a.privilege_type FROM pg_class c, aclexplode(c.relacl) a "
                "WHERE c.oid = '_pgro.restore_info'::regclass "
                "AND a.grantee = 'analytics'::regrole ORDER BY 1"
            ).fetchall()
            schema_create = one(conn, "SELECT has_schema_privilege('analytics', '_pgro', 'CREATE')")
        assert [r[0] for r in acl] == ["SELECT", "UPDATE"]
        assert schema_create is False
    finally:
        with cluster.superuser(DATABASE) as conn:
            conn.execute("DROP SCHEMA IF EXISTS _pgro CASCADE")
        cluster.provision(read_only=True)  # back to the read-only state the others expect
