"""The Kopia credentials Secret: its keys, validation and the typed result.

The reference keys (`bucket`, `region`, `accessKeyId`, `secretAccessKey`,
`repositoryPassword`, optional `endpoint` and `disableTls`) describe an S3 repository.
pgro adds one key, `filesystemPath`: a filesystem repository at that path, for which the
S3 keys are not required.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

S3_REQUIRED_KEYS = ("bucket", "region", "accessKeyId", "secretAccessKey", "repositoryPassword")
FILESYSTEM_REQUIRED_KEYS = ("repositoryPassword",)
FILESYSTEM_PATH_KEY = "filesystemPath"


class SecretInvalid(ValueError):
    """The Secret exists but cannot be used; `reason` is the condition reason."""

    reason = "SecretInvalid"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    region: str
    endpoint: str | None = None
    disable_tls: bool = False
    # Key prefix inside the bucket (canopy's `prefix`; the reference never passed it on).
    prefix: str = ""


@dataclass(frozen=True)
class FilesystemLocation:
    path: str


@dataclass(frozen=True)
class KopiaCredentials:
    """Where the repository is and how to open it.

    The secret values are excluded from `repr` so an accidental log line or traceback
    cannot print them.
    """

    location: S3Location | FilesystemLocation
    repository_password: str = field(repr=False)
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def secret_values(self) -> list[str]:
        """Every value that must never appear in output."""
        return [
            v
            for v in (
                self.repository_password,
                self.access_key_id,
                self.secret_access_key,
                self.session_token,
            )
            if v
        ]

    def describe(self) -> str:
        """A human-readable, secret-free description of the repository."""
        loc = self.location
        if isinstance(loc, FilesystemLocation):
            return f"filesystem repository at {loc.path}"
        where = loc.endpoint or "AWS S3"
        return f"S3 bucket {loc.bucket!r} ({where}, region {loc.region})"


def _scalar(value: object, key: object, where: str) -> str:
    """A Secret value as text; only strings (and YAML numbers and booleans) are values.

    A list or mapping is refused before anything stringifies it: with YAML aliases a few
    hundred bytes can stand for gigabytes, and `str()` would build them all.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    kind = "empty" if value is None else f"a {type(value).__name__}"
    raise SecretInvalid(f"key {key} in `{where}` must be a string, not {kind}")


def decode_secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """Merge a Secret document's base64 `data` and plain `stringData` like the API server does.

    `stringData` wins over `data` for the same key.
    """
    out: dict[str, bytes] = {}
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise SecretInvalid("secret `data` must be a mapping of key to base64 value")
    for key, value in data.items():
        text = _scalar(value, key, "data")
        try:
            out[str(key)] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SecretInvalid(f"key {key} is not valid base64 in `data`") from None
    string_data = secret.get("stringData") or {}
    if not isinstance(string_data, Mapping):
        raise SecretInvalid("secret `stringData` must be a mapping of key to string")
    for key, value in string_data.items():
        out[str(key)] = _scalar(value, key, "stringData").encode()
    return out


def parse_kopia_secret(data: Mapping[str, bytes]) -> KopiaCredentials:
    """Validate Secret data with the reference's messages (`missing key: <k>` and so on)."""
    if not data:
        raise SecretInvalid("secret has no data")
    text: dict[str, str] = {}
    for key, raw in data.items():
        try:
            text[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretInvalid(f"key {key} is not valid UTF-8") from None

    fs_path = text.get(FILESYSTEM_PATH_KEY, "").strip()
    required = FILESYSTEM_REQUIRED_KEYS if fs_path else S3_REQUIRED_KEYS
    for key in required:
        if not text.get(key):
            raise SecretInvalid(f"missing key: {key}")

    if fs_path:
        if not fs_path.startswith("/"):
            raise SecretInvalid(
                f"key {FILESYSTEM_PATH_KEY} must be an absolute path, got {fs_path!r}"
            )
        return KopiaCredentials(
            location=FilesystemLocation(path=fs_path),
            repository_password=text["repositoryPassword"],
        )

    endpoint = text.get("endpoint", "").strip() or None
    return KopiaCredentials(
        location=S3Location(
            bucket=text["bucket"],
            region=text["region"],
            endpoint=endpoint,
            disable_tls=text.get("disableTls", "").strip() == "true",
            prefix=text.get("prefix", "").strip(),
        ),
        repository_password=text["repositoryPassword"],
        access_key_id=text["accessKeyId"],
        secret_access_key=text["secretAccessKey"],
    )
