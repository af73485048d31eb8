"""The persistent-schema migration step (`pipeline.schema_migration`) pass by pass, with a
hand-moved clock, a recorded copy and the SQL answers given by the test. The same step runs
against real servers in tests/integration/test_run_schema_migration.py and
tests/kube/test_operator_schema_migration.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.core.observations import WorkState
from pgro.core.plan import EmitEvent, RunSwitchoverStep, SwitchoverStep
from pgro.core.schema_migration import Transfer
from pgro.pipeline.schema_migration import SchemaMigration
from pgro.postgres import schema_migration as sql
from pgro.postgres.schema_migration import Conninfo
from tests.fixtures.manifests import replica

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
BUDGET = timedelta(seconds=60)
SCHEMAS = ("reports", "scratch")


@dataclass
class FakeCopy:
    transfer: Transfer = field(default_factory=Transfer.absent)
    calls: list[str] = field(default_factory=list)
    started: dict[str, Any] = field(default_factory=dict)

    def conninfo_for(self, restore: str) -> Conninfo:
        return lambda dbname: f"{restore}/{dbname}"

    def observe(self) -> Transfer:
        return self.transfer

    def start(self, *, source_db: str, target_db: str, owner: str, schemas: Sequence[str]) -> str:
        self.calls.append("start")
        self.started = {"source_db": source_db, "target_db": target_db, "owner": owner}
        self.started["schemas"] = list(schemas)
        return "orders-schema-migration"

    def discard(self) -> None:
        self.calls.append("discard")


@dataclass
class FakeServers:
    """What the two restores' catalogs answer, and what the step did to them."""

    on_source: list[str]
    on_target: list[str] = field(default_factory=list)
    source_size: int = 5000
    down: bool = False
    done: list[tuple[str, ...]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def reach(conninfo_for: Conninfo) -> str:
            if self.down:
                raise ConnectionError("connection refused")
            return conninfo_for("postgres").partition("/")[0]

        def main_database(conninfo_for: Conninfo) -> str:
            reach(conninfo_for)
            return "app"

        def present(conninfo_for: Conninfo, db: str, schemas: Sequence[str]) -> list[str]:
            have = self.on_source if reach(conninfo_for) == "old" else self.on_target
            return [s for s in schemas if s in have]

        def size(conninfo_for: Conninfo, db: str) -> int:
            reach(conninfo_for)
            return self.source_size

        def prepare(conninfo_for: Conninfo, db: str, schemas: Sequence[str]) -> None:
            self.done.append(("prepare", reach(conninfo_for), *schemas))

        def drop(conninfo_for: Conninfo, db: str, schemas: Sequence[str]) -> None:
            self.done.append(("drop", reach(conninfo_for), *schemas))

        monkeypatch.setattr(sql, "main_database", main_database)
        monkeypatch.setattr(sql, "schemas_present", present)
        monkeypatch.setattr(sql, "database_size", size)
        monkeypatch.setattr(sql, "prepare_target", prepare)
        monkeypatch.setattr(sql, "drop_schemas", drop)


@dataclass
class Pass:
    replica: PostgresPhysicalReplica
    copy: FakeCopy
    patches: list[Mapping[str, Any]] = field(default_factory=list)
    events: list[EmitEvent] = field(default_factory=list)

    def run(self, now: datetime = T0) -> None:
        step = RunSwitchoverStep(
            SwitchoverStep.SCHEMA_MIGRATION, "new", "old", SCHEMAS, budget=BUDGET
        )
        SchemaMigration(
            self.replica,
            step,
            self.copy,
            self.patches.append,
            self.events.append,
            source_snapshot_bytes=1000,
            now=now,
        ).run()

    @property
    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]


def _pass(status: Mapping[str, Any] | None = None, transfer: Transfer | None = None) -> Pass:
    orders = replica(
        "orders", persistentSchemas=list(SCHEMAS), ephemeral=None, status=dict(status or {})
    )
    return Pass(orders, FakeCopy(transfer or Transfer.absent()))


def test_start_prepares_the_target_and_records_active(monkeypatch: pytest.MonkeyPatch) -> None:
    servers = FakeServers(on_source=["reports"])
    servers.install(monkeypatch)
    p = _pass()
    p.run()
    # A leftover copy goes before the target is prepared; every configured schema is dropped
    # there, and only the one the source has is copied.
    assert p.copy.calls == ["discard", "start"]
    assert servers.done == [("prepare", "new", "reports", "scratch")]
    assert p.copy.started == {
        "source_db": "app",
        "target_db": "app",
        "owner": "analytics",
        "schemas": ["reports"],
    }
    assert p.patches == [
        {
            "schemaMigrationJob": "orders-schema-migration",
            "schemaMigrationPhase": "active",
            "persistentSchemaDataSize": "4000",
            "persistentSchemasMissing": ["scratch"],
        }
    ]
    assert p.reasons == ["PersistentSchemaMissingOnSource", "SchemaMigrationStarted"]
    assert "scratch" in p.events[0].note and p.events[0].related == "new"


def test_nothing_on_the_source_completes_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: setting `complete` here is what stopped its 41-restore leak."""
    servers = FakeServers(on_source=[])
    servers.install(monkeypatch)
    p = _pass()
    p.run()
    assert "start" not in p.copy.calls and servers.done == []
    assert p.patches == [
        {
            "schemaMigrationJob": None,
            "schemaMigrationPhase": "complete",
            "persistentSchemasMissing": list(SCHEMAS),
        }
    ]
    assert p.reasons == ["PersistentSchemaMissingOnSource"]


def test_within_the_budget_it_waits_then_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    servers = FakeServers(on_source=list(SCHEMAS))
    servers.install(monkeypatch)
    p = _pass({"schemaMigrationPhase": "active"}, Transfer(WorkState.RUNNING, started_at=T0))
    p.run(T0 + BUDGET)
    assert (p.patches, p.events, p.copy.calls) == ([], [], [])
    p.run(T0 + BUDGET + timedelta(seconds=1))
    assert p.copy.calls == ["discard"]
    assert servers.done == [("drop", "new", *SCHEMAS)]
    assert p.patches == [{"schemaMigrationJob": None, "schemaMigrationPhase": "timeout-skipped"}]
    assert p.reasons == ["SchemaMigrationTimedOut"]


def test_a_timeout_goes_ahead_even_when_the_drop_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    servers = FakeServers(on_source=list(SCHEMAS), down=True)
    servers.install(monkeypatch)
    p = _pass({"schemaMigrationPhase": "active"}, Transfer(WorkState.RUNNING, started_at=T0))
    p.run(T0 + 2 * BUDGET)
    assert p.patches[-1]["schemaMigrationPhase"] == "timeout-skipped"


@pytest.mark.parametrize(
    ("result", "on_target", "phase", "missing", "reason"),
    [
        ("success", ["reports", "scratch"], "complete", None, "SchemaMigrationCompleted"),
        ("partial: 2 statement error(s)", list(SCHEMAS), "partial", None, "SchemaMigrationPartial"),
        ("success", ["reports"], "partial", ["scratch"], "SchemaMigrationPartial"),
    ],
)
def test_a_finished_copy_is_checked_on_the_target(
    monkeypatch: pytest.MonkeyPatch,
    result: str,
    on_target: list[str],
    phase: str,
    missing: list[str] | None,
    reason: str,
) -> None:
    FakeServers(on_source=list(SCHEMAS), on_target=on_target).install(monkeypatch)
    p = _pass({"schemaMigrationPhase": "active"}, Transfer(WorkState.SUCCEEDED, T0, result))
    p.run()
    assert p.patches == [
        {
            "schemaMigrationJob": None,
            "schemaMigrationPhase": phase,
            "persistentSchemasMissing": missing,
        }
    ]
    assert p.reasons == [reason] and p.copy.calls == ["discard"]


def test_a_schema_missing_on_the_source_does_not_make_it_partial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeServers(on_source=["reports"], on_target=["reports"]).install(monkeypatch)
    status = {"schemaMigrationPhase": "active", "persistentSchemasMissing": ["scratch"]}
    p = _pass(status, Transfer(WorkState.SUCCEEDED, T0, "success"))
    p.run()
    assert p.patches[-1]["schemaMigrationPhase"] == "complete"
    assert p.patches[-1]["persistentSchemasMissing"] == ["scratch"]


@pytest.mark.parametrize(
    "transfer",
    [
        Transfer(WorkState.FAILED, T0, failure="pg_dump: connection refused"),
        Transfer.absent(),  # vanished while active: pgro killed, Job deleted
        Transfer(WorkState.SUCCEEDED, T0, "garbled"),
    ],
)
def test_a_failed_copy_is_recorded_and_retried(
    monkeypatch: pytest.MonkeyPatch, transfer: Transfer
) -> None:
    servers = FakeServers(on_source=list(SCHEMAS), on_target=list(SCHEMAS))
    servers.install(monkeypatch)
    p = _pass({"schemaMigrationPhase": "active"}, transfer)
    p.run()
    assert p.patches[-1]["schemaMigrationPhase"].startswith("failed: ")
    assert p.reasons == ["SchemaMigrationFailed"] and p.copy.calls == ["discard"]
    # The next pass starts over (the switchover stays held meanwhile).
    retry = _pass({"schemaMigrationPhase": p.patches[-1]["schemaMigrationPhase"]})
    retry.run()
    assert retry.copy.calls == ["discard", "start"]


def test_an_unreachable_server_leaves_the_phase_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeServers(on_source=list(SCHEMAS), down=True).install(monkeypatch)
    p = _pass()
    with pytest.raises(ConnectionError):
        p.run()
    assert p.patches == [] and "start" not in p.copy.calls
