"""`migrateTo` through the operator (features.md §2.2) on the fake node: a verify replica's
restore runs the `<restore>-migrate` Job, whose image the node runs as the test-only fake
migrator (`tests/fixtures/fake_migrator.py`), and the result is read back from the restored
database into `status.migrationResult` before the restore moves on.

The Job's shape is asserted as the reference's `tests/migration.rs` does. The fake reaches the
restore through the per-restore Service by name (`DATABASE_URL`), which the node maps to the
restore's pod IP (tests/kube/node.py, "Service names"). Both cases share the module's operator
and the session's snapshot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from lightkube.resources.core_v1 import Event as CoreEvent

from pgro.api.names import LABEL_REPLICA, LABEL_RESTORE
from pgro.api.secret import KopiaCredentials
from pgro.kube.client import KubeApi
from tests.fixtures.fake_migrator import MIGRATIONS, PATIENT
from tests.kube.node import FakeNode
from tests.kube.operator_proc import OperatorProcess, wait_for
from tests.kube.test_operator import _diagnostics, _replica, _s3_secret, _secret_value

pytestmark = pytest.mark.timeout(900)

REPLICA = "rehearse"
VERSION = "2.31.0"
VERSION_ID = "77777777-7777-7777-7777-777777777777"
DATABASE = "myapp"  # the snapshot's application database (tests/fixtures/clusters.py)
# The order the reference gives them: DATABASE_URL references the two before it.
ENV_ORDER = [
    "CONFIG_SYNC_DB_HOST",
    "CONFIG_SYNC_DB_USERNAME",
    "CONFIG_SYNC_DB_PASSWORD",
    "CONFIG_SYNC_DB_NAME",
    "DATABASE_URL",
    "NODE_ENV",
]
# A restore's phases in the order it may pass them.
ORDER = ["Pending", "Restoring", "Ready", "Migrating", "Ready", "Switching", "Active"]


@dataclass
class Seen:
    """Every state a verify replica's restore and its migration Job went through, from
    watches (the restore is torn down about a second after it switched: polling could miss
    it)."""

    restore: str = ""
    phases: list[str] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    job: dict[str, Any] | None = None
    service_while_migrating: bool | None = None
    final: dict[str, Any] | None = None
    ended: threading.Event = field(default_factory=threading.Event)


def _record(admin: KubeApi, ns: str, seen: Seen) -> list[threading.Thread]:
    """Watch the namespace's restores and Jobs into `seen` until the restore moved on
    (Switching or later with a result), failed, or was deleted."""
    restores_rv = admin.list("PostgresPhysicalRestore", namespace=ns).resource_version
    jobs_rv = admin.list("Job", namespace=ns).resource_version

    def restores() -> None:
        for kind, obj in admin.watch(
            "PostgresPhysicalRestore", namespace=ns, resource_version=restores_rv
        ):
            if kind == "DELETED":
                break
            seen.restore = obj["metadata"]["name"]
            status = obj.get("status") or {}
            seen.statuses.append(status)
            phase = status.get("phase")
            if phase and (not seen.phases or seen.phases[-1] != phase):
                seen.phases.append(phase)
            if phase == "Migrating" and seen.service_while_migrating is None:
                seen.service_while_migrating = admin.get("Service", ns, seen.restore) is not None
            if phase == "Failed" or (
                status.get("migrationResult") and phase in ("Switching", "Active")
            ):
                seen.final = obj
                break
        seen.ended.set()

    def jobs() -> None:
        for kind, obj in admin.watch("Job", namespace=ns, resource_version=jobs_rv):
            if obj["metadata"]["name"].endswith("-migrate") and kind != "DELETED":
                seen.job = obj
                return
            if seen.ended.is_set():
                return

    threads = [
        threading.Thread(target=target, name=f"watch-{target.__name__}", daemon=True)
        for target in (restores, jobs)
    ]
    for thread in threads:
        thread.start()
    return threads


def _rehearse(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    ns: str,
    s3_repo: tuple[KopiaCredentials, str],
    version: str,
) -> Seen:
    creds, _ = s3_repo
    seen = Seen()
    _record(admin, ns, seen)
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(
        _replica(
            ns,
            REPLICA,
            "kopia",
            ephemeral=True,
            migrateTo={"version": version, "versionId": VERSION_ID},
        )
    )
    wait_for(
        f"the restore of {REPLICA} to migrate and move on",
        seen.ended.is_set,
        400,
        context=lambda: f"phases {seen.phases}\n{_diagnostics(operator, fake_node)}",
    )
    return seen


def _assert_order(phases: list[str]) -> None:
    """Each phase seen comes after the one before it in a restore's life."""
    at = 0
    for phase in phases:
        assert phase in ORDER[at:], f"{phase} after {phases} (expected order {ORDER})"
        at = ORDER.index(phase, at)


def _assert_no_secret(
    admin: KubeApi, operator: OperatorProcess, ns: str, seen: Seen, secrets: list[str]
) -> None:
    events = [f"{e.reason} {e.message}" for e in admin.client.list(CoreEvent, namespace=ns)]
    log = operator.log_tail(20_000)
    for secret in secrets:
        assert secret
        assert not [s for s in seen.statuses if secret in repr(s)], "a status shows a password"
        assert not [e for e in events if secret in e], "an event shows a password"
        assert secret not in log, "the operator's log shows a password"


def test_the_migration_job_runs_and_its_result_is_read_from_the_database(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    seen = _rehearse(admin, operator, fake_node, ns, s3_repo, VERSION)
    restore = seen.restore
    assert seen.final is not None and seen.final["status"]["phase"] != "Failed", seen.phases
    _assert_order(seen.phases)
    assert "Migrating" in seen.phases
    # The Job's address: the per-restore Service, there while the restore migrates.
    assert seen.service_while_migrating is True

    # The Job, as the reference's tests/migration.rs asserts it.
    job = seen.job
    assert job is not None, f"no Job {restore}-migrate seen while Migrating"
    assert job["spec"]["backoffLimit"] == 0
    owners = job["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"]) for o in owners] == [("PostgresPhysicalRestore", restore)]
    labels = job["metadata"]["labels"]
    assert (labels[LABEL_REPLICA], labels[LABEL_RESTORE]) == (REPLICA, restore)
    pod = job["spec"]["template"]
    # Its pod must not be selected by the restore's Service.
    assert LABEL_RESTORE not in (pod.get("metadata") or {}).get("labels", {})
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False
    (container,) = pod["spec"]["containers"]
    assert container["image"] == f"ghcr.io/beyondessential/tamanu-central:v{VERSION}"
    assert container.get("command") is None, "the image's entrypoint takes the subcommand"
    assert container["args"] == ["migrate"]
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    env = {e["name"]: e for e in container["env"]}
    assert [e["name"] for e in container["env"]] == ENV_ORDER
    assert env["CONFIG_SYNC_DB_NAME"]["value"] == DATABASE
    assert env["CONFIG_SYNC_DB_HOST"]["value"] == restore
    for name, key in (
        ("CONFIG_SYNC_DB_USERNAME", "username"),
        ("CONFIG_SYNC_DB_PASSWORD", "password"),
    ):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": f"{REPLICA}-creds", "key": key}
    assert env["DATABASE_URL"]["value"] == (
        "postgresql://$(CONFIG_SYNC_DB_USERNAME):$(CONFIG_SYNC_DB_PASSWORD)"
        f"@{restore}:5432/{DATABASE}"
    )
    assert env["NODE_ENV"]["value"] == "production"

    # What the fake migrator wrote into logs.migrations, read back from the restore.
    status = seen.final["status"]
    result = status["migrationResult"]
    assert [t["name"] for t in result["timings"]] == list(MIGRATIONS)
    # The fake's durations in whole seconds: its first is 1.2 s plus its DDL's time.
    first, second = (t["elapsedSeconds"] for t in result["timings"])
    assert first >= 1 and second == 2
    assert result["totalElapsedSeconds"] >= 3
    assert result.get("failedMigration") is None and result.get("error") is None
    assert 0 < result["dataBytesBefore"] < result["dataBytesAfter"]
    assert status["migrationJob"] == {"name": f"{restore}-migrate", "phase": "Succeeded"}

    reasons = [e.reason for e in admin.client.list(CoreEvent, namespace=ns)]
    assert "MigrationStarted" in reasons and "MigrationFinished" in reasons
    assert "MigrationFailed" not in reasons
    _assert_no_secret(
        admin,
        operator,
        ns,
        seen,
        [
            _secret_value(admin, ns, f"{REPLICA}-creds", "password"),
            _secret_value(admin, ns, f"{REPLICA}-admin-creds", "password"),
        ],
    )


def test_a_failed_migration_is_a_finding_not_a_failed_restore(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    seen = _rehearse(admin, operator, fake_node, ns, s3_repo, f"{VERSION}-fail")
    assert seen.final is not None
    status = seen.final["status"]
    assert status["phase"] != "Failed", seen.phases
    assert "Failed" not in seen.phases
    _assert_order(seen.phases)

    result = status["migrationResult"]
    assert result["failedMigration"] == MIGRATIONS[1]
    # The first migration applied before the second failed.
    assert [t["name"] for t in result["timings"]] == [MIGRATIONS[0]]
    error = result["error"]
    assert error and "23505" in error and "patients_name_key" in error
    assert PATIENT not in error
    assert PATIENT not in repr(seen.statuses)
    assert status["migrationJob"] == {"name": f"{seen.restore}-migrate", "phase": "Failed"}

    reasons = [e.reason for e in admin.client.list(CoreEvent, namespace=ns)]
    assert "MigrationFailed" in reasons
    _assert_no_secret(
        admin,
        operator,
        ns,
        seen,
        [
            _secret_value(admin, ns, f"{REPLICA}-creds", "password"),
            _secret_value(admin, ns, f"{REPLICA}-admin-creds", "password"),
        ],
    )
