"""Worklist entry → replica (§6.3) and the syncer's plan (§6.1, §6.6)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.canopy.materialise import (
    ExistingReplica,
    InvalidEntry,
    UnsupportedIntent,
    canopy_creds_secret_data,
    materialise,
    plan_sync,
)
from pgro.canopy.wire import Worklist, WorklistEntry, parse_worklist
from pgro.core.pod_sizing import postgres_resources

REPLICA = "11111111-1111-1111-1111-111111111111"
GROUP = "22222222-2222-2222-2222-222222222222"
MACHINE = "33333333-3333-3333-3333-333333333333"
OTHER_MACHINE = "66666666-6666-6666-6666-666666666666"
VERSION_ID = "55555555-5555-5555-5555-555555555555"
SNAPSHOT = "k000000000000000000000000000000f"


def entry(**overrides: Any) -> WorklistEntry:
    fields: dict[str, Any] = {
        "replica_id": REPLICA,
        "group_id": GROUP,
        "machine_id": MACHINE,
        "server_id": MACHINE,
        "type": "tamanu-postgres",
        "intent": "verify",
        "name": "int-test",
        "params": {},
        "snapshot_id": SNAPSHOT,
        "snapshot_at": "2026-07-01T00:00:00Z",
        "storage": "s3",
        "bucket": "canopy-int-test",
        "prefix": "",
        "region": "us-east-1",
        **overrides,
    }
    return WorklistEntry.model_validate(fields)


def analytics(**params: Any) -> WorklistEntry:
    return entry(intent="analytics", name="Nauru Prod Analytics", params=params)


# -- verify / upgrade ------------------------------------------------------------------------------


def test_verify_entry_becomes_an_ephemeral_replica() -> None:
    desired = materialise(entry())
    assert desired.namespace == "int-test-15de9039"
    assert desired.name == "canopy-replica"
    assert desired.desired_snapshot_id == SNAPSHOT
    assert desired.labels["pgro.bes.au/intent"] == "verify"
    assert desired.labels["pgro.bes.au/server"] == MACHINE
    spec = desired.spec.to_wire()
    assert spec == {
        "canopySource": {"group": GROUP, "type": "tamanu-postgres"},
        "schedule": "H * * * *",
        "scheduleJitter": "10m",
        "switchoverGracePeriod": "5m",
        "analyticsUsername": "analytics",
        "storageSizeOverride": "20Gi",
        "storageSizeMaximum": "2Ti",
        "resourcesFloor": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        },
        "resourcesMaximum": "8Gi",
        "shmSizeFloor": "512Mi",
        "readOnly": True,
        "ephemeral": True,
    }
    assert desired.spec.credential_source_problem() is None


def test_upgrade_entry_carries_its_migration_target() -> None:
    desired = materialise(
        entry(
            intent="upgrade",
            target_version="2.31.0",
            target_version_id=VERSION_ID,
            application_type="tamanu-central",
        )
    )
    spec = desired.spec.to_wire()
    assert spec["ephemeral"] is True
    assert spec["migrateTo"] == {"version": "2.31.0", "versionId": VERSION_ID}
    assert spec["resourcesMaximum"] == "8Gi"
    assert spec["storageSizeOverride"] == "20Gi"
    assert desired.labels["pgro.bes.au/intent"] == "upgrade"
    # Echoed in the upgrade report's `migration` object (canopy.reports).
    assert desired.labels["pgro.bes.au/application-type"] == "tamanu-central"


def test_analytics_migrate_to_sets_a_target_without_a_version_id() -> None:
    desired = materialise(entry(intent="analytics", params={"migrate_to": "2.32.0"}))
    assert desired.spec.to_wire()["migrateTo"] == {"version": "2.32.0", "versionId": ""}
    assert desired.spec.ephemeral is False
    # Unset, the replica is plain, whatever target the entry carries.
    plain = materialise(
        entry(intent="analytics", target_version="2.32.0", target_version_id=VERSION_ID)
    )
    assert plain.spec.migrate_to is None
    blank = materialise(entry(intent="analytics", params={"migrate_to": "  "}))
    assert blank.spec.migrate_to is None


def test_upgrade_without_a_full_target_is_refused() -> None:
    with pytest.raises(InvalidEntry, match="target_version_id"):
        materialise(entry(intent="upgrade", target_version="2.31.0"))


def test_a_null_snapshot_leaves_the_desired_snapshot_unset() -> None:
    assert materialise(entry(snapshot_id=None)).desired_snapshot_id is None


# -- analytics -------------------------------------------------------------------------------------


def test_analytics_defaults() -> None:
    desired = materialise(analytics())
    assert desired.namespace.startswith("nauru-prod-analytics-")
    spec = desired.spec.to_wire()
    assert spec["ephemeral"] is False
    assert spec["minimumTtl"] == "2h"
    assert spec["switchoverGracePeriod"] == "2m"
    assert spec["resourcesFloor"] == {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"memory": "8Gi"},
    }
    assert spec["resourcesMaximum"] == "64Gi"
    assert spec["storageSizeOverride"] == "50Gi"
    assert spec["storageSizeMaximum"] == "2Ti"
    for absent in (
        "shmSizeFloor",
        "resources",
        "serviceAnnotations",
        "redaction",
        "persistentSchemas",
        "extraUsers",
        "deploymentReadyTimeout",
        "migrateTo",
    ):
        assert absent not in spec, absent


def test_analytics_parameters() -> None:
    desired = materialise(
        analytics(
            minimum_ttl=3600,
            switchover_grace=30,
            storage_size_maximum=2**40,
            resources_maximum=32 * 2**30,
            deployment_ready_timeout=900,
            persistent_schemas=" dbt, ,reporting ",
            extra_users="alice, bob,analytics,alice",
            expose=True,
            redaction_manifest_url="https://example.org/manifests/{version}.json",
            redaction_version_query="SELECT version FROM meta",
            redaction_version_fallback_to_base=True,
        )
    )
    spec = desired.spec.to_wire()
    assert spec["minimumTtl"] == "1h"
    assert spec["switchoverGracePeriod"] == "30s"
    assert spec["storageSizeMaximum"] == "1Ti"
    assert spec["resourcesMaximum"] == "32Gi"
    assert spec["deploymentReadyTimeout"] == "15m"
    assert spec["persistentSchemas"] == ["dbt", "reporting"]
    # Trimmed, repeats and the analytics user itself dropped by the spec's own rules.
    assert spec["extraUsers"] == ["alice", "bob"]
    assert spec["redaction"] == {
        "manifestUrl": "https://example.org/manifests/{version}.json",
        "versionQuery": "SELECT version FROM meta",
        "versionFallbackToBase": True,
    }
    assert desired.spec.redaction is not None
    assert desired.spec.redaction.problem() is None
    # The raw name is not a DNS label, so its slug is used.
    assert spec["serviceAnnotations"] == {
        "tailscale.com/expose": "true",
        "tailscale.com/hostname": "infra-replica-nauru-prod-analytics",
    }


def test_exposed_hostname_keeps_a_raw_name_that_is_a_dns_label() -> None:
    desired = materialise(entry(intent="analytics", name="Fiji-DBT", params={"expose": True}))
    assert desired.spec.service_annotations == {
        "tailscale.com/expose": "true",
        "tailscale.com/hostname": "infra-replica-Fiji-DBT",
    }


def test_null_params_take_the_defaults_and_blank_text_means_unset() -> None:
    spec = materialise(
        analytics(
            minimum_ttl=None,
            switchover_grace=None,
            expose=None,
            persistent_schemas=" , ",
            redaction_manifest_url="  ",
        )
    ).spec
    assert spec.minimum_ttl == timedelta(hours=2)
    assert spec.switchover_grace_period == timedelta(minutes=2)
    assert spec.service_annotations is None
    assert spec.persistent_schemas is None
    assert spec.redaction is None


def test_zero_minimum_ttl_is_kept() -> None:
    assert materialise(analytics(minimum_ttl=0)).spec.minimum_ttl == timedelta(0)


FLOOR = {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
SNAPSHOT_200G = 200 * 2**30  # 10 % is 20Gi: above the 8Gi floor, below the 64Gi cap


def test_cpu_parameters_alone_change_the_floors_cpu_and_leave_memory_derived() -> None:
    spec = materialise(analytics(cpu_request="1", cpu_limit="3")).spec
    assert spec.resources is None
    assert spec.resources_floor == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "3", "memory": "8Gi"},
    }
    # The pod: memory from the snapshot, request = limit; CPU as the parameters set it.
    assert postgres_resources(spec, SNAPSHOT_200G) == {
        "requests": {"cpu": "1", "memory": "20480Mi"},
        "limits": {"cpu": "3", "memory": "20480Mi"},
    }
    # One alone: a request keeps no CPU limit; a limit keeps the floor's request.
    spec = materialise(analytics(cpu_request="2")).spec
    assert spec.resources is None
    assert spec.resources_floor == {
        "requests": {"cpu": "2", "memory": "2Gi"},
        "limits": {"memory": "8Gi"},
    }
    spec = materialise(analytics(cpu_limit="4")).spec
    assert spec.resources is None
    assert spec.resources_floor == {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }


def test_memory_parameters_pin_memory_and_one_alone_pins_both() -> None:
    for params in ({"memory_request": 4 * 2**30}, {"memory_limit": 4 * 2**30}):
        spec = materialise(analytics(**params)).spec
        assert spec.resources == {
            "requests": {"cpu": "500m", "memory": "4Gi"},
            "limits": {"memory": "4Gi"},
        }, params
        assert spec.resources_floor == FLOOR
        # Pinned: the snapshot no longer sizes memory.
        assert postgres_resources(spec, SNAPSHOT_200G) == spec.resources
    spec = materialise(analytics(memory_request=2 * 2**30, memory_limit=6 * 2**30)).spec
    assert spec.resources == {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"memory": "6Gi"},
    }


def test_cpu_and_memory_parameters_together() -> None:
    spec = materialise(analytics(cpu_request="250m", cpu_limit="2", memory_limit=16 * 2**30)).spec
    assert spec.resources == {
        "requests": {"cpu": "250m", "memory": "16Gi"},
        "limits": {"cpu": "2", "memory": "16Gi"},
    }
    assert spec.resources_floor == {
        "requests": {"cpu": "250m", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }
    assert postgres_resources(spec, SNAPSHOT_200G) == spec.resources


def test_a_floor_value_never_contradicts_a_set_one() -> None:
    # A CPU limit below the floor's request lowers the request, so the pod stays valid.
    assert materialise(analytics(cpu_limit="200m")).spec.resources_floor == {
        "requests": {"cpu": "200m", "memory": "2Gi"},
        "limits": {"cpu": "200m", "memory": "8Gi"},
    }


def test_contradictory_resource_parameters_are_refused() -> None:
    with pytest.raises(InvalidEntry, match="memory request 4Gi is above the memory limit 1Gi"):
        materialise(analytics(memory_request=4 * 2**30, memory_limit=2**30))
    with pytest.raises(InvalidEntry, match="cpu request 2 is above the cpu limit 1"):
        materialise(analytics(cpu_request="2", cpu_limit="1"))


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"minimum_ttl": "2h"}, "minimum_ttl"),
        ({"minimum_ttl": -5}, "minimum_ttl"),
        ({"storage_size_maximum": "1Ti"}, "storage_size_maximum"),
        ({"expose": "yes"}, "expose"),
        ({"persistent_schemas": ["dbt"]}, "persistent_schemas"),
        ({"cpu_request": "lots"}, "cpu_request"),
        ({"cpu_limit": "-1"}, "cpu_limit"),
    ],
)
def test_a_mistyped_parameter_is_refused_naming_it(params: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidEntry) as error:
        materialise(analytics(**params))
    assert repr(named) in str(error.value)
    assert "'Nauru Prod Analytics'" in str(error.value)
    assert "canopy" in str(error.value)


# -- refusals, outputs -----------------------------------------------------------------------------


def test_unsupported_intent() -> None:
    with pytest.raises(UnsupportedIntent, match=r"'reporting-schema'.*analytics, upgrade, verify"):
        materialise(entry(intent="reporting-schema"))


def test_storage_other_than_s3_is_refused() -> None:
    with pytest.raises(InvalidEntry, match="storage 'gcs'"):
        materialise(entry(storage="gcs"))


def test_a_type_that_cannot_be_a_label_is_refused() -> None:
    with pytest.raises(InvalidEntry, match=r"pgro\.bes\.au/type"):
        materialise(entry(type="tamanu postgres"))


def test_manifest_is_a_replica_without_status() -> None:
    desired = materialise(entry())
    manifest = desired.manifest()
    assert manifest["apiVersion"] == "pgro.bes.au/v1alpha1"
    assert manifest["kind"] == "PostgresPhysicalReplica"
    assert manifest["metadata"]["name"] == "canopy-replica"
    assert manifest["metadata"]["namespace"] == "int-test-15de9039"
    assert manifest["metadata"]["labels"] == dict(desired.labels)
    assert "status" not in manifest
    # It loads back as the same replica.
    loaded = PostgresPhysicalReplica.model_validate(manifest)
    assert loaded.spec == desired.spec
    assert desired.creds_secret_name == "canopy-replica-canopy-creds"


def test_canopy_creds_secret_gives_kopia_dummy_keys() -> None:
    assert canopy_creds_secret_data(entry(prefix="p/"), "pw") == {
        "bucket": "canopy-int-test",
        "region": "us-east-1",
        "prefix": "p/",
        "repositoryPassword": "pw",
        "accessKeyId": "PROXY_DUMMY_ACCESS_KEY",
        "secretAccessKey": "PROXY_DUMMY_SECRET_KEY",
    }


# -- plan_sync -------------------------------------------------------------------------------------

VERIFY_NS = "int-test-15de9039"


def test_a_failed_fetch_plans_nothing() -> None:
    plan = plan_sync(None, [ExistingReplica(VERIFY_NS), ExistingReplica("orphan-00000000")])
    assert not plan.fetched
    assert plan.apply == ()
    assert plan.delete == ()


def test_a_new_entry_creates_its_namespace_and_sets_the_snapshot() -> None:
    plan = plan_sync(Worklist((entry(),)), [])
    (change,) = plan.apply
    assert change.create_namespace
    assert change.desired.namespace == VERIFY_NS
    assert change.desired_snapshot_patch == SNAPSHOT
    assert plan.delete == ()


def test_the_snapshot_is_patched_only_when_it_differs_and_never_cleared() -> None:
    same = plan_sync(Worklist((entry(),)), [ExistingReplica(VERIFY_NS, SNAPSHOT)])
    assert same.apply[0].desired_snapshot_patch is None
    assert not same.apply[0].create_namespace
    newer = plan_sync(Worklist((entry(snapshot_id="k2"),)), [ExistingReplica(VERIFY_NS, SNAPSHOT)])
    assert newer.apply[0].desired_snapshot_patch == "k2"
    none = plan_sync(Worklist((entry(snapshot_id=None),)), [ExistingReplica(VERIFY_NS, SNAPSHOT)])
    assert none.apply[0].desired_snapshot_patch is None
    # Still applied: the spec is re-asserted every tick.
    assert len(none.apply) == 1


def test_namespaces_no_longer_listed_are_deleted() -> None:
    existing = {
        VERIFY_NS: ExistingReplica(VERIFY_NS, SNAPSHOT),
        "gone-deadbeef": ExistingReplica("gone-deadbeef"),
    }
    plan = plan_sync(Worklist((entry(),)), existing)
    assert plan.delete == ("gone-deadbeef",)
    assert plan_sync(Worklist(()), existing).delete == ("gone-deadbeef", VERIFY_NS)


def test_an_entry_that_cannot_be_materialised_keeps_its_namespace() -> None:
    unsupported = entry(intent="disaster-recovery")
    plan = plan_sync(
        Worklist((unsupported, entry(machine_id=OTHER_MACHINE, server_id=None))),
        [
            ExistingReplica(VERIFY_NS),
        ],
    )
    assert plan.delete == ()
    assert plan.kept == (VERIFY_NS,)
    assert [c.desired.entry.machine_id for c in plan.apply] == [UUID(OTHER_MACHINE)]
    assert any("disaster-recovery" in p for p in plan.problems)


def test_an_unreadable_entry_with_identity_keeps_only_its_namespace() -> None:
    broken = {
        "replica_id": REPLICA,
        "server_id": MACHINE,
        "name": "int-test",
        "intent": "verify",
    }
    worklist = parse_worklist([broken])
    plan = plan_sync(worklist, [ExistingReplica(VERIFY_NS), ExistingReplica("gone-deadbeef")])
    assert plan.apply == ()
    assert plan.delete == ("gone-deadbeef",)
    assert plan.kept == (VERIFY_NS,)
    assert plan.deletions_withheld is None
    assert any("could not be read" in p and "bucket" in p for p in plan.problems)


def test_an_unreadable_entry_without_identity_withholds_every_deletion() -> None:
    worklist = parse_worklist([{"name": "mystery"}, 42])
    plan = plan_sync(worklist, [ExistingReplica("gone-deadbeef")])
    assert plan.fetched
    assert plan.delete == ()
    assert plan.deletions_withheld is not None
    assert "no Namespace is deleted" in plan.deletions_withheld


def test_duplicate_entries_use_the_first() -> None:
    first, second = entry(snapshot_id="k1"), entry(snapshot_id="k2")
    plan = plan_sync(Worklist((first, second)), [])
    assert [c.desired_snapshot_patch for c in plan.apply] == ["k1"]
    assert any("first one is used" in p for p in plan.problems)


def test_group_wide_declarations_get_one_namespace_per_machine() -> None:
    plan = plan_sync(
        Worklist((entry(), entry(machine_id=OTHER_MACHINE, server_id=OTHER_MACHINE))), []
    )
    namespaces = {c.desired.namespace for c in plan.apply}
    assert len(namespaces) == 2
    assert all(n.startswith("int-test-") for n in namespaces)


def test_removals_wait_for_the_grace_and_for_waiting_reports() -> None:
    from datetime import UTC, datetime, timedelta

    from pgro.canopy.materialise import SyncPlan, plan_removals

    t0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    grace = timedelta(minutes=10)
    plan = SyncPlan(fetched=True, delete=("gone-a", "gone-b"))
    first = plan_removals(plan, {"listed-again": t0}, t0, grace, lambda ns: False)
    # Newly missing: the clock starts; a Namespace listed again is forgotten.
    assert first.remove == () and first.absent_since == {"gone-a": t0, "gone-b": t0}
    later = plan_removals(plan, first.absent_since, t0 + grace, grace, lambda ns: ns == "gone-b")
    assert later.remove == ("gone-a",) and later.held == ("gone-b",)
    # Without a grace the reference's behaviour: removed on the first tick.
    assert plan_removals(plan, {}, t0, timedelta(0), lambda ns: False).remove == plan.delete


@pytest.mark.parametrize("name", ["../../../../outside/evil", "a/b", "x" * 64, "nul\x00"])
def test_an_extra_user_that_is_no_role_name_is_an_invalid_entry(name: str) -> None:
    # Canopy's extra_users are remote input and become role names and credential files.
    with pytest.raises(InvalidEntry) as error:
        materialise(analytics(extra_users=f"alice,{name}"))
    assert "'Nauru Prod Analytics'" in str(error.value)
