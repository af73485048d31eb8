"""deploy/monitoring: every alert evaluated against what pgro really exports.

The metrics come from pgro's own registry, as `/metrics` renders it, after real events:
the reconciler shell (the one both runtimes use) runs the core decisions in the scenario
world's simulated time, and canopy reports go through the real courier and canopy client to
the canopy stub over HTTP. Each alert's expression is evaluated by `tests.fixtures.promql`
(a PromQL subset with Prometheus's semantics; an expression it cannot evaluate fails) at the
world's clock, and has a firing and a non-firing case. Every metric name a rule or a
dashboard panel reads must be one pgro exports, so a rename fails here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from datetime import timedelta
from typing import Any, TypeVar
from uuid import UUID

import pytest
import yaml

from pgro.api.replica import PostgresPhysicalReplica
from pgro.canopy.client import CanopyClient
from pgro.canopy.courier import ReportCourier
from pgro.canopy.naming import canopy_labels
from pgro.observability import Metrics, max_data_age
from tests.fixtures.canopy_stub import (
    GROUP_ID,
    MACHINE_ID,
    REPLICA_ID,
    CanopyStub,
    start_canopy_stub,
)
from tests.fixtures.monitoring import (
    KUSTOMIZATION,
    MONITORING,
    ROOT,
    RULE_CR,
    alert,
    dashboard_queries,
    dashboard_variable_metrics,
    replicas,
    rule_groups,
    rules,
    unexported,
)
from tests.fixtures.promql import (
    Evaluator,
    PromQLError,
    Sample,
    Scrape,
    Unsupported,
    parse,
)
from tests.scenarios.world import T0, World, replica_doc, snapshot

ALERTS = {
    "PgroBackupVerificationFailed",
    "PgroRestoresFailingRepeatedly",
    "PgroRestoreFailuresAcrossFleet",
    "PgroReplicaDataStale",
    "PgroReplicaNeverRestored",
    "PgroCanopyReportsRefused",
    "PgroCanopyReportsUndelivered",
    "PgroRedactionIncomplete",
}
CANOPY_TYPE = "tamanu-postgres"
CANOPY = {"group": GROUP_ID, "type": CANOPY_TYPE}

T = TypeVar("T")


# --- real metrics -----------------------------------------------------------------------


def scrape(world: World, metrics: Metrics | None = None) -> Scrape:
    """What Prometheus stores from pgro's `/metrics` at the world's current instant."""
    registry = metrics if metrics is not None else world.shell.metrics
    return Scrape.of(registry.render().decode(), world.now.timestamp())


def created_at_t0(doc: dict[str, Any]) -> dict[str, Any]:
    """As the API server does: the replica's creationTimestamp."""
    doc["metadata"]["creationTimestamp"] = T0.strftime("%Y-%m-%dT%H:%M:%SZ")
    return doc


def run_until(world: World, check: Callable[[], bool], limit: timedelta) -> None:
    deadline = world.now + limit
    while not check():
        assert world.now < deadline, "the world never got there"
        world.run_for(timedelta(minutes=1))


def exported_names() -> frozenset[str]:
    """The metric names in real exposition text after a restore, a failure and the other
    events (a family with no child yet counts by the names its # TYPE line declares)."""
    world = World()
    world.add_snapshot(snapshot("k-good", T0 - timedelta(hours=2)))
    world.add_snapshot(snapshot("k-bad", T0 - timedelta(hours=1)), bad=True)
    world.add_replica(created_at_t0(replica_doc("named", schedule="0 * * * *")))
    world.run_for(timedelta(minutes=30))
    return scrape(world).names


# --- the rules as files -----------------------------------------------------------------


def test_the_rules_file_holds_each_alert_with_a_severity_and_a_description() -> None:
    found = rules()
    assert set(found) == ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name


def test_the_prometheusrule_holds_exactly_the_rules_file_groups() -> None:
    [cr] = list(yaml.safe_load_all(RULE_CR.read_text()))
    assert (cr["apiVersion"], cr["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert cr["metadata"]["namespace"] == "pgro-system"
    assert cr["spec"]["groups"] == rule_groups()


def test_the_kustomization_names_files_that_exist() -> None:
    kust = yaml.safe_load(KUSTOMIZATION.read_text())
    named = list(kust["resources"]) + [
        f for generator in kust["configMapGenerator"] for f in generator["files"]
    ]
    assert sorted(named) == sorted(
        ["servicemonitor.yml", "prometheusrule.yml", "pgro-dashboard.json"]
    )
    for name in named:
        assert (MONITORING / name).is_file(), name
    [monitor] = list(yaml.safe_load_all((MONITORING / "servicemonitor.yml").read_text()))
    service = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text())
        if d and d["kind"] == "Service"
    )
    # The ServiceMonitor finds the operator's Service and its metrics port by name.
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]


def test_every_rule_and_panel_reads_only_metrics_pgro_exports() -> None:
    names = exported_names()
    queries = [r["expr"] for r in rules().values()] + dashboard_queries()
    assert len(dashboard_queries()) >= 10
    assert unexported(queries, names) == []
    assert dashboard_variable_metrics() and all(m in names for m in dashboard_variable_metrics())


def test_the_name_check_catches_a_renamed_metric() -> None:
    names = exported_names()
    assert "postgres_restore_failed_total" in names
    assert "postgres_restore_notifications_failed_total" in names  # declared, no child yet
    renamed = ["sum(increase(postgres_restore_failures_total[1h])) > 0"]
    assert unexported(renamed, names) == [f"postgres_restore_failures_total in {renamed[0]!r}"]


def test_every_rule_evaluates_on_a_real_scrape() -> None:
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=1)))
    world.add_replica(created_at_t0(replica_doc("quiet")))
    world.run_for(timedelta(minutes=10))
    first = scrape(world)
    world.run_for(timedelta(minutes=10))
    evaluator = Evaluator([first, scrape(world)])
    for name, rule in rules().items():
        assert evaluator.query(rule["expr"]) == [], f"{name} fires on a healthy replica"


def test_an_expression_beyond_the_evaluator_fails_instead_of_passing() -> None:
    evaluator = Evaluator([Scrape.of("# TYPE x gauge\nx 1\n", 0.0)])
    for expression in ("absent(x)", "x offset 5m", "topk(1, x)", "x > on (a) group_left y"):
        with pytest.raises(Unsupported):
            evaluator.query(expression)
    with pytest.raises(PromQLError):
        parse("x >")


# --- each alert, firing and not ---------------------------------------------------------


def test_backup_verification_failed_fires_while_the_latest_restore_failed() -> None:
    world = World()
    world.add_snapshot(snapshot("k-bad", T0 - timedelta(hours=1)), bad=True)
    key = world.add_replica(created_at_t0(replica_doc("verify", ephemeral=True)))
    run_until(
        world,
        lambda: world.replica(key).status.consecutive_restore_failures == 1,
        timedelta(hours=1),
    )

    assert replicas(alert("PgroBackupVerificationFailed", scrape(world))) == {
        ("default", "verify"): 1.0
    }

    # A good backup arrives and verifies: the alert resolves.
    world.add_snapshot(snapshot("k-good", world.now - timedelta(minutes=1)))
    run_until(
        world,
        lambda: world.replica(key).status.verified_snapshot_id == "k-good",
        timedelta(hours=2),
    )
    assert alert("PgroBackupVerificationFailed", scrape(world)) == []
    assert world.violations == []


def test_redaction_incomplete_fires_for_a_partial_or_failed_redaction() -> None:
    world = World()
    world.add_snapshot(snapshot("k1", T0 - timedelta(hours=1)))
    key = world.add_replica(
        created_at_t0(replica_doc("masked", redaction={"manifestUrl": "https://m.test/m.json"}))
    )
    world.add_replica(created_at_t0(replica_doc("plain")))
    world.run_for(timedelta(minutes=10))
    # Not redacted yet (held): nothing to alert on; a replica without redaction has no series.
    assert alert("PgroRedactionIncomplete", scrape(world)) == []
    series = {
        dict(labels).get("replica")
        for labels in scrape(world).samples
        if dict(labels)["__name__"] == "postgres_restore_replica_redaction_incomplete"
    }
    assert series == {"masked"}

    world.set_status(key, redactionPhase="failed: manifest 404", redactionRestore="masked-x")
    world.run_for(timedelta(minutes=1))
    assert replicas(alert("PgroRedactionIncomplete", scrape(world))) == {("default", "masked"): 1.0}
    world.set_status(key, redactionPhase="partial")
    world.run_for(timedelta(minutes=1))
    assert replicas(alert("PgroRedactionIncomplete", scrape(world))) == {("default", "masked"): 1.0}
    world.set_status(key, redactionPhase="complete")
    world.run_for(timedelta(minutes=1))
    assert alert("PgroRedactionIncomplete", scrape(world)) == []


def test_restores_failing_repeatedly_fires_from_the_third_failure_in_a_row() -> None:
    world = World()
    world.add_snapshot(snapshot("k-bad", T0 - timedelta(hours=1)), bad=True)
    key = world.add_replica(created_at_t0(replica_doc("flaky")))

    def failures() -> int:
        return world.replica(key).status.consecutive_restore_failures or 0

    run_until(world, lambda: failures() == 2, timedelta(hours=1))
    assert alert("PgroRestoresFailingRepeatedly", scrape(world)) == []

    run_until(world, lambda: failures() >= 3, timedelta(hours=1))
    assert replicas(alert("PgroRestoresFailingRepeatedly", scrape(world))) == {
        ("default", "flaky"): float(failures())
    }


@pytest.mark.parametrize("bad", [True, False], ids=["failing", "healthy"])
def test_restore_failures_across_the_fleet_counts_the_last_hour(bad: bool) -> None:
    world = World(limit=3)
    world.add_snapshot(snapshot("k-one", T0 - timedelta(hours=1)), bad=bad)
    for name in ("one", "two", "three"):
        world.add_replica(created_at_t0(replica_doc(name)))
    before = scrape(world)
    world.run_for(timedelta(minutes=50))
    failed = sum(
        world.replica(f"default/{name}").status.consecutive_restore_failures or 0
        for name in ("one", "two", "three")
    )

    result = alert("PgroRestoreFailuresAcrossFleet", before, scrape(world))

    if bad:
        assert failed >= 5
        [sample] = result
        assert sample.value == failed
    else:
        assert failed == 0 and result == []


def test_replica_data_stale_fires_when_the_schedule_brought_nothing_newer() -> None:
    world = World()
    world.add_snapshot(snapshot("k-0", T0 - timedelta(minutes=30)))
    key = world.add_replica(created_at_t0(replica_doc("hourly", schedule="0 * * * *")))
    world.run_for(timedelta(hours=3))  # the schedule fires, but no newer backup exists

    now = scrape(world)
    completed = world.replica(key).status.last_restore_completed_at
    assert completed is not None
    assert replicas(alert("PgroReplicaDataStale", now)) == {
        ("default", "hourly"): world.now.timestamp() - completed.timestamp()
    }
    # Restored, just long ago: not "never restored".
    assert alert("PgroReplicaNeverRestored", now) == []
    assert Evaluator([now]).query("postgres_restore_replica_max_data_age_seconds") == [
        Sample(
            frozenset(
                {
                    ("__name__", "postgres_restore_replica_max_data_age_seconds"),
                    ("namespace", "default"),
                    ("replica", "hourly"),
                    ("job", "pgro"),
                    ("instance", "pgro:8080"),
                }
            ),
            3600.0,
        )
    ]


def test_replica_data_stale_stays_quiet_while_each_fire_restores_a_newer_backup() -> None:
    world = World()
    key = world.add_replica(created_at_t0(replica_doc("hourly", schedule="0 * * * *")))
    for hour in range(3):
        world.add_snapshot(snapshot(f"k-{hour}", world.now))
        world.run_for(timedelta(hours=1))

    restored = [r.spec.snapshot for r in world.restores_of(key)]
    assert "k-2" in restored
    assert alert("PgroReplicaDataStale", scrape(world)) == []


def test_replica_never_restored_fires_once_the_schedule_allowed_time_passed() -> None:
    world = World()  # no backups at all
    world.add_replica(created_at_t0(replica_doc("empty", schedule="0 * * * *")))
    world.run_for(timedelta(minutes=30))
    assert alert("PgroReplicaNeverRestored", scrape(world)) == []

    world.run_for(timedelta(hours=2))
    assert replicas(alert("PgroReplicaNeverRestored", scrape(world))) == {
        ("default", "empty"): (world.now - T0).total_seconds()
    }
    assert alert("PgroReplicaDataStale", scrape(world)) == []


# --- canopy reports ---------------------------------------------------------------------


class Inline(Executor):
    """Runs each delivery at once, in the caller's thread (the courier's pool otherwise)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


@pytest.fixture
def stub() -> Iterator[CanopyStub]:
    with start_canopy_stub() as s:
        yield s


def canopy_world(declaration: str) -> tuple[World, str]:
    """A canopy verify replica that verified a snapshot; its report waits in its status
    (the world delivers nothing)."""
    world = World()
    world.add_snapshot(snapshot("k-first", T0 - timedelta(hours=1)))
    doc = replica_doc(
        "canopy-replica",
        namespace="canopy-verify-1",
        kopiaSecretRef=None,
        canopySource=CANOPY,
        schedule="0 0 * * *",
        ephemeral=True,
    )
    doc["metadata"]["labels"] = canopy_labels(
        replica_id=UUID(declaration),
        group_id=UUID(GROUP_ID),
        server_id=UUID(MACHINE_ID),
        type=CANOPY_TYPE,
        intent="verify",
    )
    key = world.add_replica(created_at_t0(doc))
    world.set_status(key, canopyDesiredSnapshotId="k-first")
    run_until(
        world,
        lambda: world.replica(key).status.verified_snapshot_id == "k-first",
        timedelta(hours=1),
    )
    assert len(world.replica(key).status.pending_verification_reports) == 1
    return world, key


def deliver(world: World, key: str, courier: ReportCourier) -> None:
    """What a runtime does on a canopy replica's pass: step the courier, write the list."""
    for _ in range(2):  # send; then settle the answer
        step = courier.step(world.replica(key))
        if step.reports is not None:
            world.set_status(key, pendingVerificationReports=[r.to_wire() for r in step.reports])
            world.run_for(timedelta(seconds=1))
        courier.settled(step)


def courier_for(stub: CanopyStub, world: World) -> ReportCourier:
    client = CanopyClient(stub.url)
    return ReportCourier(
        client.report_verification, Inline(), lambda: world.now, metrics=world.shell.metrics
    )


def test_canopy_reports_refused_fires_for_a_report_canopy_drops(stub: CanopyStub) -> None:
    world, key = canopy_world(str(uuid.uuid4()))  # a declaration canopy does not know: 404
    before = scrape(world)
    world.run_for(timedelta(minutes=1))
    deliver(world, key, courier_for(stub, world))

    assert world.replica(key).status.pending_verification_reports == []  # dropped for good
    [sample] = alert("PgroCanopyReportsRefused", before, scrape(world))
    assert dict(sample.labels)["outcome"] == "refused" and sample.value == 1.0
    assert stub.reports() == []


def test_canopy_reports_refused_stays_quiet_when_canopy_accepts(stub: CanopyStub) -> None:
    world, key = canopy_world(REPLICA_ID)
    before = scrape(world)
    world.run_for(timedelta(minutes=1))
    deliver(world, key, courier_for(stub, world))

    after = scrape(world)
    assert [r.body["snapshot_id"] for r in stub.reports()] == ["k-first"]
    assert alert("PgroCanopyReportsRefused", before, after) == []
    accepted = Evaluator([before, after]).query(
        'increase(postgres_restore_canopy_reports_total{outcome="accepted"}[1h])'
    )
    assert isinstance(accepted, list) and [s.value for s in accepted] == [1.0]


def test_canopy_reports_undelivered_fires_while_canopy_fails_and_clears_on_acceptance(
    stub: CanopyStub,
) -> None:
    world, key = canopy_world(REPLICA_ID)
    assert alert("PgroCanopyReportsUndelivered", scrape(world)) == []  # just written

    stub.fail("restore-verification", 503)
    courier = courier_for(stub, world)
    deliver(world, key, courier)
    world.run_for(timedelta(minutes=40))
    [pending] = world.replica(key).status.pending_verification_reports
    assert pending.attempts == 1 and "503" in (pending.last_error or "")
    assert replicas(alert("PgroCanopyReportsUndelivered", scrape(world))) == {
        ("canopy-verify-1", "canopy-replica"): world.now.timestamp()
        - pending.observed_at.timestamp()
    }

    stub.clear_failures()
    deliver(world, key, courier)
    assert world.replica(key).status.pending_verification_reports == []
    assert alert("PgroCanopyReportsUndelivered", scrape(world)) == []
    assert len(stub.reports()) == 1


# --- what the schedule allows -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "allowed"),
    [
        ({"schedule": "0 * * * *", "scheduleJitter": "0s"}, 3600.0),
        ({"schedule": "0 */6 * * *", "scheduleJitter": "10m"}, 6 * 3600.0 + 600),
        # Weekdays only: the weekend gap, Friday to Monday, is the longest.
        ({"schedule": "0 2 * * 1-5", "scheduleJitter": "0s"}, 72 * 3600.0),
        ({"schedule": "0 0 1,15 * *", "scheduleJitter": "0s"}, 17 * 86400.0),
        # Fires within minimumTtl are skipped: the next restore waits for the first fire
        # after it ends.
        ({"schedule": "0 * * * *", "scheduleJitter": "0s", "minimumTtl": "4h"}, 5 * 3600.0),
        ({"schedule": "61 * * * *"}, None),
    ],
)
def test_the_allowed_data_age_follows_the_schedule(
    spec: dict[str, Any], allowed: float | None
) -> None:
    replica = PostgresPhysicalReplica.model_validate(replica_doc("r", **spec))
    assert max_data_age(replica, T0) == allowed
