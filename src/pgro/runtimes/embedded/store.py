"""`pgro run`'s API server: replicas, restores, events and settings in SQLite, in wire form
with merge-patched status (docs/run.md); every write is a transaction, so a `kill -9`
leaves the last committed state."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.clock import utcnow
from pgro.core.merge_patch import merge_patch

SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
    key TEXT PRIMARY KEY,          -- namespace/name
    body TEXT NOT NULL,            -- the object without status, wire form
    status TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS restores (
    key TEXT PRIMARY KEY,          -- namespace/name
    replica_key TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS restores_by_replica ON restores (replica_key);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    replica_key TEXT NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    note TEXT NOT NULL,
    related TEXT
);
CREATE INDEX IF NOT EXISTS events_by_replica ON events (replica_key, id);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def _create_private(path: Path) -> None:
    """The database file is 0600 before SQLite opens it (its -wal and -shm files follow its
    mode); one left by an older pgro (0644) is tightened too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600, follow_symlinks=False)


# Told of each committed change of a replica (restore key None) or of one of its restores:
# `pgro run` reconciles what changed, as a controller watches the API server.
OnChange = Callable[[str, str | None], None]

# Events are a recent history, not an archive.
EVENTS_KEPT_PER_REPLICA = 200


_M = TypeVar("_M", PostgresPhysicalReplica, PostgresPhysicalRestore)


def _load(model: type[_M], body: str, status: str) -> _M:
    """An object from its stored body and status columns."""
    doc = json.loads(body)
    if st := json.loads(status):
        doc["status"] = st
    return model.model_validate(doc)


def _now() -> str:
    return utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Event:
    at: str
    replica_key: str
    type: str
    reason: str
    note: str
    related: str | None


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        _create_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._on_change: OnChange = lambda replica, restore: None

    def watch(self, on_change: OnChange) -> None:
        self._on_change = on_change

    @property
    def writes(self) -> int:
        """Rows this connection changed so far (what a test of the steady state reads)."""
        return self._db.total_changes

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- replicas -------------------------------------------------------------------------
    def apply_replica(self, replica: PostgresPhysicalReplica) -> bool:
        """Create or update a replica from a manifest, keeping its status.

        Like the API server: a uid and creationTimestamp are assigned once, and
        `generation` grows when the spec changes. Returns True when something changed.
        """
        body = replica.to_wire()
        body.pop("status", None)
        key = f"{replica.metadata.namespace}/{replica.metadata.name}"
        with self._tx() as db:
            row = db.execute("SELECT body FROM replicas WHERE key = ?", (key,)).fetchone()
            meta = body.setdefault("metadata", {})
            if row is None:
                meta["uid"] = meta.get("uid") or str(uuid.uuid4())
                meta["creationTimestamp"] = meta.get("creationTimestamp") or _now()
                meta["generation"] = 1
                db.execute(
                    "INSERT INTO replicas (key, body) VALUES (?, ?)", (key, json.dumps(body))
                )
            else:
                old = json.loads(row[0])
                old_meta = old.get("metadata", {})
                meta["uid"] = old_meta.get("uid")
                meta["creationTimestamp"] = old_meta.get("creationTimestamp")
                generation = int(old_meta.get("generation") or 1)
                meta["generation"] = generation + (old.get("spec") != body.get("spec"))
                if old == body:
                    return False
                db.execute("UPDATE replicas SET body = ? WHERE key = ?", (json.dumps(body), key))
        self._on_change(key, None)
        return True

    def replica_keys(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT key FROM replicas ORDER BY key")]

    def replica(self, key: str) -> PostgresPhysicalReplica | None:
        found = self._objects(PostgresPhysicalReplica, "replicas", "key", key)
        return found[0] if found else None

    def replicas(self) -> list[PostgresPhysicalReplica]:
        return self._objects(PostgresPhysicalReplica, "replicas")

    def _objects(self, model: type[_M], table: str, column: str = "", value: str = "") -> list[_M]:
        """The objects of `table` (where `column` is `value`, if given), by key."""
        where = f"WHERE {column} = ?" if column else ""  # this module's names, never input
        sql = f"SELECT body, status FROM {table} {where} ORDER BY key"
        rows = self._db.execute(sql, (value,) if column else ()).fetchall()
        return [_load(model, *row) for row in rows]

    def delete_replica(self, key: str) -> None:
        with self._tx() as db:
            gone = db.execute("DELETE FROM replicas WHERE key = ?", (key,)).rowcount > 0
        if gone:
            self._on_change(key, None)

    def patch_replica_status(self, key: str, patch: Mapping[str, Any]) -> None:
        if self._patch_status("replicas", "key", key, patch) is not None:
            self._on_change(key, None)

    def _patch_status(
        self, table: str, owner: str, key: str, patch: Mapping[str, Any]
    ) -> str | None:
        """Merge `patch` into the status; the row's `owner` column, None when the patch
        changes nothing (and writes nothing)."""
        with self._tx() as db:
            # `table` and `owner` are this module's names, never input.
            row = db.execute(
                f"SELECT status, {owner} FROM {table} WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                raise KeyError(f"{table[:-1]} {key} does not exist")
            old = json.loads(row[0])
            status = merge_patch(old, patch)
            if status == old:
                return None
            db.execute(f"UPDATE {table} SET status = ? WHERE key = ?", (json.dumps(status), key))
        return str(row[1])

    # -- restores -------------------------------------------------------------------------
    def create_restore(self, restore: PostgresPhysicalRestore) -> bool:
        """Insert a new restore; False if one of that name exists (a conflict, as on Kubernetes)."""
        body = restore.to_wire()
        status = body.pop("status", None) or {}
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        key = f"{restore.metadata.namespace}/{restore.metadata.name}"
        replica_key = f"{restore.metadata.namespace}/{restore.spec.replica.name}"
        with self._tx() as db:
            if db.execute("SELECT 1 FROM restores WHERE key = ?", (key,)).fetchone():
                return False
            db.execute(
                "INSERT INTO restores (key, replica_key, body, status) VALUES (?, ?, ?, ?)",
                (key, replica_key, json.dumps(body), json.dumps(status)),
            )
        self._on_change(replica_key, key)
        return True

    def restores(self, replica_key: str | None = None) -> list[PostgresPhysicalRestore]:
        if replica_key is None:
            return self._objects(PostgresPhysicalRestore, "restores")
        return self._objects(PostgresPhysicalRestore, "restores", "replica_key", replica_key)

    def restore(self, key: str) -> PostgresPhysicalRestore | None:
        found = self._objects(PostgresPhysicalRestore, "restores", "key", key)
        return found[0] if found else None

    def patch_restore_status(self, key: str, patch: Mapping[str, Any]) -> None:
        replica_key = self._patch_status("restores", "replica_key", key, patch)
        if replica_key is not None:
            self._on_change(replica_key, key)

    def delete_restore(self, key: str) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT replica_key FROM restores WHERE key = ?", (key,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM restores WHERE key = ?", (key,))
        self._on_change(str(row[0]), key)
        return True

    # -- events ---------------------------------------------------------------------------
    def add_event(
        self, replica_key: str, type_: str, reason: str, note: str, related: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (at, replica_key, type, reason, note, related) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_now(), replica_key, type_, reason, note, related),
            )
            db.execute(
                "DELETE FROM events WHERE replica_key = ? AND id NOT IN "
                "(SELECT id FROM events WHERE replica_key = ? ORDER BY id DESC LIMIT ?)",
                (replica_key, replica_key, EVENTS_KEPT_PER_REPLICA),
            )

    def events(self, replica_key: str, limit: int = 20) -> list[Event]:
        rows = self._db.execute(
            "SELECT at, replica_key, type, reason, note, related FROM events "
            "WHERE replica_key = ? ORDER BY id DESC LIMIT ?",
            (replica_key, limit),
        ).fetchall()
        return [Event(*row) for row in reversed(rows)]

    # -- settings (stable ports and the like) ---------------------------------------------
    def setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def delete_setting(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM settings WHERE key = ?", (key,))
