"""The opt-in anon engine (`engine="anon"`, pgro.postgres.redaction, pgro.core.masks) on a real
PostgreSQL whose share directory holds a FAKE `anon` extension (tests/fixtures/fake_anon.py,
in a private copy of an npm major), and on one without it.

- The reference's tests/redaction.rs outcomes with the anon engine, and proof that anon's
  functions made the values (the fake's domain, names, cities, letters, lorem, init()).
- Every anon kind on the types it fits, NULLs kept, varchar lengths cut, deterministic
  masks still the native keyed ones.
- A rerun replaces the extension an earlier run left; a schema `anon` holding objects of
  its own is refused and nothing is masked.
- A server without anon: RedactionFailed with the reference's message and the fix, and
  nothing masked; the same through `redact` with the annotation's value.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.api.names import ANNOTATION_REDACTION_ENGINE
from pgro.api.replica import Redaction
from pgro.core.masks import EMAIL_DOMAIN
from pgro.core.redaction_manifest import check_spec, parse_manifest
from pgro.pipeline.redaction_fetch import fetch_manifest
from pgro.pipeline.redaction_step import redact
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.redaction import RedactionFailed, apply_manifest, resolve_version
from pgro.postgres.server import PostgresServer
from tests.fixtures.fake_anon import (
    FAKE_CITIES,
    FAKE_EMAIL_DOMAIN,
    FAKE_FIRST_NAMES,
    FAKE_FULL_NAMES,
    FAKE_LOREM,
    with_fake_anon,
)
from tests.fixtures.majors import installed_in_cache, server_readable_cache
from tests.fixtures.manifest_server import FIXTURE_MANIFEST, manifest_server
from tests.fixtures.scratch_server import scratch_server
from tests.integration.test_redaction import (
    ORIGINAL_EMAILS,
    ORIGINAL_FULL,
    ORIGINAL_SINGLE,
    USERS,
)

NOT_INSTALLED = (
    "postgresql_anonymizer (anon) is not installed for PostgreSQL {major}; remove the "
    f"annotation {ANNOTATION_REDACTION_ENGINE}=anon to mask with pgro's built-in engine"
)
MAJORS = ("17", "13")

_numbers = itertools.count()


@dataclass
class Db:
    server: PostgresServer
    name: str

    @property
    def conninfo(self) -> str:
        return self.server.endpoint.conninfo(self.name, "postgres")

    def session(self) -> psycopg.Connection[tuple[Any, ...]]:
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


def _cached_binaries(scratch_root: Path, major: str, *, fake_anon: bool) -> PostgresBinaries:
    if not installed_in_cache(major):
        pytest.skip(f"PostgreSQL {major} is not installed: scripts/install-postgres-major.sh")
    if fake_anon:
        return PostgresBinaries(major, with_fake_anon(scratch_root, major))
    return PostgresBinaries(major, server_readable_cache(scratch_root, (major,)) / major / "bin")


@pytest.fixture(scope="module", params=MAJORS)
def anon_server(
    request: pytest.FixtureRequest, scratch_root: Path, account: RunAccount
) -> Iterator[PostgresServer]:
    """A server of an npm major whose (private) share directory holds the fake anon."""
    binaries = _cached_binaries(scratch_root, str(request.param), fake_anon=True)
    with scratch_server(scratch_root, account, binaries, "redaction-anon") as s:
        yield s


@pytest.fixture(scope="module")
def plain_server(scratch_root: Path, account: RunAccount) -> Iterator[PostgresServer]:
    """A server of the newest npm major without anon."""
    binaries = _cached_binaries(scratch_root, MAJORS[0], fake_anon=False)
    with scratch_server(scratch_root, account, binaries, "redaction-plain") as s:
        yield s


def _database(server: PostgresServer) -> Iterator[Db]:
    """A fresh database, served read-only as a restore is (the only one on its server
    while the test runs, so it is the cluster's main database)."""
    name = f"app{next(_numbers)}"
    admin = server.endpoint.conninfo("postgres", "postgres")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}".encode())
    d = Db(server, name)
    d.run(USERS)
    d.run(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    yield d
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())


@pytest.fixture
def db(anon_server: PostgresServer) -> Iterator[Db]:
    yield from _database(anon_server)


@pytest.fixture
def plain_db(plain_server: PostgresServer) -> Iterator[Db]:
    yield from _database(plain_server)


def _major(db: Db) -> int:
    return int(db.column("SELECT current_setting('server_version_num')::int / 10000")[0])


# --- the reference's outcomes, from anon's functions


def test_reference_outcomes_with_the_anon_engine(db: Db) -> None:
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
    result = apply_manifest(db.conninfo, fetched.manifest, engine="anon")

    assert not result.partial, result.summary()
    assert result.columns_attempted == 6 and len(result.columns_masked) == 6
    assert result.tables_truncated == ("public.sync_lookup",)
    for value in (*ORIGINAL_EMAILS, *ORIGINAL_FULL, "+61 400 111 001"):
        assert value not in result.summary()

    # anon was installed from the server's share directory and initialised once.
    assert db.rows(
        "SELECT e.extname, n.nspname FROM pg_extension e "
        "JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname IN ('anon', 'pgcrypto') ORDER BY 1"
    ) == [("anon", "anon"), ("pgcrypto", "anon")]
    assert db.column("SELECT count(*) FROM anon.init_calls") == [1]

    assert db.column("SELECT count(*) FROM sync_lookup") == [0]
    assert db.column("SELECT unmasked FROM users ORDER BY id") == [f"keep-{i}" for i in range(1, 7)]
    emails = db.column("SELECT email FROM users ORDER BY id")
    assert len(emails) == 6 and not set(emails) & ORIGINAL_EMAILS
    # Every email still holds '@', and anon.fake_email() made it (the fake's domain).
    assert all("@" in e and e.endswith(FAKE_EMAIL_DOMAIN) for e in emails), emails
    full = db.column("SELECT full_name FROM users WHERE id <= 5 ORDER BY id")
    assert not set(full) & ORIGINAL_FULL and set(full) <= set(FAKE_FULL_NAMES)
    single = db.column("SELECT single_name FROM users WHERE id <= 5 ORDER BY id")
    assert not set(single) & ORIGINAL_SINGLE and set(single) <= set(FAKE_FIRST_NAMES)
    dobs = db.column("SELECT dob FROM users WHERE id <= 5 ORDER BY id")
    assert date(1980, 1, 15) not in dobs
    assert all(date(1900, 1, 1) <= d <= date.today() for d in dobs)
    phones = db.column("SELECT phone FROM users WHERE id <= 5 ORDER BY id")
    assert phones == [f"+6****0{i}" for i in range(1, 6)]
    rates = db.column("SELECT heart_rate FROM users WHERE id <= 5")
    assert all(50 <= r <= 100 for r in rates), rates
    assert db.rows(
        "SELECT full_name, single_name, dob, phone, heart_rate FROM users WHERE id = 6"
    ) == [(None, None, None, None, None)]
    with psycopg.connect(db.conninfo) as plain:
        assert plain.execute("SHOW default_transaction_read_only").fetchall() == [("on",)]


def test_every_anon_kind_on_the_types_it_fits(db: Db) -> None:
    db.run(
        """
        CREATE TABLE kinds (
            id int PRIMARY KEY,
            note text, code text, mail varchar(8), city text, link text, short_phone text,
            day_text text, at_ts timestamp, at_tstz timestamptz, keyed text, keyed_copy text
        );
        INSERT INTO kinds VALUES
            (1, 'a confidential note', 'ABC-123-xyz', 'x@ex.com', 'Suva', 'http://a.b/c',
             '1234', '1999-12-31', '1999-12-31 10:00', '1999-12-31 10:00+00', 'k1', 'k1'),
            (2, '', 'z', 'y@ex.com', 'Lautoka', 'http://d.e/f', '12', '2000-01-01',
             '2000-01-01 11:00', '2000-01-01 11:00+00', 'k2', 'k2'),
            (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        """
    )
    manifest = parse_manifest(
        """{"sources": {"k": {"schema": "public", "name": "kinds", "columns": {
            "note": {"meta": {"masking": "text"}},
            "code": {"meta": {"masking": "string"}},
            "mail": {"meta": {"masking": "email"}},
            "city": {"meta": {"masking": "place"}},
            "link": {"meta": {"masking": "url"}},
            "short_phone": {"meta": {"masking": "phone"}},
            "day_text": {"meta": {"masking": "date"}},
            "at_ts": {"meta": {"masking": "date"}},
            "at_tstz": {"meta": {"masking": "date"}},
            "keyed": {"meta": {"masking": {"kind": "email", "deterministic": true}}},
            "keyed_copy": {"meta": {"masking": {"kind": "email", "deterministic": true}}}
        }}}}"""
    )
    result = apply_manifest(db.conninfo, manifest, engine="anon", key="k" * 64)
    assert not result.partial, result.summary()
    assert len(result.columns_masked) == 11

    rows = db.rows(
        "SELECT note, code, mail, city, link, short_phone, day_text, at_ts, at_tstz, keyed, "
        "keyed_copy FROM kinds WHERE id <= 2 ORDER BY id"
    )
    originals = [
        ("a confidential note", "ABC-123-xyz", "1234", "1999-12-31"),
        ("", "z", "12", "2000-01-01"),
    ]
    for row, (note, code, _phone, day) in zip(rows, originals, strict=True):
        masked_note, masked_code, mail, city, link, phone, day_text, ts, tstz, k, k2 = row
        # text: anon.lorem_ipsum(characters := length(c)); string: anon.random_string.
        if note:
            assert masked_note == (FAKE_LOREM * 5)[: len(note)]
        assert re.fullmatch(r"[A-Z]*", masked_code) and len(masked_code) == len(code)
        assert masked_code != code
        # email on varchar(8): anon.fake_email() cut to the column's length.
        assert len(mail) == 8 and "@ex.com" not in mail
        assert city in FAKE_CITIES
        assert re.fullmatch(r"https://example\.invalid/[A-Z]{8}", link), link
        assert phone == "****"  # 4 characters or fewer: never shown whole
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", day_text) and day_text != day
        assert isinstance(ts, datetime) and ts.tzinfo is None and ts.year >= 1900
        assert isinstance(tstz, datetime) and tstz.tzinfo is not None
        # Deterministic: the native keyed expression, equal values alike.
        assert k.endswith(EMAIL_DOMAIN) and k == k2
    assert rows[0][9] != rows[1][9]
    assert db.rows("SELECT * FROM kinds WHERE id = 3") == [(3, *([None] * 11))]


def test_a_rerun_replaces_the_extension_an_earlier_run_left(db: Db) -> None:
    manifest = parse_manifest(
        """{"sources": {"u": {"schema": "public", "name": "users", "columns": {
            "email": {"meta": {"masking": "email"}}}}}}"""
    )
    first = apply_manifest(db.conninfo, manifest, engine="anon")
    masked_once = db.column("SELECT email FROM users ORDER BY id")
    second = apply_manifest(db.conninfo, manifest, engine="anon")
    assert not first.partial and not second.partial
    masked_twice = db.column("SELECT email FROM users ORDER BY id")
    assert masked_twice != masked_once and all(e.endswith(FAKE_EMAIL_DOMAIN) for e in masked_twice)
    # A fresh extension: its init() ran once, in the second run.
    assert db.column("SELECT count(*) FROM anon.init_calls") == [1]


def test_a_schema_anon_with_objects_of_its_own_is_refused(db: Db) -> None:
    # The snapshot's own `anon`: a function that would hand back the original value.
    db.run(
        """
        CREATE SCHEMA anon;
        CREATE FUNCTION anon.fake_email() RETURNS text LANGUAGE sql AS $$SELECT 'kept'$$;
        """
    )
    manifest = parse_manifest(
        """{"sources": {"u": {"schema": "public", "name": "users", "columns": {
            "email": {"meta": {"masking": "email"}}}}}}"""
    )
    with pytest.raises(RedactionFailed) as caught:
        apply_manifest(db.conninfo, manifest, engine="anon")
    assert str(caught.value) == (
        "the anon engine cannot start: checking that no schema anon holds objects of its own "
        "failed: DependentObjectsStillExist (SQLSTATE 2BP01)"
    )
    assert set(db.column("SELECT email FROM users")) == ORIGINAL_EMAILS
    assert db.column("SELECT count(*) FROM pg_extension WHERE extname = 'anon'") == [0]


# --- without anon


def test_a_server_without_anon_fails_with_the_fix(plain_db: Db) -> None:
    manifest = parse_manifest(
        """{"sources": {"u": {"schema": "public", "name": "users", "columns": {
            "email": {"meta": {"masking": "email"}}},
            "meta": {"masking": "truncate"}}}}"""
    )
    with pytest.raises(RedactionFailed) as caught:
        apply_manifest(plain_db.conninfo, manifest, engine="anon")
    assert str(caught.value) == NOT_INSTALLED.format(major=_major(plain_db))
    # Nothing was done: no truncate, no mask, no extension.
    assert set(plain_db.column("SELECT email FROM users")) == ORIGINAL_EMAILS
    assert plain_db.column("SELECT count(*) FROM pg_extension WHERE extname = 'anon'") == [0]
    # The native engine masks the same database.
    result = apply_manifest(plain_db.conninfo, manifest)
    assert not result.partial and result.tables_truncated == ("public.users",)


def test_redact_passes_the_annotations_engine(plain_db: Db) -> None:
    """`redact` (the switchover step's work) with the annotation's value: anon on a server
    without it fails with the fix; no annotation masks natively."""
    with manifest_server() as http:
        http.put_json("/v1.0.0/manifest.json", FIXTURE_MANIFEST)
        redaction = Redaction(manifest_url=http.url("/v{version}/manifest.json"), version="1.0.0")

        def conninfo_for(database: str) -> str:
            return plain_db.server.endpoint.conninfo(database, "postgres")

        with pytest.raises(RedactionFailed) as caught:
            redact(conninfo_for, redaction, (), "anon")
        assert str(caught.value) == NOT_INSTALLED.format(major=_major(plain_db))
        assert set(plain_db.column("SELECT email FROM users")) == ORIGINAL_EMAILS

        done = redact(conninfo_for, redaction, (), None)
    assert not done.partial and done.columns_masked == 6
    assert f"database {plain_db.name}," in done.summary
    emails = plain_db.column("SELECT email FROM users")
    assert all(e.endswith(EMAIL_DOMAIN) for e in emails)
