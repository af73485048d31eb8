"""Login credentials of each replica's users, kept in files only their owner can read.

The embedded counterpart of the `<replica>-creds` and extra-user Secrets: created once,
never rotated (as the reference does), so clients keep working across restores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pgro.postgres.users import RoleCredentials, generate_password


class CredentialStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, replica_key: str, username: str) -> Path:
        namespace, name = replica_key.split("/", 1)
        return self.root / namespace / name / f"{username}.json"

    def ensure(self, replica_key: str, username: str) -> RoleCredentials:
        """The user's credentials, generated and written (mode 0600) on first use."""
        path = self._path(replica_key, username)
        try:
            doc = json.loads(path.read_text())
            return RoleCredentials(doc["username"], doc["password"])
        except (OSError, ValueError, KeyError):
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, *path.parents):
            if directory == self.root.parent:
                break
            os.chmod(directory, 0o700)
        creds = RoleCredentials(username, generate_password())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"username": creds.username, "password": creds.password}, f)
        os.replace(tmp, path)
        return creds

    def read(self, replica_key: str) -> dict[str, RoleCredentials]:
        """Every stored user of a replica, by username."""
        namespace, name = replica_key.split("/", 1)
        out: dict[str, RoleCredentials] = {}
        folder = self.root / namespace / name
        if not folder.is_dir():
            return out
        for path in sorted(folder.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
                out[doc["username"]] = RoleCredentials(doc["username"], doc["password"])
            except (OSError, ValueError, KeyError):
                continue
        return out

    def path_of(self, replica_key: str, username: str) -> Path:
        return self._path(replica_key, username)
