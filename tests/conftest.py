"""Shared fixtures: real kopia repositories built from real PostgreSQL clusters."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgro.api.secret import FilesystemLocation, KopiaCredentials, S3Location
from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import RunAccount, hand_over, resolve_run_account
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import newest_binaries
from pgro.postgres.server import free_port
from tests.fixtures.clusters import build_debian_cluster, crash_consistent_copy

# The process-leak check (a test that leaves a process behind fails): hooks and an autouse
# fixture, see tests/fixtures/leaks.py.
from tests.fixtures.leaks import (  # noqa: F401
    _no_process_left_behind,
    pytest_configure,
    pytest_fixture_post_finalizer,
    pytest_fixture_setup,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

REPO_PASSWORD = "test-repo-password"


@dataclass
class Repo:
    """A filesystem repository and the snapshots the fixtures put in it, by kind."""

    path: Path
    password: str
    snapshots: dict[str, str] = field(default_factory=dict)

    @property
    def credentials(self) -> KopiaCredentials:
        return KopiaCredentials(
            location=FilesystemLocation(str(self.path)), repository_password=self.password
        )


@pytest.fixture(scope="session")
def scratch_root() -> Iterator[Path]:
    """A temp dir the PostgreSQL account can traverse (pytest's own is mode 0700 for root)."""
    root = Path(tempfile.mkdtemp(prefix="pgro-tests-"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch(scratch_root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=scratch_root))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def account() -> RunAccount:
    return resolve_run_account()


@pytest.fixture(scope="session")
def binaries() -> PostgresBinaries:
    return newest_binaries()


def _snapshot(
    repo: KopiaRepository,
    source: Path,
    kind: str,
    host: str,
    *,
    path: str = "/var/lib/postgresql",
    start: datetime | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    return repo.snapshot_create(
        source,
        tags={"kind": kind, **(extra_tags or {})},
        description=f"fixture {kind}",
        override_source=f"postgres@{host}:{path}",
        start_time=start,
    )


@pytest.fixture(scope="session")
def fs_repo(scratch_root: Path, account: RunAccount, binaries: PostgresBinaries) -> Iterator[Repo]:
    """One repository holding every kind of snapshot the tests need.

    - clean: cleanly stopped Debian-layout cluster, `myapp` with 1000 rows, `current` symlink
    - crash: copied while running (stale pid, rows only in WAL)
    - notpg: a tree of files that is not PostgreSQL
    - systemonly: a cluster with only the system databases
    - fakemajor: the clean cluster claiming PostgreSQL 11 (not installed)
    - poisoned: source-host config, ALTER SYSTEM overrides, standby.signal, stale pid
    - nowal: the clean cluster without pg_wal (a Windows source kept WAL elsewhere)
    """
    base = scratch_root / "fixtures"
    base.mkdir()
    os.chmod(base, 0o711)
    repo = Repo(path=base / "repository", password=REPO_PASSWORD)
    kopia = KopiaRepository(repo.credentials, base / "kopia-state")
    kopia.create()
    try:
        clean = base / "clean"
        pgdata = build_debian_cluster(clean, binaries, account, base)
        os.symlink(f"/var/lib/postgresql/{binaries.major}/main", clean / "current")
        repo.snapshots["clean"] = _snapshot(kopia, clean, "clean", "db-clean")

        crash = base / "crash"
        crash_consistent_copy(crash, binaries, account, base)
        repo.snapshots["crash"] = _snapshot(kopia, crash, "crash", "db-crash")

        notpg = base / "notpg"
        (notpg / "random-stuff").mkdir(parents=True)
        (notpg / "random-stuff" / "notes.txt").write_text("not a database\n" * 100)
        (notpg / "random-stuff" / "PG_VERSION").write_text("15\n")  # no global/ beside it
        repo.snapshots["notpg"] = _snapshot(kopia, notpg, "notpg", "files-host", path="/data")

        systemonly = base / "systemonly"
        build_debian_cluster(systemonly, binaries, account, base, app_database=False)
        repo.snapshots["systemonly"] = _snapshot(kopia, systemonly, "systemonly", "db-empty")

        fake = base / "fakemajor"
        shutil.copytree(clean, fake, symlinks=True)
        (fake / binaries.major / "main" / "PG_VERSION").write_text("11\n")
        repo.snapshots["fakemajor"] = _snapshot(kopia, fake, "fakemajor", "db-old")

        poisoned = base / "poisoned"
        shutil.copytree(clean, poisoned, symlinks=True)
        _poison(poisoned / binaries.major / "main", binaries.major)
        hand_over(poisoned, account)
        repo.snapshots["poisoned"] = _snapshot(kopia, poisoned, "poisoned", "db-poisoned")

        nowal = base / "nowal"
        shutil.copytree(clean, nowal, symlinks=True)
        shutil.rmtree(nowal / binaries.major / "main" / "pg_wal")  # WAL kept on another volume
        repo.snapshots["nowal"] = _snapshot(kopia, nowal, "nowal", "db-nowal")

        # Selection fixtures: tiny trees, varied host/path/tags/times (restored by no test).
        tiny = base / "tiny"
        tiny.mkdir()
        (tiny / "f").write_text("x")
        for name, host, path, when, tags in [
            (
                "sel-old",
                "fiji-prod-1",
                "/var/lib/postgresql",
                "2026-03-01T00:00:00",
                {"env": "prod"},
            ),
            (
                "sel-new",
                "fiji-prod-1",
                "/var/lib/postgresql",
                "2026-03-05T00:00:00",
                {"env": "prod"},
            ),
            (
                "sel-staging",
                "fiji-staging",
                "/var/lib/postgresql",
                "2026-03-09T00:00:00",
                {"env": "staging"},
            ),
            ("sel-windows", "win-host", "D:\\Full", "2026-03-07T00:00:00", {"env": "prod"}),
        ]:
            repo.snapshots[name] = _snapshot(
                kopia,
                tiny,
                name,
                host,
                path=path,
                start=datetime.fromisoformat(when).replace(tzinfo=UTC),
                extra_tags=tags,
            )
        del pgdata
    finally:
        kopia.close()
    yield repo


def _poison(pgdata: Path, major: str) -> None:
    """Give a cluster everything a source host leaves behind that stops startup here."""
    (pgdata / "postgresql.conf").write_text(
        "\n".join(
            [
                f"data_directory = '/var/lib/postgresql/{major}/main'",
                f"hba_file = '/etc/postgresql/{major}/main/pg_hba.conf'",
                f"ident_file = '/etc/postgresql/{major}/main/pg_ident.conf'",
                f"external_pid_file = '/var/run/postgresql/{major}-main.pid'",
                "listen_addresses = 'localhost'",
                "port = 5433",
                "unix_socket_directories = '/var/run/postgresql'",
                "ssl = on",
                "ssl_cert_file = '/etc/ssl/certs/ssl-cert-snakeoil.pem'",
                "ssl_key_file = '/etc/ssl/private/ssl-cert-snakeoil.key'",
                "shared_preload_libraries = 'pg_stat_statements,timescaledb'",
                "archive_mode = on",
                "archive_command = 'rsync %p backup:/wal/%f'",
                "logging_collector = on",
                "log_directory = '/var/log/postgresql'",
                "lc_messages = 'en_NZ.UTF-8'",
                "include_dir = 'conf.d'",
                f"include_if_exists = '/etc/postgresql/{major}/main/extra.conf'",
                "max_connections = 50",
                "shared_buffers = 64GB",
                "cluster_name = '15/main'",  # no trailing newline: the append must not merge
            ]
        )
    )
    (pgdata / "postgresql.auto.conf").write_text(
        "# Do not edit this file manually!\n"
        "primary_conninfo = 'host=10.0.0.1 user=replicator'\n"
        "restore_command = 'cp /mnt/wal/%f %p'\n"
    )
    (pgdata / "standby.signal").write_text("")
    (pgdata / "postmaster.pid").write_text("4242\n/var/lib/postgresql/15/main\n")


@pytest.fixture(scope="session")
def moto_s3(scratch_root: Path) -> Iterator[str]:
    """A local S3 server (moto) speaking the real S3 protocol; yields its host:port."""
    port = free_port()
    # The virtualenv's pinned moto, not whichever one comes first on PATH.
    venv_server = Path(sys.executable).parent / "moto_server"
    server = (
        str(venv_server) if venv_server.exists() else shutil.which("moto_server") or "moto_server"
    )
    log = (scratch_root / "moto.log").open("wb")
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{endpoint}/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(
                    f"moto_server did not start: see {scratch_root / 'moto.log'}"
                ) from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    log.close()


def s3_credentials(endpoint: str, bucket: str, password: str = REPO_PASSWORD) -> KopiaCredentials:
    return KopiaCredentials(
        location=S3Location(bucket=bucket, region="us-east-1", endpoint=endpoint, disable_tls=True),
        repository_password=password,
        access_key_id="testing-access-key",
        secret_access_key="testing-secret-key",
    )


@pytest.fixture(scope="session")
def s3_repo(
    moto_s3: str, fs_repo: Repo, scratch_root: Path
) -> Iterator[tuple[KopiaCredentials, str]]:
    """An S3 repository on moto holding the clean cluster; yields (credentials, snapshot id)."""
    import boto3

    bucket = "pgro-test-bucket"
    boto3.client(
        "s3",
        endpoint_url=f"http://{moto_s3}",
        region_name="us-east-1",
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
    ).create_bucket(Bucket=bucket)
    creds = s3_credentials(moto_s3, bucket)
    kopia = KopiaRepository(creds, scratch_root / "s3-kopia-state")
    kopia.create()
    try:
        snap = _snapshot(kopia, scratch_root / "fixtures" / "clean", "clean", "db-clean")
    finally:
        kopia.close()
    yield creds, snap


@pytest.fixture
def canopy_stub() -> Iterator[object]:
    """A stub canopy (tests/fixtures/canopy_stub.py) on 127.0.0.1 with §7's `int-test` entry."""
    from tests.fixtures.canopy_stub import start_canopy_stub

    with start_canopy_stub() as stub:
        yield stub
