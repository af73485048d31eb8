"""Login credentials of each replica's users, kept in files only their owner can read.

The embedded counterpart of the `<replica>-creds` and extra-user Secrets: created once,
never rotated (as the reference does), so clients keep working across restores. Names are
remote input: a file is named by a slug and hash of the name, never by the name itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pgro.postgres.users import RoleCredentials, generate_password
from pgro.runtimes.embedded.state_dir import PRIVATE, ensure_dir

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Names the files of pgro before 2026-12 had (`<username>.json`); read once, then moved.
_LEGACY_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")


def credential_file_name(username: str) -> str:
    """`<slug>-<hash>.json`: readable, and confined to one path component whatever the name."""
    slug = _UNSAFE.sub("_", username)[:40] or "_"
    digest = hashlib.sha256(username.encode()).hexdigest()[:16]
    return f"{slug}-{digest}.json"


class CredentialStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, replica_key: str) -> Path:
        namespace, name = replica_key.split("/", 1)
        # Both are validated DNS-1123 labels (api.objects); checked again because a path
        # is built from them.
        for part in (namespace, name):
            if not part or _UNSAFE.sub("", part) != part:
                raise ValueError(f"{replica_key!r} is not a namespace/name replica key")
        return self.root / namespace / name

    def path_of(self, replica_key: str, username: str) -> Path:
        return self._folder(replica_key) / credential_file_name(username)

    def _read(self, path: Path, username: str | None = None) -> RoleCredentials | None:
        """The file's credentials (None: unreadable, or for another user than `username`)."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or username not in (None, doc.get("username")):
            return None
        name, password = doc.get("username"), doc.get("password")
        if isinstance(name, str) and isinstance(password, str):
            return RoleCredentials(name, password)
        return None

    def ensure(self, replica_key: str, username: str) -> RoleCredentials:
        """The user's credentials, generated and written (mode 0600) on first use."""
        path = self.path_of(replica_key, username)
        found = self._read(path, username)
        if found is not None:
            return found
        folder = path.parent
        # Only the folders pgro makes here are chmodded; never a parent named by input.
        for directory in (self.root, self.root / folder.parent.name, folder):
            ensure_dir(directory, PRIVATE)
        legacy = None
        if _LEGACY_SAFE.fullmatch(username):
            legacy = self._read(folder / f"{username}.json", username)
        creds = legacy or RoleCredentials(username, generate_password())
        tmp = folder / f".{path.name}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"username": creds.username, "password": creds.password}, f)
        os.replace(tmp, path)
        if legacy is not None:
            (folder / f"{username}.json").unlink(missing_ok=True)
        return creds

    def read(self, replica_key: str) -> dict[str, RoleCredentials]:
        """Every stored user of a replica, by username."""
        found = (self._read(p) for p in sorted(self._folder(replica_key).glob("*.json")))
        return {c.username: c for c in found if c is not None}
