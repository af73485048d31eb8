"""Redaction as the operator's switchover step (issue 15, features.md §2.6) on the fake node:
a real backup in S3 (moto), the real `pgro operator`, the manifest served from a loopback
HTTP server (fetched by the operator process), and the analytics user reading through the
stable Service as a client would.

- The first restore becomes Active only redacted: the reference's tests/redaction.rs
  outcomes through the Service, the read-only hand-over, `redactionVersion`,
  `redactionColumnsApplied`, and the RedactionStarted/RedactionCompleted events.
- A second snapshot whose version has no manifest (404, no fallback): the step fails
  (`redactionPhase` `failed: ...`, a RedactionFailed Warning), the Service keeps selecting
  the old, redacted restore and the held one keeps its analytics login closed; once the
  manifest appears, the retry (after its 30 s backoff) redacts and switches over.
- No original value (emails, names, phones) in the replica's status, the events or the
  operator's log.

One test shares the setup: the two cases run in sequence on the same replica.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from lightkube.resources.core_v1 import Event as CoreEvent

from pgro.api.names import LABEL_RESTORE
from pgro.kopia.repository import KopiaRepository
from pgro.kube.client import KubeApi
from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries
from tests.conftest import s3_credentials
from tests.fixtures.clusters import build_debian_cluster
from tests.fixtures.manifest_server import FIXTURE_MANIFEST, ManifestServer, manifest_server
from tests.fixtures.run_harness import Backups
from tests.integration.test_redaction import ORIGINAL_EMAILS, ORIGINAL_VALUES, USERS
from tests.integration.test_run_redaction import (
    ORIGINAL_PHONES,
    SECOND_EMAIL,
    VERSION_QUERY,
)
from tests.kube.node import FakeNode
from tests.kube.operator_proc import OperatorProcess, wait_for
from tests.kube.test_operator import (
    _active,
    _diagnostics,
    _pod_ip,
    _replica,
    _s3_secret,
    _secret_value,
)
from tests.kube.test_operator_restore_info import _manual_restore

pytestmark = pytest.mark.timeout(900)

BUCKET = "pgro-redaction-bucket"
HELD = "orders-manual"  # the second restore, made by hand from the second snapshot


@pytest.fixture
def s3_backups(
    moto_s3: str, scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Backups]:
    """run_harness's Backups, writing its snapshots to a bucket of their own on moto."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=f"http://{moto_s3}",
        region_name="us-east-1",
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
    ).create_bucket(Bucket=BUCKET)
    source = scratch / "source"
    pgdata = build_debian_cluster(source, binaries, account, scratch)
    (pgdata / "pg_hba.conf").write_text("local all all trust\n")
    (pgdata / "pg_ident.conf").write_text("")
    hand_over(source, account)
    kopia = KopiaRepository(s3_credentials(moto_s3, BUCKET), scratch / "kopia-author")
    kopia.create()
    try:
        # `path` names no filesystem repository here: the snapshots go to the bucket.
        yield Backups(scratch, kopia, source, binaries, account, scratch)
    finally:
        kopia.close()


def _status(admin: KubeApi, ns: str) -> dict[str, Any]:
    status: dict[str, Any] = (admin.get("PostgresPhysicalReplica", ns, "orders") or {}).get(
        "status", {}
    )
    return status


def _selected(admin: KubeApi, ns: str) -> str:
    """The restore the stable Service selects."""
    service = admin.get("Service", ns, "orders")
    assert service is not None
    return str(service["spec"]["selector"][LABEL_RESTORE])


def _events(admin: KubeApi, ns: str) -> list[dict[str, Any]]:
    """The replica's events (through core/v1, as test_operator reads them)."""
    return [
        e.to_dict()
        for e in admin.client.list(CoreEvent, namespace=ns)
        if e.involvedObject.kind == "PostgresPhysicalReplica" and e.involvedObject.name == "orders"
    ]


def _analytics(ip: str, password: str, autocommit: bool = False) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=ip,
        port=5432,
        user="analytics",
        password=password,
        dbname="myapp",
        connect_timeout=5,
        autocommit=autocommit,
    )


def _through_service(fake_node: FakeNode, ns: str) -> str:
    """The IP the stable Service forwards to (the fake node computes its endpoints)."""
    [(ip, port)] = fake_node.service_endpoints(ns, "orders")
    assert port == 5432
    return ip


def _assert_redacted(ip: str, password: str, marker: str) -> None:
    """The reference's tests/redaction.rs outcomes, read as the analytics user."""
    with _analytics(ip, password) as conn:
        assert conn.execute("SELECT v FROM marker").fetchone() == (marker,)
        rows = conn.execute(
            "SELECT email, full_name, single_name, phone, heart_rate, unmasked FROM users "
            "ORDER BY id"
        ).fetchall()
        assert len(rows) == 6
        emails = [str(r[0]) for r in rows]
        assert all("@" in e for e in emails), emails
        assert not set(emails) & (ORIGINAL_EMAILS | {SECOND_EMAIL})
        assert not {r[1] for r in rows[:5]} & {"Alice Apple", "Bob Banana", "Carol Cherry"}
        assert not {r[2] for r in rows[:5]} & {"Alice", "Bob", "Carol", "Dave", "Eve"}
        for phone in (str(r[3]) for r in rows[:5]):
            # The ends kept around the mask: "+6****01".
            assert phone.startswith("+6") and "****" in phone, phone
            assert phone[-2:].isdigit() and phone not in ORIGINAL_PHONES, phone
        assert all(50 <= int(r[4]) <= 100 for r in rows[:5])
        assert rows[5][1:5] == (None, None, None, None)  # NULLs kept
        assert [r[5] for r in rows] == [f"keep-{i}" for i in range(1, 7)]
        assert conn.execute("SELECT count(*) FROM sync_lookup").fetchone() == (0,)
        # The read-only hand-over: read-only by default, and not a superuser.
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
    with _analytics(ip, password, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE users SET email = 'back@example.com'")


def _redaction(server: ManifestServer) -> dict[str, Any]:
    return {"manifestUrl": server.url("/v{version}/manifest.json"), "versionQuery": VERSION_QUERY}


def test_a_restore_serves_only_redacted_and_a_failed_redaction_holds_the_switchover(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    moto_s3: str,
    s3_backups: Backups,
) -> None:
    ns = kube_namespace
    s3_backups.snapshot("one", [USERS])
    with manifest_server() as server:
        server.put_json("/v1.0.0/manifest.json", FIXTURE_MANIFEST)
        admin.create(_s3_secret(ns, "kopia", s3_credentials(moto_s3, BUCKET)))
        # The old restore must keep running while the new one is held.
        admin.create(
            _replica(
                ns, "orders", "kopia", switchoverGracePeriod="30m", redaction=_redaction(server)
            )
        )

        # 1. The first restore becomes Active only redacted.
        replica = wait_for(
            "the first, redacted restore",
            lambda: _active(admin, ns, "orders"),
            360,
            context=lambda: _diagnostics(operator, fake_node),
        )
        status = replica["status"]
        first = status["currentRestore"]
        assert status["redactionPhase"] == "complete", status
        assert status["redactionRestore"] == first
        assert status["redactionVersion"] == "1.0.0"
        assert status["redactionColumnsApplied"] == 6
        assert server.requested == ["/v1.0.0/manifest.json"]
        assert _selected(admin, ns) == first
        analytics = _secret_value(admin, ns, "orders-creds", "password")
        _assert_redacted(_through_service(fake_node, ns), analytics, "one")
        events = _events(admin, ns)
        reasons = [e["reason"] for e in events]
        assert "RedactionStarted" in reasons and "RedactionCompleted" in reasons, reasons
        [completed] = [e for e in events if e["reason"] == "RedactionCompleted"]
        assert completed["type"] == "Normal"

        # 2. A second snapshot names a version whose manifest is not there (404, no fallback).
        second = s3_backups.snapshot(
            "two",
            [
                "UPDATE local_system_facts SET value = '1.0.3'",
                f"UPDATE users SET email = '{SECOND_EMAIL}' WHERE id = 1",
            ],
        )
        admin.create(_manual_restore(ns, replica, second))
        status = wait_for(
            "the redaction of the second restore to fail",
            lambda: (
                found
                if str((found := _status(admin, ns)).get("redactionPhase", "")).startswith(
                    "failed:"
                )
                and found.get("redactionRestore") == HELD
                else None
            ),
            360,
            context=lambda: _diagnostics(operator, fake_node),
        )
        assert "404" in status["redactionPhase"], status
        assert "/v1.0.3/manifest.json" in status["redactionPhase"], status
        failed = [e for e in _events(admin, ns) if e["reason"] == "RedactionFailed"]
        assert failed and all(e["type"] == "Warning" for e in failed), failed
        assert HELD in failed[0]["message"]
        # The old, redacted restore keeps serving; the new one is held, its login closed.
        assert status["currentRestore"] == first
        assert _selected(admin, ns) == first
        held = admin.get("PostgresPhysicalRestore", ns, HELD) or {}
        assert held.get("status", {}).get("phase") == "Switching", held.get("status")
        with pytest.raises(psycopg.OperationalError):
            _analytics(_pod_ip(admin, ns, HELD), analytics).close()
        _assert_redacted(_through_service(fake_node, ns), analytics, "one")

        # The manifest appears: the retry (after its backoff) redacts and switches over.
        server.put_json("/v1.0.3/manifest.json", FIXTURE_MANIFEST)
        replica = wait_for(
            "the switchover to the redacted second restore",
            lambda: (
                found
                if (found := _active(admin, ns, "orders"))
                and found["status"]["currentRestore"] == HELD
                else None
            ),
            240,
            context=lambda: _diagnostics(operator, fake_node),
        )
        status = replica["status"]
        assert status["redactionPhase"] == "complete", status
        assert status["redactionRestore"] == HELD
        assert status["redactionVersion"] == "1.0.3"
        assert status["redactionColumnsApplied"] == 6
        assert _selected(admin, ns) == HELD
        assert server.requested.count("/v1.0.3/manifest.json") >= 2  # failed, then fetched
        _assert_redacted(_through_service(fake_node, ns), analytics, "two")

    # 3. No original value in the status, the events or the operator's log.
    restores = admin.list("PostgresPhysicalRestore", namespace=ns).items
    text = json.dumps([replica, restores, _events(admin, ns)], default=str)
    text += operator.log_path.read_text(errors="replace")
    for value in [*ORIGINAL_VALUES, SECOND_EMAIL, *ORIGINAL_PHONES, "Bob Banana", "Eve Elder"]:
        assert value not in text, value
    for secret in (analytics, _secret_value(admin, ns, "orders-admin-creds", "password")):
        assert secret not in text
