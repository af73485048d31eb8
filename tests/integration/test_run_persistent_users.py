"""`pgro run` end to end with `persistentUsers` (features.md §2.5, reference
`persistent_users.rs`): the role, its credential file and PgBouncer login, across two
switchovers of a read-only replica, and its removal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.run_harness import Backups, StartRun, connect, manifest_for

PU = "tupaia_read"
PERSISTENT = [{"name": PU, "readSchemas": ["public", "nonexistent"], "searchPath": ["public"]}]


def password_of(entry: dict[str, Any], user: str) -> str:
    return str(next(c["password"] for c in entry["credentials"] if c["username"] == user))


def login(entry: dict[str, Any], user: str) -> psycopg.Connection[tuple[Any, ...]]:
    return connect(entry, user=user, autocommit=True)


def test_persistent_user_keeps_its_password_across_switchovers_and_goes_when_removed(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("old")
    manifest = manifest_for(
        scratch / "m.yaml",
        backups,
        schedule="* * * * *",
        switchoverGracePeriod="5s",
        persistentUsers=PERSISTENT,
    )
    run = start_run(manifest)
    run.wait_for(
        "the first restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
    )
    entry = run.replica("orders")
    first = entry["status"]["currentRestore"]
    password = password_of(entry, PU)
    with login(entry, PU) as conn:
        # Unqualified through its search_path; the restore is read-only.
        assert conn.execute("SELECT v FROM marker").fetchone() == ("old",)
        denied = pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied")
        with denied, conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
            conn.execute("INSERT INTO marker VALUES ('no')")
        denied = pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied")
        with denied, conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
            conn.execute("CREATE TABLE public.mine (id int)")
    with login(entry, "analytics") as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert row.fetchone() == (False,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE public.analytics_ddl (id int)")
    notes = [e["note"] for e in entry["events"] if e["reason"] == "PersistentUserSchemaMissing"]
    assert notes and f"{PU}/nonexistent" in notes[0]
    assert password not in run.log.read_text()

    backups.snapshot("new")
    run.wait_for(
        "the switchover to the new snapshot",
        lambda: run.replica("orders")["status"].get("currentRestore") not in (None, first),
        timeout=180,
    )
    entry = run.replica("orders")
    assert password_of(entry, PU) == password  # never rotated
    with login(entry, PU) as conn:
        assert conn.execute("SELECT v FROM marker").fetchone() == ("new",)

    # Removed from the manifest: its credential file goes (and PgBouncer no longer knows it).
    path = next(Path(c["file"]) for c in entry["credentials"] if c["username"] == PU)
    assert path.exists()
    manifest_for(scratch / "m.yaml", backups, schedule="* * * * *", switchoverGracePeriod="5s")
    run.wait_for("the credential file to go", lambda: not path.exists())
    assert PU not in [c["username"] for c in run.replica("orders")["credentials"]]
    assert run.stop() == 0
