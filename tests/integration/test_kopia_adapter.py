"""The kopia adapter against the real kopia binary: filesystem and S3 repositories."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.errors import (
    EndpointUnreachable,
    RepositoryNotFound,
    SnapshotNotFound,
    WrongPassword,
)
from pgro.kopia.repository import KopiaRepository, RestoreProgress
from pgro.postgres.server import free_port
from tests.conftest import Repo, s3_credentials


def test_lists_every_snapshot_with_the_reference_fields(fs_repo: Repo, scratch: Path) -> None:
    with KopiaRepository(fs_repo.credentials, scratch / "k") as repo:
        snapshots = {s.id: s for s in repo.list_snapshots()}
    assert set(fs_repo.snapshots.values()) <= set(snapshots)
    clean = snapshots[fs_repo.snapshots["clean"]]
    assert clean.source.host == "db-clean"
    assert clean.source.user_name == "postgres"
    assert clean.source.path == "/var/lib/postgresql"
    assert clean.tags["tag:kind"] == "clean"
    assert clean.description == "fixture clean"
    # 1000 rows of 1000 bytes live in the cluster: the size comes from stats.totalSize.
    assert clean.size_bytes > 1_000_000
    windows = snapshots[fs_repo.snapshots["sel-windows"]]
    assert windows.source.path == "D:\\Full"
    assert windows.start_time.startswith("2026-03-07T00:00:00")


def test_state_is_isolated_and_removed_on_close(fs_repo: Repo, scratch: Path) -> None:
    state = scratch / "state"
    with KopiaRepository(fs_repo.credentials, state) as repo:
        repo.list_snapshots()
        assert (state / "config" / "repository.config").exists()
        # --no-persist-credentials: the password is never written next to the config.
        for path in state.rglob("*"):
            if path.is_file():
                assert fs_repo.password.encode() not in path.read_bytes(), path
    assert not state.exists()


def test_wrong_password_names_the_cause(fs_repo: Repo, scratch: Path) -> None:
    creds = KopiaCredentials(
        location=FilesystemLocation(str(fs_repo.path)), repository_password="not-the-password"
    )
    with pytest.raises(WrongPassword) as err:
        KopiaRepository(creds, scratch / "k").connect()
    assert "repository password is wrong" in str(err.value)
    assert "repositoryPassword" in str(err.value)
    assert "not-the-password" not in str(err.value)


def test_missing_repository_path(scratch: Path) -> None:
    creds = KopiaCredentials(
        location=FilesystemLocation(str(scratch / "nowhere")), repository_password="x"
    )
    with pytest.raises(RepositoryNotFound) as err:
        KopiaRepository(creds, scratch / "k").connect()
    assert "no repository at that path" in str(err.value)
    assert "filesystemPath" in str(err.value)


def test_directory_without_a_repository(scratch: Path) -> None:
    empty = scratch / "empty"
    empty.mkdir()
    creds = KopiaCredentials(location=FilesystemLocation(str(empty)), repository_password="x")
    with pytest.raises(RepositoryNotFound) as err:
        KopiaRepository(creds, scratch / "k").connect()
    assert "holds no Kopia repository" in str(err.value)


def test_unknown_snapshot_restore(fs_repo: Repo, scratch: Path) -> None:
    with KopiaRepository(fs_repo.credentials, scratch / "k") as repo:
        with pytest.raises(SnapshotNotFound) as err:
            repo.restore("deadbeefdeadbeefdeadbeefdeadbeef", scratch / "out")
        assert "deadbeefdeadbeefdeadbeefdeadbeef" in str(err.value)
        with pytest.raises(SnapshotNotFound):
            repo.restore("no such id!", scratch / "out2")


def test_restore_reports_progress_and_writes_the_tree(fs_repo: Repo, scratch: Path) -> None:
    samples: list[RestoreProgress] = []
    with KopiaRepository(fs_repo.credentials, scratch / "k") as repo:
        repo.restore(
            fs_repo.snapshots["clean"], scratch / "out", parallel=2, on_progress=samples.append
        )
    assert (scratch / "out" / "15" / "main" / "PG_VERSION").read_text().strip() == "15"
    assert os.readlink(scratch / "out" / "current") == "/var/lib/postgresql/15/main"
    assert samples, "kopia printed no progress"
    assert samples[-1].done_bytes == samples[-1].total_bytes > 1_000_000


def test_restore_can_be_cancelled(fs_repo: Repo, scratch: Path) -> None:
    cancel = threading.Event()
    cancel.set()  # cancelled before kopia can finish
    with (
        KopiaRepository(fs_repo.credentials, scratch / "k") as repo,
        pytest.raises(Exception, match="cancelled"),
    ):
        repo.restore(fs_repo.snapshots["clean"], scratch / "out", cancel=cancel)


def test_restore_target_must_be_empty(fs_repo: Repo, scratch: Path) -> None:
    (scratch / "out").mkdir()
    (scratch / "out" / "stray").write_text("")
    with (
        KopiaRepository(fs_repo.credentials, scratch / "k") as repo,
        pytest.raises(Exception, match="not empty"),
    ):
        repo.restore(fs_repo.snapshots["clean"], scratch / "out")


def test_s3_repository_lists_and_restores(
    s3_repo: tuple[KopiaCredentials, str], scratch: Path
) -> None:
    creds, snapshot_id = s3_repo
    with KopiaRepository(creds, scratch / "k") as repo:
        ids = [s.id for s in repo.list_snapshots()]
        assert snapshot_id in ids
        repo.restore(snapshot_id, scratch / "out")
    assert (scratch / "out" / "15" / "main" / "global").is_dir()


def test_s3_wrong_password(
    moto_s3: str, s3_repo: tuple[KopiaCredentials, str], scratch: Path
) -> None:
    creds = s3_credentials(moto_s3, "pgro-test-bucket", password="wrong-password")
    with pytest.raises(WrongPassword) as err:
        KopiaRepository(creds, scratch / "k").connect()
    assert "wrong-password" not in str(err.value)
    assert "testing-secret-key" not in str(err.value)


def test_s3_missing_bucket(moto_s3: str, scratch: Path) -> None:
    creds = s3_credentials(moto_s3, "no-such-bucket")
    with pytest.raises(RepositoryNotFound) as err:
        KopiaRepository(creds, scratch / "k", connect_timeout=60).connect()
    assert "the bucket does not exist or holds no Kopia repository" in str(err.value)


def test_s3_unreachable_endpoint(scratch: Path) -> None:
    creds = s3_credentials(f"127.0.0.1:{free_port()}", "bucket")  # nothing listens there
    with pytest.raises(EndpointUnreachable) as err:
        KopiaRepository(creds, scratch / "k", connect_timeout=30).connect()
    assert "cannot be reached" in str(err.value) or "did not finish" in str(err.value)
    assert "testing-secret-key" not in str(err.value)
