"""Login-role provisioning on a real server, checked through real logins over TCP (scram).

One cluster per module stands in for a restored snapshot: it carries a superuser role named
`analytics` with memberships and settings, a source login role `app_rw`, a source role named
like an extra user with grants of its own, and an application database whose `CONNECT` was
revoked from PUBLIC. It also carries the write paths a hostile or careless source leaves
behind: a table PUBLIC may write, a SECURITY DEFINER function owned by a superuser that writes,
CREATE on `public` for PUBLIC (as on PostgreSQL ≤ 14), a view over `pg_authid`, a restricted
built-in (`pg_read_file`) re-granted to PUBLIC, and a role named like the analytics user that
owns a table, holds a table grant and is a member of `pg_execute_server_program`. Every test
provisions the state it needs itself (provisioning converges), so the tests do not depend on
their order.

The read-only and least-privilege tests run on the newest installed PostgreSQL and on
PostgreSQL 13 (no `pg_read_all_data`), from `scripts/install-postgres-major.sh 13` when the
system has no PostgreSQL 13.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from pgro.api.users import ExtraUser
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import BinariesMissing, PostgresBinaries, find_binaries
from pgro.postgres.server import PostgresServer, make_conninfo
from pgro.postgres.users import (
    ProvisioningFailed,
    ProvisionReport,
    RoleCredentials,
    generate_password,
    provision_users,
)
from tests.fixtures.scratch_server import scratch_server

OLD_ANALYTICS_PASSWORD = "old-analytics-secret"
OLD_REPORTER_PASSWORD = "old-reporter-secret"
APP_RW_PASSWORD = "app-rw-secret"
BOOTSTRAP_PASSWORD = "bootstrap-secret"

SNAPSHOT_ROLES = f"""
CREATE ROLE legacy_group NOLOGIN;
CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret';
CREATE ROLE app_rw LOGIN PASSWORD '{APP_RW_PASSWORD}';
CREATE ROLE analytics LOGIN SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS NOINHERIT
    CONNECTION LIMIT 2 VALID UNTIL '2001-01-01' PASSWORD '{OLD_ANALYTICS_PASSWORD}'
    IN ROLE legacy_group;
ALTER ROLE analytics SET work_mem = '64MB';
ALTER ROLE analytics SET default_transaction_read_only = off;
GRANT pg_execute_server_program TO analytics;
CREATE ROLE reporter LOGIN CREATEDB PASSWORD '{OLD_REPORTER_PASSWORD}' IN ROLE legacy_group;
ALTER ROLE postgres PASSWORD '{BOOTSTRAP_PASSWORD}';
CREATE DATABASE myapp OWNER app_owner;
ALTER ROLE analytics IN DATABASE myapp SET search_path = private;
"""

SNAPSHOT_DATA = """
REVOKE CONNECT ON DATABASE myapp FROM PUBLIC;
CREATE SCHEMA reporting AUTHORIZATION app_owner;
CREATE SCHEMA private AUTHORIZATION app_owner;
SET ROLE app_owner;
CREATE TABLE public.items (id int PRIMARY KEY, name text);
INSERT INTO public.items VALUES (1, 'one'), (2, 'two');
GRANT SELECT ON public.items TO PUBLIC;
CREATE FUNCTION public.add_one(i int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT i + 1';
CREATE TABLE reporting.sales (id serial PRIMARY KEY, amount int);
INSERT INTO reporting.sales (amount) VALUES (10), (20), (30);
CREATE SEQUENCE reporting.counter;
SELECT nextval('reporting.counter');
CREATE TABLE private.secrets (id int, secret text);
INSERT INTO private.secrets VALUES (1, 'classified');
GRANT USAGE ON SCHEMA private TO reporter;
GRANT SELECT ON private.secrets TO reporter;
ALTER DEFAULT PRIVILEGES IN SCHEMA private GRANT SELECT ON TABLES TO reporter;
CREATE SCHEMA dbt;
CREATE TABLE dbt.model AS SELECT 1 AS n;
RESET ROLE;
CREATE TABLE public.open_t (id int);
GRANT INSERT, UPDATE, DELETE, TRUNCATE ON public.open_t TO PUBLIC;
CREATE TABLE public.audit (id int);
CREATE FUNCTION public.write_t(i int) RETURNS int LANGUAGE sql SECURITY DEFINER
    AS 'INSERT INTO public.audit VALUES (i) RETURNING i';
CREATE VIEW public.roles_v AS SELECT rolname, rolsuper FROM pg_catalog.pg_authid;
GRANT SELECT ON public.roles_v TO PUBLIC;
GRANT CREATE ON SCHEMA public TO PUBLIC;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_file(text) TO PUBLIC;
UPDATE pg_catalog.pg_proc SET proacl = NULL
    WHERE oid = 'pg_catalog.pg_read_binary_file(text)'::regprocedure;
GRANT INSERT, UPDATE ON public.items TO analytics;
CREATE TABLE public.analytics_owned (id int);
ALTER TABLE public.analytics_owned OWNER TO analytics;
CREATE FUNCTION public.rf(text) RETURNS text LANGUAGE internal STRICT AS 'pg_read_file_all';
CREATE FUNCTION public.shout(text) RETURNS text LANGUAGE internal IMMUTABLE STRICT AS 'upper';
"""
# Only from PostgreSQL 15: a parameter a role could load a library with.
SNAPSHOT_PARAMETER_GRANT = "GRANT SET ON PARAMETER session_preload_libraries TO PUBLIC"


@dataclass
class Cluster:
    server: PostgresServer
    analytics: RoleCredentials = field(
        default_factory=lambda: RoleCredentials("analytics", generate_password())
    )
    reporter: RoleCredentials = field(
        default_factory=lambda: RoleCredentials("reporter", generate_password())
    )
    viewer: RoleCredentials = field(
        default_factory=lambda: RoleCredentials("viewer", generate_password())
    )
    first_report: ProvisionReport | None = None

    @property
    def passwords(self) -> list[str]:
        return [c.password for c in (self.analytics, self.reporter, self.viewer)]

    def conninfo_for(self, dbname: str) -> str:
        return self.server.endpoint.conninfo(dbname, "postgres")

    def superuser(self, dbname: str = "myapp") -> psycopg.Connection[tuple[object, ...]]:
        """The bootstrap superuser over the socket, able to write on a read-only server."""
        conn = psycopg.connect(self.conninfo_for(dbname), autocommit=True)
        conn.execute("SET default_transaction_read_only = off")
        return conn

    def login(
        self, user: str, password: str, dbname: str = "myapp"
    ) -> psycopg.Connection[tuple[object, ...]]:
        """A real client login over TCP: scram-sha-256 under DEFAULT_HBA."""
        return psycopg.connect(
            make_conninfo(
                host="127.0.0.1",
                port=str(self.server.port),
                dbname=dbname,
                user=user,
                password=password,
                connect_timeout="10",
            ),
            autocommit=True,
        )

    def provision(
        self,
        *,
        read_only: bool = True,
        extra: list[tuple[ExtraUser, RoleCredentials]] | None = None,
        other_managed_roles: tuple[str, ...] = (),
        persistent_schemas: tuple[str, ...] = (),
    ) -> ProvisionReport:
        if extra is None:
            extra = [
                (ExtraUser(name="reporter", schemas=["reporting", "missing"]), self.reporter),
                (ExtraUser(name="viewer"), self.viewer),
                # Defensive cases normalisation already removes: both are ignored.
                (ExtraUser(name="analytics", schemas=["reporting"]), self.analytics),
                (ExtraUser(name="reporter", schemas=["private"]), self.reporter),
            ]
        return provision_users(
            self.conninfo_for,
            analytics=self.analytics,
            extra_users=extra,
            read_only=read_only,
            other_managed_roles=other_managed_roles,
            persistent_schemas=persistent_schemas,
        )

    def set_server_read_only(self, on: bool) -> None:
        """The server-wide default, as the runtime writes it for a read-only replica."""
        with self.superuser("postgres") as conn:
            if on:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        wanted = "on" if on else "off"
        deadline = time.monotonic() + 10
        while True:
            with psycopg.connect(self.conninfo_for("postgres")) as probe:
                row = probe.execute("SHOW default_transaction_read_only").fetchone()
            if row == (wanted,):
                return
            assert time.monotonic() < deadline, f"server did not reload to {wanted}"
            time.sleep(0.05)


def _cluster(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Cluster]:
    with scratch_server(scratch_root, account, binaries, "users") as server:
        c = Cluster(server)
        with c.superuser("postgres") as conn:
            for statement in SNAPSHOT_ROLES.split(";\n"):
                if statement.strip():
                    conn.execute(statement.encode())
            if int(binaries.major) >= 15:
                conn.execute(SNAPSHOT_PARAMETER_GRANT)
        with c.superuser("myapp") as conn:
            conn.execute(SNAPSHOT_DATA.encode())
        # The snapshot is served read-only: provisioning must write regardless (§9 item 14).
        c.set_server_read_only(True)
        c.first_report = c.provision(read_only=True)
        yield c


@pytest.fixture(scope="module")
def cluster(
    scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Cluster]:
    yield from _cluster(scratch_root, account, binaries)


PG13_CACHE = (
    Path(os.environ.get("PGRO_POSTGRES_CACHE", Path.home() / ".cache/pgro/postgres")) / "13"
)


def _binaries_13(scratch_root: Path) -> PostgresBinaries | None:
    try:
        return find_binaries("13")
    except BinariesMissing:
        pass
    if not os.access(PG13_CACHE / "bin" / "postgres", os.X_OK):
        return None
    # The cache is under root's home, which the server's account cannot enter: a copy.
    copy = scratch_root / "postgresql-13"
    if not copy.exists():
        shutil.copytree(PG13_CACHE, copy, symlinks=True)
    return PostgresBinaries(major="13", bindir=copy / "bin")


@pytest.fixture(scope="module")
def cluster13(scratch_root: Path, account: RunAccount) -> Iterator[Cluster]:
    binaries = _binaries_13(scratch_root)
    if binaries is None:
        pytest.skip(
            "PostgreSQL 13 server binaries are not installed: run "
            "`scripts/install-postgres-major.sh 13` (or install postgresql-13)"
        )
    yield from _cluster(scratch_root, account, binaries)


@pytest.fixture(params=["newest", "13"])
def any_cluster(request: pytest.FixtureRequest) -> Cluster:
    """The same snapshot on the newest installed PostgreSQL and on 13 (no pg_read_all_data)."""
    name = "cluster" if request.param == "newest" else "cluster13"
    c: Cluster = request.getfixturevalue(name)
    return c


def one(conn: psycopg.Connection[tuple[object, ...]], query: str, *params: object) -> object:
    row = conn.execute(query.encode(), params or None).fetchone()
    assert row is not None
    return row[0]


def role_state(cluster: Cluster, name: str) -> dict[str, object]:
    with cluster.superuser("postgres") as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
            "rolinherit, rolcanlogin, rolconnlimit, rolvaliduntil::text FROM pg_roles "
            "WHERE rolname = %s",
            [name],
        ).fetchone()
        assert row is not None
        members = conn.execute(
            "SELECT m.roleid::regrole::text FROM pg_auth_members m "
            "WHERE m.member = %s::regrole ORDER BY 1",
            [name],
        ).fetchall()
        settings = conn.execute(
            "SELECT coalesce(d.datname, '*'), s.setconfig FROM pg_db_role_setting s "
            "LEFT JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE s.setrole = %s::regrole ORDER BY 1",
            [name],
        ).fetchall()
    keys = [
        "super",
        "createdb",
        "createrole",
        "replication",
        "bypassrls",
        "inherit",
        "login",
        "connlimit",
        "validuntil",
    ]
    return {
        **dict(zip(keys, row, strict=True)),
        "member_of": [m[0] for m in members],
        "settings": [(d, list(c)) for d, c in settings],  # type: ignore[call-overload]
    }


RESET_ATTRIBUTES = {
    "super": False,
    "createdb": False,
    "createrole": False,
    "replication": False,
    "bypassrls": False,
    "inherit": True,
    "login": True,
    "connlimit": -1,
    "validuntil": "infinity",
}


def test_first_run_reports_what_it_did(cluster: Cluster) -> None:
    report = cluster.first_report
    assert report is not None
    assert report.server_version_num >= 150000
    assert report.analytics.name == "analytics"
    assert report.analytics.action == "reset"  # the snapshot had a role of that name
    assert report.analytics.privilege == "pg_read_all_data"
    assert report.analytics.read_only_sessions is True
    assert report.analytics.memberships_revoked == ["legacy_group", "pg_execute_server_program"]
    # Managed roles get new passwords; every other login role, the bootstrap superuser
    # included (unlike the reference), loses its restored one.
    assert report.passwords_neutralised == ["app_owner", "app_rw", "postgres"]
    assert report.ignored_extra_users == ["analytics", "reporter"]
    assert report.databases == ["myapp", "postgres"]

    reporter = report.extra_user("reporter")
    assert reporter.action == "reset"
    assert reporter.memberships_revoked == ["legacy_group"]
    assert reporter.schemas == ("reporting", "missing")
    assert reporter.schemas_missing == ["missing"]
    assert [g.as_dict() for g in reporter.grants] == [
        {"database": "myapp", "granted": ["reporting"], "skipped": ["missing"]},
        {"database": "postgres", "granted": [], "skipped": ["reporting", "missing"]},
    ]
    viewer = report.extra_user("viewer")
    assert viewer.action == "created"
    assert viewer.schemas == ()
    assert viewer.schemas_missing == []
    assert "reporter: missing" in report.summary()


def test_analytics_read_only_is_reset_and_cannot_write(cluster: Cluster) -> None:
    # Without the server-wide default, the role's own setting still makes sessions read-only.
    cluster.set_server_read_only(False)
    try:
        report = cluster.provision(read_only=True)
        assert report.analytics.privilege == "pg_read_all_data"

        with pytest.raises(psycopg.OperationalError):
            cluster.login("analytics", OLD_ANALYTICS_PASSWORD).close()
        assert role_state(cluster, "analytics") == {
            **RESET_ATTRIBUTES,
            "member_of": ["pg_read_all_data"],
            "settings": [("*", ["default_transaction_read_only=on"])],
        }
        with cluster.login("analytics", cluster.analytics.password) as conn:
            assert one(conn, "SHOW default_transaction_read_only") == "on"
            assert one(conn, "SHOW search_path") == '"$user", public'  # per-database setting gone
            assert one(conn, "SELECT count(*) FROM public.items") == 2
            assert one(conn, "SELECT count(*) FROM reporting.sales") == 3
            assert one(conn, "SELECT count(*) FROM private.secrets") == 1
            assert one(conn, "SELECT last_value FROM reporting.counter") == 1
            # PUBLIC lost EXECUTE; the analytics user kept what PUBLIC could execute.
            assert one(conn, "SELECT public.add_one(41)") == 42
            with pytest.raises(errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO public.items VALUES (3, 'three')")
            # Opting out of the read-only default does not help: it has no write privilege.
            conn.execute("SET default_transaction_read_only = off")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("INSERT INTO public.items VALUES (3, 'three')")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE public.nope (id int)")
        with cluster.login("analytics", cluster.analytics.password, "postgres") as conn:
            assert one(conn, "SELECT current_user") == "analytics"
    finally:
        cluster.set_server_read_only(True)


def test_analytics_read_write_is_no_superuser_and_writes(cluster: Cluster) -> None:
    cluster.set_server_read_only(False)
    try:
        report = cluster.provision(read_only=False)
        assert report.analytics.privilege == "read_write"
        assert report.analytics.read_only_sessions is False
        assert role_state(cluster, "analytics") == {
            **RESET_ATTRIBUTES,
            "member_of": [],  # pg_read_all_data from a read-only run is gone too
            "settings": [],
        }
        with cluster.login("analytics", cluster.analytics.password) as conn:
            assert one(conn, "SHOW default_transaction_read_only") == "off"
            conn.execute("CREATE TABLE public.written_by_analytics (id int)")
            conn.execute("INSERT INTO public.written_by_analytics VALUES (1)")
            assert one(conn, "SELECT count(*) FROM public.written_by_analytics") == 1
            conn.execute("DROP TABLE public.written_by_analytics")
    finally:
        cluster.set_server_read_only(True)
        cluster.provision(read_only=True)
    assert role_state(cluster, "analytics")["super"] is False


def test_source_login_roles_cannot_log_in(cluster: Cluster) -> None:
    cluster.provision(read_only=True)
    with pytest.raises(psycopg.OperationalError):
        cluster.login("app_rw", APP_RW_PASSWORD).close()
    with pytest.raises(psycopg.OperationalError):
        cluster.login("reporter", OLD_REPORTER_PASSWORD).close()
    with cluster.superuser("postgres") as conn:
        rows = conn.execute(
            "SELECT rolname, rolpassword IS NOT NULL FROM pg_authid "
            "WHERE rolcanlogin ORDER BY rolname"
        ).fetchall()
    # Only the roles pgro manages hold a password; not even the bootstrap superuser.
    assert rows == [
        ("analytics", True),
        ("app_owner", False),
        ("app_rw", False),
        ("postgres", False),
        ("reporter", True),
        ("viewer", True),
    ]


def test_passwords_of_other_managed_roles_survive_a_rerun(cluster: Cluster) -> None:
    """persistentUsers are provisioned elsewhere; re-applying these users (after the
    persistent-schema migration) must not lock them out."""
    with cluster.superuser("postgres") as su:
        su.execute("CREATE ROLE keeper LOGIN PASSWORD 'keeper-secret'")
    try:
        report = cluster.provision(other_managed_roles=("keeper",))
        assert "keeper" not in report.passwords_neutralised
        with cluster.login("keeper", "keeper-secret", "postgres") as conn:
            assert one(conn, "SELECT current_user") == "keeper"
        assert cluster.provision().passwords_neutralised == ["keeper"]
        with pytest.raises(psycopg.OperationalError):
            cluster.login("keeper", "keeper-secret", "postgres").close()
    finally:
        with cluster.superuser("postgres") as su:
            su.execute("DROP ROLE keeper")


def test_extra_user_reads_only_its_schemas(cluster: Cluster) -> None:
    report = cluster.provision(read_only=True)
    assert report.extra_user("reporter").schemas_missing == ["missing"]
    assert role_state(cluster, "reporter") == {
        **RESET_ATTRIBUTES,
        "member_of": [],
        "settings": [("*", ["default_transaction_read_only=on"])],
    }
    with cluster.superuser("myapp") as su:
        # Created after provisioning by the schema owner: default privileges must cover them.
        su.execute("SET ROLE app_owner")
        su.execute("DROP TABLE IF EXISTS reporting.later, private.later")
        su.execute("DROP SEQUENCE IF EXISTS reporting.later_seq")
        su.execute("CREATE TABLE reporting.later AS SELECT 7 AS n")
        su.execute("CREATE SEQUENCE reporting.later_seq")
        su.execute("CREATE TABLE private.later AS SELECT 8 AS n")

    with cluster.login("reporter", cluster.reporter.password) as conn:
        assert one(conn, "SHOW default_transaction_read_only") == "on"
        assert one(conn, "SELECT count(*) FROM reporting.sales") == 3
        assert one(conn, "SELECT last_value FROM reporting.counter") == 1
        assert one(conn, "SELECT n FROM reporting.later") == 7
        assert one(conn, "SELECT last_value FROM reporting.later_seq") == 1
        for query in (
            "SELECT * FROM private.secrets",  # the snapshot's own grant to `reporter` is gone
            "SELECT * FROM private.later",  # and so is its default privilege
            "SELECT * FROM public.items",  # PUBLIC's grant is gone
            "SELECT public.add_one(1)",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(query.encode())
        assert one(conn, "SELECT has_schema_privilege('public', 'USAGE')") is False
        assert one(conn, "SELECT has_schema_privilege('private', 'USAGE')") is False
        assert one(conn, "SELECT has_schema_privilege('reporting', 'CREATE')") is False
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO reporting.sales (amount) VALUES (1)")
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO reporting.sales (amount) VALUES (1)")
    # CONNECT was revoked from PUBLIC on myapp in the snapshot; provisioning grants it.
    with cluster.login("reporter", cluster.reporter.password, "postgres") as conn:
        assert one(conn, "SELECT current_user") == "reporter"

    # A bare name: a login role that reads nothing.
    with cluster.login("viewer", cluster.viewer.password) as conn:
        assert one(conn, "SHOW default_transaction_read_only") == "on"
        assert one(conn, "SELECT has_schema_privilege('reporting', 'USAGE')") is False
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM reporting.sales")
    with cluster.superuser() as su:
        assert one(su, "SELECT has_database_privilege('viewer', 'myapp', 'CONNECT')") is True


def catalog_state(cluster: Cluster) -> dict[str, object]:
    """Every role attribute, membership, setting and ACL provisioning touches, ACLs as sets
    (revoking and re-granting may reorder an aclitem array without changing its meaning)."""
    state: dict[str, object] = {}
    with cluster.superuser("postgres") as conn:
        state["roles"] = conn.execute(
            "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, "
            "rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil::text, rolpassword IS NULL "
            "FROM pg_authid ORDER BY rolname"
        ).fetchall()
        state["members"] = conn.execute(
            "SELECT roleid::regrole::text, member::regrole::text, admin_option "
            "FROM pg_auth_members ORDER BY 1, 2"
        ).fetchall()
        state["settings"] = conn.execute(
            "SELECT setrole::regrole::text, setdatabase, setconfig FROM pg_db_role_setting "
            "ORDER BY 1, 2"
        ).fetchall()
        state["databases"] = conn.execute(
            "SELECT datname, ARRAY(SELECT unnest(datacl)::text ORDER BY 1) FROM pg_database "
            "ORDER BY 1"
        ).fetchall()
    for dbname in ("myapp", "postgres"):
        with cluster.superuser(dbname) as conn:
            for name, query in {
                "schemas": "SELECT nspname, ARRAY(SELECT unnest(nspacl)::text ORDER BY 1) "
                "FROM pg_namespace ORDER BY 1",
                "relations": "SELECT oid::regclass::text, "
                "ARRAY(SELECT unnest(relacl)::text ORDER BY 1) FROM pg_class "
                "WHERE relacl IS NOT NULL ORDER BY 1",
                "routines": "SELECT oid::regprocedure::text, "
                "ARRAY(SELECT unnest(proacl)::text ORDER BY 1) FROM pg_proc "
                "WHERE proacl IS NOT NULL ORDER BY 1",
                "default_acl": "SELECT defaclrole::regrole::text, "
                "defaclnamespace::regnamespace::text, "
                "defaclobjtype, ARRAY(SELECT unnest(defaclacl)::text ORDER BY 1) "
                "FROM pg_default_acl ORDER BY 1, 2, 3",
            }.items():
                state[f"{dbname}:{name}"] = conn.execute(query.encode()).fetchall()
    return state


def test_provisioning_twice_gives_identical_state(cluster: Cluster) -> None:
    first = cluster.provision(read_only=True)
    before = catalog_state(cluster)
    second = cluster.provision(read_only=True)
    assert catalog_state(cluster) == before
    # The same report, except that nothing is left to neutralise and nothing to revoke
    # beyond what provisioning itself granted.
    assert second.passwords_neutralised == first.passwords_neutralised == []
    assert second.analytics.memberships_revoked == ["pg_read_all_data"]
    assert [u.as_dict() for u in second.extra_users] == [u.as_dict() for u in first.extra_users]
    assert all(u.action == "reset" for u in second.extra_users)
    for name, creds in (("analytics", cluster.analytics), ("reporter", cluster.reporter)):
        with cluster.login(name, creds.password) as conn:
            assert one(conn, "SELECT current_user") == name
    # The snapshot's default privilege in `private` is gone; only the listed schema's remain.
    assert before["myapp:default_acl"] == [
        ("app_owner", "reporting", "S", ["reporter=r/app_owner"]),
        ("app_owner", "reporting", "r", ["reporter=r/app_owner"]),
    ]


def test_passwords_stay_out_of_reports_and_errors(cluster: Cluster) -> None:
    report = cluster.provision(read_only=True)
    text = repr(report) + json.dumps(report.as_dict()) + report.summary()
    text += repr(cluster.analytics) + str(cluster.reporter)
    assert "analytics" in text and "reporter" in text
    for password in cluster.passwords:
        assert password not in text

    # A role the server refuses to create: the whole role step rolls back, the error names
    # the role and the cause, and carries no password.
    evil = RoleCredentials("pg_evil", generate_password())
    with pytest.raises(ProvisioningFailed) as failed:
        cluster.provision(extra=[(ExtraUser(name="pg_evil", schemas=["reporting"]), evil)])
    exc = failed.value
    assert exc.reason == "RoleProvisioningFailed"
    assert exc.role == "pg_evil"
    assert "pg_evil" in str(exc) and "reserved" in str(exc)
    for password in [*cluster.passwords, evil.password]:
        assert password not in str(exc) and password not in repr(exc.args)
    assert exc.__cause__ is None and exc.__suppress_context__
    # Rolled back: the users from the last successful run are untouched.
    with cluster.login("reporter", cluster.reporter.password) as conn:
        assert one(conn, "SELECT count(*) FROM reporting.sales") == 3

    # Inconsistent input is refused before anything is touched.
    with pytest.raises(ProvisioningFailed) as failed:
        cluster.provision(extra=[(ExtraUser(name="reporter"), cluster.viewer)])
    assert failed.value.reason == "InvalidUsers"
    assert "reporter" in str(failed.value) and cluster.viewer.password not in str(failed.value)
    with pytest.raises(ProvisioningFailed) as failed:
        cluster.provision(extra=[(ExtraUser(name="postgres"), RoleCredentials("postgres", "x1"))])
    assert failed.value.reason == "InvalidUsers"


# -- least privilege and read-only at the server (issue 18 items 7 and 8) ----------------

# Every way to write that a read-only login must not have, whatever its session default.
WRITE_PATHS = {
    "INSERT": "INSERT INTO public.items VALUES (3, 'three')",
    "UPDATE": "UPDATE public.items SET name = 'changed'",
    "DELETE": "DELETE FROM public.items",
    "TRUNCATE": "TRUNCATE public.items",
    "INSERT granted to PUBLIC": "INSERT INTO public.open_t VALUES (1)",
    "TRUNCATE granted to PUBLIC": "TRUNCATE public.open_t",
    "SECURITY DEFINER function that writes": "SELECT public.write_t(1)",
    "lo_create": "SELECT lo_create(0)",
    "lo_creat": "SELECT lo_creat(-1)",
    "lo_from_bytea": "SELECT lo_from_bytea(0, 'x')",
    "lo_import": "SELECT lo_import('/etc/hostname')",
    "CREATE TEMP TABLE": "CREATE TEMP TABLE scratch (id int)",
    "CREATE in public": "CREATE TABLE public.nope (id int)",
    "CREATE SCHEMA": "CREATE SCHEMA nope",
    "nextval": "SELECT nextval('reporting.counter')",
    "SELECT FOR UPDATE": "SELECT * FROM public.items FOR UPDATE",
    "a table the snapshot let the role own": "INSERT INTO public.analytics_owned VALUES (1)",
}
# What no role pgro hands out may do, read-only or not.
SERVER_ESCAPES = {
    "COPY TO PROGRAM": "COPY (SELECT 1) TO PROGRAM 'true'",
    "COPY FROM PROGRAM": "COPY public.open_t FROM PROGRAM 'echo 1'",
    "COPY TO a server file": "COPY (SELECT 1) TO '/tmp/pgro-users-copy-test'",
    "COPY FROM a server file": "COPY public.open_t FROM '/etc/hostname'",
    "pg_read_file re-granted to PUBLIC": "SELECT pg_read_file('PG_VERSION')",
    "pg_read_binary_file with its ACL cleared in pg_proc": (
        "SELECT pg_read_binary_file('PG_VERSION')"
    ),
    "lo_import": "SELECT lo_import('/etc/hostname')",
    "SECURITY DEFINER function owned by a superuser": "SELECT public.write_t(2)",
    "write through a view owned by a superuser": "UPDATE public.roles_v SET rolsuper = true",
    "SET ROLE to the bootstrap superuser": "SET ROLE postgres",
    "an internal alias of pg_read_file": "SELECT public.rf('PG_VERSION')",
    "a trigger on a table it does not own": (
        "CREATE TRIGGER t BEFORE INSERT ON public.items FOR EACH ROW "
        "EXECUTE FUNCTION suppress_redundant_updates_trigger()"
    ),
}


def assert_denied(conn: psycopg.Connection[tuple[object, ...]], paths: dict[str, str]) -> None:
    """Each statement fails for lack of a privilege (each in its own transaction)."""
    allowed = []
    for what, statement in paths.items():
        try:
            conn.execute(statement.encode())
        except errors.InsufficientPrivilege:
            continue
        allowed.append(what)
    assert allowed == [], f"{conn.info.user} could: {allowed}"


def assert_nothing_written(cluster: Cluster) -> None:
    with cluster.superuser() as su:
        assert one(su, "SELECT count(*) FROM public.items") == 2
        assert one(su, "SELECT count(*) FROM public.open_t") == 0
        assert one(su, "SELECT count(*) FROM public.audit") == 0
        assert one(su, "SELECT count(*) FROM pg_largeobject_metadata") == 0
        assert one(su, "SELECT last_value FROM reporting.counter") == 1
        assert one(su, "SELECT to_regclass('public.nope')") is None
        assert one(su, "SELECT count(*) FROM pg_roles WHERE rolsuper") == 1


def assert_least_privilege(cluster: Cluster, name: str) -> None:
    """No superuser, no dangerous attribute, no membership, no parameter it could load a
    library with."""
    state = role_state(cluster, name)
    assert {k: state[k] for k in ("super", "createrole", "replication", "bypassrls")} == {
        "super": False,
        "createrole": False,
        "replication": False,
        "bypassrls": False,
    }
    assert set(state["member_of"]) <= {"pg_read_all_data"}  # type: ignore[call-overload]
    with cluster.superuser("postgres") as su:
        if su.info.server_version >= 150000:
            assert (
                one(
                    su,
                    "SELECT has_parameter_privilege(%s, 'session_preload_libraries', 'SET')",
                    name,
                )
                is False
            )


def logins(cluster: Cluster) -> list[tuple[str, str]]:
    return [
        ("analytics", cluster.analytics.password),
        ("reporter", cluster.reporter.password),
        ("viewer", cluster.viewer.password),
    ]


@pytest.mark.parametrize("persistent", [(), ("dbt",)], ids=["plain", "persistentSchemas"])
def test_read_only_holds_at_the_server_for_every_role(
    any_cluster: Cluster, persistent: tuple[str, ...]
) -> None:
    """SET default_transaction_read_only = off, then every write path: all denied."""
    cluster = any_cluster
    cluster.set_server_read_only(False)  # the session default is not what holds
    try:
        report = cluster.provision(read_only=True, persistent_schemas=persistent)
        version = report.server_version_num
        assert report.analytics.privilege == (
            "pg_read_all_data" if version >= 140000 else "select_grants"
        )
        for name, password in logins(cluster):
            assert_least_privilege(cluster, name)
            with cluster.login(name, password) as conn:
                assert one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is (
                    False
                )
                conn.execute("SET default_transaction_read_only = off")
                assert_denied(conn, {**WRITE_PATHS, **SERVER_ESCAPES})
            # template1 is no database a client reads, and PUBLIC could write there.
            with pytest.raises(psycopg.OperationalError, match="permission denied"):
                cluster.login(name, password, "template1").close()
        with cluster.login("analytics", cluster.analytics.password) as conn:
            # Still reads everything, views and sequences included, on every version.
            assert one(conn, "SELECT count(*) FROM public.items") == 2
            assert one(conn, "SELECT count(*) FROM private.secrets") == 1
            assert one(conn, "SELECT last_value FROM reporting.counter") == 1
            assert one(conn, "SELECT count(*) FROM dbt.model") == 1
            assert one(conn, "SELECT public.add_one(41)") == 42
            assert one(conn, "SELECT public.shout('quiet')") == "QUIET"  # a built-in's alias
            # Read-only: no schema changes hands, persistent or not.
            assert (
                one(conn, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'dbt'")
                == "app_owner"
            )
        with cluster.login("reporter", cluster.reporter.password) as conn:
            assert one(conn, "SELECT count(*) FROM reporting.sales") == 3
        assert_nothing_written(cluster)
    finally:
        cluster.set_server_read_only(True)
        cluster.provision(read_only=True)


@pytest.mark.parametrize(
    "persistent", [(), ("dbt", "absent")], ids=["readOnly-false", "persistentSchemas"]
)
def test_write_capable_analytics_writes_what_it_needs_and_no_more(
    any_cluster: Cluster, persistent: tuple[str, ...]
) -> None:
    """readOnly: false, or persistentSchemas/redaction/migrateTo: DML, CREATE, TEMP, large
    objects and its persistent schemas, but never a superuser's powers; the extra users
    stay read-only on the same replica."""
    cluster = any_cluster
    cluster.set_server_read_only(False)
    try:
        report = cluster.provision(read_only=False, persistent_schemas=persistent)
        assert report.analytics.privilege == "read_write"
        for name, _ in logins(cluster):
            assert_least_privilege(cluster, name)
        assert role_state(cluster, "analytics")["member_of"] == []
        with cluster.login("analytics", cluster.analytics.password) as conn:
            assert one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
            assert_denied(conn, SERVER_ESCAPES)
            with conn.transaction(force_rollback=True):
                conn.execute("INSERT INTO public.items VALUES (3, 'three')")
                conn.execute("UPDATE public.items SET name = 'changed' WHERE id = 3")
                conn.execute("DELETE FROM public.items WHERE id = 3")
                conn.execute("TRUNCATE public.open_t")
                assert one(conn, "SELECT nextval('reporting.counter') > 1") is True
                assert one(conn, "SELECT id FROM public.items ORDER BY id LIMIT 1 FOR UPDATE") == 1
                conn.execute("CREATE TEMP TABLE scratch (id int)")
                conn.execute("CREATE TABLE public.made (id int)")
                conn.execute("CREATE SCHEMA made")
                assert one(conn, "SELECT lo_create(0) > 0") is True
                assert one(conn, "SELECT lo_from_bytea(0, 'x') > 0") is True
            owner = "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'dbt'"
            if persistent:
                # Its persistent schema is its own: what the migration does (drop, re-create).
                assert one(conn, owner) == "analytics"
                conn.execute("DROP SCHEMA dbt CASCADE")
                conn.execute("CREATE SCHEMA dbt")
                conn.execute("CREATE TABLE dbt.model AS SELECT 2 AS n")
                assert one(conn, "SELECT n FROM dbt.model") == 2
            else:
                # Not a persistent schema: the source's, written to but not dropped.
                assert one(conn, owner) == "app_owner"
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute("DROP SCHEMA dbt CASCADE")
        for name, password in logins(cluster)[1:]:
            with cluster.login(name, password) as conn:
                conn.execute("SET default_transaction_read_only = off")
                assert_denied(conn, {**WRITE_PATHS, **SERVER_ESCAPES})
        with cluster.superuser() as su:
            assert one(su, "SELECT count(*) FROM public.items") == 2
            assert one(su, "SELECT count(*) FROM public.audit") == 0
            assert one(su, "SELECT count(*) FROM pg_roles WHERE rolsuper") == 1
    finally:
        cluster.set_server_read_only(True)
        with cluster.superuser() as su:
            su.execute("SELECT setval('reporting.counter', 1)")  # nextval is not rolled back
            su.execute("DROP SCHEMA IF EXISTS dbt CASCADE")
            su.execute("CREATE SCHEMA dbt AUTHORIZATION app_owner")
            su.execute("CREATE TABLE dbt.model AS SELECT 1 AS n")
            su.execute("ALTER TABLE dbt.model OWNER TO app_owner")
        cluster.provision(read_only=True)


def test_write_capable_provisioning_twice_gives_identical_state(cluster: Cluster) -> None:
    cluster.set_server_read_only(False)
    try:
        cluster.provision(read_only=False, persistent_schemas=("dbt",))
        before = catalog_state(cluster)
        cluster.provision(read_only=False, persistent_schemas=("dbt",))
        assert catalog_state(cluster) == before
    finally:
        cluster.set_server_read_only(True)
        cluster.provision(read_only=True)


def test_provisioning_neutralises_the_catalog_before_its_ddl(cluster: Cluster) -> None:
    """provision_users runs the catalog guard first: an event trigger the snapshot left
    would otherwise run (as the superuser) on provisioning's GRANTs, and a stored
    dynamic_library_path would apply to every user session."""
    with cluster.superuser() as conn:
        conn.execute(
            "CREATE FUNCTION public.snapshot_hook() RETURNS event_trigger LANGUAGE plpgsql "
            "AS $$BEGIN RAISE EXCEPTION 'snapshot event trigger ran'; END$$"
        )
        conn.execute(
            "CREATE EVENT TRIGGER snapshot_hook ON ddl_command_start "
            "EXECUTE FUNCTION public.snapshot_hook()"
        )
        conn.execute("ALTER DATABASE myapp SET dynamic_library_path = '/nonexistent'")
    try:
        report = cluster.provision()
        assert any("snapshot_hook" in note for note in report.catalog_notes), report
        assert any("dynamic_library_path" in note for note in report.catalog_notes), report
        with cluster.superuser() as conn:
            assert one(conn, "SELECT evtenabled FROM pg_event_trigger") == "D"
            stored = one(
                conn,
                "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d "
                "ON d.oid = s.setdatabase WHERE d.datname = 'myapp' "
                "AND array_to_string(s.setconfig, ',') LIKE '%dynamic_library_path%'",
            )
            assert stored == 0
    finally:
        with cluster.superuser() as conn:
            conn.execute("DROP EVENT TRIGGER IF EXISTS snapshot_hook")
            conn.execute("DROP FUNCTION IF EXISTS public.snapshot_hook()")
            conn.execute("ALTER DATABASE myapp RESET dynamic_library_path")
