"""`SpecValid`: values the reference admitted but pgro cannot act on become a condition.

A byte size that is not a quantity (`100GB`, `"64 Gi"`) stops restore creation, so no
restore is ever sized from a guess; `overlayDatabase` (removed upstream, not built here) is
reported while the replica restores normally.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pgro.api.conditions import Condition
from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplicaSpec
from pgro.core.plan import CreateRestore, ListSnapshots
from pgro.core.replica_decision import ReplicaPlan
from pgro.runtimes.embedded.manifest import load_manifests
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.scenarios.builders import (
    GIB,
    NOW,
    decide,
    listing,
    replica,
    restore,
    settled_status,
    snap,
)

DUE = settled_status(nextScheduledRestore="2026-03-01T11:00:00Z")


def _conditions(plan: ReplicaPlan) -> dict[str, Condition]:
    out: dict[str, Condition] = {}
    for step in plan.status_patches:
        for raw in step.patch.get("conditions") or []:
            c = Condition.model_validate(raw)
            out[c.type] = c
    return out


def _patched(plan: ReplicaPlan) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for step in plan.status_patches:
        merged.update(step.patch)
    return merged


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("storageSizeOverride", "100GB", "'100G'"),
        ("resourcesMaximum", "64 Gi", "'64Gi'"),
        ("shmSizeFloor", "1GiB", "'1Gi'"),
        ("storageSizeOverride", "lots", None),
    ],
)
def test_a_value_that_is_not_a_quantity_blocks_restores_with_a_condition(
    field: str, value: str, hint: str | None
) -> None:
    plan = decide(
        replica(DUE, **{field: value}),
        the_listing=listing(snap("k1", NOW - timedelta(hours=1))),
    )
    assert not any(isinstance(s, CreateRestore | ListSnapshots) for s in plan.steps)
    spec_valid = _conditions(plan)["SpecValid"]
    assert (spec_valid.status, spec_valid.reason) == ("False", "InvalidQuantity")
    assert f"spec.{field} {value!r} is not a Kubernetes quantity" in spec_valid.message
    assert "e.g. 100Gi, 100G or 107374182400" in spec_valid.message
    assert "No new restore is made until this is fixed" in spec_valid.message
    if hint is not None:
        assert f"did you mean {hint}?" in spec_valid.message
    else:
        assert "did you mean" not in spec_valid.message
    assert _patched(plan)["phase"] == "Pending"


def test_the_serving_restore_keeps_serving_and_the_fix_restores_again() -> None:
    serving = restore("fiji-old", "k0", "Active")
    status = {**DUE, "currentRestore": "fiji-old"}
    blocked = decide(
        replica(status, storageSizeOverride="100GB"),
        [serving],
        the_listing=listing(snap("k1", NOW - timedelta(hours=1), size=10 * GIB)),
    )
    assert not any(isinstance(s, CreateRestore) for s in blocked.steps)
    assert _patched(blocked).get("phase", "Ready") == "Ready"
    assert "currentRestore" not in _patched(blocked)
    condition = _conditions(blocked)["SpecValid"]
    # The fix: the condition turns True and the restore is sized from the fixed floor.
    fixed = decide(
        replica({**status, "conditions": [condition.to_wire()]}, storageSizeOverride="100G"),
        [serving],
        the_listing=listing(snap("k1", NOW - timedelta(hours=1), size=10 * GIB)),
    )
    [create] = [s for s in fixed.steps if isinstance(s, CreateRestore)]
    # The floor as fixed: 100 G, not 100 Gi nor the snapshot-derived size.
    assert parse_quantity(create.restore.spec.storage_size) == 100 * 10**9
    spec_valid = _conditions(fixed)["SpecValid"]
    assert (spec_valid.status, spec_valid.reason) == ("True", "ValidSpec")


def test_usable_values_write_no_condition() -> None:
    plan = decide(
        replica(DUE, storageSizeOverride="50Gi", resourcesMaximum=64 * GIB, shmSizeFloor="1G"),
        the_listing=listing(snap("k1", NOW - timedelta(hours=1))),
    )
    assert any(isinstance(s, CreateRestore) for s in plan.steps)
    assert "SpecValid" not in _conditions(plan)


def test_overlay_database_is_refused_but_the_replica_restores() -> None:
    overlay = {"strategy": "fdw", "schemas": ["reporting"], "postgresVersion": 17}
    plan = decide(
        replica(DUE, overlayDatabase=overlay),
        the_listing=listing(snap("k1", NOW - timedelta(hours=1))),
    )
    assert any(isinstance(s, CreateRestore) for s in plan.steps)
    spec_valid = _conditions(plan)["SpecValid"]
    assert (spec_valid.status, spec_valid.reason) == ("False", "OverlayDatabaseUnsupported")
    assert "spec.overlayDatabase is not supported" in spec_valid.message
    assert "persistentSchemas" in spec_valid.message


def test_the_spec_round_trips_what_the_reference_admitted() -> None:
    raw = {
        "schedule": "0 3 * * *",
        "storageSizeOverride": "100GB",
        "resourcesMaximum": "64 Gi",
        "shmSizeFloor": 536870912,
        "overlayDatabase": {"strategy": "copy", "schemas": ["a"]},
    }
    spec = PostgresPhysicalReplicaSpec.model_validate(raw)
    wire = spec.to_wire()
    assert {k: wire[k] for k in raw} == raw
    assert len(spec.quantity_problems()) == 2
    with pytest.raises(ValueError, match="expected a quantity"):
        PostgresPhysicalReplicaSpec.model_validate({**raw, "shmSizeFloor": True})


def test_pgro_run_loads_such_a_manifest(tmp_path: Path) -> None:
    # Before, the model refused it and `pgro run` would not start (exit 2).
    path = write_manifest(
        tmp_path / "m.yaml",
        secret_doc("kopia", {"filesystemPath": "/srv/repo", "repositoryPassword": "pw"}),
        replica_doc("orders", storageSizeOverride="100GB", overlayDatabase={"strategy": "fdw"}),
    )
    [loaded] = load_manifests([path]).replicas
    assert loaded.spec.storage_size_override == "100GB"
    assert loaded.spec.overlay_database == {"strategy": "fdw"}
