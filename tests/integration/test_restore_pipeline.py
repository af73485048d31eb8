"""The restore step and the server on restored data, checked through the data itself."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest

from pgro.api.replica import SnapshotFilter
from pgro.core.selection import select_snapshot
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.events import SilentObserver
from pgro.pipeline.restore import RestoredDataDirectory, restore_snapshot
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import BinariesMissing, PostgresBinaries, find_binaries
from pgro.postgres.config import BLOCK_BEGIN
from pgro.postgres.initdb import init_cluster
from pgro.postgres.repair import prepare_data_directory
from pgro.postgres.server import (
    PostgresServer,
    StartupFailed,
    StartupTimeout,
    bootstrap_superuser,
)
from tests.conftest import Repo


def restore(repo: Repo, kind: str, scratch: Path, account: RunAccount) -> RestoredDataDirectory:
    with KopiaRepository(repo.credentials, scratch / "kopia") as kopia:
        snapshots = kopia.list_snapshots()
        snap = next(s for s in snapshots if s.id == repo.snapshots[kind])
        return restore_snapshot(kopia, snap, scratch / "data", account, SilentObserver())


def serve(restored: RestoredDataDirectory, account: RunAccount, scratch: Path) -> PostgresServer:
    server = PostgresServer(
        restored.data.path,
        restored.binaries,
        account,
        socket_dir=scratch / "run",
        log_path=scratch / "pg.log",
    )
    server.start(120)
    return server


def query(server: PostgresServer, db: str, sql: str) -> object:
    with psycopg.connect(server.endpoint.conninfo(db, "postgres")) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


def test_clean_snapshot_holds_the_rows(fs_repo: Repo, scratch: Path, account: RunAccount) -> None:
    restored = restore(fs_repo, "clean", scratch, account)
    assert restored.data.path == scratch / "data" / "15" / "main"
    server = serve(restored, account, scratch)
    try:
        assert query(server, "myapp", "SELECT count(*) FROM test_data") == 1000
        assert query(server, "myapp", "SELECT length(data) FROM test_data WHERE id = 7") == 1000
        # It runs as the unprivileged account on exactly the port and socket it was given.
        status = Path(f"/proc/{server.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert int(uid_line.split()[1]) == account.uid
        assert query(server, "postgres", "SHOW port") == str(server.port)
        assert query(server, "postgres", "SHOW listen_addresses") == ""
        assert query(server, "postgres", "SHOW logging_collector") == "off"
    finally:
        assert server.stop() == 0  # a clean, fast shutdown
    assert not server.running()
    st = restored.data.path.stat()
    assert st.st_mode & 0o777 == 0o700
    assert st.st_uid == account.uid


def test_crash_copy_replays_wal(fs_repo: Repo, scratch: Path, account: RunAccount) -> None:
    restored = restore(fs_repo, "crash", scratch, account)
    assert restored.repairs.fixes["removed_stale_pid"] is True
    server = serve(restored, account, scratch)
    try:
        # 250 rows were committed after the last checkpoint: only WAL replay keeps them.
        assert query(server, "myapp", "SELECT count(*) FROM test_data") == 1250
        assert query(server, "myapp", "SELECT pg_is_in_recovery()") is False
    finally:
        server.stop()
    assert "redo starts" in (scratch / "pg.log").read_text()


def test_poisoned_snapshot_runs_as_a_primary_with_source_settings_disabled(
    fs_repo: Repo, scratch: Path, account: RunAccount
) -> None:
    restored = restore(fs_repo, "poisoned", scratch, account)
    conf = (restored.data.path / "postgresql.conf").read_text()
    assert "#pgro-disabled: archive_command = 'rsync %p backup:/wal/%f'" in conf
    assert "max_connections = 50" in conf
    assert not (restored.data.path / "standby.signal").exists()
    server = serve(restored, account, scratch)
    try:
        assert query(server, "postgres", "SELECT pg_is_in_recovery()") is False
        assert query(server, "postgres", "SHOW archive_mode") == "off"
        assert query(server, "postgres", "SHOW primary_conninfo") == ""
        assert query(server, "postgres", "SHOW max_connections") == "50"  # harmless: kept
        assert query(server, "postgres", "SHOW shared_preload_libraries") == "pg_stat_statements"
        assert query(server, "postgres", "SHOW ssl") == "off"
    finally:
        server.stop()


def test_repair_is_idempotent(fs_repo: Repo, scratch: Path, account: RunAccount) -> None:
    restored = restore(fs_repo, "poisoned", scratch, account)
    first = (restored.data.path / "postgresql.conf").read_text()
    again = prepare_data_directory(restored.root, restored.data.path, restored.binaries, account)
    second = (restored.data.path / "postgresql.conf").read_text()
    assert first == second
    assert second.count(BLOCK_BEGIN) == 1
    # The second pass finds nothing left to fix.
    assert not any(again.fixes.values()), again.fixes


def test_selection_over_a_real_listing(fs_repo: Repo, scratch: Path) -> None:
    with KopiaRepository(fs_repo.credentials, scratch / "kopia") as kopia:
        snapshots = kopia.list_snapshots()

    def pick(**criteria: object) -> str | None:
        chosen = select_snapshot(snapshots, SnapshotFilter.model_validate(criteria))
        return chosen.id if chosen else None

    ids = fs_repo.snapshots
    # Tags match kopia's `tag:` prefixed keys; newest wins (windows 03-07 > new 03-05).
    assert pick(tags={"env": "prod"}) == ids["sel-windows"]
    assert pick(tags={"env": "prod"}, pathPattern="/var/*") == ids["sel-new"]
    assert pick(pathPattern="/D/*") == ids["sel-windows"]  # D:\Full normalised to /D/Full
    assert pick(hostPattern="fiji-*") == ids["sel-staging"]
    assert pick(hostPattern="fiji-prod-?", tags={"env": "prod"}) == ids["sel-new"]
    assert pick(descriptionPattern="fixture sel-old") == ids["sel-old"]
    assert pick(hostPattern="fiji-*", tags={"env": "dev"}) is None


def test_missing_binaries_name_the_package() -> None:
    with pytest.raises(BinariesMissing) as err:
        find_binaries("11")
    assert "apt-get install postgresql-11" in str(err.value)
    assert "/usr/lib/postgresql/11/bin" in str(err.value)


def test_bootstrap_superuser_other_than_postgres(
    scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    pgdata = scratch / "bob-cluster"
    init_cluster(binaries, pgdata, account, superuser="bob")
    assert bootstrap_superuser(binaries, pgdata, account) == "bob"


def test_startup_failure_carries_the_server_log(
    scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    pgdata = scratch / "broken"
    init_cluster(binaries, pgdata, account)
    (pgdata / "postgresql.conf").write_text("this is = = not valid\n")
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=scratch / "run", log_path=scratch / "pg.log"
    )
    with pytest.raises(StartupFailed) as err:
        server.start(60)
    assert "exited with code" in str(err.value)
    assert "syntax error" in err.value.log_tail


def test_run_account_is_postgres_when_root(account: RunAccount) -> None:
    if os.geteuid() == 0:
        assert account.name == "postgres"
        assert account.uid == pwd.getpwnam("postgres").pw_uid
    else:
        assert account.uid == os.geteuid()


def test_readiness_timeout_stops_the_server(
    scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    pgdata = scratch / "slow"
    init_cluster(binaries, pgdata, account)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=scratch / "run", log_path=scratch / "pg.log"
    )
    with pytest.raises(StartupTimeout) as err:
        server.start(0.0)  # no server is ready before it even started
    assert "did not accept connections within 0s" in str(err.value)
    assert "raise the readiness timeout" in str(err.value)
    assert not server.running()
    assert not (pgdata / "postmaster.pid").exists()  # it was shut down, not abandoned


def test_restore_worker_result_never_carries_a_secret(scratch: Path) -> None:
    from pgro.pipeline import worker as restore_worker

    secret = "hunter2-in-the-path"
    result = restore_worker.run(
        {
            "restoreDir": str(scratch / "r"),
            "snapshot": "0123456789abcdef",
            "credentials": {
                "filesystemPath": f"/nonexistent/{secret}",
                "repositoryPassword": secret,
            },
        }
    )
    assert result.ok is False
    assert result.reason == "RepositoryNotFound"
    assert "/nonexistent/***" in result.error
    assert secret not in result.error
