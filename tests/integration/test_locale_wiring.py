"""The locale, reindex and collation repairs wired into `pgro verify` and `pgro run` (issue 13;
features.md §2.3, §2.4), end to end: the real CLI, real kopia, real PostgreSQL.

- an `en_US.UTF-8` cluster, made with that locale from a private LOCPATH (this host lacks
  it), snapshotted with kopia and restored WITHOUT it: pgro builds its own private locales
  in the restore's directory, rewrites the databases to C.UTF-8 and rebuilds their text
  indexes (`fixes.locale`, `fixes.reindex`), before `pgro run` serves the server;
- the same with the private locales disabled: a clear `LocaleUnavailable`;
- an ICU collation with a forged old `collversion`: `fixes.collation_refresh`;
- a sound cluster: no repair, its text index untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.locale_repair import ALIASES_SWITCH, LocaleRepair, LocaleUnavailable
from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.locale_aliases import RESTORE_LOCALES_DIR, build_locale_aliases
from pgro.postgres.server import PostgresServer, socket_dir_for
from tests.conftest import Repo
from tests.fixtures.manifests import fs_manifest, replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import PASSWORD, Backups, Running, StartRun, connect
from tests.integration.test_locale_fix import (
    ROWS,
    _fill,
    _initdb,
    _query,
    _server,
    build_en_us_cluster,
)
from tests.integration.test_verify_cli import run_verify

EN_US_SOURCE = "postgres@db-en:/var/lib/postgresql"


@dataclass(frozen=True)
class EnUsRepo:
    path: Path
    snapshot: str
    # words_w's relfilenode in the source, per database (it must change before serving).
    relfilenodes: dict[str, int]


def _relfilenode(conninfo: str, index: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = %s", (index,))
        found = row.fetchone()
    assert found is not None
    return int(str(found[0]))


@pytest.fixture(scope="module")
def en_us_repo(
    scratch_root: Path, binaries: PostgresBinaries, account: RunAccount
) -> Iterator[EnUsRepo]:
    """A kopia repository holding one snapshot of an en_US.UTF-8 cluster (databases
    `postgres` and `app`, each with 1000 rows under the text index `words_w`)."""
    base = scratch_root / "locale-wiring"
    pgdata = build_en_us_cluster(base, binaries, account)
    source_env = {"LOCPATH": str(base / "source-locales")}
    server = PostgresServer(
        pgdata,
        binaries,
        account,
        socket_dir=socket_dir_for(base / "src-run"),
        log_path=base / "src.log",
        env=source_env,
    )
    server.start(60)
    try:
        nodes = {
            db: _relfilenode(server.endpoint.conninfo(db, "postgres"), "words_w")
            for db in ("postgres", "app")
        }
    finally:
        server.stop()
    creds = KopiaCredentials(FilesystemLocation(str(base / "repo")), PASSWORD)
    kopia = KopiaRepository(creds, base / "kopia-author")
    kopia.create()
    try:
        snapshot = kopia.snapshot_create(pgdata.parent, override_source=EN_US_SOURCE)
        yield EnUsRepo(base / "repo", snapshot, nodes)
    finally:
        kopia.close()


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["health_details"]["checks"]}


# --- pgro verify --------------------------------------------------------------------------


def test_verify_rewrites_and_reindexes_an_en_us_snapshot(
    en_us_repo: EnUsRepo, scratch: Path
) -> None:
    manifest = fs_manifest(scratch / "m.yaml", en_us_repo.path, PASSWORD)
    code, report, _ = run_verify(manifest, scratch / "work", "--depth", "standard")
    assert code == 0, json.dumps(report, indent=1)
    assert report["replica_healthy"] is True
    assert report["snapshot_id"] == en_us_repo.snapshot
    fixes = report["health_details"]["fixes"]
    assert fixes["locale"] is True
    assert fixes["reindex"] is True
    assert fixes["collation_refresh"] is False
    assert fixes["reset_wal"] is False
    notes = " ".join(report["notes"])
    # postgres, app, template0 and template1, in single-user mode before the start.
    assert "rewrote the locale of 4 database(s) to C.UTF-8" in notes
    assert "quick reindex of the indexes on the default collation: rebuilt 2" in notes
    assert "private locale(s)" in notes
    checks = _checks(report)
    # amcheck (with heapallindexed) agrees with the rebuilt indexes: in the C order now, and
    # holding every row. Without the reindex the en_US order would fail the btree check.
    assert checks["btree"]["status"] == "pass", checks["btree"]
    assert checks["select_1:app"]["status"] == "pass"
    assert checks["collation_versions"]["status"] == "pass"


def test_verify_rewrites_a_windows_snapshot_to_c(
    scratch: Path, binaries: PostgresBinaries, account: RunAccount
) -> None:
    """A WIN1252 cluster named "English_United States.1252" (made with aliases this test
    builds for itself) opens only through pgro's own aliases, and is rewritten to C (not
    C.UTF-8, which PostgreSQL refuses for WIN1252)."""
    name = "English_United States.1252"
    source_aliases = build_locale_aliases(scratch / "source-aliases")
    pgdata = scratch / "windows" / "data"
    _initdb(binaries, account, pgdata, source_aliases.env(), "-E", "WIN1252", f"--locale={name}")
    server = _server(binaries, account, pgdata, source_aliases.env())
    server.start(60)
    try:
        _query(server, "postgres", "CREATE DATABASE app")
        _fill(server, "app")
    finally:
        server.stop()
    creds = KopiaCredentials(FilesystemLocation(str(scratch / "repo")), PASSWORD)
    kopia = KopiaRepository(creds, scratch / "kopia-author")
    kopia.create()
    try:
        kopia.snapshot_create(pgdata.parent, override_source="postgres@db-win:C:/pgdata")
    finally:
        kopia.close()
    manifest = fs_manifest(scratch / "m.yaml", scratch / "repo", PASSWORD)
    code, report, _ = run_verify(manifest, scratch / "work", "--depth", "standard")
    assert code == 0, json.dumps(report, indent=1)
    fixes = report["health_details"]["fixes"]
    assert fixes["locale"] is True
    assert fixes["reindex"] is True
    notes = " ".join(report["notes"])
    assert "rewrote the locale of 4 database(s)" in notes
    assert "rebuilt 1" in notes  # app's words_w
    assert _checks(report)["btree"]["status"] == "pass"


def test_a_locale_pgro_cannot_build_fails_clearly(
    scratch: Path, binaries: PostgresBinaries, account: RunAccount
) -> None:
    """A database created with a locale no source on this host builds ("xx_XX.UTF-8", made
    here from en_US under another name): `LocaleUnavailable` naming it, the data unchanged."""
    source = scratch / "source-locales"
    source.mkdir()
    subprocess.run(
        ["localedef", "-i", "en_US", "-f", "UTF-8", str(source / "xx_XX.UTF-8")],
        check=True,
        capture_output=True,
    )
    hand_over(source, account)
    pgdata = scratch / "odd" / "data"
    env = {"LOCPATH": str(source)}
    _initdb(binaries, account, pgdata, env, "--locale=xx_XX.UTF-8", "-E", "UTF8")
    said: list[str] = []
    with pytest.raises(LocaleUnavailable) as caught:
        LocaleRepair.before_start(binaries, pgdata, account, scratch / "locales", said.append)
    message = str(caught.value)
    assert "'xx_XX.UTF-8'" in message
    assert "pgro could not build it privately" in message
    assert 'initialized with LC_COLLATE "xx_XX.UTF-8"' in caught.value.log_tail
    assert any("building private locale aliases" in line for line in said)
    # Nothing was rewritten: the source's locale opens it as before.
    server = _server(binaries, account, pgdata, env)
    server.start(60)
    try:
        rows = _query(server, "postgres", "SELECT DISTINCT datcollate FROM pg_database")
        assert rows == [("xx_XX.UTF-8",)]
    finally:
        server.stop()


def test_verify_without_private_locales_fails_clearly(
    en_us_repo: EnUsRepo, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALIASES_SWITCH, "off")
    manifest = fs_manifest(scratch / "m.yaml", en_us_repo.path, PASSWORD)
    code, report, _ = run_verify(manifest, scratch / "work", "--depth", "quick")
    assert code == 1, json.dumps(report, indent=1)
    assert report["replica_healthy"] is False
    assert report["reason"] == "LocaleUnavailable", report
    error = report["error"]
    assert "'en_US.UTF-8'" in error
    assert f"private locale aliases are disabled ({ALIASES_SWITCH})" in error
    assert "database locale is incompatible with operating system" in error


def test_verify_refreshes_a_forged_icu_collation_version(backups: Backups, scratch: Path) -> None:
    snapshot = backups.snapshot(
        "icu",
        [
            "CREATE COLLATION en_icu (provider = icu, locale = 'en-US')",
            "CREATE TABLE named (id int PRIMARY KEY, name text COLLATE en_icu)",
            f"INSERT INTO named SELECT g, 'name ' || g FROM generate_series(1, {ROWS}) g",
            "CREATE INDEX named_name ON named (name)",
            "UPDATE pg_collation SET collversion = '0.0' WHERE collname = 'en_icu'",
        ],
    )
    manifest = fs_manifest(scratch / "m.yaml", backups.path, PASSWORD)
    code, report, _ = run_verify(
        manifest, scratch / "work", "--snapshot", snapshot, "--depth", "standard"
    )
    assert code == 0, json.dumps(report, indent=1)
    fixes = report["health_details"]["fixes"]
    assert fixes["collation_refresh"] is True
    assert fixes["locale"] is False  # a C.UTF-8 cluster: only its collation drifted
    assert fixes["reindex"] is False
    notes = " ".join(report["notes"])
    assert "refreshed 1 collation version(s) after rebuilding 1 index(es)" in notes
    assert "myapp:public.en_icu (recorded 0.0" in notes
    check = _checks(report)["collation_versions"]
    assert check["status"] == "pass"
    assert "en_icu" in check["detail"]


def test_verify_of_a_sound_snapshot_repairs_nothing(backups: Backups, scratch: Path) -> None:
    snapshot = backups.snapshot("sound")
    manifest = fs_manifest(scratch / "m.yaml", backups.path, PASSWORD)
    code, report, _ = run_verify(manifest, scratch / "work", "--snapshot", snapshot)
    assert code == 0, json.dumps(report, indent=1)
    fixes = report["health_details"]["fixes"]
    assert not (fixes["locale"] or fixes["reindex"] or fixes["collation_refresh"])
    notes = " ".join(report["notes"])
    assert "locale" not in notes and "reindex" not in notes
    assert _checks(report)["collation_versions"]["status"] == "pass"


def test_verify_reindexes_every_database_after_a_wal_reset(fs_repo: Repo, scratch: Path) -> None:
    manifest = fs_manifest(
        scratch / "m.yaml",
        fs_repo.path,
        fs_repo.password,
        snapshotFilter={"hostPattern": "db-nowal"},
    )
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 0, json.dumps(report, indent=1)
    fixes = report["health_details"]["fixes"]
    assert fixes["reset_wal"] is True
    assert fixes["reindex"] is True
    assert fixes["locale"] is False
    notes = report["notes"]
    full = [n for n in notes if n.startswith("full reindex after pg_resetwal")]
    assert full and "rebuilt 3" in full[0], notes  # postgres, myapp, template1
    assert "reindex" in report["timings"]  # its own step, after the checks


# --- pgro run -----------------------------------------------------------------------------


def _serving(run: Running) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(replica entry, serving restore, its directory) once the replica serves."""
    run.wait_for(
        "the restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
        timeout=240,
    )
    entry = run.replica("orders")
    serving = entry["status"]["currentRestore"]
    restore = next(r for r in entry["restores"] if r["name"] == serving)
    return entry, restore, run.state / "restores" / "default" / serving


def _run_manifest(path: Path, repo: Path) -> Path:
    return write_manifest(
        path,
        secret_doc("kopia", {"filesystemPath": str(repo), "repositoryPassword": PASSWORD}),
        replica_doc("orders", ephemeral=False, scheduleJitter="0s", schedule="* * * * *"),
    )


def _postmaster_env(pgdata_pid_file: Path) -> dict[str, str]:
    pid = int(pgdata_pid_file.read_text().splitlines()[0])
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_run_serves_an_en_us_snapshot_after_the_rewrite_and_reindex(
    en_us_repo: EnUsRepo, scratch: Path, start_run: StartRun
) -> None:
    run = start_run(_run_manifest(scratch / "m.yaml", en_us_repo.path))
    entry, restore, rdir = _serving(run)
    assert restore["spec"]["snapshot"] == en_us_repo.snapshot
    fixes = restore["status"]["fixes"]
    assert fixes["locale"] is True
    assert fixes["reindex"] is True
    assert fixes["collation_refresh"] is False
    # The first query through the endpoint already sees the rebuilt index: the worker's
    # quick reindex ran before pgro run served the server.
    for db in ("postgres", "app"):
        with connect(entry, dbname=db) as conn:
            row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 'words_w'")
            assert row.fetchone() != (en_us_repo.relfilenodes[db],)
            assert conn.execute("SELECT count(*) FROM words").fetchone() == (ROWS,)
            conn.execute("SET enable_seqscan = off")
            found = conn.execute("SELECT count(*) FROM words WHERE w < 'a'").fetchone()
            assert found == (ROWS // 2,)  # the index answers in the C order
            datcollate = conn.execute(
                "SELECT datcollate FROM pg_database WHERE datname = current_database()"
            ).fetchone()
            assert datcollate == ("C.UTF-8",)
    work_log = (rdir / "work.log").read_text()
    assert work_log.index("rewrote the locale of 4 database(s)") < work_log.index(
        "quick reindex of the indexes on the default collation: rebuilt 2"
    )
    # The private locales stay in the restore's directory, and the served server has them.
    locales = rdir / RESTORE_LOCALES_DIR
    assert (locales / "en_US.UTF-8" / "LC_CTYPE").is_file()
    pgdata = Path(next(iter((rdir / "data").rglob("PG_VERSION"))).parent)
    served = _postmaster_env(pgdata / "postmaster.pid")
    assert served.get("LOCPATH") == str(locales)
    assert run.stop() == 0


def test_run_of_a_sound_snapshot_leaves_its_indexes_alone(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot(
        "sound",
        [
            "CREATE TABLE words (id int PRIMARY KEY, w text)",
            f"INSERT INTO words SELECT g, 'w' || g FROM generate_series(1, {ROWS}) g",
            "CREATE INDEX words_w ON words (w)",
        ],
    )
    pgdata = backups.source / backups.binaries.major / "main"
    (pgdata / "postgresql.conf").touch()
    server = PostgresServer(
        pgdata,
        backups.binaries,
        backups.account,
        socket_dir=socket_dir_for(scratch / "src-node"),
        log_path=scratch / "src-node.log",
    )
    server.start(60)
    try:
        before = _relfilenode(server.endpoint.conninfo("myapp", "postgres"), "words_w")
    finally:
        server.stop()
        (pgdata / "postgresql.conf").unlink()

    run = start_run(_run_manifest(scratch / "m.yaml", backups.path))
    entry, restore, rdir = _serving(run)
    fixes = restore["status"]["fixes"]
    assert not (fixes["locale"] or fixes["reindex"] or fixes["collation_refresh"])
    with connect(entry) as conn:
        row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 'words_w'")
        assert row.fetchone() == (before,)
    assert not (rdir / RESTORE_LOCALES_DIR).exists()  # nothing built for a sound snapshot
    work_log = (rdir / "work.log").read_text()
    assert "quick reindex" not in work_log and "full reindex" not in work_log
    assert run.stop() == 0


def test_locale_probe_needs_no_private_locales_on_a_sound_cluster(
    backups: Backups, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the private locales disabled a sound snapshot still verifies: only a database
    naming a missing locale needs them."""
    monkeypatch.setenv(ALIASES_SWITCH, "off")
    snapshot = backups.snapshot("plain")
    manifest = fs_manifest(scratch / "m.yaml", backups.path, PASSWORD)
    code, report, _ = run_verify(manifest, scratch / "work", "--snapshot", snapshot)
    assert code == 0, json.dumps(report, indent=1)
    assert report["health_details"]["fixes"]["locale"] is False


def test_run_reindexes_every_database_after_a_wal_reset_once_serving(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    """A snapshot whose WAL is gone: the worker resets it, and pgro run rebuilds every index
    once the server serves, without gating readiness (features.md §2.3 step 5):
    `status.fullReindex` goes `running` → `complete`, `_pgro.restore_info.stage` ends
    `ready`, and the worker (whose end gates readiness) did not run it."""
    pgdata = backups.source / backups.binaries.major / "main"
    (pgdata / "postgresql.conf").touch()
    server = PostgresServer(
        pgdata,
        backups.binaries,
        backups.account,
        socket_dir=socket_dir_for(scratch / "src-crash"),
        log_path=scratch / "src-crash.log",
    )
    server.start(60)
    try:
        conninfo = server.endpoint.conninfo("myapp", "postgres")
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute("CREATE TABLE marker (v text)")
            c.execute("INSERT INTO marker VALUES ('crashed')")
            c.execute("CHECKPOINT")
        before = _relfilenode(conninfo, "test_data_pkey")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGQUIT)  # an unclean stop: crash recovery is due
    finally:
        server.stop()
        (pgdata / "postgresql.conf").unlink()
    for segment in [p for p in (pgdata / "pg_wal").iterdir() if p.is_file()]:
        segment.unlink()
    backups.kopia.snapshot_create(
        backups.source, override_source="postgres@db-run:/var/lib/postgresql"
    )

    run = start_run(_run_manifest(scratch / "m.yaml", backups.path))
    entry, restore, rdir = _serving(run)
    assert restore["status"]["fixes"]["reset_wal"] is True
    # The worker finished (the restore is Ready) without the rebuild: it is not gating.
    work_log = (rdir / "work.log").read_text()
    assert "full reindex" not in work_log

    def reindexed() -> dict[str, Any] | None:
        current = next(r for r in run.replica("orders")["restores"] if r["name"] == restore["name"])
        return current if current["status"].get("fullReindex") == "complete" else None

    run.wait_for("the full reindex after the WAL reset", lambda: reindexed() is not None, 120)
    done = reindexed()
    assert done is not None
    fixes = done["status"]["fixes"]
    assert fixes["reset_wal"] is True
    assert fixes["reindex"] is True
    assert fixes["locale"] is False
    with connect(entry) as conn:
        row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 'test_data_pkey'")
        assert row.fetchone() != (before,)
        assert conn.execute("SELECT v FROM marker").fetchone() == ("crashed",)
    with connect(entry, dbname="postgres") as conn:
        stage = conn.execute("SELECT stage FROM _pgro.restore_info").fetchone()
        assert stage == ("ready",)
    log = run.log.read_text()
    assert "full reindex after pg_resetwal (databases): rebuilt 3" in log
    assert run.stop() == 0


def test_run_refreshes_a_forged_icu_collation_version_before_serving(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot(
        "icu",
        [
            "CREATE COLLATION en_icu (provider = icu, locale = 'en-US')",
            "CREATE TABLE named (id int PRIMARY KEY, name text COLLATE en_icu)",
            f"INSERT INTO named SELECT g, 'name ' || g FROM generate_series(1, {ROWS}) g",
            "CREATE INDEX named_name ON named (name)",
            "UPDATE pg_collation SET collversion = '0.0' WHERE collname = 'en_icu'",
        ],
    )
    run = start_run(_run_manifest(scratch / "m.yaml", backups.path))
    entry, restore, rdir = _serving(run)
    fixes = restore["status"]["fixes"]
    assert fixes["collation_refresh"] is True
    assert fixes["locale"] is False
    with connect(entry) as conn:
        row = conn.execute(
            "SELECT collversion = pg_collation_actual_version(oid) FROM pg_collation "
            "WHERE collname = 'en_icu'"
        ).fetchone()
        assert row == (True,)
        assert conn.execute("SELECT count(*) FROM named").fetchone() == (ROWS,)
    work_log = (rdir / "work.log").read_text()
    assert work_log.count("refreshed 1 collation version(s) after rebuilding 1 index(es)") == 1
    assert run.stop() == 0
