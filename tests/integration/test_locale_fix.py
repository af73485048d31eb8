"""Locale aliases, the locale rewrite and the reindexes on real clusters (features.md §2.3).

The source hosts are simulated with locales generated into a private `LOCPATH` (this host
has none but C and C.UTF-8): an `en_US.UTF-8` cluster and a `WIN1252` cluster named
"English_United States.1252". Without that directory the server refuses their databases;
pgro's own alias directory (`locale_aliases`) lets the single-user rewrite open them, after
which they start with no LOCPATH at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg
import pytest

from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries, find_binaries
from pgro.postgres.locale_aliases import (
    I18N_ROOT,
    WINDOWS_CODE_PAGES,
    WINDOWS_LANGUAGES,
    LocaleAliases,
    build_locale_aliases,
    build_locales,
    missing_locales,
    spec_for,
)
from pgro.postgres.locale_fix import (
    full_reindex,
    quick_reindex,
    rewrite_after_start,
    rewrite_in_single_user,
)
from pgro.postgres.server import PostgresServer, socket_dir_for
from pgro.postgres.single_user import SingleUserFailed, run_single_user
from tests.fixtures.majors import (
    CACHED_MAJORS,
    DEBIAN_MAJOR,
    SUPPORTED_MAJORS,
    installed_in_cache,
    server_readable_cache,
)

ROWS = 1000
INCOMPATIBLE = "database locale is incompatible with operating system"


def _host_has(name: str) -> bool:
    """Whether this host's own locales (no LOCPATH) know `name`."""
    probe = "import locale, sys; locale.setlocale(locale.LC_COLLATE, sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCPATH", "GCONV_PATH")}
    proc = subprocess.run(
        [sys.executable, "-c", probe, name], env=env, capture_output=True, check=False
    )
    return proc.returncode == 0


def _python_for(account: RunAccount) -> str:
    """An interpreter the server's account can run (the project's may sit under /root)."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _accepts(account: RunAccount, name: str, env: Mapping[str, str]) -> bool:
    """Whether a process of the server's account with `env` can set the locale `name`."""
    probe = "import locale, sys; locale.setlocale(locale.LC_ALL, sys.argv[1])"
    proc = subprocess.run(  # type: ignore[call-overload]
        [_python_for(account), "-c", probe, name],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        check=False,
        cwd="/",
        **account.popen_kwargs(),
    )
    return bool(proc.returncode == 0)


@pytest.fixture(scope="module")
def aliases(scratch_root: Path) -> LocaleAliases:
    """pgro's private locale directory, built once for the module."""
    return build_locale_aliases(scratch_root / "locale-aliases")


def _initdb(
    binaries: PostgresBinaries,
    account: RunAccount,
    pgdata: Path,
    env: Mapping[str, str],
    *args: str,
) -> None:
    pgdata.mkdir(parents=True)
    hand_over(pgdata, account)
    os.chmod(pgdata, 0o700)
    proc = subprocess.run(  # type: ignore[call-overload]
        [binaries.tool("initdb"), "-D", str(pgdata), "--auth=trust", "--username=postgres", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", **account.env(), **env},
        cwd="/",
        **account.popen_kwargs(),
    )
    assert proc.returncode == 0, proc.stderr
    # What pgro's repair does to a restored postgresql.conf: the source's lc_* go.
    conf = pgdata / "postgresql.conf"
    kept = [line for line in conf.read_text().splitlines() if not line.startswith("lc_")]
    conf.write_text("\n".join(kept) + "\n")


def _server(
    binaries: PostgresBinaries,
    account: RunAccount,
    pgdata: Path,
    env: Mapping[str, str] | None = None,
) -> PostgresServer:
    base = pgdata.parent
    return PostgresServer(
        pgdata,
        binaries,
        account,
        socket_dir=socket_dir_for(base / "run"),
        log_path=base / "pg.log",
        env=env,
    )


def _conninfo(server: PostgresServer) -> Callable[[str], str]:
    return lambda dbname: server.endpoint.conninfo(dbname, "postgres")


def _query(server: PostgresServer, dbname: str, *sql: str) -> list[tuple[object, ...]]:
    """Run `sql` in one session; the last statement's rows (none for a command)."""
    with psycopg.connect(server.endpoint.conninfo(dbname, "postgres"), autocommit=True) as c:
        rows: list[tuple[object, ...]] = []
        for statement in sql:
            cur = c.execute(statement.encode())
            rows = cur.fetchall() if cur.description else []
        return rows


def _relfilenode(server: PostgresServer, dbname: str, index: str) -> int:
    rows = _query(server, dbname, f"SELECT relfilenode FROM pg_class WHERE relname = '{index}'")
    return int(str(rows[0][0]))


def _refused(server: PostgresServer, dbname: str) -> str:
    """The error a connection to `dbname` gets (the test fails if it connects)."""
    with pytest.raises(psycopg.OperationalError) as caught:
        _query(server, dbname, "SELECT 1")
    return str(caught.value)


def _fill(server: PostgresServer, dbname: str) -> None:
    with psycopg.connect(server.endpoint.conninfo(dbname, "postgres"), autocommit=True) as c:
        c.execute("CREATE TABLE words (id int PRIMARY KEY, w text NOT NULL)")
        c.execute(
            "INSERT INTO words SELECT g, CASE WHEN g % 2 = 0 THEN 'b' ELSE 'B' END || g "
            f"FROM generate_series(1, {ROWS}) g"
        )
        c.execute("CREATE INDEX words_w ON words (w)")


# --- the aliases --------------------------------------------------------------------------


def test_aliases_hold_the_windows_names_and_the_image_locale(
    aliases: LocaleAliases, account: RunAccount
) -> None:
    expected = {f"{lang}.{page}" for lang in WINDOWS_LANGUAGES for page in WINDOWS_CODE_PAGES}
    expected |= {f"{lang}.65001" for lang in WINDOWS_LANGUAGES}
    expected.add("en_US.UTF-8")
    if (I18N_ROOT / "locales" / "C").is_file():  # glibc 2.35+
        expected.add("C.UTF-8")
    assert aliases.failed == ()
    assert set(aliases.built) == expected
    assert all(aliases.has(name) for name in expected)
    # The server's account accepts them through the environment pgro hands it ...
    env = aliases.env()
    assert env["LOCPATH"] == str(aliases.locpath)
    for name in (
        "English_United States.1252",
        "English_United Kingdom.65001",
        "en_US.UTF-8",
        "C.UTF-8",
    ):
        assert _accepts(account, name, env), name
    # ... and only through it: this host does not know the Windows names.
    assert not _accepts(account, "English_United States.1252", {})
    # Nothing was written outside the private directory.
    assert not _host_has("English_United States.1252")


def test_aliases_are_kept_when_built_again(aliases: LocaleAliases) -> None:
    ctype = aliases.locpath / "English_United States.1250" / "LC_CTYPE"
    before = ctype.stat().st_ino
    again = build_locale_aliases(aliases.locpath)
    assert again.failed == ()
    assert ctype.stat().st_ino == before  # not rebuilt
    assert not [p for p in aliases.locpath.iterdir() if p.name.startswith(".building-")]


def test_a_locale_a_failed_start_names_is_built_on_demand(scratch: Path) -> None:
    log = (
        "FATAL:  database locale is incompatible with operating system\nDETAIL:  The database "
        'was initialized with LC_COLLATE "de_DE.UTF-8",  which is not recognized by setlocale().'
    )
    assert missing_locales(log) == ["de_DE.UTF-8"]
    spec = spec_for("de_DE.UTF-8")
    assert spec is not None
    assert (spec.source, spec.charmap) == ("de_DE", "UTF-8")
    built = build_locales(scratch / "loc", [spec])
    assert built.built == ("de_DE.UTF-8",)
    assert built.has("de_DE.UTF-8")
    # Names that are not plain language_TERRITORY.codeset are never built from.
    assert spec_for("../../etc/x.UTF-8") is None
    assert spec_for("xx_YY.UTF-8") is None
    assert spec_for("en_US.NOT-A-CHARSET") is None


# --- an en_US.UTF-8 source ----------------------------------------------------------------


def build_en_us_cluster(
    base: Path, binaries: PostgresBinaries, account: RunAccount, *, app: bool = True
) -> Path:
    """A stopped cluster made with `--locale=en_US.UTF-8` from a private source LOCPATH,
    with 1000 rows under a text btree index in `postgres` (and in `app`)."""
    if _host_has("en_US.UTF-8"):
        pytest.skip("this host has en_US.UTF-8 itself: nothing would fail without it")
    source = base / "source-locales"
    source.mkdir(parents=True)
    subprocess.run(
        ["localedef", "-i", "en_US", "-f", "UTF-8", str(source / "en_US.UTF-8")],
        check=True,
        capture_output=True,
    )
    hand_over(source, account)
    pgdata = base / "en_us" / "data"
    _initdb(
        binaries, account, pgdata, {"LOCPATH": str(source)}, "--locale=en_US.UTF-8", "-E", "UTF8"
    )
    server = _server(binaries, account, pgdata, {"LOCPATH": str(source)})
    server.start(60)
    try:
        assert _query(server, "postgres", "SELECT datcollate FROM pg_database")[0] == (
            "en_US.UTF-8",
        )
        _fill(server, "postgres")
        if app:
            _query(server, "postgres", "CREATE DATABASE app")
            _fill(server, "app")
    finally:
        server.stop()
    return pgdata


@pytest.fixture
def en_us_cluster(scratch: Path, binaries: PostgresBinaries, account: RunAccount) -> Path:
    return build_en_us_cluster(scratch, binaries, account)


def test_an_en_us_cluster_is_rewritten_and_reindexed(
    en_us_cluster: Path, aliases: LocaleAliases, binaries: PostgresBinaries, account: RunAccount
) -> None:
    pgdata = en_us_cluster
    # Without the source's locales the server refuses the databases ...
    server = _server(binaries, account, pgdata)
    server.start(60)
    try:
        assert INCOMPATIBLE in _refused(server, "postgres")
    finally:
        server.stop()
    # ... and so does single-user mode, whose log names the locale.
    with pytest.raises(SingleUserFailed) as caught:
        rewrite_in_single_user(binaries, pgdata, account)
    assert missing_locales(caught.value.log_tail) == ["en_US.UTF-8"]

    # With pgro's aliases the rewrite opens them: postgres, app, template0, template1.
    rewrite = rewrite_in_single_user(binaries, pgdata, account, env=aliases.env())
    assert rewrite.rewritten == 4
    assert rewrite.needs_reindex
    # Idempotent: nothing left to rewrite.
    assert rewrite_in_single_user(binaries, pgdata, account, env=aliases.env()).rewritten == 0

    # Now it starts and serves with no LOCPATH at all.
    server = _server(binaries, account, pgdata)
    server.start(60)
    try:
        conninfo_for = _conninfo(server)
        rows = _query(server, "postgres", "SELECT datname, datcollate, datctype FROM pg_database")
        assert {(r[1], r[2]) for r in rows} == {("C.UTF-8", "C.UTF-8")}
        assert rewrite_after_start(conninfo_for).rewritten == 0
        before = {db: _relfilenode(server, db, "words_w") for db in ("postgres", "app")}
        pkey = _relfilenode(server, "app", "words_pkey")

        result = quick_reindex(conninfo_for)
        assert result.failures == ()
        assert set(result.reindexed) == {"postgres:public.words_w", "app:public.words_w"}
        for db in ("postgres", "app"):
            assert _relfilenode(server, db, "words_w") != before[db]
            assert _query(server, db, "SELECT count(*) FROM words") == [(ROWS,)]
            # The index answers in the new (C) order: every 'B…' sorts before any 'b…'.
            first = _query(server, db, "SELECT w FROM words ORDER BY w LIMIT 1")[0][0]
            assert str(first).startswith("B")
            found = _query(
                server, db, "SET enable_seqscan = off", "SELECT count(*) FROM words WHERE w < 'a'"
            )
            assert found == [(ROWS // 2,)]
        assert _relfilenode(server, "app", "words_pkey") == pkey  # no collation: left alone

        # The full reindex (after pg_resetwal) rebuilds every index of every database.
        full = full_reindex(conninfo_for)
        assert full.failures == ()
        assert set(full.reindexed) == {"postgres", "app", "template1"}
        assert _relfilenode(server, "app", "words_pkey") != pkey
    finally:
        server.stop()


def test_the_post_start_fallback_rewrites_and_counts(
    en_us_cluster: Path, aliases: LocaleAliases, binaries: PostgresBinaries, account: RunAccount
) -> None:
    """On a server started with the aliases (no single-user step), the fallback rewrites
    every database and says so; read-only configuration does not stop it."""
    pgdata = en_us_cluster
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("default_transaction_read_only = on\n")
    server = _server(binaries, account, pgdata, aliases.env())
    server.start(60)
    try:
        result = rewrite_after_start(_conninfo(server))
        assert result.rewritten == 4
        assert result.changed
        rows = _query(server, "postgres", "SELECT DISTINCT datcollate FROM pg_database")
        assert rows == [("C.UTF-8",)]
        assert rewrite_after_start(_conninfo(server)).rewritten == 0
        reindex = quick_reindex(_conninfo(server))
        assert reindex.failures == ()
        assert len(reindex.reindexed) == 2
    finally:
        server.stop()


# --- a Windows source ---------------------------------------------------------------------


def test_a_windows_cluster_starts_only_with_the_aliases(
    scratch: Path, aliases: LocaleAliases, binaries: PostgresBinaries, account: RunAccount
) -> None:
    name = "English_United States.1252"
    pgdata = scratch / "windows" / "data"
    _initdb(binaries, account, pgdata, aliases.env(), "-E", "WIN1252", f"--locale={name}")

    # With the aliases it serves ...
    server = _server(binaries, account, pgdata, aliases.env())
    server.start(60)
    try:
        rows = _query(
            server,
            "postgres",
            "SELECT datcollate, pg_encoding_to_char(encoding) FROM pg_database "
            "WHERE datname = 'postgres'",
        )
        assert rows == [(name, "WIN1252")]
        _fill(server, "postgres")
    finally:
        server.stop()

    # ... without them (the negative control) it refuses, with a clear error.
    server = _server(binaries, account, pgdata)
    server.start(60)
    try:
        assert INCOMPATIBLE in _refused(server, "postgres")
    finally:
        server.stop()
    assert f'initialized with LC_COLLATE "{name}"' in server.log_tail(40)
    with pytest.raises(SingleUserFailed) as caught:
        rewrite_in_single_user(binaries, pgdata, account)
    assert INCOMPATIBLE in caught.value.log_tail
    assert missing_locales(caught.value.log_tail) == [name]

    # The rewrite through the aliases makes it start without them.
    assert rewrite_in_single_user(binaries, pgdata, account, env=aliases.env()).rewritten == 3
    server = _server(binaries, account, pgdata)
    server.start(60)
    try:
        rows = _query(server, "postgres", "SELECT DISTINCT datcollate, datctype FROM pg_database")
        # Not C.UTF-8: PostgreSQL refuses that locale for a WIN1252 database.
        assert rows == [("C", "C")]
        result = quick_reindex(_conninfo(server))
        assert result.reindexed == ("postgres:public.words_w",)
        assert _query(server, "postgres", "SELECT count(*) FROM words") == [(ROWS,)]
    finally:
        server.stop()


# --- every supported major --------------------------------------------------------------


@pytest.fixture(scope="module")
def bindirs(scratch_root: Path) -> Path:
    """The cached builds of the other majors, in a copy the server's account can read."""
    installed = tuple(m for m in CACHED_MAJORS if installed_in_cache(m))
    return server_readable_cache(scratch_root, installed)


@pytest.mark.parametrize("major", SUPPORTED_MAJORS)
def test_each_major_rewrites_and_reindexes(
    major: str, bindirs: Path, scratch: Path, aliases: LocaleAliases, account: RunAccount
) -> None:
    if major == DEBIAN_MAJOR:
        binaries = find_binaries(major)
    elif (bindirs / major / "bin" / "postgres").exists():
        binaries = PostgresBinaries(major, bindirs / major / "bin")
    else:
        pytest.skip(f"PostgreSQL {major} is not installed (scripts/install-postgres-major.sh)")
    pgdata = build_en_us_cluster(scratch, binaries, account, app=False)

    # template0, template1 and postgres; datcollversion exists (and is reset) from 15.
    assert rewrite_in_single_user(binaries, pgdata, account, env=aliases.env()).rewritten == 3
    server = _server(binaries, account, pgdata)
    server.start(60)
    try:
        rows = _query(server, "postgres", "SELECT DISTINCT datcollate, datctype FROM pg_database")
        assert rows == [("C.UTF-8", "C.UTF-8")]
        assert not rewrite_after_start(_conninfo(server)).changed
        before = _relfilenode(server, "postgres", "words_w")
        result = quick_reindex(_conninfo(server))
        assert result.failures == ()
        assert result.reindexed == ("postgres:public.words_w",)
        assert _relfilenode(server, "postgres", "words_w") != before
        assert _query(server, "postgres", "SELECT count(*) FROM words") == [(ROWS,)]
        full = full_reindex(_conninfo(server))
        assert full.failures == ()
        assert set(full.reindexed) == {"postgres", "template1"}
    finally:
        server.stop()


# --- single-user sessions -----------------------------------------------------------------


def test_a_failed_single_user_statement_raises_without_its_text(
    scratch: Path, binaries: PostgresBinaries, account: RunAccount
) -> None:
    pgdata = scratch / "plain" / "data"
    _initdb(binaries, account, pgdata, {}, "--no-locale", "-E", "UTF8")
    out = run_single_user(binaries, pgdata, account, ["SELECT 41 + 1 AS answer"])
    assert 'answer = "42"' in out.stdout
    with pytest.raises(SingleUserFailed) as caught:
        run_single_user(binaries, pgdata, account, ["SELECT 1 / 0 AS secret_marker"])
    assert "division by zero" in caught.value.log_tail
    # log_min_error_statement=panic: the failing statement is not logged.
    assert "STATEMENT" not in caught.value.log_tail
    assert "secret_marker" not in caught.value.log_tail
    with pytest.raises(ValueError, match="one line"):
        run_single_user(binaries, pgdata, account, ["SELECT 1\nSELECT 2"])
