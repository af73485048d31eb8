"""`pgro run --canopy-url`: canopy decides what to restore, pgro reports the verdict.

The real `pgro run` process, real kopia through the real `pgro canopy-proxy` child (S3 on
moto), real PostgreSQL, and the stub canopy of tests/fixtures/canopy_stub.py, which
checks every body pgro sends.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from pgro.api.secret import KopiaCredentials, S3Location
from pgro.kopia.repository import KopiaRepository
from tests.conftest import Repo, _snapshot
from tests.fixtures.canopy_stub import (
    BACKUP_TYPE,
    GROUP_ID,
    MACHINE_ID,
    REPLICA_ID,
    REPO_PASSWORD,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    CanopyStub,
    Declaration,
    S3Target,
    start_canopy_stub,
)
from tests.fixtures.waiting import wait_for

PGRO = str(Path(sys.executable).parent / "pgro")
BUCKET = "pgro-run-canopy"
# The reference's naming vector: `int-test` for replica 1111… on machine 3333….
NAMESPACE = "int-test-15de9039"
KEY = f"{NAMESPACE}/canopy-replica"


@dataclass(frozen=True)
class CanopyRepo:
    endpoint: str  # http://host:port
    first: str  # a PostgreSQL snapshot ("A")
    second: str  # another one ("B")
    notpg: str  # a tree of files that is not PostgreSQL


@pytest.fixture(scope="module")
def canopy_repo(moto_s3: str, fs_repo: Repo, scratch_root: Path) -> Iterator[CanopyRepo]:
    """A repository on moto protected by the stub's repository password."""
    boto3.client(
        "s3",
        endpoint_url=f"http://{moto_s3}",
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    ).create_bucket(Bucket=BUCKET)
    creds = KopiaCredentials(
        location=S3Location(bucket=BUCKET, region="us-east-1", endpoint=moto_s3, disable_tls=True),
        repository_password=REPO_PASSWORD,
        access_key_id="setup",
        secret_access_key="setup",
    )
    kopia = KopiaRepository(creds, scratch_root / "canopy-kopia-state")
    kopia.create()
    fixtures = scratch_root / "fixtures"
    try:
        first = _snapshot(kopia, fixtures / "clean", "clean", "db-canopy")
        second = _snapshot(kopia, fixtures / "clean", "clean", "db-canopy")
        notpg = _snapshot(kopia, fixtures / "notpg", "notpg", "files-host", path="/data")
    finally:
        kopia.close()
    assert len({first, second, notpg}) == 3
    yield CanopyRepo(f"http://{moto_s3}", first, second, notpg)


@pytest.fixture
def stub(canopy_repo: CanopyRepo) -> Iterator[CanopyStub]:
    with start_canopy_stub(declarations=[], s3=S3Target(bucket=BUCKET)) as s:
        yield s


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    state: Path
    log: Path

    def status(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [PGRO, "status", "--state-dir", str(self.state), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        doc: list[dict[str, Any]] = json.loads(out.stdout)
        return doc

    def replica(self, key: str = KEY) -> dict[str, Any] | None:
        return next((r for r in self.status() if f"{r['namespace']}/{r['name']}" == key), None)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 180) -> Any:
        def running_check() -> Any:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgro run exited: {self.log.read_text()[-3000:]}")
            return check()

        return wait_for(
            what,
            running_check,
            timeout,
            lambda: "log:\n" + self.log.read_text()[-4000:],
            interval=0.3,
            ignore=(StopIteration, KeyError, IndexError, TypeError, subprocess.CalledProcessError),
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


StartRun = Callable[..., Running]


@pytest.fixture
def start_run(scratch: Path, stub: CanopyStub, canopy_repo: CanopyRepo) -> Iterator[StartRun]:
    started: list[Running] = []

    def start(*args: str, grace: float = 600) -> Running:
        state = scratch / "state"
        log = scratch / f"run-{len(started)}.log"
        command = [
            PGRO,
            "run",
            "--state-dir",
            str(state),
            "--tick",
            "0.3",
            "--canopy-url",
            stub.url,
            "--s3-endpoint",
            canopy_repo.endpoint,
            "--canopy-interval",
            "0.5",
            "--canopy-progress-interval",
            "0.2",
            "--canopy-removal-grace",
            str(grace),
            *args,
        ]
        proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        running = Running(proc, state, log)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            assert running.stop() == 0


def restores(entry: dict[str, Any]) -> dict[str, str]:
    return {r["spec"]["snapshot"]: r["status"].get("phase", "Pending") for r in entry["restores"]}


def condition(entry: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in entry["status"]["conditions"] if c["type"] == type_)


def created_restores(run: Running) -> list[str]:
    """Every restore `pgro run` ever created for the canopy replica, from its events."""
    entry = run.replica()
    assert entry is not None
    return [e["related"] for e in entry["events"] if e["reason"] == "RestoreStarted"]


def assert_no_real_keys(root: Path) -> None:
    """kopia, its logs, the job handed to the worker: none holds canopy's S3 keys."""
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for secret in (SECRET_ACCESS_KEY, SESSION_TOKEN):
            assert secret.encode() not in data, f"a real S3 credential is in {path}"


def test_verify_seed_scenario(
    stub: CanopyStub, canopy_repo: CanopyRepo, start_run: StartRun
) -> None:
    """Canopy offers A → restored, Active, success report with health details → torn down,
    verifiedSnapshotId A → canopy stops listing it (once) → offers B → B restored exactly
    once and reported once; A is never restored again."""
    stub.add_declaration(Declaration(snapshot_id=canopy_repo.first, intent="verify"))
    run = start_run()

    run.wait_for(
        "A verified and torn down",
        lambda: (
            (e := run.replica())
            and e["status"].get("verifiedSnapshotId") == canopy_repo.first
            and not e["restores"]
        ),
    )
    assert stub.wait_for(lambda s: bool(s.reports()))
    [report] = stub.reports()
    body = report.body
    assert body["replica_id"] == REPLICA_ID and body["group"] == GROUP_ID
    assert body["server_id"] == MACHINE_ID and "machine_id" not in body
    assert (body["type"], body["intent"]) == (BACKUP_TYPE, "verify")
    assert (body["outcome"], body["replica_healthy"]) == ("success", True)
    assert body["snapshot_id"] == canopy_repo.first and body["postgres_version"] == "15"
    details = body["health_details"]
    assert details["restore_duration_sec"] >= 0
    assert details["sizes"]["myapp"] > 0
    assert set(details["fixes"]) and all(isinstance(v, bool) for v in details["fixes"].values())
    statuses = {c["name"]: c["status"] for c in details["checks"]}
    # The server's health checks, then the data checks of a verify replica's default depth
    # (the fixture keeps no checksums: "not checked", never a failure).
    assert statuses["connect"] == statuses["primary"] == "pass"
    assert statuses["btree"] == "pass" and statuses["checksums"] == "not_checked"
    assert set(statuses.values()) <= {"pass", "not_checked"}
    # The run id the proxy's credentials were issued under is the one reported.
    assert stub.issuance_count(GROUP_ID, BACKUP_TYPE, run_id=body["run_id"]) >= 1
    assert body["s3_received_payload_bytes"] > 0
    # Progress samples were relayed under the same run.
    assert any(p.body["run_id"] == body["run_id"] for p in stub.progress())

    entry = run.replica()
    assert entry is not None
    assert entry["namespace"] == NAMESPACE
    assert "pendingVerificationReports" not in entry["status"]
    assert "currentRestore" not in entry["status"]
    # `once`: canopy no longer lists the entry; nothing restores A again.
    assert stub.worklist() == []
    time.sleep(3)
    assert created_restores(run) == created_restores(run)[:1] and len(created_restores(run)) == 1

    stub.set_snapshot(REPLICA_ID, canopy_repo.second)
    run.wait_for(
        "B verified",
        lambda: (
            (e := run.replica())
            and e["status"].get("verifiedSnapshotId") == canopy_repo.second
            and not e["restores"]
        ),
    )
    stub.wait_for(lambda s: len(s.reports()) == 2)
    time.sleep(3)
    assert len(created_restores(run)) == 2
    assert [r.body["snapshot_id"] for r in stub.reports()] == [
        canopy_repo.first,
        canopy_repo.second,
    ]
    assert run.stop() == 0
    assert_no_real_keys(run.state)


def test_analytics_switches_over_without_teardown(
    stub: CanopyStub, canopy_repo: CanopyRepo, start_run: StartRun
) -> None:
    stub.add_declaration(
        Declaration(
            snapshot_id=canopy_repo.first,
            intent="analytics",
            params={"minimum_ttl": 0, "switchover_grace": 1},
        )
    )
    run = start_run()
    first = run.wait_for(
        "A active",
        lambda: (
            (e := run.replica())
            and e["status"].get("phase") == "Ready"
            and restores(e) == {canopy_repo.first: "Active"}
            and e
        ),
    )
    assert first["status"]["connectionInfo"]["port"] > 0
    stub.set_snapshot(REPLICA_ID, canopy_repo.second)
    run.wait_for(
        "switched over to B, A swept",
        lambda: (e := run.replica()) and restores(e) == {canopy_repo.second: "Active"},
    )
    entry = run.replica()
    assert entry is not None
    assert "verifiedSnapshotId" not in entry["status"]  # long-lived: no teardown
    assert entry["status"]["phase"] == "Ready"
    stub.wait_for(lambda s: len(s.reports()) == 2)
    assert [(r.body["intent"], r.body["outcome"]) for r in stub.reports()] == [
        ("analytics", "success"),
        ("analytics", "success"),
    ]


def test_non_postgres_snapshot_is_reported_failed_and_backs_off(
    stub: CanopyStub, canopy_repo: CanopyRepo, start_run: StartRun
) -> None:
    stub.add_declaration(Declaration(snapshot_id=canopy_repo.notpg, intent="verify"))
    run = start_run()
    stub.wait_for(lambda s: bool(s.reports()), timeout=120)
    [report] = stub.reports()
    assert (report.body["outcome"], report.body["replica_healthy"]) == ("failure", False)
    assert "PostgreSQL" in report.body["error"]
    assert report.body["snapshot_id"] == canopy_repo.notpg
    entry = run.wait_for(
        "failure counted",
        lambda: (e := run.replica()) and e["status"].get("consecutiveRestoreFailures") == 1 and e,
    )
    assert entry["status"]["nextScheduledRestore"]
    assert condition(entry, "LastRestoreFailed")["status"] == "True"
    # A failure does not settle `once`: canopy keeps listing it, pgro waits out its backoff.
    assert len(stub.worklist()) == 1
    time.sleep(5)
    assert len(created_restores(run)) == 1
    assert len(stub.reports()) == 1


def test_canopy_outage_tears_nothing_down_and_reports_later(
    stub: CanopyStub, canopy_repo: CanopyRepo, start_run: StartRun
) -> None:
    stub.add_declaration(Declaration(snapshot_id=canopy_repo.first, intent="verify"))
    run = start_run(grace=0)
    run.wait_for("a restore", lambda: (e := run.replica()) and e["restores"])
    # Canopy goes away: the worklist connection drops, reports answer 503.
    stub.drop_connections("restore-worklist")
    stub.fail("restore-verification", 503)
    pending = run.wait_for(
        "a failed delivery recorded",
        lambda: (
            (e := run.replica())
            and (p := e["status"].get("pendingVerificationReports"))
            and p[0].get("attempts", 0) >= 1
            and p[0]
        ),
    )
    assert "503" in pending["lastError"] and pending["outcome"] == "success"
    assert stub.reports() == []
    time.sleep(3)
    entry = run.replica()
    assert entry is not None  # not removed although nothing lists it any more
    assert entry["status"]["verifiedSnapshotId"] == canopy_repo.first
    stub.clear_failures()
    stub.wait_for(lambda s: bool(s.reports()), timeout=90)
    # Delivered once; then canopy settles the entry and the replica goes (grace 0).
    run.wait_for("replica removed", lambda: run.replica() is None, timeout=60)
    assert len(stub.reports()) == 1
    assert stub.reports()[0].body["snapshot_id"] == canopy_repo.first


def test_credentials_refused_is_a_condition(
    stub: CanopyStub, canopy_repo: CanopyRepo, start_run: StartRun
) -> None:
    stub.add_declaration(Declaration(snapshot_id=canopy_repo.first, intent="verify"))
    stub.fail("restore-credentials", 403)
    run = start_run()
    entry = run.wait_for(
        "the refusal on the replica",
        lambda: (
            (e := run.replica())
            and condition(e, "KopiaSecretValid")["reason"] == "CanopyCredentialsRefused"
            and e
        ),
    )
    refused = condition(entry, "KopiaSecretValid")
    assert refused["status"] == "False"
    assert "403" in refused["message"] and GROUP_ID in refused["message"]
    assert entry["restores"] == []
    stub.clear_failures()
    run.wait_for(
        "credentials accepted and the restore started",
        lambda: (
            (e := run.replica())
            and condition(e, "KopiaSecretValid")["status"] == "True"
            and e["restores"]
        ),
    )


def test_the_broker_keeps_its_port_and_moves_only_when_it_is_taken(
    scratch: Path, stub: CanopyStub
) -> None:
    import socket
    from datetime import UTC, datetime

    from pgro.canopy.client import CanopyClient
    from pgro.runtimes.embedded.canopy import BROKER_PORT_SETTING, CanopyOptions, EmbeddedCanopy
    from pgro.runtimes.embedded.store import Store

    store = Store(scratch / "state.db")

    def start() -> EmbeddedCanopy:
        return EmbeddedCanopy(
            CanopyClient(stub.url), CanopyOptions(), store, clock=lambda: datetime.now(UTC)
        )

    first = start()
    port = first.base_url.rsplit(":", 1)[1]
    first.shutdown()
    again = start()  # a restart: the same port, so surviving proxies still reach it
    assert again.base_url.rsplit(":", 1)[1] == port
    again.shutdown()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(port)))
        squatter.listen()
        moved = start()
        new_port = moved.base_url.rsplit(":", 1)[1]
        moved.shutdown()
    assert new_port != port and store.setting(BROKER_PORT_SETTING) == new_port
    store.close()


def test_an_upgrade_rehearsal_reports_its_migration(
    stub: CanopyStub, canopy_repo: CanopyRepo, start_run: StartRun
) -> None:
    """Canopy's `upgrade` intent through `pgro run --migrator`: the restore migrates with the
    stand-in migrator, verifies, and the report carries the `migration` object canopy files
    under the target's version id."""
    version_id = "55555555-5555-4555-8555-555555555555"
    stub.add_declaration(
        Declaration(
            snapshot_id=canopy_repo.first,
            intent="upgrade",
            application_type="tamanu",
            target_version="2.40.1",
            target_version_id=version_id,
        )
    )
    migrator = Path(__file__).parents[1] / "fixtures" / "fake_migrator.py"
    # Debian's interpreter with psycopg: the PostgreSQL account runs it (see setup.sh).
    run = start_run("--migrator", f"/usr/bin/python3 {migrator} migrate")
    assert stub.wait_for(lambda s: bool(s.reports()), timeout=240)
    [report] = stub.reports()
    body = report.body
    assert (body["intent"], body["outcome"]) == ("upgrade", "success")
    migration = body["migration"]
    assert migration["target_version"] == "2.40.1"
    assert migration["target_version_id"] == version_id
    assert migration["application_type"] == "tamanu"
    assert migration.get("failed_migration") is None
    assert [t["name"] for t in migration["timings"]] == [
        "1721000001-addProbeColumn.js",
        "1721000002-addProbeTable.js",
    ]
    assert migration["data_bytes_after"] > migration["data_bytes_before"] > 0
    assert run.stop() == 0
