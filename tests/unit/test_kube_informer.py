"""The informer's index follows every add, relabel, delete and relist; the client keeps no
managedFields."""

from __future__ import annotations

from typing import Any

from pgro.kube.client import Listed, _to_dict
from pgro.kube.informer import Informer

LABEL = "pgro.bes.au/restore"


def pod(name: str, restore: str | None, version: str = "1") -> dict[str, Any]:
    labels = {LABEL: restore} if restore else {}
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": labels,
            "resourceVersion": version,
        }
    }


class ListingApi:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def list(self, kind: str, **_: Any) -> Listed:
        return Listed(list(self.items), "9")


def names(informer: Informer, restore: str, index: str = LABEL) -> list[str]:
    return sorted(o["metadata"]["name"] for o in informer.select("ns", index, restore))


def test_the_index_follows_changes_and_relists() -> None:
    seen: list[str] = []
    api = ListingApi([pod("a", "r1"), pod("b", "r1"), pod("c", "r2")])
    informer = Informer(
        api,  # type: ignore[arg-type]
        "Pod",
        lambda o: seen.append(o["metadata"]["name"]),
        labels={LABEL: None},
        indexers={"first-letter": lambda o: o["metadata"]["name"][0]},
    )
    informer._relist()
    assert names(informer, "r1") == ["a", "b"]
    assert names(informer, "a", "first-letter") == ["a"]
    assert informer.select("other", LABEL, "r1") == []

    informer._apply("MODIFIED", pod("b", "r2", "2"))  # relabelled
    informer._apply("ADDED", pod("d", None))  # not indexed
    informer._apply("DELETED", pod("a", "r1"))
    assert names(informer, "r1") == []
    assert names(informer, "r2") == ["b", "c"]
    assert informer.get("ns", "d") is not None

    api.items = [pod("c", "r1", "3")]
    informer._relist()
    assert names(informer, "r1") == ["c"]
    assert names(informer, "r2") == []
    assert [o["metadata"]["name"] for o in informer.items()] == ["c"]
    assert "c" in seen


def test_the_client_drops_managed_fields() -> None:
    """Nothing reads them, and they are often the larger part of a cached object."""
    obj = _to_dict(pod("a", "r1") | {"metadata": {"name": "a", "managedFields": [{}]}})
    assert obj == {"metadata": {"name": "a"}}
