"""Redaction as `pgro run`'s switchover step (issue 15, features.md §2.6), end to end: a real
backup, the real `pgro run`, the manifest served from a loopback HTTP server, and the
analytics user reading through the replica's endpoint as a client would.

- The reference's tests/redaction.rs outcomes on the served restore, the read-only hand-over
  (`default_transaction_read_only` on, the analytics role no superuser and unable to write),
  `redactionVersion` and `redactionColumnsApplied`.
- A manifest that is not there (404 without the fallback) fails the step with a
  `RedactionFailed` event while the old, redacted restore keeps serving, and the analytics
  user cannot log in to the held restore's own server; once the manifest appears, the retry
  redacts and switches over.
- The base-version fallback, and a manifest with a column that does not exist and a kind
  that does not fit: `partial`, a Warning, and the rest masked.
- `pgro run` killed (SIGKILL) mid-redaction: nothing unredacted ever serves, and the next
  `pgro run` redacts the restore again before serving it.
"""

from __future__ import annotations

import copy
import json
import re
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.runtimes.embedded.store import Store
from tests.fixtures.manifest_server import FIXTURE_MANIFEST, ManifestServer, Slow, manifest_server
from tests.fixtures.run_harness import (
    Backups,
    Running,
    StartRun,
    connect,
    manifest_for,
    marker,
    phases,
)
from tests.integration.test_redaction import ORIGINAL_EMAILS, ORIGINAL_VALUES, USERS

VERSION_QUERY = "SELECT value FROM local_system_facts WHERE key = 'currentVersion'"
ORIGINAL_PHONES = {f"+61 400 111 00{i}" for i in range(1, 6)}
# A value written only into the second snapshot: it must never be seen anywhere.
SECOND_EMAIL = "zed.second@example.com"


def _redaction(server: ManifestServer, **extra: Any) -> dict[str, Any]:
    return {
        "manifestUrl": server.url("/v{version}/manifest.json"),
        "versionQuery": VERSION_QUERY,
        **extra,
    }


def _status(run: Running) -> dict[str, Any]:
    status: dict[str, Any] = run.replica("orders")["status"]
    return status


def _serving(run: Running, what: str, timeout: float = 240) -> dict[str, Any]:
    run.wait_for(what, lambda: _status(run).get("phase") == "Ready", timeout=timeout)
    return run.replica("orders")


def _assert_redacted(entry: dict[str, Any]) -> None:
    """The reference's tests/redaction.rs outcomes, read as the analytics user."""
    with connect(entry) as conn:
        rows = conn.execute(
            "SELECT email, full_name, single_name, phone, heart_rate, unmasked FROM users "
            "ORDER BY id"
        ).fetchall()
        assert len(rows) == 6
        emails = [r[0] for r in rows]
        assert all("@" in e for e in emails)
        assert not set(emails) & (ORIGINAL_EMAILS | {SECOND_EMAIL})
        full = [r[1] for r in rows[:5]]
        assert not set(full) & {"Alice Apple", "Bob Banana", "Carol Cherry", "Dave Date"}
        assert all(" " in name for name in full)  # two words stay two words
        assert rows[5][1] is None and rows[5][2] is None  # NULLs kept
        for (phone,) in [(r[3],) for r in rows[:5]]:
            assert re.fullmatch(r"\+6\*\*\*\*\d\d", phone), phone
        assert all(50 <= r[4] <= 100 for r in rows[:5])
        assert [r[5] for r in rows] == [f"keep-{i}" for i in range(1, 7)]
        assert conn.execute("SELECT count(*) FROM sync_lookup").fetchone() == (0,)
        # The read-only hand-over: read-only by default, and not a superuser.
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
    with connect(entry, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE users SET email = 'back@example.com'")


def _no_original_value(run: Running) -> None:
    """Nothing of the original values in status, events or the log."""
    text = json.dumps(run.status()) + run.log.read_text(errors="replace")
    for value in [*ORIGINAL_VALUES, SECOND_EMAIL, *ORIGINAL_PHONES]:
        assert value not in text, value


def test_a_redacted_restore_serves_and_a_failed_redaction_never_does(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("one", [USERS])
    with manifest_server() as server:
        server.put_json("/v1.0.0/manifest.json", FIXTURE_MANIFEST)
        manifest = manifest_for(
            scratch / "m.yaml",
            backups,
            schedule="* * * * *",
            switchoverGracePeriod="5s",
            redaction=_redaction(server),
        )
        run = start_run(manifest)
        entry = _serving(run, "the first, redacted restore to serve")
        serving = entry["status"]["currentRestore"]
        status = entry["status"]
        assert status["redactionPhase"] == "complete"
        assert status["redactionRestore"] == serving
        assert status["redactionVersion"] == "1.0.0"
        assert status["redactionColumnsApplied"] == 6
        _assert_redacted(entry)
        reasons = [e["reason"] for e in entry["events"]]
        assert "RedactionCompleted" in reasons

        # The next snapshot names a version whose manifest is not there (404, no fallback).
        backups.snapshot(
            "two",
            [
                "UPDATE local_system_facts SET value = '1.0.3'",
                f"UPDATE users SET email = '{SECOND_EMAIL}' WHERE id = 1",
            ],
        )
        run.wait_for(
            "the redaction of the second restore to fail",
            lambda: (
                str(_status(run).get("redactionPhase", "")).startswith("failed:")
                and _status(run).get("redactionRestore") != serving
            ),
            timeout=240,
        )
        entry = run.replica("orders")
        assert "404" in entry["status"]["redactionPhase"], entry["status"]
        assert "/v1.0.3/manifest.json" in entry["status"]["redactionPhase"]
        assert "RedactionFailed" in [e["reason"] for e in entry["events"]]
        # The old, redacted restore keeps serving; the new one holds, unserved.
        assert entry["status"]["currentRestore"] == serving
        assert marker(entry) == "one"
        [held] = [n for n, p in phases(entry).items() if n != serving]
        assert phases(entry)[held] == "Switching"
        _assert_redacted(entry)
        # Its own server runs (reached over its private socket), but no user may log in to
        # it unredacted: the analytics role is held NOLOGIN until the redaction.
        store = Store(run.state / "state.db")
        port = int(store.setting(f"server-port/default/{held}") or 0)
        socket_dir = store.setting(f"server-socket/default/{held}")
        store.close()
        analytics = next(c for c in entry["credentials"] if c["username"] == "analytics")
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            psycopg.connect(
                host=socket_dir,
                port=port,
                user="analytics",
                password=analytics["password"],
                dbname="myapp",
                connect_timeout=5,
            )

        # The manifest appears: the retry (with backoff) redacts and switches over.
        server.put_json("/v1.0.3/manifest.json", FIXTURE_MANIFEST)
        run.wait_for(
            "the switchover to the redacted second restore",
            lambda: _status(run).get("currentRestore") == held,
            timeout=180,
        )
        entry = run.replica("orders")
        assert entry["status"]["redactionVersion"] == "1.0.3"
        assert marker(entry) == "two"
        _assert_redacted(entry)
        _no_original_value(run)
        assert run.stop() == 0


def test_the_base_version_fallback_and_a_partial_manifest(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("one", [USERS, "UPDATE local_system_facts SET value = '1.0.3'"])
    document = copy.deepcopy(FIXTURE_MANIFEST)
    columns = document["sources"]["source.app.app.users"]["columns"]
    columns["no_such_column"] = {"meta": {"masking": "email"}}
    columns["id"] = {"meta": {"masking": "phone"}}  # a kind that does not fit an integer
    with manifest_server() as server:
        server.put_json("/v1.0.0/manifest.json", document)
        manifest = manifest_for(
            scratch / "m.yaml",
            backups,
            schedule="0 0 1 1 *",
            redaction=_redaction(server, versionFallbackToBase=True),
        )
        run = start_run(manifest)
        entry = _serving(run, "the partially redacted restore to serve")
        assert server.requested[:2] == ["/v1.0.3/manifest.json", "/v1.0.0/manifest.json"]
    status = entry["status"]
    assert status["redactionPhase"] == "partial"
    assert status["redactionVersion"] == "1.0.0"  # the base version's manifest
    assert status["redactionColumnsApplied"] == 6  # of 8: two counted failures
    [partial] = [e for e in entry["events"] if e["reason"] == "RedactionPartial"]
    assert partial["type"] == "Warning"
    assert "no_such_column" in partial["note"] and "phone" in partial["note"]
    _assert_redacted(entry)
    _no_original_value(run)
    assert run.stop() == 0


def test_a_pgro_run_killed_mid_redaction_never_serves_unredacted(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("one", [USERS])
    body = json.dumps(FIXTURE_MANIFEST).encode()
    with manifest_server() as server:
        # The first fetch drips for a minute: pgro run is killed while it redacts.
        server.routes["/v1.0.0/manifest.json"] = Slow(body, pieces=60, pause_s=1.0)
        manifest = manifest_for(
            scratch / "m.yaml", backups, schedule="0 0 1 1 *", redaction=_redaction(server)
        )
        state = scratch / "state"
        first = start_run(manifest, state=state)
        first.wait_for(
            "the redaction to be under way",
            lambda: (
                _status(first).get("redactionPhase") == "active"
                and "/v1.0.0/manifest.json" in server.requested
            ),
            timeout=240,
        )
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        # Nothing serves: the endpoint never moved to the unredacted restore.
        entry = first.replica("orders")
        assert entry["status"].get("currentRestore") is None
        assert entry["status"]["redactionPhase"] == "active"

        server.put_json("/v1.0.0/manifest.json", FIXTURE_MANIFEST)
        second = start_run(manifest, state=state)
        entry = _serving(second, "the restore to serve once redacted again")
        assert entry["status"]["redactionPhase"] == "complete"
        _assert_redacted(entry)
        assert second.stop() == 0
