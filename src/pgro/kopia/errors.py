"""Kopia failures, classified by cause so callers and users see what to fix."""

from __future__ import annotations

import re


class KopiaError(Exception):
    """A kopia command failed. The message is secret-free and says what to do."""

    reason = "KopiaFailed"


class KopiaNotInstalled(KopiaError):
    reason = "KopiaNotInstalled"


class WrongPassword(KopiaError):
    reason = "WrongPassword"


class RepositoryNotFound(KopiaError):
    reason = "RepositoryNotFound"


class AccessDenied(KopiaError):
    reason = "AccessDenied"


class EndpointUnreachable(KopiaError):
    reason = "EndpointUnreachable"


class SnapshotNotFound(KopiaError):
    reason = "SnapshotNotFound"


class RestoreFailed(KopiaError):
    reason = "RestoreFailed"


class DiskFull(KopiaError):
    reason = "InsufficientDisk"


# Each entry: (pattern in kopia's stderr, error class, what the user should do).
_CONNECT_PATTERNS: list[tuple[re.Pattern[str], type[KopiaError], str]] = [
    (
        re.compile(r"invalid repository password"),
        WrongPassword,
        "the repository password is wrong: check `repositoryPassword` in the Secret",
    ),
    (
        re.compile(r"repository not initialized in the provided storage"),
        RepositoryNotFound,
        "the storage exists but holds no Kopia repository: check the path/bucket and prefix",
    ),
    (
        re.compile(r"cannot access storage path|no such file or directory"),
        RepositoryNotFound,
        "no repository at that path: check `filesystemPath` in the Secret",
    ),
    (
        re.compile(r"NoSuchBucket|bucket does not exist|BUCKET_NOT_FOUND", re.IGNORECASE),
        RepositoryNotFound,
        "the bucket does not exist: check `bucket`, `region` and `endpoint` in the Secret",
    ),
    (
        re.compile(
            r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Access Denied|"
            r"permission denied|ExpiredToken",
            re.IGNORECASE,
        ),
        AccessDenied,
        "the storage refused the credentials: check `accessKeyId` and `secretAccessKey`",
    ),
    (
        re.compile(
            r"connection refused|no such host|i/o timeout|network is unreachable|"
            r"context deadline exceeded|TLS handshake|server gave HTTP response to HTTPS|"
            r"connection reset|no route to host|dial tcp",
            re.IGNORECASE,
        ),
        EndpointUnreachable,
        "the storage endpoint cannot be reached: check `endpoint` and `disableTls`, "
        "and that the server is up",
    ),
]

_SNAPSHOT_PATTERNS = re.compile(
    r"no snapshots contain data for|object not found|unable to open object|"
    r"invalid object ID|malformed object ID|unable to parse",
    re.IGNORECASE,
)


def last_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def classify_connect_failure(stderr: str, where: str, *, s3: bool = False) -> KopiaError:
    for pattern, cls, hint in _CONNECT_PATTERNS:
        if pattern.search(stderr):
            if s3 and cls is RepositoryNotFound:
                # kopia reports a missing bucket the same way as an empty one.
                hint = (
                    "the bucket does not exist or holds no Kopia repository: check `bucket`, "
                    "`endpoint` and `region` in the Secret"
                )
            return cls(f"cannot open {where}: {hint}. kopia said: {last_lines(stderr, 2)}")
    return KopiaError(f"cannot open {where}. kopia said: {last_lines(stderr)}")


def classify_restore_failure(stderr: str, snapshot_id: str) -> KopiaError:
    if "no space left on device" in stderr:
        return DiskFull(
            f"restore of {snapshot_id} ran out of disk space: restore onto a filesystem with "
            "room for the whole snapshot (pgro verify --work-dir DIR)"
        )
    if _SNAPSHOT_PATTERNS.search(stderr):
        return SnapshotNotFound(
            f"snapshot {snapshot_id!r} is not in the repository "
            f"(list them with `kopia snapshot list --all`). kopia said: {last_lines(stderr, 2)}"
        )
    for pattern, cls, hint in _CONNECT_PATTERNS:
        if cls is not RepositoryNotFound and pattern.search(stderr):
            return cls(
                f"restore of {snapshot_id} failed: {hint}. kopia said: {last_lines(stderr, 2)}"
            )
    return RestoreFailed(f"restore of {snapshot_id} failed. kopia said: {last_lines(stderr)}")
