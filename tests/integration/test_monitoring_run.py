"""deploy/monitoring against the real `pgro run`: its `/metrics` over HTTP, after a real
restore of a real backup and a real failed restore (a snapshot that is not PostgreSQL)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.monitoring import (
    alert,
    dashboard_queries,
    dashboard_variable_metrics,
    replicas,
    rules,
    unexported,
)
from tests.fixtures.promql import Evaluator, Scrape
from tests.fixtures.run_harness import PASSWORD, Backups, Running, StartRun


def scrape(run: Running) -> Scrape:
    text = urllib.request.urlopen(f"http://127.0.0.1:{run.metrics}/metrics").read().decode()
    return Scrape.of(text, time.time())


def test_alerts_on_the_metrics_of_pgro_run(
    fs_repo: Any, backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("good")
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc("kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        secret_doc(
            "fixtures",
            {"filesystemPath": str(fs_repo.path), "repositoryPassword": fs_repo.password},
        ),
        replica_doc("good", ephemeral=False, schedule="0 * * * *", scheduleJitter="0s"),
        replica_doc("notpg", secret="fixtures", snapshotFilter={"hostPattern": "files-host"}),
    )
    run = start_run(manifest)
    run.wait_for("good to serve", lambda: run.replica("good")["status"].get("phase") == "Ready")
    run.wait_for(
        "the failed restore of a non-PostgreSQL snapshot",
        lambda: run.replica("notpg")["status"].get("consecutiveRestoreFailures") == 1,
        timeout=120,
    )
    first = scrape(run)
    time.sleep(1)
    second = scrape(run)

    # The rules and the dashboard read only what this process exports.
    queries = [r["expr"] for r in rules().values()] + dashboard_queries()
    assert unexported(queries, second.names) == []
    assert all(m in second.names for m in dashboard_variable_metrics())

    # The failed restore of notpg, and only it, fails verification; one failure is not
    # "repeatedly"; good's data is fresh; nothing else fires.
    assert replicas(alert("PgroBackupVerificationFailed", first, second)) == {
        ("default", "notpg"): 1.0
    }
    fired = {name for name in rules() if alert(name, first, second)}
    assert fired == {"PgroBackupVerificationFailed"}

    # The staleness inputs, as pgro run exports them for the served replica.
    evaluator = Evaluator([first, second])
    age = evaluator.query(
        "time() - postgres_restore_replica_last_restore_completed_timestamp_seconds"
    )
    allowed = evaluator.query("postgres_restore_replica_max_data_age_seconds")
    assert isinstance(age, list) and isinstance(allowed, list)
    assert [dict(s.labels)["replica"] for s in age] == ["good"]
    assert 0 <= age[0].value < 600
    assert {dict(s.labels)["replica"]: s.value for s in allowed} == {
        "good": 3600.0,
        "notpg": 86400.0 + 600.0,  # `H 3 * * *` and the default 10 minutes of jitter
    }
    assert run.stop() == 0
