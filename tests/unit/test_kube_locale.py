"""The operator's side of the locale rewrite and the index repairs (issue 13): the postgres
pod's spec (the `locales` emptyDir, the setup's env and termination message, the probes),
the setup script's rendered SQL and aliases, the setup's report as the operator reads it,
and what the provisioning records."""

from __future__ import annotations

import shlex
from types import SimpleNamespace
from typing import Any

import pytest

from pgro.core.plan import EventType
from pgro.postgres import restore_info
from pgro.postgres.collation_refresh import CollationMismatch
from pgro.postgres.locale_aliases import gconv_aliases, windows_alias_specs
from pgro.postgres.locale_fix import mismatch_probe_statement, rewrite_statement
from pgro.runtimes.kubernetes import provisioning
from pgro.runtimes.kubernetes.observe import PodView
from pgro.runtimes.kubernetes.provisioning import (
    COLLATION_MISMATCH_REASON,
    Provisioner,
    ServerRepairs,
)
from pgro.runtimes.kubernetes.scripts import SetupReport, setup_script
from tests.fixtures import manifests
from tests.unit.test_kube_workloads import (
    assert_kubernetes_valid,
    containers,
    deployment,
    env_map,
)


def test_setup_builds_locales_into_an_emptydir_of_its_own() -> None:
    dep = deployment()
    pod = dep["spec"]["template"]["spec"]
    setup, postgres = containers(dep)
    assert {"name": "locales", "emptyDir": {"sizeLimit": "128Mi"}} in pod["volumes"]
    assert {"name": "locales", "mountPath": "/pgro-locales"} in setup["volumeMounts"]
    assert env_map(setup)["PGRO_LOCALES"] == "/pgro-locales"
    # Never the image's locale directory, and nothing of it in the server's container.
    mounts = [m["mountPath"] for c in (setup, postgres) for m in c["volumeMounts"]]
    assert not any(m.startswith("/usr/lib/locale") for m in mounts)
    assert "LOCPATH" not in env_map(postgres) and "GCONV_PATH" not in env_map(postgres)
    # No root container: the emptyDir is the pod's fsGroup's, the pod stays runAsNonRoot.
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in (setup, postgres):
        assert "runAsUser" not in container["securityContext"]
    assert_kubernetes_valid(dep)


def test_setup_reports_through_its_termination_message() -> None:
    setup, _ = containers(deployment())
    assert setup["terminationMessagePath"] == "/dev/termination-log"
    assert setup["terminationMessagePolicy"] == "File"
    assert env_map(setup)["PGRO_TERMINATION_LOG"] == "/dev/termination-log"


def test_readiness_is_pg_isready_alone() -> None:
    """The quick reindex gates pgro's READY (provisioning), not the pod's readiness: the
    operator cannot remove a marker on the volume, and the stable Service moves only after
    READY (docs/locale-and-collation.md)."""
    _, postgres = containers(deployment())
    probe = postgres["readinessProbe"]["exec"]["command"]
    assert probe == ["pg_isready", "-U", "postgres", "-d", "postgres"]


def test_setup_script_renders_the_locale_rewrite_from_locale_fix() -> None:
    script = setup_script()
    assert f"locale_probe={shlex.quote(mismatch_probe_statement())}" in script
    assert f"locale_update={shlex.quote(rewrite_statement(150000))}" in script
    assert f"locale_update={shlex.quote(rewrite_statement(140000))}" in script
    assert "datcollversion = NULL" in rewrite_statement(150000)
    assert "datcollversion" not in rewrite_statement(140000)
    # The markers, written before the rewrite, and never removed by the script.
    assert '"$PGRO_DATA_ROOT/needs-reindex"' in script
    assert 'touch "$PGRO_DATA_ROOT/fix-locale"' in script
    assert 'rm -f "$PGRO_DATA_ROOT/needs-reindex"' not in script
    assert script.index("needs-reindex.tmp") < script.index('locale_session "$locale_statements"')


def test_setup_script_builds_the_reference_aliases_privately() -> None:
    script = setup_script()
    for spec in windows_alias_specs():
        line = f"build_locale {shlex.quote(spec.name)} en_US {spec.charmap}"
        assert line in script
    assert "build_locale en_US.UTF-8 en_US UTF-8" in script
    assert "build_locale C.UTF-8 C UTF-8" in script
    assert gconv_aliases() in script
    assert 'export LOCPATH="$PGRO_LOCALES" GCONV_PATH="$PGRO_LOCALES/gconv"' in script
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not any("/usr/lib/locale" in line for line in code)
    # Only on demand: the build sits behind the "incompatible" message.
    assert script.index('incompatible_locale "$output"') < script.index('build_locales "$names"')


def test_setup_report_parsing() -> None:
    line = '{"fixes":{"locale":true,"reset_wal":false},"needsReindex":2,"failure":""}'
    assert SetupReport.parse(f"noise\n{line}\n") == SetupReport(True, False, 2)
    assert SetupReport.parse("") is None
    assert SetupReport.parse("setup: could not set the password") is None
    assert SetupReport.parse('["fixes"]') is None
    odd = '{"fixes":{"locale":"yes","reset_wal":1},"needsReindex":-3,"failure":7}'
    assert SetupReport.parse(odd) == SetupReport()


def _pod(init_statuses: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "initContainerStatuses": init_statuses},
    }


def test_pod_view_reads_the_setups_message() -> None:
    message = '{"fixes":{"locale":true,"reset_wal":true},"needsReindex":1,"failure":""}'
    view = PodView.of(
        _pod(
            [
                {"name": "other", "state": {"terminated": {"message": "not this"}}},
                {"name": "setup", "state": {"terminated": {"exitCode": 0, "message": message}}},
            ]
        )
    )
    assert view.setup_message == message
    assert SetupReport.parse(view.setup_message) == SetupReport(True, True, 1)
    assert PodView.of(_pod([{"name": "setup", "state": {"running": {}}}])).setup_message == ""


def test_server_repairs_write_only_new_fixes() -> None:
    repairs = ServerRepairs({"locale": True, "reindex": True})
    assert repairs.new_fixes(None) == {"locale": True, "reindex": True}
    assert repairs.new_fixes({"locale": False, "reset_wal": False}) == {
        "locale": True,
        "reindex": True,
    }
    # Already recorded: no status write.
    assert repairs.new_fixes({"locale": True, "reindex": True, "reset_wal": False}) == {}
    assert repairs.events() == []


def test_a_remaining_collation_mismatch_is_a_warning_naming_it() -> None:
    mismatch = CollationMismatch("app", "public", "en_icu", "0.0", "153.120")
    note = (
        "1 collation version mismatch(es) remain, not refreshed because 1 index rebuild(s) failed"
    )
    repairs = ServerRepairs({}, (note,), (mismatch,))
    [event] = repairs.events("fiji-1")
    assert event.type is EventType.WARNING
    assert event.reason == COLLATION_MISMATCH_REASON
    assert event.note == note
    assert event.related == "fiji-1"
    # Without its note, the mismatch itself is named.
    [bare] = ServerRepairs({}, (), (mismatch,)).events()
    assert "app:public.en_icu" in bare.note


# -- the provisioning thread: repairs first, recorded before the users and READY ----------


def test_provisioning_repairs_and_records_before_the_users(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []
    seen: dict[str, Any] = {}

    def repair(conninfo_for: Any, setup: Any, recorded: Any, say: Any) -> ServerRepairs:
        order.append("repair")
        seen.update(setup=setup, recorded=recorded)
        return ServerRepairs({"locale": True, "reindex": True})

    def users(conninfo_for: Any, **kwargs: Any) -> Any:
        order.append("users")
        return SimpleNamespace(
            analytics=SimpleNamespace(name="analytics"), extra_users=[], catalog_notes=[]
        )

    monkeypatch.setattr(provisioning, "repair_server", repair)
    monkeypatch.setattr(provisioning, "provision_users", users)
    rows: list[Any] = []

    def record_row(conninfo: str, row: Any, **kwargs: Any) -> list[str]:
        rows.append(row)
        return []

    monkeypatch.setattr(restore_info, "record_restore", record_row)
    recorded: list[tuple[str, dict[str, bool], int]] = []

    def record(replica: Any, restore: Any, fixes: Any, events: Any) -> None:
        order.append("record")
        recorded.append((restore.name, dict(fixes), len(events)))

    requeued: list[tuple[str, float]] = []
    provisioner = Provisioner(
        lambda ns, name, key: f"pw-of-{name}",
        lambda key, delay: requeued.append((key, delay)),
        record_repairs=record,
    )
    message = '{"fixes":{"locale":true,"reset_wal":false},"needsReindex":3,"failure":""}'
    ready = manifests.restore(
        "orders-1", "orders", namespace="ns", status={"phase": "Ready", "fixes": {"locale": False}}
    )
    orders = manifests.replica("orders", namespace="ns")
    provisioner._provision(orders, ready, "10.0.0.7", "pod-1", message)
    assert order == ["repair", "record", "users"]
    assert seen["setup"] == SetupReport(locale=True, needs_reindex=3)
    assert seen["recorded"] == {"locale": False}
    assert recorded == [("orders-1", {"locale": True, "reindex": True}, 0)]
    # The clients' view (_pgro.restore_info) shows the repairs of this very pass.
    assert rows[0].fixes == {"locale": True, "reindex": True}
    assert requeued == [("ns/orders-1", 0.0)]
    assert provisioner.provisioned(ready, "pod-1")

    # A new pod of a restore whose status shows both: nothing to write.
    order.clear()
    done = manifests.restore(
        "orders-1",
        "orders",
        namespace="ns",
        status={"phase": "Active", "fixes": {"locale": True, "reindex": True}},
    )
    provisioner._provision(orders, done, "10.0.0.8", "pod-2", message)
    assert order == ["repair", "users"]


def test_a_failed_repair_leaves_the_pod_unprovisioned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def repair(*args: Any) -> ServerRepairs:
        raise RuntimeError("connection refused for pw-of-orders-admin-creds")

    monkeypatch.setattr(provisioning, "repair_server", repair)
    requeued: list[tuple[str, float]] = []
    provisioner = Provisioner(
        lambda ns, name, key: f"pw-of-{name}", lambda key, delay: requeued.append((key, delay))
    )
    ready = manifests.restore("orders-1", "orders", namespace="ns", status={"phase": "Ready"})
    provisioner._provision(manifests.replica("orders", namespace="ns"), ready, "10.0.0.7", "p")
    assert not provisioner.provisioned(ready, "p")
    assert requeued == [("ns/orders-1", provisioning.PROVISION_RETRY_S)]
    # Logged and retried, the admin password scrubbed from the message.
    assert "connection refused" in caplog.text
    assert "pw-of-orders-admin-creds" not in caplog.text
