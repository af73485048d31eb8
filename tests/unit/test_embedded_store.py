"""The embedded runtime's SQLite store: objects in wire form, merge-patched status."""

from __future__ import annotations

import functools
from pathlib import Path

from pgro.api.names import LABEL_REPLICA
from pgro.core.merge_patch import merge_patch
from pgro.runtimes.embedded.store import EVENTS_KEPT_PER_REPLICA, Store
from tests.fixtures.manifests import replica, restore

# The one replica of these tests, and its restores.
orders = functools.partial(replica, "orders", namespace="shop")
orders_restore = functools.partial(
    restore, replica="orders", namespace="shop", metadata={"labels": {LABEL_REPLICA: "orders"}}
)
FIRST = "orders-20260101-000000"


def test_merge_patch_rfc7386() -> None:
    target = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}
    patch = {"a": None, "b": {"c": 9, "d": None}, "e": [3], "f": {"g": None}}
    assert merge_patch(target, patch) == {"b": {"c": 9}, "e": [3], "f": {}}
    assert target["a"] == 1  # the input is not modified


def test_replica_identity_and_generation(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.apply_replica(orders()) is True
    first = store.replica("shop/orders")
    assert first is not None
    assert first.metadata.uid
    assert first.metadata.generation == 1
    assert store.apply_replica(orders()) is False  # unchanged manifest: no write
    assert store.apply_replica(orders(schedule="0 * * * *")) is True
    second = store.replica("shop/orders")
    assert second is not None
    assert second.metadata.uid == first.metadata.uid
    assert second.metadata.generation == 2
    assert second.spec.schedule == "0 * * * *"


def test_status_survives_manifest_updates_and_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.apply_replica(orders())
    store.patch_replica_status("shop/orders", {"phase": "Ready", "verifiedSnapshotId": "abc"})
    store.apply_replica(orders(schedule="0 * * * *"))
    store.patch_replica_status("shop/orders", {"phase": "Restoring"})
    store.close()
    reopened = Store(tmp_path / "state.db")
    got = reopened.replica("shop/orders")
    assert got is not None and got.status is not None
    assert got.status.phase == "Restoring"
    assert got.status.verified_snapshot_id == "abc"


def test_restores_conflict_patch_delete(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.create_restore(orders_restore(FIRST)) is True
    assert store.create_restore(orders_restore(FIRST)) is False  # same name: a conflict
    store.create_restore(orders_restore("orders-20260101-000001"))
    store.patch_restore_status("shop/orders-20260101-000000", {"phase": "Restoring"})
    listed = store.restores("shop/orders")
    assert [r.metadata.name for r in listed] == ["orders-20260101-000000", "orders-20260101-000001"]
    assert listed[0].status is not None and listed[0].status.phase == "Restoring"
    assert listed[0].metadata.uid and listed[0].metadata.creation_timestamp
    assert store.delete_restore("shop/orders-20260101-000000") is True
    assert store.delete_restore("shop/orders-20260101-000000") is False
    assert [r.metadata.name for r in store.restores()] == ["orders-20260101-000001"]


def test_events_are_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for i in range(EVENTS_KEPT_PER_REPLICA + 25):
        store.add_event("shop/orders", "Normal", "RestoreStarted", f"n{i}")
    events = store.events("shop/orders", limit=1000)
    assert len(events) == EVENTS_KEPT_PER_REPLICA
    assert events[-1].note == f"n{EVENTS_KEPT_PER_REPLICA + 24}"


def test_settings(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store.setting("port/shop/orders") is None
    store.set_setting("port/shop/orders", "6500")
    store.set_setting("port/shop/orders", "6501")
    assert store.setting("port/shop/orders") == "6501"


def test_changes_are_told_once_and_a_patch_that_changes_nothing_writes_nothing(
    tmp_path: Path,
) -> None:
    """`pgro run` reconciles what changed (the store is its watch); the steady state writes
    nothing, so a status patch equal to what is stored must not count as a change."""
    store = Store(tmp_path / "state.db")
    told: list[tuple[str, str | None]] = []
    store.watch(lambda replica_key, restore_key: told.append((replica_key, restore_key)))
    store.apply_replica(orders())
    store.apply_replica(orders())  # unchanged
    store.patch_replica_status("shop/orders", {"phase": "Ready"})
    writes = store.writes
    store.patch_replica_status("shop/orders", {"phase": "Ready"})
    store.patch_replica_status("shop/orders", {"queuePosition": None})  # absent already
    assert store.writes == writes
    store.create_restore(orders_restore(FIRST))
    store.patch_restore_status("shop/orders-20260101-000000", {"phase": "Restoring"})
    writes = store.writes
    store.patch_restore_status("shop/orders-20260101-000000", {"phase": "Restoring"})
    assert store.writes == writes
    store.delete_restore("shop/orders-20260101-000000")
    store.delete_restore("shop/orders-20260101-000000")  # gone already
    store.delete_replica("shop/orders")
    restore_change = ("shop/orders", "shop/orders-20260101-000000")
    assert told == [
        ("shop/orders", None),
        ("shop/orders", None),
        restore_change,
        restore_change,
        restore_change,
        ("shop/orders", None),
    ]
