"""`pgro status`: one renderer for a state directory and a cluster; the command's choice of
source; the users a cluster replica lists and where their passwords live."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.cli.status import status
from pgro.cli.status_cluster import _credentials
from pgro.cli.status_view import render, replica_entry
from pgro.runtimes.embedded.credentials import CredentialStore
from pgro.runtimes.embedded.store import Store

REPLICA: dict[str, Any] = {
    "apiVersion": "pgro.bes.au/v1alpha1",
    "kind": "PostgresPhysicalReplica",
    "metadata": {"name": "orders", "namespace": "shop"},
    "spec": {"kopiaSecretRef": {"name": "kopia"}, "schedule": "0 2 * * *"},
}
STATUS: dict[str, Any] = {
    "phase": "Ready",
    "currentRestore": "orders-1",
    "connectionInfo": {
        "host": "127.0.0.1",
        "port": 6432,
        "database": "postgres",
        "username": "analytics",
        "passwordSecret": "orders-creds",
    },
}
RESTORE: dict[str, Any] = {
    "apiVersion": "pgro.bes.au/v1alpha1",
    "kind": "PostgresPhysicalRestore",
    "metadata": {"name": "orders-1", "namespace": "shop"},
    "spec": {
        "replica": {"name": "orders"},
        "snapshot": "k1",
        "snapshotSize": "1Gi",
        "storageSize": "2Gi",
    },
    "status": {"phase": "Active"},
}


def text_of(entries: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    render(Console(file=out, width=200, color_system=None), entries)
    return out.getvalue()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = Store(state / "state.db")
    replica = PostgresPhysicalReplica.model_validate(REPLICA)
    store.apply_replica(replica)
    store.patch_replica_status(replica.key, STATUS)
    store.create_restore(PostgresPhysicalRestore.model_validate(RESTORE))
    store.add_event(replica.key, "Normal", "SwitchedOver", "orders-1 serves", "orders-1")
    store.close()
    CredentialStore(state / "credentials").ensure(replica.key, "analytics")
    return state


def test_state_dir_prints_the_entries_it_builds(state_dir: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(status, ["--state-dir", str(state_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    (entry,) = json.loads(shown.output)
    assert entry["status"] == STATUS
    assert entry["endpoint"] == {"host": "127.0.0.1", "port": 6432}
    assert entry["restores"] == [
        {"name": "orders-1", "spec": RESTORE["spec"], "status": {"phase": "Active"}}
    ]
    assert [(e["reason"], e["related"]) for e in entry["events"]] == [("SwitchedOver", "orders-1")]
    (cred,) = entry["credentials"]
    assert cred["username"] == "analytics" and "password" not in cred
    assert Path(cred["file"]).parent == state_dir / "credentials" / "shop" / "orders"

    human = runner.invoke(status, ["--state-dir", str(state_dir)], env={"COLUMNS": "200"})
    assert human.output == text_of([entry])
    assert human.output.splitlines() == [
        "shop/orders  phase Ready",
        "  serving            orders-1",
        "  endpoint           127.0.0.1:6432",
        "  restore orders-1  Active  snapshot k1",
        f"  user analytics (password in {cred['file']})",
    ]

    with_pw = runner.invoke(status, ["--state-dir", str(state_dir), "--show-credentials", "--json"])
    password = json.loads(with_pw.output)[0]["credentials"][0]["password"]
    assert len(password) >= 16
    shown_pw = runner.invoke(
        status, ["--state-dir", str(state_dir), "--show-credentials"], env={"COLUMNS": "200"}
    )
    assert f"  user analytics password {password}\n" in shown_pw.output


def test_a_cluster_entry_renders_like_a_state_dir_entry() -> None:
    entry = replica_entry(
        {**REPLICA, "status": STATUS},
        [RESTORE],
        credentials=[{"username": "analytics", "secret": "shop/orders-creds"}],
    )
    assert (
        text_of([entry]).splitlines()[-1]
        == "  user analytics (password in Secret shop/orders-creds)"
    )
    missing = {"username": "bi", "secret": "shop/orders-user-bi", "missing": True}
    shown = {"username": "bi", "secret": "shop/orders-user-bi", "password": "pw"}
    assert text_of([{**entry, "credentials": [missing, shown]}]).splitlines()[-2:] == [
        "  user bi (Secret shop/orders-user-bi does not exist yet)",
        "  user bi password pw",
    ]
    assert text_of([]) == "no replicas\n"


def test_the_users_of_a_cluster_replica_and_their_secrets() -> None:
    replica = {
        **REPLICA,
        "spec": {
            **REPLICA["spec"],
            "analyticsUsername": "reader",
            "extraUsers": ["report_writer", {"name": "etl", "schemas": ["staging"]}, "reader"],
            "persistentUsers": [{"name": "bi"}, {"name": "Ops_Team", "secretName": "ops-login"}],
        },
    }
    assert _credentials(replica) == [
        {"username": "reader", "secret": "shop/orders-creds"},
        {"username": "report_writer", "secret": "shop/orders-user-report-writer-creds"},
        {"username": "etl", "secret": "shop/orders-user-etl-creds"},
        {"username": "bi", "secret": "shop/orders-user-bi"},
        {"username": "Ops_Team", "secret": "shop/ops-login"},
    ]
    # The status names the analytics user's Secret once the operator made it.
    named = {**replica, "status": STATUS}
    assert _credentials(named)[0] == {"username": "analytics", "secret": "shop/orders-creds"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "say what to show: --state-dir DIR"),
        (["--state-dir", "{state}", "-n", "x"], "--namespace a cluster: give one or the other"),
        (["--state-dir", "{state}", "--cluster"], "--cluster a cluster"),
        (["-n", "x", "-A"], "-n/--namespace and -A/--all-namespaces exclude each other"),
    ],
)
def test_usage_errors(state_dir: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(status, [a.format(state=state_dir) for a in args])
    assert result.exit_code == 2
    assert message in result.output


def test_the_kubectl_plugins_default_gives_way_to_state_dir(state_dir: Path) -> None:
    """`kubectl pgro status` reads the cluster by default (default_map), yet
    `kubectl pgro status --state-dir DIR` still reads the directory."""
    result = CliRunner().invoke(
        status, ["--state-dir", str(state_dir), "--json"], default_map={"cluster": True}
    )
    assert result.exit_code == 0, result.output
    assert [e["name"] for e in json.loads(result.output)] == ["orders"]
