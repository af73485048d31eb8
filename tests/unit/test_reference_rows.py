"""Reference unit tests that pgro covered only in part (issue 17 item 6), each closed here
against the same observable outcome; the rows of docs/reference-parity.md cite them.

One section per reference module: `replica/tests.rs` (the sweep once a persistent-schema
migration settled), `quantity.rs` (an unparsable memory limit), `canopy/intent.rs` (a
manifest URL without a version query), `canopy/verification.rs` (the canopy ids),
`jobs.rs` (a Job with failed pods still retrying), `replica/schema_build.rs` (a recorded
build settles the pair) and `replica/redaction/apply.rs` (what makes a run `partial`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

import pytest

from pgro.api.migration import MigrateTo, MigrationResult, SchemaBuildResult
from pgro.api.names import restore_job_name
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.verification import PendingVerificationReport
from pgro.canopy import reports
from pgro.canopy.materialise import materialise
from pgro.canopy.naming import canopy_labels
from pgro.canopy.wire import WorklistEntry
from pgro.core.observations import WorkState
from pgro.core.plan import DeleteRestore, PointServiceAt, RunSwitchoverStep, SwitchoverStep
from pgro.core.pod_sizing import shm_size_mib
from pgro.kube.client import KubeApi
from pgro.postgres.redaction import MaskFailure, RedactionResult
from pgro.runtimes.kubernetes.migration_job import job_state
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from pgro.runtimes.kubernetes.schema_copy import transfer_of
from tests.fixtures.kube_api import Clock, MemoryApi
from tests.fixtures.manifests import replica as replica_manifest
from tests.fixtures.manifests import restore_doc
from tests.scenarios.builders import NOW, decide, replica, restore, settled_status, stamp

# -- replica/tests.rs: migration_settled_when_no_status, migration_settled_in_terminal_phases


def _sweep(status: dict[str, Any]) -> list[str]:
    """The restores the sweep deletes for a replica with persistent schemas, past its grace
    period, whose schema migration is in `status`."""
    plan = decide(
        replica(
            settled_status(
                currentRestore="fiji-new",
                previousRestore="fiji-old",
                lastRestoreCompletedAt=stamp(NOW - timedelta(minutes=10)),
                phase="Ready",
                **status,
            ),
            persistentSchemas=["reports"],
        ),
        [restore("fiji-old", "k1", "Active"), restore("fiji-new", "k2", "Active")],
    )
    return [s.restore for s in plan.steps if isinstance(s, DeleteRestore)]


def test_a_migration_with_no_status_lets_the_sweep_proceed() -> None:
    """Persistent schemas set, no `schemaMigrationPhase` at all: settled."""
    assert _sweep({}) == ["fiji-old"]


@pytest.mark.parametrize(
    "phase",
    [
        "complete",
        "partial",
        "timeout-skipped",
        "failed: pg_dump: connection refused",
    ],
)
def test_every_terminal_migration_phase_lets_the_sweep_proceed(phase: str) -> None:
    assert _sweep({"schemaMigrationPhase": phase}) == ["fiji-old"]


def test_only_a_running_migration_holds_the_sweep() -> None:
    assert _sweep({"schemaMigrationPhase": "active"}) == []


# -- quantity.rs: shm_unparsable_limit_is_ignored -------------------------------------------


def test_an_unparsable_memory_limit_is_ignored_for_shm() -> None:
    # As a 2Gi request alone: shm 738 MiB, shared_buffers 516 MiB.
    limits = {"requests": {"memory": "2Gi"}, "limits": {"memory": "bogus"}}
    assert shm_size_mib(limits, None) == (738, 516)
    assert shm_size_mib(limits, None) == shm_size_mib({"requests": {"memory": "2Gi"}}, None)


# -- canopy/intent.rs: redaction_spec_without_a_version_query --------------------------------


def _analytics(params: dict[str, Any]) -> WorklistEntry:
    return WorklistEntry.model_validate(
        {
            "replica_id": "11111111-1111-1111-1111-111111111111",
            "group_id": "22222222-2222-2222-2222-222222222222",
            "machine_id": "33333333-3333-3333-3333-333333333333",
            "server_id": "33333333-3333-3333-3333-333333333333",
            "type": "tamanu-postgres",
            "intent": "analytics",
            "name": "site",
            "params": params,
            "snapshot_id": "k000000000000000000000000000000f",
            "snapshot_at": "2026-07-01T00:00:00Z",
            "storage": "s3",
            "bucket": "canopy-int-test",
            "prefix": "",
            "region": "us-east-1",
        }
    )


@pytest.mark.parametrize("query", ["", "   ", None])
def test_a_manifest_url_without_a_version_query(query: str | None) -> None:
    """A URL with no placeholder needs no version: canopy sends the unset query as "" or
    null, and redaction is on without one."""
    spec = materialise(
        _analytics(
            {
                "redaction_manifest_url": "https://docs.example.org/v2.41.0/manifest.json",
                "redaction_version_query": query,
                "redaction_version_fallback_to_base": False,
            }
        )
    ).spec
    assert spec.redaction is not None
    assert spec.redaction.manifest_url == "https://docs.example.org/v2.41.0/manifest.json"
    assert spec.redaction.version_query is None
    assert spec.redaction.version_fallback_to_base is False


# -- canopy/verification.rs: every_absent_id_is_reported_at_once, an_unparsable_id_counts_as_absent

DECLARATION = "pgro.bes.au/declaration-id"
GROUP = "pgro.bes.au/group"
SERVER = "pgro.bes.au/server"


def _labels() -> dict[str, str]:
    return canopy_labels(
        replica_id=UUID("11111111-1111-1111-1111-111111111111"),
        group_id=UUID("22222222-2222-2222-2222-222222222222"),
        server_id=UUID("33333333-3333-3333-3333-333333333333"),
        type="tamanu-postgres",
        intent="verify",
    )


def _ids_refused(labels: dict[str, str]) -> str:
    with pytest.raises(reports.ReportUnsendable) as refused:
        reports.canopy_ids(labels)
    return str(refused.value)


def test_every_absent_id_is_reported_at_once() -> None:
    message = _ids_refused({})
    for key in (DECLARATION, GROUP, SERVER):
        assert f"no {key} label" in message, message


def test_an_unparsable_id_counts_as_absent() -> None:
    labels = _labels()
    labels[SERVER] = "not-a-uuid"
    del labels[DECLARATION]
    message = _ids_refused(labels)
    assert f"label {SERVER}='not-a-uuid' is not a UUID" in message
    assert f"no {DECLARATION} label" in message
    assert GROUP not in message  # only what is wrong is named


def test_a_report_names_every_bad_id_and_is_never_sent() -> None:
    labels = _labels()
    labels[GROUP] = "garbage"
    del labels[SERVER]
    report = PendingVerificationReport.model_validate(
        {
            "restore": "r-1",
            "snapshotId": "k1",
            "outcome": "success",
            "observedAt": "2026-11-27T12:00:00Z",
        }
    )
    with pytest.raises(reports.ReportUnsendable) as refused:
        reports.verification_args(
            replica_manifest("canopy-replica", None, metadata={"labels": labels}), report
        )
    assert GROUP in str(refused.value) and SERVER in str(refused.value)
    assert DECLARATION not in str(refused.value)


# -- jobs.rs: classify_still_active_with_some_failures ----------------------------------------

RETRYING = {"spec": {"backoffLimit": 3}, "status": {"failed": 1, "active": 1}}


def test_a_job_with_failed_pods_but_no_failed_condition_is_still_running() -> None:
    """A pod failed and the Job controller is retrying: only its `Failed` condition ends it."""
    assert job_state(RETRYING) is WorkState.RUNNING
    assert transfer_of(RETRYING, "").state is WorkState.RUNNING
    failed = {
        **RETRYING,
        "status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True"}]},
    }
    assert job_state(failed) is WorkState.FAILED
    # pgro trusts the Job controller's condition, not its own count (reference
    # `classify_failed_by_count` counts: the row is DIVERGES).
    over = {**RETRYING, "status": {"failed": 4}}
    assert job_state(over) is WorkState.RUNNING
    assert transfer_of(over, "").state is WorkState.RUNNING


@pytest.fixture
def operator() -> Iterator[Operator]:
    op = Operator(
        cast(KubeApi, MemoryApi()),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="pgro:test"),
        clock=Clock(),
    )
    try:
        yield op
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def test_the_restore_job_with_failed_pods_is_still_running(operator: Operator) -> None:
    doc = restore_doc("r-20260101-000000", "r", namespace="team-a", metadata={"uid": "u"})
    model = PostgresPhysicalRestore.model_validate(doc)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": restore_job_name(model.name), "namespace": "team-a", "uid": "j"},
        **RETRYING,
    }
    operator.jobs._put(("team-a", restore_job_name(model.name)), job)
    assert operator.observer.work(model).state is WorkState.RUNNING
    job["status"] = {"failed": 4, "conditions": [{"type": "Failed", "status": "True"}]}
    operator.jobs._put(("team-a", restore_job_name(model.name)), job)
    assert operator.observer.work(model).state is WorkState.FAILED


# -- replica/schema_build.rs: what_a_reconcile_has_to_build (Settled) -----------------------


@pytest.mark.parametrize("built", [True, False])
def test_a_recorded_build_settles_the_pair(built: bool) -> None:
    """A build result on the restore, failed or not, means nothing is left to build."""
    switching = restore("fiji-new", "k2", "Switching")
    spec = switching.spec.model_copy(
        update={
            "builder_image": "builder:1",
            "migrate_to": MigrateTo(version="2.1", version_id="v"),
        }
    )
    result = MigrationResult.model_validate(
        {"totalElapsedSeconds": 60, "dataBytesBefore": 1, "dataBytesAfter": 2, "timings": []}
    )
    status = switching.status.model_copy(update={"migration_result": result})
    migrated = switching.model_copy(update={"spec": spec, "status": status})
    waiting = decide(
        replica(settled_status(currentRestore="fiji-old")),
        [restore("fiji-old", "k1", "Active"), migrated],
    )
    assert [s.kind for s in waiting.steps if isinstance(s, RunSwitchoverStep)] == [
        SwitchoverStep.SCHEMA_BUILD
    ]

    build = SchemaBuildResult(
        built=built, error=None if built else "exit 1", total_elapsed_seconds=1
    )
    done = migrated.model_copy(
        update={"status": status.model_copy(update={"schema_build_result": build})}
    )
    plan = decide(
        replica(settled_status(currentRestore="fiji-old")),
        [restore("fiji-old", "k1", "Active"), done],
    )
    assert not [s for s in plan.steps if isinstance(s, RunSwitchoverStep)]
    assert any(isinstance(s, PointServiceAt) for s in plan.steps)


# -- replica/redaction/apply.rs: outcome_is_partial_when_anything_failed ----------------------


def _result(*failures: MaskFailure) -> RedactionResult:
    return RedactionResult(
        columns_attempted=2,
        columns_masked=("public.users.email",),
        tables_attempted=1,
        tables_truncated=(),
        failures=failures,
    )


def test_a_run_is_partial_when_anything_failed() -> None:
    assert not _result().partial
    column = MaskFailure("public.users.phone", "phone", "column not found", column=True)
    table = MaskFailure("public.sync", "truncate", "table not found", column=False)
    only_column = _result(column)
    assert only_column.partial
    assert (only_column.columns_failed, only_column.tables_failed) == (1, 0)
    only_table = _result(table)
    assert only_table.partial
    assert (only_table.columns_failed, only_table.tables_failed) == (0, 1)
