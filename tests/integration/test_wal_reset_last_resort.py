"""The reset-WAL last resort (features.md §1.E), on real data directories, in both places
that start a restored server: `postgres.server` (`pgro verify`) and the pod's `setup` script.

A startup failure pgro does not recognise is retried once unchanged and then reset with
`pg_resetwal -f`. The real one used here: a `pg_control` whose checksum no longer matches
(a torn copy of the file). PostgreSQL refuses it ("incorrect checksum in control file");
pg_resetwal rewrites it from the values it still holds, and the data is all there. A
failure a reset cannot fix (a configuration error) leaves the data directory untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.server import (
    LAST_RESORT_NOTE,
    PostgresServer,
    StartupFailed,
    StartupFailureKind,
    classify_startup_failure,
    socket_dir_for,
    start_resetting_wal_if_needed,
)
from tests.integration.test_kube_setup_script import (
    PASSWORD,
    assert_admin_login,
    new_cluster,
    run_setup,
    started,
)

ROWS = 50


def _crc32c(data: bytes | bytearray) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def corrupt_control_checksum(pgdata: Path) -> None:
    """Flip the stored CRC-32C of `global/pg_control` (found where it matches the bytes
    before it, so whatever the major's layout) and nothing else."""
    path = pgdata / "global" / "pg_control"
    data = bytearray(path.read_bytes())
    offset = next(
        n for n in range(8, 1024, 4) if _crc32c(data[:n]).to_bytes(4, "little") == data[n : n + 4]
    )
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _evidence(pgdata: Path) -> str:
    """A digest of pg_control and every WAL file: what a reset would rewrite."""
    digest = hashlib.sha256()
    for path in sorted([pgdata / "global" / "pg_control", *(pgdata / "pg_wal").rglob("*")]):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def cluster(binaries: PostgresBinaries, account: RunAccount, scratch: Path) -> tuple[Path, Path]:
    """(PGDATA, volume root) of a cleanly stopped cluster holding `ROWS` rows."""
    pgdata, root = new_cluster(binaries, account, scratch)
    pgdata.chmod(0o700)
    with started(binaries, account, pgdata, scratch) as server, server.local("postgres") as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute(f"INSERT INTO kept SELECT generate_series(1, {ROWS})")
        conn.commit()
    return pgdata, root


@pytest.fixture
def server(
    cluster: tuple[Path, Path], binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> Iterator[PostgresServer]:
    pgdata, _ = cluster
    log = scratch / "postgres.log"
    log.touch()
    socket_dir = socket_dir_for(scratch / "run")
    srv = PostgresServer(pgdata, binaries, account, socket_dir=socket_dir, log_path=log)
    yield srv
    srv.stop()


def _count(server: PostgresServer) -> int:
    import psycopg

    with psycopg.connect(server.endpoint.conninfo("postgres", "postgres")) as conn:
        row = conn.execute("SELECT count(*) FROM kept").fetchone()
    assert row is not None
    return int(row[0])


def test_classification_of_startup_logs() -> None:
    fatal = "2026-01-01 00:00:00 UTC [1] FATAL:  "
    assert classify_startup_failure(f"{fatal}incorrect checksum in control file") is (
        StartupFailureKind.UNRECOGNISED
    )
    panic = "[1] PANIC:  could not locate a valid checkpoint record"
    assert classify_startup_failure(panic) is StartupFailureKind.WAL_LOST
    # A permissions error that ends in a WAL signature is still a permissions error.
    denied = f'{fatal}could not open file "pg_wal/000000010000000000000001": Permission denied'
    assert classify_startup_failure(f"{denied}\n{panic}") is StartupFailureKind.NOT_RESETTABLE
    for cause in (
        "database files are incompatible with server",
        'configuration file "/x/postgresql.conf" contains errors',
        'could not access file "timescaledb": No such file or directory',
        'lock file "postmaster.pid" already exists',
        'database "postgres" does not exist',
    ):
        assert classify_startup_failure(fatal + cause) is StartupFailureKind.NOT_RESETTABLE
    # What the log says on the way is not why startup failed: a snapshot missing its
    # postgresql.auto.conf (a removed link) still has its WAL reset.
    skipped = '[1] LOG:  skipping missing configuration file "/x/postgresql.auto.conf"'
    assert classify_startup_failure(f"{skipped}\n{panic}") is StartupFailureKind.WAL_LOST
    # Nothing says startup failed (killed, or a statement's ERROR): never reset.
    assert classify_startup_failure("ERROR:  syntax error") is StartupFailureKind.NOT_RESETTABLE
    assert classify_startup_failure("") is StartupFailureKind.NOT_RESETTABLE


# postgres.server, as `pgro verify` starts a restored server ------------------------------


def test_an_unrecognised_failure_is_retried_then_reset_as_the_last_resort(
    cluster: tuple[Path, Path], server: PostgresServer
) -> None:
    corrupt_control_checksum(cluster[0])
    notes: list[str] = []
    repair = start_resetting_wal_if_needed(server, 60, notes.append)
    assert repair == LAST_RESORT_NOTE
    assert "last resort" in repair
    assert notes == [
        "PostgreSQL did not start, for a reason pgro does not recognise: retrying once",
        "PostgreSQL failed to start twice: resetting WAL with pg_resetwal -f as a last resort",
    ]
    log = (server.log_path).read_text()
    assert log.count("incorrect checksum in control file") == 2  # the start and the retry
    assert _count(server) == ROWS


def test_a_configuration_error_is_not_reset(
    cluster: tuple[Path, Path], server: PostgresServer
) -> None:
    pgdata = cluster[0]
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nwork_mem = 'lots'\n")
    before = _evidence(pgdata)
    notes: list[str] = []
    with pytest.raises(StartupFailed) as failed:
        start_resetting_wal_if_needed(server, 60, notes.append)
    assert 'invalid value for parameter "work_mem"' in failed.value.log_tail
    assert notes == []  # not even retried: nothing would change
    assert _evidence(pgdata) == before
    assert "pg_resetwal" not in server.log_path.read_text()


def test_a_clean_start_is_not_retried_or_reset(
    cluster: tuple[Path, Path], server: PostgresServer
) -> None:
    notes: list[str] = []
    assert start_resetting_wal_if_needed(server, 60, notes.append) is None
    assert notes == []
    assert _count(server) == ROWS


# The pod's setup script ----------------------------------------------------------------


def test_the_setup_script_resets_an_unrecognised_failure_as_the_last_resort(
    cluster: tuple[Path, Path], binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata, root = cluster
    corrupt_control_checksum(pgdata)
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    assert "incorrect checksum in control file" in run.output
    assert "retrying once" in run.output
    assert "as a last resort; running pg_resetwal -f" in run.output
    assert "after pg_resetwal (the last resort)" in run.output
    assert PASSWORD not in run.output
    assert (root / "fix-reset-wal").exists()
    with started(binaries, account, pgdata, scratch) as srv:
        assert_admin_login(srv)
        with srv.local("postgres") as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (ROWS,)


def test_the_setup_script_leaves_a_configuration_error_untouched(
    cluster: tuple[Path, Path], binaries: PostgresBinaries, account: RunAccount
) -> None:
    pgdata, root = cluster
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nwork_mem = 'lots'\n")
    before = _evidence(pgdata)
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 1
    assert 'invalid value for parameter "work_mem"' in run.output
    assert "a WAL reset cannot fix this failure" in run.output
    assert "retrying" not in run.output
    assert "running pg_resetwal" not in run.output
    assert not (root / "fix-reset-wal").exists()
    assert _evidence(pgdata) == before
