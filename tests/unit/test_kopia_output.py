"""Reading kopia's output: restore progress lines and failure messages."""

from __future__ import annotations

import pytest

from pgro.kopia.errors import (
    AccessDenied,
    DiskFull,
    EndpointUnreachable,
    KopiaError,
    RepositoryNotFound,
    RestoreFailed,
    SnapshotNotFound,
    WrongPassword,
    classify_connect_failure,
    classify_restore_failure,
)
from pgro.kopia.repository import RestoreProgress, parse_progress_line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Processed 5 (3 B) of 4 (3 B).", RestoreProgress(3, 3)),
        (
            "Processed 812 (36 MB) of 1305 (48.9 MB) 18.2 MB/s (73.6%) remaining 0s.",
            RestoreProgress(36_000_000, 48_900_000),
        ),
        ("Processed 10 (1.5 GiB) of 20 (3 GiB)", RestoreProgress(1610612736, 3221225472)),
        ("Restoring to local filesystem (/x) with parallelism=2...", None),
        ("Restored 1 files, 4 directories and 0 symbolic links (3 B).", None),
    ],
)
def test_progress_lines(line: str, expected: RestoreProgress | None) -> None:
    assert parse_progress_line(line) == expected


@pytest.mark.parametrize(
    ("stderr", "cls", "fragment"),
    [
        (
            "error connecting to repository: unable to create format manager: "
            "invalid repository password",
            WrongPassword,
            "repositoryPassword",
        ),
        (
            "can't connect to storage: cannot access storage path: "
            "stat /x: no such file or directory",
            RepositoryNotFound,
            "filesystemPath",
        ),
        (
            "error connecting to repository: repository not initialized in the provided storage",
            RepositoryNotFound,
            "holds no Kopia repository",
        ),
        (
            'unable to list: Get "http://127.0.0.1:1/b": '
            "dial tcp 127.0.0.1:1: connect: connection refused",
            EndpointUnreachable,
            "endpoint",
        ),
        (
            "The AWS Access Key Id you provided does not exist (InvalidAccessKeyId)",
            AccessDenied,
            "accessKeyId",
        ),
        ("something nobody has seen before", KopiaError, "something nobody has seen before"),
    ],
)
def test_connect_failures_name_the_cause(stderr: str, cls: type[KopiaError], fragment: str) -> None:
    err = classify_connect_failure(stderr, "the repository")
    assert type(err) is cls
    assert fragment in str(err)


def test_s3_not_initialized_mentions_the_bucket() -> None:
    err = classify_connect_failure(
        "repository not initialized in the provided storage", "bucket x", s3=True
    )
    assert isinstance(err, RepositoryNotFound)
    assert "bucket does not exist or holds no Kopia repository" in str(err)


@pytest.mark.parametrize(
    ("stderr", "cls"),
    [
        ("no snapshots contain data for nothex", SnapshotNotFound),
        (
            "unable to open object: deadbeef: content deadbeef not found: object not found",
            SnapshotNotFound,
        ),
        ("error restoring: write /x: no space left on device", DiskFull),
        ("error restoring: unexpected EOF reading pack blob", RestoreFailed),
    ],
)
def test_restore_failures(stderr: str, cls: type[KopiaError]) -> None:
    err = classify_restore_failure(stderr, "deadbeef")
    assert type(err) is cls
    assert "deadbeef" in str(err)
