"""`_pgro.restore_info` on a real server (pgro.postgres.restore_info).

One cluster per module stands in for a restored snapshot, served read-only and provisioned
like a restore (catalog guard, analytics role). Each test first removes whatever `_pgro`
schemas an earlier test left, then builds the snapshot state it needs. The hostile cases put
into the snapshot's `_pgro` objects that would run code if pgro's superuser session wrote
through them; the code leaves a row in `public.pwned` (or raises), so "nothing ran" is
checked, not assumed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.restore_info import (
    RestoreInfo,
    RestoreInfoFailed,
    mark_outgoing,
    record_restore,
    reset_access,
    set_stage,
)
from pgro.postgres.server import PostgresServer, make_conninfo
from pgro.postgres.users import RoleCredentials, generate_password, provision_users
from tests.fixtures.scratch_server import scratch_server
from tests.integration.test_users import _binaries_13

FIXES = {"locale": False, "reindex": False, "reset_wal": True, "recreated_pg_wal": False}
INFO = RestoreInfo("k1a2b3", "2026-11-30T01:02:03.456Z", FIXES)

SNAPSHOT = """
CREATE ROLE app_owner NOLOGIN;
CREATE TABLE public.pwned (who text, at timestamptz DEFAULT now());
GRANT INSERT ON public.pwned TO PUBLIC;
CREATE FUNCTION public.pwn() RETURNS text LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO public.pwned (who) VALUES (current_user); RETURN 'x'; END$$;
CREATE FUNCTION public.pwn_trigger() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.pwn(); RETURN NEW; END$$;
CREATE FUNCTION public.pwn_check(text) RETURNS boolean LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.pwn(); RETURN true; END$$;
CREATE FUNCTION public.pwn_immutable(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS
  $$BEGIN RAISE EXCEPTION 'pwned: a snapshot index expression ran as %', current_user; END$$;
"""
# The reference's first table, as an old restored copy would hold it (no stage, no fixes).
OLD_TABLE = """
CREATE SCHEMA _pgro;
CREATE TABLE _pgro.restore_info (id int PRIMARY KEY DEFAULT 1, snapshot_id text NOT NULL,
  snapshot_time timestamptz, restored_at timestamptz NOT NULL DEFAULT now());
INSERT INTO _pgro.restore_info (snapshot_id, restored_at) VALUES ('old-snapshot', '2020-01-01');
GRANT INSERT, DELETE, TRUNCATE, TRIGGER ON _pgro.restore_info TO PUBLIC;
GRANT UPDATE (snapshot_id) ON _pgro.restore_info TO app_owner;
GRANT CREATE ON SCHEMA _pgro TO PUBLIC;
"""
_TABLE = (
    "CREATE TABLE _pgro.restore_info (id int PRIMARY KEY DEFAULT 1, snapshot_id text NOT NULL, "
    "snapshot_time timestamptz, restored_at timestamptz NOT NULL DEFAULT now(), "
    "stage text NOT NULL DEFAULT 'restored', "
    "last_transition_time timestamptz NOT NULL DEFAULT now(), fixes jsonb"
)
_ROW = "INSERT INTO _pgro.restore_info (snapshot_id) VALUES ('old')"
# Each: what a snapshot's `_pgro` holds that pgro's superuser writes would run.
HOSTILE = {
    "view": "CREATE SCHEMA _pgro; CREATE VIEW _pgro.restore_info AS "
    "SELECT 1 AS id, public.pwn() AS snapshot_id, now() AS snapshot_time, now() AS restored_at, "
    "'ready'::text AS stage, now() AS last_transition_time, NULL::jsonb AS fixes",
    "trigger": f"CREATE SCHEMA _pgro; {_TABLE}); {_ROW}; "
    "CREATE TRIGGER t BEFORE INSERT OR UPDATE ON _pgro.restore_info "
    "FOR EACH ROW EXECUTE FUNCTION public.pwn_trigger()",
    "statement trigger": f"CREATE SCHEMA _pgro; {_TABLE}); "
    "CREATE TRIGGER t AFTER UPDATE ON _pgro.restore_info "
    "FOR EACH STATEMENT EXECUTE FUNCTION public.pwn_trigger()",
    "rule": f"CREATE SCHEMA _pgro; {_TABLE}); {_ROW}; "
    "CREATE RULE r AS ON UPDATE TO _pgro.restore_info DO ALSO SELECT public.pwn()",
    "check constraint": f"CREATE SCHEMA _pgro; {_TABLE}, CHECK (public.pwn_check(stage)))",
    "expression index": f"CREATE SCHEMA _pgro; {_TABLE}); "
    "CREATE INDEX ON _pgro.restore_info (public.pwn_immutable(stage))",
    "column with a default": f"CREATE SCHEMA _pgro; {_TABLE}, extra text DEFAULT public.pwn())",
    "a default calling the snapshot's code": "CREATE SCHEMA _pgro; "
    + _TABLE.replace("DEFAULT 'restored'", "DEFAULT public.pwn()")
    + ")",
    "domain column": "CREATE DOMAIN public.sneaky AS text CHECK (public.pwn_check(VALUE)); "
    f"CREATE SCHEMA _pgro; {_TABLE.replace('stage text', 'stage public.sneaky')})",
    "inheritance child": f"CREATE SCHEMA _pgro; {_TABLE}); "
    "CREATE TABLE public.child () INHERITS (_pgro.restore_info); "
    "CREATE TRIGGER t BEFORE UPDATE ON public.child "
    "FOR EACH ROW EXECUTE FUNCTION public.pwn_trigger(); "
    "INSERT INTO public.child (snapshot_id) VALUES ('c')",
    "table owned by a source role": f"CREATE SCHEMA _pgro; {_TABLE}); "
    "ALTER TABLE _pgro.restore_info OWNER TO app_owner",
    "schema owned by a source role": f"CREATE SCHEMA _pgro AUTHORIZATION app_owner; {_TABLE})",
    "a type in the way": "CREATE SCHEMA _pgro; CREATE TYPE _pgro.restore_info AS (a int)",
}


@dataclass
class Cluster:
    server: PostgresServer
    analytics: RoleCredentials = field(
        default_factory=lambda: RoleCredentials("analytics", generate_password())
    )

    def conninfo(self, dbname: str = "postgres") -> str:
        return self.server.endpoint.conninfo(dbname, "postgres")

    def superuser(self) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(self.conninfo(), autocommit=True)
        conn.execute("SET default_transaction_read_only = off")
        return conn

    def login_analytics(self) -> psycopg.Connection[tuple[object, ...]]:
        """A real client login over TCP (scram-sha-256 under DEFAULT_HBA)."""
        return psycopg.connect(
            make_conninfo(
                host="127.0.0.1",
                port=str(self.server.port),
                dbname="postgres",
                user=self.analytics.username,
                password=self.analytics.password,
                connect_timeout="10",
            ),
            autocommit=True,
        )

    def provision(self, *, read_only: bool) -> None:
        provision_users(
            self.conninfo, analytics=self.analytics, extra_users=[], read_only=read_only
        )

    def record(self, info: RestoreInfo = INFO, *, may_write: bool = False) -> list[str]:
        return record_restore(
            self.conninfo(), info, analytics="analytics", analytics_may_write=may_write
        )

    def fresh(self, snapshot_sql: str = "") -> None:
        """No `_pgro` of an earlier test; then the snapshot's own, if any."""
        with self.superuser() as conn:
            for (name,) in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE '\\_pgro%'"
            ).fetchall():
                conn.execute(f'DROP SCHEMA "{name}" CASCADE')
            conn.execute("DROP TABLE IF EXISTS public.child")
            conn.execute("DROP DOMAIN IF EXISTS public.sneaky CASCADE")
            conn.execute("TRUNCATE public.pwned")
            for statement in snapshot_sql.split("; "):
                if statement.strip():
                    conn.execute(statement.encode())

    def set_read_only(self, on: bool) -> None:
        with self.superuser() as conn:
            if on:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        wanted = ("on" if on else "off",)
        deadline = time.monotonic() + 10
        while True:
            with psycopg.connect(self.conninfo()) as probe:
                if probe.execute("SHOW default_transaction_read_only").fetchone() == wanted:
                    return
            assert time.monotonic() < deadline, "the server did not reload its settings"
            time.sleep(0.05)

    def row(self) -> dict[str, object]:
        with self.superuser() as conn:
            cur = conn.execute(
                "SELECT snapshot_id, snapshot_time, restored_at, stage, last_transition_time, "
                "fixes FROM _pgro.restore_info WHERE id = 1"
            )
            found = cur.fetchone()
            assert found is not None
            assert cur.description is not None
            return {d.name: v for d, v in zip(cur.description, found, strict=True)}

    def value(self, query: str, *params: object) -> object:
        with self.superuser() as conn:
            found = conn.execute(query.encode(), params or None).fetchone()
        assert found is not None
        return found[0]

    def grants(self, kind: str) -> list[str]:
        """Who else than the owner holds what on the `_pgro` schema or the table."""
        source = (
            "SELECT nspacl AS acl, nspowner AS owner FROM pg_namespace WHERE nspname = '_pgro'"
            if kind == "schema"
            else "SELECT relacl AS acl, relowner AS owner FROM pg_class "
            "WHERE oid = '_pgro.restore_info'::regclass"
        )
        with self.superuser() as conn:
            rows = conn.execute(
                f"SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END"
                f" || '=' || string_agg(a.privilege_type, ',' ORDER BY a.privilege_type) "
                f"FROM ({source}) o, aclexplode(o.acl) a WHERE a.grantee <> o.owner "
                "GROUP BY a.grantee ORDER BY 1"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def pwned(self) -> list[str]:
        with self.superuser() as conn:
            return [str(r[0]) for r in conn.execute("SELECT who FROM public.pwned").fetchall()]


@pytest.fixture(scope="module", params=["newest", "13"])
def cluster(
    request: pytest.FixtureRequest,
    scratch_root: Path,
    account: RunAccount,
    binaries: PostgresBinaries,
) -> Iterator[Cluster]:
    """The newest installed PostgreSQL, and 13 (the operator runs any major's image)."""
    if request.param == "13":
        found = _binaries_13(scratch_root)
        if found is None:
            pytest.skip(
                "PostgreSQL 13 server binaries are not installed: run "
                "`scripts/install-postgres-major.sh 13` (or install postgresql-13)"
            )
        binaries = found
    with scratch_server(scratch_root, account, binaries, "restore-info") as server:
        c = Cluster(server)
        with c.superuser() as conn:
            conn.execute(SNAPSHOT.encode())
        c.set_read_only(True)
        c.provision(read_only=True)
        yield c


def test_creates_the_table_and_writes_the_row_on_a_read_only_server(cluster: Cluster) -> None:
    cluster.fresh()
    assert cluster.record() == []
    row = cluster.row()
    assert row["snapshot_id"] == "k1a2b3"
    assert str(row["snapshot_time"]).startswith("2026-11-30 01:02:03.456")
    assert row["stage"] == "ready"
    assert row["restored_at"] is not None and row["last_transition_time"] is not None
    assert row["fixes"] == FIXES
    # pgro's role owns the schema and the table; nobody else holds anything but analytics.
    assert (
        cluster.value("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = '_pgro'")
        == "postgres"
    )
    assert cluster.grants("table") == ["analytics=SELECT"]


def test_an_unknown_snapshot_time_and_fixes_are_null_and_a_pending_reindex_starts_restored(
    cluster: Cluster,
) -> None:
    cluster.fresh()
    cluster.record(RestoreInfo("k9", "", None, reindex_pending=True))
    row = cluster.row()
    assert (row["snapshot_id"], row["snapshot_time"], row["fixes"], row["stage"]) == (
        "k9",
        None,
        None,
        "restored",
    )
    # The reindex step (features.md §2.3) moves it on.
    assert set_stage(cluster.conninfo(), "reindexing") is True
    assert cluster.row()["stage"] == "reindexing"
    assert set_stage(cluster.conninfo(), "ready") is True
    assert cluster.row()["stage"] == "ready"
    with pytest.raises(ValueError, match="unknown restore_info stage"):
        set_stage(cluster.conninfo(), "bogus")


def test_an_old_table_from_the_snapshot_is_upgraded_and_its_grants_reset(
    cluster: Cluster,
) -> None:
    cluster.fresh(OLD_TABLE.replace(";\n", "; "))
    assert cluster.record() == []
    columns = cluster.value(
        "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = '_pgro.restore_info'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    assert columns == ("id,snapshot_id,snapshot_time,restored_at,stage,last_transition_time,fixes")
    row = cluster.row()
    assert (row["snapshot_id"], row["stage"], row["fixes"]) == ("k1a2b3", "ready", FIXES)
    assert str(row["restored_at"]) > "2026"  # the snapshot's restored_at is replaced
    assert cluster.value("SELECT count(*) FROM pg_namespace WHERE nspname LIKE '\\_pgro\\_%'") == 0
    # The snapshot's grants (PUBLIC's writes and TRIGGER, a column grant, CREATE) are gone.
    assert cluster.grants("table") == ["analytics=SELECT"]
    assert (
        cluster.value(
            "SELECT count(*) FROM pg_attribute WHERE attacl IS NOT NULL "
            "AND attrelid = '_pgro.restore_info'::regclass"
        )
        == 0
    )
    assert cluster.grants("schema") == ["analytics=USAGE"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_snapshot_schema_is_moved_aside_and_runs_nothing(
    cluster: Cluster, case: str
) -> None:
    cluster.fresh(HOSTILE[case])
    notes = cluster.record()
    assert len(notes) == 1 and "renamed to _pgro_snapshot" in notes[0], notes
    assert cluster.pwned() == []
    # A fresh plain table of pgro's, in a fresh schema of pgro's.
    assert (
        cluster.value(
            "SELECT c.relkind::text || ' ' || c.relowner::regrole::text || ' ' "
            "|| n.nspowner::regrole::text FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = '_pgro.restore_info'::regclass"
        )
        == "r postgres postgres"
    )
    assert cluster.row()["snapshot_id"] == "k1a2b3"
    # The snapshot's objects are kept, out of the way, and never written.
    assert cluster.value("SELECT count(*) FROM pg_namespace WHERE nspname = '_pgro_snapshot'") == 1
    assert mark_outgoing(cluster.conninfo(), label="hostile") is True
    assert cluster.row()["stage"] == "outgoing"
    assert cluster.pwned() == []


def test_a_view_over_the_snapshot_table_follows_it_aside(cluster: Cluster) -> None:
    cluster.fresh(
        HOSTILE["trigger"] + "; CREATE VIEW public.info_v AS SELECT * FROM _pgro.restore_info"
    )
    cluster.record()
    # Renaming keeps what depends on the snapshot's table (nothing of the user's is lost).
    assert cluster.value("SELECT snapshot_id FROM public.info_v") == "old"
    assert (
        cluster.value("SELECT count(*) FROM pg_namespace WHERE nspname = '_pgro_snapshot_1'") == 0
    )
    # A second snapshot copy aside gets the next free name.
    with cluster.superuser() as conn:
        conn.execute("DROP SCHEMA _pgro CASCADE")
        conn.execute("CREATE SCHEMA _pgro AUTHORIZATION app_owner")
    assert "_pgro_snapshot_1" in cluster.record()[0]
    assert cluster.pwned() == []


def test_enabled_event_triggers_are_refused(cluster: Cluster) -> None:
    cluster.fresh()
    with cluster.superuser() as conn:
        conn.execute(
            "CREATE FUNCTION public.pwn_event() RETURNS event_trigger LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM public.pwn(); END$$"
        )
        conn.execute(
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION public.pwn_event()"
        )
    try:
        with pytest.raises(RestoreInfoFailed, match="event triggers"):
            cluster.record()
    finally:
        with cluster.superuser() as conn:
            conn.execute("DROP EVENT TRIGGER e")
            conn.execute("DROP FUNCTION public.pwn_event()")
    assert cluster.pwned() == []


def test_outgoing_mark_survives_provisioning_again_but_not_a_new_snapshot(
    cluster: Cluster,
) -> None:
    cluster.fresh()
    cluster.record()
    first = cluster.row()
    assert mark_outgoing(cluster.conninfo(), label="old") is True
    marked = cluster.row()
    assert marked["stage"] == "outgoing"
    assert marked["last_transition_time"] >= first["last_transition_time"]  # type: ignore[operator]
    # The same server provisioned again (a restart): the same restore, still outgoing.
    assert cluster.record() == []
    again = cluster.row()
    assert (again["stage"], again["restored_at"], again["last_transition_time"]) == (
        "outgoing",
        first["restored_at"],
        marked["last_transition_time"],
    )
    # A row for another snapshot is the snapshot's, not this restore's: replaced.
    cluster.record(RestoreInfo("k-other", "", None))
    assert cluster.row()["stage"] == "ready"


def test_mark_outgoing_is_best_effort(cluster: Cluster, scratch_root: Path) -> None:
    cluster.fresh()
    # No table: nothing to mark, no error.
    assert mark_outgoing(cluster.conninfo(), label="none") is False
    # No server: logged, never raised.
    unreachable = make_conninfo(
        host=str(scratch_root / "nowhere"), port="1", dbname="postgres", user="postgres"
    )
    assert mark_outgoing(unreachable, label="gone") is False


def test_analytics_reads_the_row_and_nothing_else_on_a_read_only_server(
    cluster: Cluster,
) -> None:
    cluster.fresh()
    cluster.record(may_write=False)
    with cluster.login_analytics() as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("SELECT snapshot_id, stage FROM _pgro.restore_info").fetchall() == [
            ("k1a2b3", "ready")
        ]
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE _pgro.restore_info SET stage = 'x'")
        # Read-only holds at the server, not per session (docs/roles.md).
        conn.execute("SET default_transaction_read_only = off")
        for statement in (
            "UPDATE _pgro.restore_info SET stage = 'x'",
            "INSERT INTO _pgro.restore_info (id, snapshot_id) VALUES (2, 'x')",
            "DELETE FROM _pgro.restore_info",
            "TRUNCATE _pgro.restore_info",
            "CREATE TABLE _pgro.mine (id int)",
            "CREATE TRIGGER t BEFORE UPDATE ON _pgro.restore_info "
            "FOR EACH ROW EXECUTE FUNCTION public.pwn_trigger()",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
    assert cluster.row()["stage"] == "ready"


def test_a_writing_replica_lets_analytics_update_the_row(cluster: Cluster) -> None:
    cluster.fresh()
    cluster.set_read_only(False)
    try:
        cluster.record(may_write=True)
        with cluster.login_analytics() as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute("UPDATE _pgro.restore_info SET stage = 'reindexing'")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("DELETE FROM _pgro.restore_info")
        assert cluster.row()["stage"] == "reindexing"
    finally:
        cluster.set_read_only(True)


def test_fixes_are_stored_as_json_objects(cluster: Cluster) -> None:
    cluster.fresh()
    cluster.record()
    assert json.loads(str(cluster.value("SELECT fixes::text FROM _pgro.restore_info"))) == FIXES


def test_a_restore_without_a_postgres_database_is_noted_not_failed(cluster: Cluster) -> None:
    with psycopg.connect(cluster.conninfo("template1"), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("ALTER DATABASE postgres RENAME TO postgres_gone")
        try:
            assert cluster.record() == [
                "the restore has no postgres database: _pgro.restore_info not written"
            ]
        finally:
            conn.execute("ALTER DATABASE postgres_gone RENAME TO postgres")


def test_access_is_reset_after_the_roles_are_provisioned_again(cluster: Cluster) -> None:
    cluster.fresh()
    assert reset_access(cluster.conninfo(), analytics="analytics", analytics_may_write=False) is (
        False
    )
    cluster.record()
    # What provision_users grants a writing analytics user on every schema and table.
    with cluster.superuser() as conn:
        conn.execute("GRANT USAGE, CREATE ON SCHEMA _pgro TO analytics")
        conn.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON _pgro.restore_info TO analytics"
        )
    assert reset_access(cluster.conninfo(), analytics="analytics", analytics_may_write=True) is (
        True
    )
    assert cluster.grants("table") == ["analytics=SELECT,UPDATE"]
    assert cluster.grants("schema") == ["analytics=USAGE"]
