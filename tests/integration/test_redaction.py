"""Redaction with pgro's native masking engine on a real PostgreSQL (pgro.postgres.redaction,
pgro.core.masks), with the manifest served from a loopback HTTP server.

- The reference's tests/redaction.rs outcomes on its fixture (`users` and `sync_lookup`), the
  version read by `versionQuery` from `local_system_facts`: emails changed and still holding
  `@`, names changed, the phone's ends kept around `****`, `heart_rate` within 50..100,
  `sync_lookup` empty, the unmasked column kept, NULLs kept.
- Every mask kind evaluated on the column types it fits, NOT NULL and varchar lengths kept.
- Counted failures (a column that does not exist, a kind that does not fit, a constraint the
  masked values break, a table whose triggers would undo the masking) with the others
  applied; a lock not granted fails the run; no original value in any message.
- Deterministic masks join; the database's own triggers do not run.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.api.replica import Redaction
from pgro.core.masks import CITIES, FIRST_NAMES, LAST_NAMES
from pgro.core.redaction_manifest import check_spec, parse_manifest
from pgro.pipeline.redaction_fetch import fetch_manifest
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.redaction import (
    RedactionFailed,
    RedactionResult,
    apply_manifest,
    resolve_version,
)
from pgro.postgres.server import PostgresServer
from tests.fixtures.majors import installed_in_cache, server_readable_cache
from tests.fixtures.manifest_server import FIXTURE_MANIFEST, manifest_server
from tests.fixtures.scratch_server import scratch_server

USERS = """
CREATE TABLE local_system_facts (key text PRIMARY KEY, value text);
INSERT INTO local_system_facts VALUES ('currentVersion', '1.0.0');
CREATE TABLE users (
    id int PRIMARY KEY,
    email text NOT NULL UNIQUE,
    full_name text,
    single_name varchar(40),
    dob date,
    phone varchar(20),
    heart_rate int,
    unmasked text
);
INSERT INTO users VALUES
    (1, 'a@example.com', 'Alice Apple', 'Alice', '1980-01-15', '+61 400 111 001', 10, 'keep-1'),
    (2, 'b@example.com', 'Bob Banana', 'Bob', '1981-02-16', '+61 400 111 002', 20, 'keep-2'),
    (3, 'c@example.com', 'Carol Cherry', 'Carol', '1982-03-17', '+61 400 111 003', 150, 'keep-3'),
    (4, 'd@example.com', 'Dave Date', 'Dave', '1983-04-18', '+61 400 111 004', 200, 'keep-4'),
    (5, 'e@example.com', 'Eve Elder', 'Eve', '1984-05-19', '+61 400 111 005', 250, 'keep-5'),
    (6, 'f@example.com', NULL, NULL, NULL, NULL, NULL, 'keep-6');
CREATE TABLE sync_lookup (id int PRIMARY KEY, record text);
INSERT INTO sync_lookup SELECT g, 'secret ' || g FROM generate_series(1, 50) g;
"""
ORIGINAL_EMAILS = {f"{c}@example.com" for c in "abcdef"}
ORIGINAL_FULL = {"Alice Apple", "Bob Banana", "Carol Cherry", "Dave Date", "Eve Elder"}
ORIGINAL_SINGLE = {"Alice", "Bob", "Carol", "Dave", "Eve"}
ORIGINAL_VALUES = [*ORIGINAL_EMAILS, *ORIGINAL_FULL, "+61 400 111 001", "1980-01-15"]

_numbers = itertools.count()


@dataclass
class Db:
    server: PostgresServer
    name: str

    @property
    def conninfo(self) -> str:
        return self.server.endpoint.conninfo(self.name, "postgres")

    def session(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The superuser, able to write on the read-only database."""
        conn = psycopg.connect(self.conninfo, autocommit=True)
        conn.execute("SET default_transaction_read_only = off")
        return conn

    def run(self, statements: str) -> None:
        with self.session() as conn:
            conn.execute(statements.encode())

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        with self.session() as conn:
            return conn.execute(query.encode()).fetchall()

    def column(self, query: str) -> list[Any]:
        return [r[0] for r in self.rows(query)]


@pytest.fixture(scope="module", params=["newest", "13", "17"])
def server(
    request: pytest.FixtureRequest,
    scratch_root: Path,
    account: RunAccount,
    binaries: PostgresBinaries,
) -> Iterator[PostgresServer]:
    """The newest installed major, and the oldest and newest pgro supports when installed
    (the engine's built-ins and catalog columns must exist in each)."""
    if request.param != "newest":
        major = str(request.param)
        if major == binaries.major:
            pytest.skip(f"PostgreSQL {major} is the newest installed: already covered")
        if not installed_in_cache(major):
            pytest.skip(f"PostgreSQL {major} is not installed: scripts/install-postgres-major.sh")
        bindir = server_readable_cache(scratch_root, (major,)) / major / "bin"
        binaries = PostgresBinaries(major, bindir)
    with scratch_server(scratch_root, account, binaries, "redaction") as s:
        yield s


@pytest.fixture
def db(server: PostgresServer) -> Iterator[Db]:
    """A fresh database, served read-only as a restore is."""
    name = f"app{next(_numbers)}"
    with psycopg.connect(server.endpoint.conninfo("postgres", "postgres"), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}".encode())
    d = Db(server, name)
    d.run(USERS)
    d.run(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    yield d
    with psycopg.connect(server.endpoint.conninfo("postgres", "postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())


def no_original_values(result: RedactionResult) -> None:
    text = result.summary() + " ".join(f.message() for f in result.failures)
    for value in ORIGINAL_VALUES:
        assert value not in text


# --- the reference's outcomes


def test_reference_outcomes_with_the_manifest_served_over_http(db: Db) -> None:
    with manifest_server() as http:
        http.put_json("/v1.0.0/manifest.json", FIXTURE_MANIFEST)
        redaction = Redaction(
            manifest_url=http.url("/v{version}/manifest.json"),
            version_query="SELECT value FROM local_system_facts WHERE key = 'currentVersion'",
        )
        check_spec(redaction)
        version = resolve_version(db.conninfo, redaction)
        assert version == "1.0.0"
        fetched = fetch_manifest(redaction, version)
    result = apply_manifest(db.conninfo, fetched.manifest)

    assert not result.partial, result.summary()
    assert result.columns_attempted == 6 and len(result.columns_masked) == 6
    assert result.tables_truncated == ("public.sync_lookup",)
    no_original_values(result)

    assert db.column("SELECT count(*) FROM sync_lookup") == [0]
    assert db.column("SELECT unmasked FROM users ORDER BY id") == [f"keep-{i}" for i in range(1, 7)]
    emails = db.column("SELECT email FROM users ORDER BY id")
    assert len(emails) == 6 and not set(emails) & ORIGINAL_EMAILS
    assert all("@" in e for e in emails)
    full = db.column("SELECT full_name FROM users WHERE id <= 5 ORDER BY id")
    assert not set(full) & ORIGINAL_FULL
    assert all(len(f.split(" ")) == 2 for f in full)  # a full name stays a full name
    single = db.column("SELECT single_name FROM users WHERE id <= 5 ORDER BY id")
    assert not set(single) & ORIGINAL_SINGLE and all(s in FIRST_NAMES for s in single)
    dobs = db.column("SELECT dob FROM users WHERE id <= 5 ORDER BY id")
    assert date(1980, 1, 15) not in dobs
    assert all(date(1900, 1, 1) <= d <= date.today() for d in dobs)
    phones = db.column("SELECT phone FROM users WHERE id <= 5 ORDER BY id")
    assert phones == [f"+6****0{i}" for i in range(1, 6)]
    rates = db.column("SELECT heart_rate FROM users WHERE id <= 5")
    assert all(50 <= r <= 100 for r in rates), rates
    # Null-preserving: the sixth user's NULLs stay NULL.
    assert db.rows(
        "SELECT full_name, single_name, dob, phone, heart_rate FROM users WHERE id = 6"
    ) == [(None, None, None, None, None)]
    # The database is still served read-only: pgro's session did not change that.
    with psycopg.connect(db.conninfo) as plain:
        assert plain.execute("SHOW default_transaction_read_only").fetchall() == [("on",)]


# --- failures are counted, the rest applied


def test_missing_and_unfit_columns_are_counted_and_the_rest_applied(db: Db) -> None:
    manifest = parse_manifest(
        """{"sources": {
        "u": {"schema": "public", "name": "users", "columns": {
            "email": {"meta": {"masking": "email"}},
            "no_such_column": {"meta": {"masking": "email"}},
            "heart_rate": {"meta": {"masking": "phone"}},
            "dob": {"meta": {"masking": "shuffle"}},
            "full_name": {"meta": {"masking": "name"}}}},
        "gone": {"schema": "public", "name": "no_such_table", "meta": {"masking": "truncate"},
                 "columns": {"x": {"meta": {"masking": "email"}}}},
        "sync": {"schema": "public", "name": "sync_lookup", "meta": {"masking": "truncate"}}
    }}"""
    )
    result = apply_manifest(db.conninfo, manifest)
    assert result.partial
    assert set(result.columns_masked) == {"public.users.email", "public.users.full_name"}
    assert result.columns_attempted == 6 and result.columns_failed == 4
    assert result.tables_truncated == ("public.sync_lookup",)
    assert result.tables_failed == 1
    reasons = {f.target: f.reason for f in result.failures}
    assert reasons["public.users.no_such_column"] == "column not found"
    assert reasons["public.no_such_table.x"] == "table not found"
    assert "phone" in reasons["public.users.heart_rate"]
    assert "integer" in reasons["public.users.heart_rate"]
    assert "unknown mask kind" in reasons["public.users.dob"]
    assert "UndefinedTable" in reasons["public.no_such_table"]
    no_original_values(result)

    assert not set(db.column("SELECT email FROM users")) & ORIGINAL_EMAILS
    assert db.column("SELECT heart_rate FROM users WHERE id = 1") == [10]  # not masked
    assert db.column("SELECT count(*) FROM sync_lookup") == [0]


def test_a_constraint_the_masked_values_break_fails_that_column_only(db: Db) -> None:
    # `empty` gives every email '': the UNIQUE constraint refuses it. The table's other
    # masked column is applied on its own.
    manifest = parse_manifest(
        """{"sources": {"u": {"schema": "public", "name": "users", "columns": {
            "email": {"meta": {"masking": "empty"}},
            "phone": {"meta": {"masking": "phone"}}}}}}"""
    )
    result = apply_manifest(db.conninfo, manifest)
    assert result.columns_masked == ("public.users.phone",)
    (failure,) = result.failures
    assert failure.target == "public.users.email"
    assert failure.reason == "UniqueViolation (SQLSTATE 23505) on constraint users_email_key"
    no_original_values(result)
    assert set(db.column("SELECT email FROM users")) == ORIGINAL_EMAILS
    assert db.column("SELECT phone FROM users WHERE id = 1") == ["+6****01"]


def test_a_table_whose_triggers_would_undo_the_masking_is_refused(db: Db) -> None:
    db.run(
        """
        CREATE FUNCTION public.keep_email() RETURNS trigger LANGUAGE plpgsql AS
            $$BEGIN NEW.email := OLD.email; RETURN NEW; END$$;
        CREATE TRIGGER keep BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION keep_email();
        CREATE TABLE other (id int, email text);
        INSERT INTO other VALUES (1, 'z@example.com');
        CREATE FUNCTION public.explode() RETURNS trigger LANGUAGE plpgsql AS
            $$BEGIN RAISE EXCEPTION 'fired'; END$$;
        CREATE TRIGGER boom BEFORE UPDATE ON other FOR EACH ROW EXECUTE FUNCTION explode();
        CREATE RULE nothing AS ON UPDATE TO other DO INSTEAD NOTHING;
        """
    )
    manifest = parse_manifest(
        """{"sources": {
            "u": {"schema": "public", "name": "users",
                  "columns": {"email": {"meta": {"masking": "email"}}}},
            "o": {"schema": "public", "name": "other",
                  "columns": {"email": {"meta": {"masking": "email"}}}}}}"""
    )
    # Ordinary triggers and rules do not run for pgro's masking (replica role).
    result = apply_manifest(db.conninfo, manifest)
    assert not result.partial, result.summary()
    assert not set(db.column("SELECT email FROM users")) & ORIGINAL_EMAILS
    assert db.column("SELECT email FROM other") != ["z@example.com"]

    # A trigger enabled ALWAYS would run: the table is refused, not silently left alone.
    db.run("ALTER TABLE users ENABLE ALWAYS TRIGGER keep")
    db.run("ALTER TABLE other ENABLE ALWAYS RULE nothing")
    before = db.column("SELECT email FROM users ORDER BY id")
    result = apply_manifest(db.conninfo, manifest)
    assert result.columns_masked == ()
    reasons = [f.reason for f in result.failures]
    assert "trigger keep" in reasons[0] and "rule nothing" in reasons[1]
    assert db.column("SELECT email FROM users ORDER BY id") == before


def test_a_lock_not_granted_fails_the_run(db: Db) -> None:
    manifest = parse_manifest(
        """{"sources": {"u": {"schema": "public", "name": "users",
            "columns": {"email": {"meta": {"masking": "email"}}}}}}"""
    )
    with db.session() as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(RedactionFailed, match="LockNotAvailable") as caught:
            apply_manifest(db.conninfo, manifest, lock_timeout_ms=200)
        holder.execute("ROLLBACK")
    assert "public.users" in str(caught.value)
    assert set(db.column("SELECT email FROM users")) == ORIGINAL_EMAILS


def test_an_unreachable_server_fails_the_run_without_its_conninfo() -> None:
    conninfo = "host=127.0.0.1 port=1 dbname=x user=postgres password=hunter2 connect_timeout=2"
    with pytest.raises(RedactionFailed, match="cannot connect") as caught:
        apply_manifest(conninfo, parse_manifest("{}"))
    assert "hunter2" not in str(caught.value)


# --- every kind on the types it fits

KINDS_TABLE = """
CREATE DOMAIN short_text AS varchar(8);
CREATE TABLE kinds (
    id int PRIMARY KEY,
    d_date date, d_ts timestamptz, d_text varchar(10),
    dt_ts timestamp, dt_text text,
    txt text NOT NULL, str text, em short_text, nm text, ph text, pl text, ur text,
    i_int int2, i_text text, f_num numeric, m_num numeric, m_money money,
    z_int int, z_text text, z_bytea bytea,
    e_json jsonb, e_arr text[], e_text text, e_int bigint,
    n_text text,
    df_int int NOT NULL DEFAULT 42,
    gen int GENERATED ALWAYS AS (id * 2) STORED,
    ident int GENERATED ALWAYS AS IDENTITY
);
INSERT INTO kinds (id, d_date, d_ts, d_text, dt_ts, dt_text, txt, str, em, nm, ph, pl, ur,
                   i_int, i_text, f_num, m_num, m_money, z_int, z_text, z_bytea,
                   e_json, e_arr, e_text, e_int, n_text, df_int)
SELECT g, DATE '1970-06-15', TIMESTAMPTZ '1970-06-15 10:00+00', '1970-06-15',
       TIMESTAMP '1999-12-31 23:59:59', '1999-12-31 23:59:59',
       'secret text number ' || g, 'secretstr' || g, 'e' || g || '@x.y', 'Secret Person',
       '0412345678', 'Secretville', 'https://secret.example/' || g,
       7, '7', 7.5, 7.5, 7.5, 7, 'seven', '\\x0707'::bytea,
       '{"secret": 1}', ARRAY['secret'], 'secret', 7, 'secret', 7
FROM generate_series(1, 20) g;
INSERT INTO kinds (id, txt, df_int) VALUES (21, 'x', 1);  -- NULLs everywhere else
"""
KINDS_MANIFEST: dict[str, Any] = {
    "d_date": "date",
    "d_ts": "date",
    "d_text": "date",
    "dt_ts": "datetime",
    "dt_text": "datetime",
    "txt": "text",
    "str": "string",
    "em": "email",
    "nm": "name",
    "ph": "phone",
    "pl": "place",
    "ur": "url",
    "i_int": {"kind": "integer", "range": "-5-5"},
    "i_text": "integer",
    "f_num": {"kind": "float", "range": "1.001-1.03"},
    "m_num": "money",
    "m_money": {"kind": "money", "range": "10-20"},
    "z_int": "zero",
    "z_text": "zero",
    "z_bytea": "zero",
    "e_json": "empty",
    "e_arr": "empty",
    "e_text": "empty",
    "e_int": "empty",
    "n_text": "nil",
    "df_int": "default",
    "gen": "integer",
    "ident": "integer",
}


def manifest_for(table: str, masks: dict[str, Any]) -> str:
    columns = {c: {"config": {"meta": {"masking": m}}} for c, m in masks.items()}
    return json.dumps({"sources": {"s": {"schema": "public", "name": table, "columns": columns}}})


def test_every_kind_on_a_real_table(db: Db) -> None:
    db.run(KINDS_TABLE)
    result = apply_manifest(db.conninfo, parse_manifest(manifest_for("kinds", KINDS_MANIFEST)))
    reasons = {f.target.rsplit(".", 1)[1]: f.reason for f in result.failures}
    assert set(reasons) == {"gen", "ident"}, result.summary()
    assert "generated column" in reasons["gen"] and "GENERATED ALWAYS" in reasons["ident"]

    rows = db.rows("SELECT * FROM kinds WHERE id <= 20 ORDER BY id")
    names = db.column(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'kinds'::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum"
    )
    today = date.today()
    for row in rows:
        v = dict(zip(names, row, strict=True))
        assert date(1900, 1, 1) <= v["d_date"] <= today
        assert datetime(1900, 1, 1).date() <= v["d_ts"].date() <= today + timedelta(days=1)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", v["d_text"])
        assert v["dt_ts"].date() == date(1999, 12, 31)  # datetime keeps the day
        assert re.fullmatch(r"1999-12-31 \d\d:\d\d:\d\d", v["dt_text"])
        assert len(v["txt"]) == len(f"secret text number {v['id']}")
        assert "secret" not in v["txt"]
        assert len(v["str"]) == len(f"secretstr{v['id']}") and "secret" not in v["str"]
        assert v["em"] == v["em"][:8] and v["em"].startswith("u")  # cut to the domain's 8
        first, last = v["nm"].split(" ")
        assert first in FIRST_NAMES and last in LAST_NAMES
        assert v["ph"] == "04****78"
        assert v["pl"] in CITIES
        assert re.fullmatch(r"https://example\.invalid/[0-9a-f]{8}", v["ur"])
        assert -5 <= v["i_int"] <= 5
        assert -(2**31) <= int(v["i_text"]) < 2**31
        assert Decimal("1.001") <= v["f_num"] <= Decimal("1.03")
        assert 0 <= v["m_num"] <= 10000 and v["m_num"] == round(v["m_num"], 2)
        assert re.fullmatch(r"\$1\d\.\d\d|\$20\.00", v["m_money"]), v["m_money"]
        assert (v["z_int"], v["z_text"], bytes(v["z_bytea"])) == (0, "00000", b"\x00\x00")
        assert (v["e_json"], v["e_arr"], v["e_text"], v["e_int"]) == ({}, [], "", 0)
        assert v["n_text"] is None
        assert v["df_int"] == 42
        assert v["gen"] == v["id"] * 2

    # Null-preserving kinds keep NULL; zero on numbers, empty, nil and default do not.
    (last_row,) = db.rows("SELECT * FROM kinds WHERE id = 21")
    nulls = dict(zip(names, last_row, strict=True))
    preserved = [
        c
        for c, m in KINDS_MANIFEST.items()
        if (m if isinstance(m, str) else m["kind"]) not in ("zero", "empty", "nil", "default")
        and c not in ("txt", "gen", "ident")
    ]
    assert all(nulls[c] is None for c in preserved), {c: nulls[c] for c in preserved}
    assert len(nulls["txt"]) == 1  # NOT NULL: masked, to its length
    assert nulls["z_int"] == 0 and nulls["z_text"] is None and nulls["z_bytea"] is None
    assert (nulls["e_json"], nulls["e_text"], nulls["df_int"]) == ({}, "", 42)


def test_deterministic_masks_keep_joins_and_random_ones_do_not(db: Db) -> None:
    db.run(
        """
        CREATE TABLE patients (id int, email text, nick text);
        CREATE TABLE visits (id int, patient_email text);
        INSERT INTO patients SELECT g, 'p' || g || '@example.com', 'same'
            FROM generate_series(1, 30) g;
        INSERT INTO visits SELECT g, 'p' || (g % 30 + 1) || '@example.com'
            FROM generate_series(1, 90) g;
        """
    )
    manifest = parse_manifest(
        """{"sources": {
            "p": {"schema": "public", "name": "patients", "columns": {
                "email": {"meta": {"masking": {"kind": "email", "deterministic": true}}},
                "nick": {"meta": {"masking": "string"}}}},
            "v": {"schema": "public", "name": "visits", "columns": {
                "patient_email": {"meta": {"masking": {"kind": "email", "deterministic": true}}}}}
        }}"""
    )
    result = apply_manifest(db.conninfo, manifest, key="k1")
    assert not result.partial, result.summary()
    joined = db.column("SELECT count(*) FROM visits v JOIN patients p ON p.email = v.patient_email")
    assert joined == [90]
    assert not db.column("SELECT email FROM patients WHERE email LIKE '%@example.com'")
    # The random kind gives each row its own value, even for equal inputs.
    assert db.column("SELECT count(DISTINCT nick) FROM patients") == [30]


def test_a_stopped_run_leaves_the_deterministic_tables_all_masked_or_none(db: Db) -> None:
    db.run(
        """
        CREATE TABLE visits (id int, patient_email text);
        INSERT INTO visits SELECT g, 'p' || g || '@example.com' FROM generate_series(1, 5) g;
        CREATE TABLE zz_patients (id int, email text);
        INSERT INTO zz_patients SELECT g, 'p' || g || '@example.com' FROM generate_series(1, 5) g;
        """
    )
    keyed = {"kind": "email", "deterministic": True}
    manifest = parse_manifest(
        json.dumps(
            {
                "sources": {
                    "v": {
                        "schema": "public",
                        "name": "visits",
                        "columns": {"patient_email": {"meta": {"masking": keyed}}},
                    },
                    "p": {
                        "schema": "public",
                        "name": "zz_patients",
                        "columns": {"email": {"meta": {"masking": keyed}}},
                    },
                }
            }
        )
    )
    # The run stops at the second table (its lock is not granted): the first stays as it was.
    with db.session() as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE zz_patients IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(RedactionFailed, match="LockNotAvailable"):
            apply_manifest(db.conninfo, manifest, lock_timeout_ms=200)
        holder.execute("ROLLBACK")
    assert db.column("SELECT count(*) FROM visits WHERE patient_email LIKE '%@example.com'") == [5]
    # The rerun masks both, alike.
    assert not apply_manifest(db.conninfo, manifest).partial
    joined = db.column(
        "SELECT count(*) FROM visits v JOIN zz_patients p ON p.email = v.patient_email"
    )
    assert joined == [5]


def test_the_same_key_masks_alike_and_another_key_differently(server: PostgresServer) -> None:
    manifest = parse_manifest(
        manifest_for("users", {"email": {"kind": "email", "deterministic": True}})
    )
    outcomes = []
    for key in ("k1", "k1", "k2"):
        name = f"app{next(_numbers)}"
        with psycopg.connect(
            server.endpoint.conninfo("postgres", "postgres"), autocommit=True
        ) as c:
            c.execute(f"CREATE DATABASE {name}".encode())
        d = Db(server, name)
        d.run(USERS)
        apply_manifest(d.conninfo, manifest, key=key)
        outcomes.append(d.column("SELECT email FROM users ORDER BY id"))
    assert outcomes[0] == outcomes[1]
    assert not set(outcomes[0]) & set(outcomes[2])


# --- the version


def test_version_resolution(db: Db) -> None:
    def redaction(query: str | None = None, version: str | None = None) -> Redaction:
        return Redaction(
            manifest_url="http://h/v{version}/m.json", version=version, version_query=query
        )

    assert resolve_version(db.conninfo, redaction(version="2.41.7")) == "2.41.7"
    assert resolve_version(db.conninfo, Redaction(manifest_url="http://h/m.json")) is None
    with pytest.raises(RedactionFailed, match="no rows"):
        resolve_version(db.conninfo, redaction("SELECT value FROM local_system_facts WHERE false"))
    with pytest.raises(RedactionFailed, match="NULL"):
        resolve_version(db.conninfo, redaction("SELECT NULL"))
    # One statement only, read-only.
    with pytest.raises(RedactionFailed, match="SyntaxError"):
        resolve_version(db.conninfo, redaction("SELECT '1.0.0'; DROP TABLE users"))
    with pytest.raises(RedactionFailed, match="ReadOnlySqlTransaction"):
        resolve_version(
            db.conninfo, redaction("WITH d AS (DELETE FROM users RETURNING 1) SELECT '1' FROM d")
        )
    assert db.column("SELECT count(*) FROM users") == [6]
    # A value that is not a version is refused without being quoted.
    with pytest.raises(RedactionFailed, match="not a version") as caught:
        resolve_version(db.conninfo, redaction("SELECT email FROM users WHERE id = 1"))
    assert "a@example.com" not in str(caught.value)
