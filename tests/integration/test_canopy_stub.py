"""The stub canopy itself, driven with plain httpx (not pgro's client): routes on both mounts,
body encodings, worklist rules (advertised intents, params, field styles, migrate, redact,
`once`), credentials, report and progress validation, failure injection, mTLS and the
`/_stub` control API."""

from __future__ import annotations

import gzip
import json
import ssl
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.fixtures.canopy_stub import (
    GROUP_ID,
    MACHINE_ID,
    PGRO_DESCRIPTORS,
    REPLICA_ID,
    SNAPSHOT_ID,
    CanopyStub,
    Declaration,
    S3Target,
    StubCredentials,
    start_canopy_stub,
)

TYPE = "tamanu-postgres"
OTHER_GROUP = "44444444-4444-4444-4444-444444444444"
RUN_ID = "55555555-5555-4555-8555-555555555555"
MOUNTS = ["", "/public"]


def report(**overrides: Any) -> dict[str, Any]:
    """A valid newest-shape verification for the default `int-test` declaration."""
    body: dict[str, Any] = {
        "replica_id": REPLICA_ID,
        "group": GROUP_ID,
        "server_id": MACHINE_ID,
        "type": TYPE,
        "intent": "verify",
        "snapshot_id": SNAPSHOT_ID,
        "outcome": "success",
        "replica_healthy": True,
        "postgres_version": "16",
        "observed_at": "2026-07-01T00:10:00Z",
        "s3_sent_raw_bytes": 0,
        "s3_sent_payload_bytes": 0,
        "s3_received_raw_bytes": 1234,
        "s3_received_payload_bytes": 1200,
        "health_details": {"restore_duration_sec": 42, "sizes": {"app": 8192}},
        "run_id": RUN_ID,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def progress(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "run_id": RUN_ID,
        "type": TYPE,
        "purpose": "restore",
        "s3_sent_raw_bytes": 10,
        "s3_sent_payload_bytes": 8,
        "s3_received_raw_bytes": 1000,
        "s3_received_payload_bytes": 900,
        "extra": {},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def creds_request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"group": GROUP_ID, "type": TYPE}
    body.update(overrides)
    return body


def assert_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = r.json()
    assert doc["type"] == f"/errors/{slug}"
    assert doc["status"] == status
    assert isinstance(doc["title"], str) and doc["title"]
    assert isinstance(doc["detail"], str) and doc["detail"]
    return doc


@pytest.fixture
def stub() -> Iterator[CanopyStub]:
    with start_canopy_stub() as s:
        yield s


@pytest.fixture
def http(stub: CanopyStub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stub.url, timeout=10) as client:
        yield client


def advertise(http: httpx.Client, prefix: str = "") -> None:
    r = http.post(f"{prefix}/restore-capabilities", json={"intents": PGRO_DESCRIPTORS})
    assert r.status_code == 204 and r.content == b""


# --- routes and mounts -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/public/servers", "/servers"])
def test_servers_probe_answers_empty_list(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 200
    assert r.json() == []


@pytest.mark.parametrize("prefix", MOUNTS)
def test_every_route_works_on_both_mounts(
    stub: CanopyStub, http: httpx.Client, prefix: str
) -> None:
    advertise(http, prefix)
    entries = http.get(f"{prefix}/restore-worklist").json()
    assert [e["name"] for e in entries] == ["int-test"]

    r = http.post(f"{prefix}/restore-credentials", json=creds_request(run_id=RUN_ID))
    assert r.status_code == 200
    assert r.json()["repo_password"] == "stub-repo-password"

    r = http.post(f"{prefix}/backup-progress", json=progress())
    assert r.status_code == 204
    r = http.post(f"{prefix}/restore-verification", json=report())
    assert r.status_code == 204

    mount = "public" if prefix else "root"
    assert [c.mount for c in stub.capability_posts()] == [mount]
    assert [(i.group, i.type, i.run_id, i.mount) for i in stub.issuances()] == [
        (GROUP_ID, TYPE, RUN_ID, mount)
    ]
    assert [p.body for p in stub.progress()] == [progress()]
    assert [(x.body, x.mount, x.resolved_name) for x in stub.reports()] == [
        (report(), mount, "int-test")
    ]
    assert {r.mount for r in stub.requests()} == {mount}


def test_root_and_public_worklists_are_identical(http: httpx.Client) -> None:
    advertise(http)
    assert http.get("/restore-worklist").json() == http.get("/public/restore-worklist").json()


def test_unknown_route_and_wrong_method_are_problems(http: httpx.Client) -> None:
    assert_problem(http.get("/public/restore-everything"), 404, "resource-not-found")
    r = http.get("/restore-credentials")
    assert_problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == "POST"


# --- request bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", MOUNTS)
def test_gzip_bodies_are_decoded(stub: CanopyStub, http: httpx.Client, prefix: str) -> None:
    # pgro gzips bodies of 1 KiB and more: make one that large.
    body = report(health_details={"sizes": {f"db{i}": i for i in range(200)}})
    raw = json.dumps(body).encode()
    assert len(raw) >= 1024
    r = http.post(
        f"{prefix}/restore-verification",
        content=gzip.compress(raw),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 204, r.text
    assert stub.reports()[0].body == body
    record = stub.requests("restore-verification")[0]
    assert record.headers["content-encoding"] == "gzip"
    assert record.body_bytes < len(raw)


def test_deflate_bodies_are_decoded(stub: CanopyStub, http: httpx.Client) -> None:
    r = http.post(
        "/restore-capabilities",
        content=zlib.compress(json.dumps({"intents": ["verify"]}).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "deflate"},
    )
    assert r.status_code == 204
    assert list(stub.advertised()) == ["verify"]


def test_undecodable_or_unsupported_bodies_are_refused(
    stub: CanopyStub, http: httpx.Client
) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    r = http.post("/restore-verification", content=b"not gzip at all", headers=headers)
    assert_problem(r, 400, "bad-request")
    r = http.post(
        "/restore-verification", content=b"\x1b\x00", headers={**headers, "Content-Encoding": "br"}
    )
    assert_problem(r, 415, "unsupported-media-type")
    r = http.post(
        "/restore-verification",
        content=json.dumps(report()),
        headers={"Content-Type": "text/plain"},
    )
    assert_problem(r, 415, "unsupported-media-type")
    r = http.post(
        "/restore-verification", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_problem(r, 400, "bad-request")
    assert stub.reports() == []


# --- capabilities and the worklist ---------------------------------------------------------


def test_worklist_only_lists_advertised_intents(stub: CanopyStub, http: httpx.Client) -> None:
    assert http.get("/restore-worklist").json() == []
    r = http.post("/restore-capabilities", json={"intents": [PGRO_DESCRIPTORS[2]]})
    assert r.status_code == 204
    assert http.get("/restore-worklist").json() == []  # verify is a gap now
    advertise(http)
    assert len(http.get("/restore-worklist").json()) == 1
    # Advertising replaces the set wholesale.
    http.post("/restore-capabilities", json={"intents": [PGRO_DESCRIPTORS[1]]})
    assert http.get("/restore-worklist").json() == []
    assert set(stub.advertised()) == {"upgrade"}
    assert len(stub.capability_posts()) == 3


def test_newest_entry_has_exactly_the_reference_fields(http: httpx.Client) -> None:
    advertise(http)
    assert http.get("/restore-worklist").json() == [
        {
            "replica_id": REPLICA_ID,
            "group_id": GROUP_ID,
            "machine_id": MACHINE_ID,
            "server_id": MACHINE_ID,
            "type": TYPE,
            "intent": "verify",
            "name": "int-test",
            "overdue_after_seconds": None,
            "params": {},
            "snapshot_id": SNAPSHOT_ID,
            "snapshot_at": "2026-07-01T00:00:00Z",
            "storage": "s3",
            "bucket": "canopy-int-test",
            "prefix": "",
            "region": "us-east-1",
            "target_version": None,
            "target_version_id": None,
        }
    ]


def test_old_field_styles_for_lenient_clients(stub: CanopyStub, http: httpx.Client) -> None:
    advertise(http)
    stub.update_declaration(REPLICA_ID, overdue_after_seconds=86400)
    stub.set_field_style("middle")
    (middle,) = http.get("/restore-worklist").json()
    assert "machine_id" not in middle and middle["server_id"] == MACHINE_ID
    assert middle["overdue_after_seconds"] == 86400 and middle["params"] == {}
    assert middle["target_version"] is None

    stub.set_field_style("oldest")
    (oldest,) = http.get("/restore-worklist").json()
    assert set(oldest) == {
        "replica_id",
        "group_id",
        "server_id",
        "type",
        "intent",
        "name",
        "freshness_seconds",
        "snapshot_id",
        "snapshot_at",
        "storage",
        "bucket",
        "prefix",
        "region",
    }
    assert oldest["freshness_seconds"] == 86400


def test_params_are_set_value_else_default_else_null(stub: CanopyStub, http: httpx.Client) -> None:
    stub.set_declarations(
        [
            Declaration(
                replica_id=str(uuid.uuid4()),
                intent="analytics",
                name="nauru analytics",
                params={"expose": True, "minimum_ttl": 600, "redaction_manifest_url": "x"},
            )
        ]
    )
    advertise(http)
    (entry,) = http.get("/restore-worklist").json()
    params = entry["params"]
    assert set(params) == set(PGRO_DESCRIPTORS[2]["params"])  # one key per advertised param
    assert len(params) == 16
    assert params["expose"] is True
    assert params["minimum_ttl"] == 600
    assert params["switchover_grace"] == 120  # declared default
    assert params["storage_size_maximum"] is None  # no default
    # Canopy owns the redaction params: null when the declaration does not redact.
    assert params["redaction_manifest_url"] is None
    assert params["redaction_version_fallback_to_base"] is None
    assert "application_type" not in entry


def test_redacting_declarations_take_the_manifest_or_are_skipped(
    stub: CanopyStub, http: httpx.Client
) -> None:
    manifest = {
        "redaction_manifest_url": "https://example.test/manifest.json",
        "redaction_version_query": "select version from meta",
        "redaction_version_fallback_to_base": True,
    }
    with_manifest = Declaration(
        replica_id=str(uuid.uuid4()), intent="analytics", name="a", redact=True, redaction=manifest
    )
    without = Declaration(
        replica_id=str(uuid.uuid4()),
        machine_id=str(uuid.uuid4()),
        intent="analytics",
        name="b",
        redact=True,
    )
    stub.set_declarations([with_manifest, without])
    advertise(http)
    (entry,) = http.get("/restore-worklist").json()
    assert entry["name"] == "a"
    assert {k: entry["params"][k] for k in manifest} == manifest


def test_string_list_capabilities_give_no_params_and_no_once(
    stub: CanopyStub, http: httpx.Client
) -> None:
    r = http.post("/restore-capabilities", json={"intents": ["verify", "analytics-dev"]})
    assert r.status_code == 204
    (entry,) = http.get("/restore-worklist").json()
    assert entry["params"] == {}
    assert http.post("/restore-verification", json=report()).status_code == 204
    assert len(http.get("/restore-worklist").json()) == 1  # no semantics advertised


@pytest.mark.parametrize(
    ("intents", "fragment"),
    [
        ([{"description": "no name"}], "intent: required"),
        ([{"intent": "a", "params": {"p": {"type": "colour"}}}], "params.p.type"),
        ([{"intent": "a", "params": {"p": {"type": "duration", "default": -1}}}], "default"),
        ([{"intent": "a", "params": {"p": {"type": "boolean", "default": "no"}}}], "default"),
        ([{"intent": "a", "semantics": "once"}], "semantics"),
        ([{"intent": "a"}, {"intent": "a"}], "twice"),
        ([{"intent": "a", "colour": "red"}], "unknown field"),
        ("verify", "intents"),
    ],
)
def test_invalid_capabilities_are_refused(
    stub: CanopyStub, http: httpx.Client, intents: Any, fragment: str
) -> None:
    advertise(http)
    r = http.post("/restore-capabilities", json={"intents": intents})
    doc = assert_problem(r, 400, "bad-request")
    assert fragment in doc["detail"]
    assert set(stub.advertised()) == {"verify", "upgrade", "analytics"}  # unchanged


def test_disabled_not_ready_and_duplicate_declarations_are_not_listed(
    stub: CanopyStub, http: httpx.Client
) -> None:
    other = Declaration(replica_id=str(uuid.uuid4()), group_id=OTHER_GROUP, name="other")
    twin = Declaration(replica_id=str(uuid.uuid4()))  # same machine and name as int-test
    stub.set_declarations([Declaration(), other, twin])
    advertise(http)
    names = [(e["replica_id"], e["name"]) for e in http.get("/restore-worklist").json()]
    assert names == [(REPLICA_ID, "int-test"), (other.replica_id, "other")]

    stub.set_group_ready(OTHER_GROUP, False)
    assert [e["name"] for e in http.get("/restore-worklist").json()] == ["int-test"]
    # A disabled declaration does not hold its (machine, name) slot.
    stub.update_declaration(REPLICA_ID, enabled=False)
    assert [e["replica_id"] for e in http.get("/restore-worklist").json()] == [twin.replica_id]
    stub.update_declaration(twin.replica_id, enabled=False)
    assert http.get("/restore-worklist").json() == []


# --- once suppression ----------------------------------------------------------------------


def test_once_entry_goes_after_a_healthy_report_and_returns_with_a_new_snapshot(
    stub: CanopyStub, http: httpx.Client
) -> None:
    advertise(http)
    failure = report(outcome="failure", replica_healthy=False, error="restore job failed")
    assert http.post("/restore-verification", json=failure).status_code == 204
    assert len(http.get("/restore-worklist").json()) == 1  # a failure settles nothing

    other_snapshot = report(snapshot_id="k1111")
    assert http.post("/restore-verification", json=other_snapshot).status_code == 204
    assert len(http.get("/restore-worklist").json()) == 1  # not the offered snapshot

    no_snapshot = report(snapshot_id=...)
    assert http.post("/restore-verification", json=no_snapshot).status_code == 204
    assert len(http.get("/restore-worklist").json()) == 1

    assert http.post("/restore-verification", json=report()).status_code == 204
    assert http.get("/restore-worklist").json() == []
    assert http.get("/public/restore-worklist").json() == []

    stub.set_snapshot(REPLICA_ID, "k2222")
    (entry,) = http.get("/restore-worklist").json()
    assert entry["snapshot_id"] == "k2222"
    assert entry["snapshot_at"] is not None


def test_once_key_includes_the_declaration_name(stub: CanopyStub, http: httpx.Client) -> None:
    second = Declaration(replica_id=str(uuid.uuid4()), name="second-check")
    stub.set_declarations([Declaration(), second])
    advertise(http)
    assert http.post("/restore-verification", json=report()).status_code == 204
    assert [e["name"] for e in http.get("/restore-worklist").json()] == ["second-check"]


def test_a_report_with_machine_id_settles_too(stub: CanopyStub, http: httpx.Client) -> None:
    advertise(http)
    body = report(server_id=..., machine_id=MACHINE_ID)
    assert http.post("/restore-verification", json=body).status_code == 204
    assert http.get("/restore-worklist").json() == []


def test_intent_without_once_stays_listed(stub: CanopyStub, http: httpx.Client) -> None:
    stub.update_declaration(REPLICA_ID, intent="analytics")
    advertise(http)
    assert http.post("/restore-verification", json=report(intent="analytics")).status_code == 204
    assert len(http.get("/restore-worklist").json()) == 1


def test_migrate_entries_need_a_candidate_and_settle_per_target(
    stub: CanopyStub, http: httpx.Client
) -> None:
    upgrade = Declaration(replica_id=str(uuid.uuid4()), intent="upgrade", name="upgrade-check")
    stub.set_declarations([upgrade])
    advertise(http)
    assert http.get("/restore-worklist").json() == []  # no candidate version

    version_id = str(uuid.uuid4())
    stub.update_declaration(
        upgrade.replica_id,
        application_type="tamanu-central",
        target_version="2.41.0",
        target_version_id=version_id,
    )
    (entry,) = http.get("/restore-worklist").json()
    assert entry["application_type"] == "tamanu-central"
    assert (entry["target_version"], entry["target_version_id"]) == ("2.41.0", version_id)

    migration = {
        "target_version_id": version_id,
        "application_type": "tamanu-central",
        "total_elapsed_seconds": 12,
        "failed_migration": "20260701-add-things",
        "data_bytes_before": 100,
        "data_bytes_after": 120,
        "timings": [{"name": "20260701-add-things", "elapsed_seconds": 12}],
    }
    failed = report(
        replica_id=upgrade.replica_id,
        intent="upgrade",
        outcome="failure",
        replica_healthy=False,
        migration=migration,
    )
    assert http.post("/restore-verification", json=failed).status_code == 204
    assert http.get("/restore-worklist").json() == []  # a migrate failure settles the pair

    stub.update_declaration(upgrade.replica_id, target_version="2.42.0", target_version_id=None)
    assert [e["target_version"] for e in http.get("/restore-worklist").json()] == ["2.42.0"]


# --- credentials -----------------------------------------------------------------------------


def test_credentials_have_the_reference_shape_and_a_future_expiry(http: httpx.Client) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    r = http.post("/restore-credentials", json=creds_request())
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"credentials", "repo_password"}
    creds = body["credentials"]
    assert set(creds) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert creds["Version"] == 1
    assert creds["AccessKeyId"] == "AKIAIOSFODNN7EXAMPLE"
    assert creds["SessionToken"] == "FQoGZXIvYXdzEXAMPLE"
    assert creds["Expiration"].endswith("Z")
    expiry = datetime.fromisoformat(creds["Expiration"])
    assert before + timedelta(seconds=3599) <= expiry <= datetime.now(UTC) + timedelta(seconds=3600)


def test_credential_expiry_and_keys_are_configurable(s3_target: S3Target) -> None:
    fixed = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)
    creds = StubCredentials(
        access_key_id="real-key",
        secret_access_key="real-secret",
        session_token="tok",
        repo_password="pw",
        expiration=fixed,
    )
    with (
        start_canopy_stub(credentials=creds, s3=s3_target) as stub,
        httpx.Client(base_url=stub.url) as http,
    ):
        body = http.post("/restore-credentials", json=creds_request()).json()
        assert body["credentials"]["Expiration"] == "2099-12-31T23:59:59Z"
        assert body["credentials"]["AccessKeyId"] == "real-key"
        assert body["repo_password"] == "pw"
        advertise(http)
        (entry,) = http.get("/restore-worklist").json()
        assert (entry["bucket"], entry["region"]) == (s3_target.bucket, s3_target.region)
        assert stub.s3.endpoint == s3_target.endpoint

        stub.set_credentials(StubCredentials(ttl=timedelta(seconds=30), mint_unique_keys=True))
        first = http.post("/restore-credentials", json=creds_request()).json()["credentials"]
        second = http.post("/restore-credentials", json=creds_request()).json()["credentials"]
        assert first["AccessKeyId"].startswith("ASIA")
        assert first["AccessKeyId"] != second["AccessKeyId"]
        assert first["SessionToken"] != second["SessionToken"]
        expiry = datetime.fromisoformat(second["Expiration"])
        assert expiry <= datetime.now(UTC) + timedelta(seconds=30)
        assert [i.access_key_id for i in stub.issuances()][1:] == [
            first["AccessKeyId"],
            second["AccessKeyId"],
        ]


@pytest.fixture
def s3_target() -> S3Target:
    return S3Target(bucket="pgro-test-bucket", region="ap-southeast-2", endpoint="127.0.0.1:9")


def test_issuances_are_counted_per_group_type_and_run(stub: CanopyStub, http: httpx.Client) -> None:
    other_run = str(uuid.uuid4())
    for body in [
        creds_request(),
        creds_request(),
        creds_request(run_id=RUN_ID),
        creds_request(run_id=other_run),
    ]:
        assert http.post("/restore-credentials", json=body).status_code == 200
    assert stub.issuance_count(GROUP_ID, TYPE) == 4
    assert stub.issuance_count(GROUP_ID, TYPE, run_id=None) == 2
    assert stub.issuance_count(GROUP_ID, TYPE, run_id=RUN_ID) == 1
    assert stub.issuance_counts() == {
        (GROUP_ID, TYPE, None): 2,
        (GROUP_ID, TYPE, RUN_ID): 1,
        (GROUP_ID, TYPE, other_run): 1,
    }


def test_credentials_refused_when_not_covered_or_not_ready(
    stub: CanopyStub, http: httpx.Client
) -> None:
    r = http.post("/restore-credentials", json=creds_request(group=OTHER_GROUP))
    assert_problem(r, 403, "auth-insufficient-permissions")
    r = http.post("/restore-credentials", json=creds_request(type="tamanu-files"))
    assert_problem(r, 403, "auth-insufficient-permissions")
    stub.update_declaration(REPLICA_ID, enabled=False)  # disabling revokes access
    assert_problem(
        http.post("/restore-credentials", json=creds_request()),
        403,
        "auth-insufficient-permissions",
    )
    stub.update_declaration(REPLICA_ID, enabled=True)
    stub.set_group_ready(GROUP_ID, False)
    assert_problem(http.post("/restore-credentials", json=creds_request()), 409, "conflict")
    assert stub.issuances() == []


@pytest.mark.parametrize(
    "body",
    [
        {"type": TYPE},
        {"group": "not-a-uuid", "type": TYPE},
        {"group": GROUP_ID, "type": 7},
        {"group": GROUP_ID, "type": TYPE, "run_id": "run-1"},
        {"group": GROUP_ID, "type": TYPE, "runId": RUN_ID},
        [GROUP_ID, TYPE],
    ],
)
def test_malformed_credential_requests(stub: CanopyStub, http: httpx.Client, body: Any) -> None:
    assert_problem(http.post("/restore-credentials", json=body), 400, "bad-request")
    assert stub.issuances() == []


# --- reports -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "status", "slug"),
    [
        ({"machine_id": MACHINE_ID}, 400, "bad-request"),  # both machine ids
        ({"server_id": ...}, 400, "bad-request"),  # neither
        ({"replica_id": ...}, 400, "bad-request"),
        ({"observed_at": ...}, 400, "bad-request"),
        ({"observed_at": "2026-07-01 00:10"}, 400, "bad-request"),
        ({"replica_healthy": "true"}, 400, "bad-request"),
        ({"outcome": "ok"}, 400, "bad-request"),
        ({"group": 12}, 400, "bad-request"),
        ({"s3_received_raw_bytes": "1234"}, 400, "bad-request"),
        ({"s3_received_raw_bytes": -1}, 400, "bad-request"),
        ({"run_id": "not-a-uuid"}, 400, "bad-request"),
        ({"serverId": MACHINE_ID}, 400, "bad-request"),  # unknown field
        (
            {
                "migration": {
                    "total_elapsed_seconds": 1,
                    "data_bytes_before": 1,
                    "data_bytes_after": 1,
                    "timings": [],
                }
            },
            400,
            "bad-request",
        ),  # no target
        (
            {
                "migration": {
                    "target_version": "2.41",
                    "total_elapsed_seconds": 1,
                    "data_bytes_before": 1,
                    "data_bytes_after": 1,
                    "timings": [],
                }
            },
            400,
            "bad-request",
        ),  # not semver
        ({"redaction": {"outcome": "most"}}, 400, "bad-request"),
        ({"replica_id": str(uuid.uuid4())}, 404, "resource-not-found"),
        ({"group": OTHER_GROUP}, 403, "auth-insufficient-permissions"),
        ({"type": "tamanu-files"}, 403, "auth-insufficient-permissions"),
    ],
)
def test_invalid_reports_are_refused_and_not_stored(
    stub: CanopyStub, http: httpx.Client, changes: dict[str, Any], status: int, slug: str
) -> None:
    advertise(http)
    assert_problem(http.post("/restore-verification", json=report(**changes)), status, slug)
    assert stub.reports() == []
    assert len(http.get("/restore-worklist").json()) == 1


def test_minimal_and_full_reports_are_accepted(stub: CanopyStub, http: httpx.Client) -> None:
    minimal = {
        "replica_id": REPLICA_ID,
        "group": GROUP_ID,
        "machine_id": MACHINE_ID,
        "type": TYPE,
        "intent": "verify",
        "outcome": "failure",
        "replica_healthy": False,
        "observed_at": "2026-07-01T00:10:00.123456+00:00",
    }
    full = report(
        redaction={"outcome": "partial", "manifest_version": "3", "columns_masked": 5},
        reporting_schema={"target_version": "2.41.0", "built": True, "artifacts": [RUN_ID]},
        health_details={"url": "https://infra-replica-x.example.ts.net", "fixes": {"locale": True}},
    )
    for body in (minimal, full):
        assert http.post("/restore-verification", json=body).status_code == 204
    assert [r.body for r in stub.reports()] == [minimal, full]


def test_retired_declaration_answers_404(stub: CanopyStub, http: httpx.Client) -> None:
    stub.add_declaration(Declaration(replica_id=str(uuid.uuid4()), name="keeps-cover"))
    assert stub.remove_declaration(REPLICA_ID) == 1
    assert_problem(http.post("/restore-verification", json=report()), 404, "resource-not-found")


def test_lenient_mode_accepts_unknown_fields(stub: CanopyStub, http: httpx.Client) -> None:
    stub.configure(strict_fields=False)
    assert http.post("/restore-verification", json=report(future_field=1)).status_code == 204
    assert stub.reports()[0].body["future_field"] == 1


# --- progress ------------------------------------------------------------------------------


def test_progress_is_validated_stored_and_rate_limited(
    stub: CanopyStub, http: httpx.Client
) -> None:
    assert http.post("/backup-progress", json=progress(files_done=3)).status_code == 204
    assert_problem(http.post("/backup-progress", json=progress(run_id=...)), 400, "bad-request")
    assert_problem(http.post("/backup-progress", json=progress(type=...)), 400, "bad-request")
    assert_problem(http.post("/backup-progress", json=progress(bytes_read=-5)), 400, "bad-request")
    assert_problem(
        http.post("/backup-progress", json=progress(sent_raw_bytes=1)), 400, "bad-request"
    )  # the sidecar's field names, not canopy's
    assert [p.body["files_done"] for p in stub.progress()] == [3]

    stub.configure(progress_limit=(2, 300))
    assert http.post("/backup-progress", json=progress()).status_code == 204
    assert http.post("/backup-progress", json=progress()).status_code == 204
    assert_problem(http.post("/backup-progress", json=progress()), 429, "rate-limited")
    assert len(stub.progress()) == 3


# --- failure injection -----------------------------------------------------------------------


def test_rate_limited_with_retry_after_for_n_requests(stub: CanopyStub, http: httpx.Client) -> None:
    stub.fail("restore-credentials", 429, times=2, retry_after=7)
    for _ in range(2):
        r = http.post("/restore-credentials", json=creds_request())
        assert_problem(r, 429, "rate-limited")
        assert r.headers["retry-after"] == "7"
    assert http.post("/restore-credentials", json=creds_request()).status_code == 200
    assert stub.issuance_count() == 1  # failed attempts issue nothing
    assert [r.status for r in stub.requests("restore-credentials")] == [429, 429, 200]
    assert stub.failures() == []


@pytest.mark.parametrize(
    ("status", "slug"),
    [
        (403, "auth-insufficient-permissions"),
        (409, "conflict"),
        (500, "other"),
        (502, "upstream"),
        (503, "backup-rotation-in-progress"),
    ],
)
def test_injected_status_until_cleared(
    stub: CanopyStub, http: httpx.Client, status: int, slug: str
) -> None:
    stub.fail("*", status)
    for _ in range(3):
        assert_problem(http.get("/restore-worklist"), status, slug)
        assert_problem(http.post("/restore-credentials", json=creds_request()), status, slug)
    stub.clear_failures()
    assert http.get("/restore-worklist").status_code == 200
    assert stub.issuances() == []


def test_failures_can_target_one_mount(stub: CanopyStub, http: httpx.Client) -> None:
    stub.drop_connections("servers", mount="public")
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/public/servers")
    assert http.get("/servers").status_code == 200
    stub.fail("restore-worklist", 500, mount="root")
    assert http.get("/public/restore-worklist").status_code == 200
    assert http.get("/restore-worklist").status_code == 500


def test_dropped_connections_for_n_requests(stub: CanopyStub, http: httpx.Client) -> None:
    stub.drop_connections("restore-verification", times=2)
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            http.post("/restore-verification", json=report())
    assert stub.reports() == []
    assert http.post("/restore-verification", json=report()).status_code == 204
    assert [r.status for r in stub.requests("restore-verification")] == [None, None, 204]


def test_offline_refuses_connections_until_online_or_reset(
    stub: CanopyStub, http: httpx.Client
) -> None:
    assert http.get("/public/servers").status_code == 200  # a pooled keep-alive connection
    stub.go_offline()
    with pytest.raises(httpx.TransportError):
        http.get("/public/servers")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stub.url}/servers", timeout=5)
    stub.go_online()
    assert http.get("/public/servers").status_code == 200
    stub.go_offline()
    stub.reset()
    assert httpx.get(f"{stub.url}/servers", timeout=5).status_code == 200


def test_reset_forgets_everything(stub: CanopyStub, http: httpx.Client) -> None:
    advertise(http)
    http.post("/restore-verification", json=report())
    http.post("/restore-credentials", json=creds_request())
    stub.set_declarations([])
    stub.fail("*", 500)
    stub.set_field_style("oldest")
    stub.reset()
    assert stub.reports() == [] and stub.issuances() == [] and stub.requests() == []
    assert stub.advertised() == {} and stub.failures() == []
    assert [d.name for d in stub.declarations()] == ["int-test"]
    advertise(http)
    (entry,) = http.get("/restore-worklist").json()
    assert entry["machine_id"] == MACHINE_ID  # newest style again, once no longer settled


# --- authentication ----------------------------------------------------------------------


def _self_signed(cn: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=6))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def test_root_routes_can_require_a_client_certificate(stub: CanopyStub, http: httpx.Client) -> None:
    stub.configure(require_client_certificate=True)
    assert_problem(http.get("/restore-worklist"), 401, "auth-missing-certificate")
    assert http.get("/servers").status_code == 200  # the probe needs no identity
    assert http.get("/public/restore-worklist").status_code == 200  # tailnet identity

    cert_pem, _ = _self_signed("device.local")
    xfcc = {"x-forwarded-client-cert": f'Hash=abc;Cert="{quote(cert_pem)}"'}
    assert http.get("/restore-worklist", headers=xfcc).status_code == 200
    record = stub.requests("restore-worklist")[-1]
    assert record.client_cn == "device.local"
    assert record.device.startswith("spki:")

    r = http.get("/restore-worklist", headers={"x-forwarded-client-cert": "Cert=garbage"})
    assert_problem(r, 401, "auth-missing-certificate")


def test_mtls_listener_requires_and_records_client_certificates() -> None:
    with start_canopy_stub(tls=True, require_client_certificate=True) as stub:
        # No client certificate: the handshake fails.
        with (
            pytest.raises(httpx.TransportError),
            httpx.Client(base_url=stub.tls_url, verify=stub.client_ssl_context()) as anonymous,
        ):
            anonymous.get("/servers")

        issued = stub.issue_client_certificate("pgro-operator")
        with httpx.Client(base_url=stub.tls_url, verify=stub.client_ssl_context(issued)) as c:
            advertise(c)
            assert len(c.get("/restore-worklist").json()) == 1
        (post,) = stub.capability_posts()
        assert post.client_cn == "pgro-operator"
        assert {r.listener for r in stub.requests()} == {"https"}

        # A self-signed device certificate (pgro's `device.local`), once the test trusts it.
        cert_pem, key_pem = _self_signed("device.local")
        ctx = ssl.create_default_context(cafile=str(stub.ca_cert_path))
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.pem").write_text(cert_pem)
            (Path(d) / "k.pem").write_text(key_pem)
            ctx.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
        with (
            pytest.raises(httpx.TransportError),
            httpx.Client(base_url=stub.tls_url, verify=ctx) as c,
        ):
            c.get("/servers")
        stub.trust_client_certificate(cert_pem)
        with httpx.Client(base_url=stub.tls_url, verify=ctx) as c:
            assert c.post("/restore-credentials", json=creds_request()).status_code == 200
        assert stub.issuances()[-1].device.startswith("spki:")
        assert stub.requests()[-1].client_cn == "device.local"

        # The plain listener still serves the tailnet family.
        assert httpx.get(f"{stub.public_url}/servers").status_code == 200


# --- the HTTP control API ------------------------------------------------------------------


@pytest.mark.parametrize("control", ["/_stub", "/tests"])
def test_http_control_api(stub: CanopyStub, http: httpx.Client, control: str) -> None:
    extra = Declaration(replica_id=str(uuid.uuid4()), machine_id=str(uuid.uuid4()), name="x")
    r = http.put(f"{control}/declarations", json=[Declaration().to_json(), extra.to_json()])
    assert r.status_code == 204
    r = http.put(f"{control}/capabilities", json={"intents": PGRO_DESCRIPTORS})
    assert r.status_code == 204
    assert len(http.get("/restore-worklist").json()) == 2

    r = http.patch(
        f"{control}/declarations/{REPLICA_ID}",
        json={"snapshot_id": "k9", "snapshot_at": "2026-08-01T00:00:00Z"},
    )
    assert r.status_code == 204
    assert http.delete(f"{control}/declarations/{extra.replica_id}").status_code == 204
    assert http.delete(f"{control}/declarations/{extra.replica_id}").status_code == 404
    (entry,) = http.get("/restore-worklist").json()
    assert entry["snapshot_id"] == "k9"

    http.post("/restore-verification", json=report(snapshot_id="k9"))
    http.post("/restore-credentials", json=creds_request(run_id=RUN_ID))
    http.post("/backup-progress", json=progress())
    assert http.get("/restore-worklist").json() == []
    reports = http.get(f"{control}/reports").json()
    assert [r["body"]["snapshot_id"] for r in reports] == ["k9"]
    assert http.get(f"{control}/credentials").json()[0]["run_id"] == RUN_ID
    assert "SecretAccessKey" not in json.dumps(http.get(f"{control}/credentials").json())
    assert len(http.get(f"{control}/progress").json()) == 1
    caps = http.get(f"{control}/capabilities").json()
    assert set(caps["advertised"]) == {"verify", "upgrade", "analytics"} and caps["posts"] == []

    r = http.post(
        f"{control}/failures",
        json={"route": "restore-worklist", "status": 429, "times": 1, "retry_after": 3},
    )
    assert r.status_code == 204
    assert http.get("/restore-worklist").headers["retry-after"] == "3"
    r = http.post(f"{control}/failures", json={"route": "servers", "unreachable": True, "times": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/public/servers")

    assert (
        http.patch(
            f"{control}/settings", json={"field_style": "oldest", "credential_ttl_seconds": 60}
        ).status_code
        == 204
    )
    stub.set_snapshot(REPLICA_ID, "k10")
    assert "freshness_seconds" in http.get("/restore-worklist").json()[0]
    assert_problem(http.patch(f"{control}/settings", json={"colour": "red"}), 400, "bad-request")
    assert_problem(
        http.post(f"{control}/failures", json={"route": "nowhere", "status": 500}),
        400,
        "bad-request",
    )

    assert http.post(f"{control}/reset").status_code == 204
    assert http.get(f"{control}/reports").json() == []
    assert [d["name"] for d in http.get(f"{control}/declarations").json()] == ["int-test"]


# --- the pytest fixture and waiting ------------------------------------------------------------


def test_conftest_fixture_and_wait_for(canopy_stub: CanopyStub) -> None:
    assert canopy_stub.online
    assert not canopy_stub.wait_for(lambda s: bool(s.reports()), timeout=0.2)
    with httpx.Client(base_url=canopy_stub.public_url) as c:
        assert c.post("/restore-verification", json=report()).status_code == 204
    assert canopy_stub.wait_for(lambda s: len(s.reports()) == 1, timeout=5)
