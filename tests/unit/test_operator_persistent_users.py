"""The operator's persistent-user Secrets (features.md §2.5) over the in-memory API: created
once, never rewritten, deleted with the user, and never taken from another user's Secret."""

from __future__ import annotations

import base64
from typing import Any, cast

import pytest

from pgro.api.names import LABEL_PERSISTENT_USER, LABEL_REPLICA
from pgro.kube.client import KubeApi
from pgro.runtimes.kubernetes.provisioning import (
    ensure_persistent_user_secrets,
    persistent_user_credentials,
)
from pgro.runtimes.kubernetes.workloads import persistent_user_label
from tests.fixtures.kube_api import MemoryApi
from tests.fixtures.manifests import replica

NS = "team-a"


def orders(*users: dict[str, Any]) -> Any:
    return replica(
        "orders", namespace=NS, metadata={"uid": "uid-orders"}, persistentUsers=list(users)
    )


def kube(api: MemoryApi) -> KubeApi:
    return cast(KubeApi, api)


def data(api: MemoryApi, name: str) -> dict[str, str]:
    secret = api.objects[("Secret", NS, name)]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_secrets_are_made_once_and_deleted_with_their_user() -> None:
    api = MemoryApi()
    both = orders({"name": "tupaia_read"}, {"name": "bi", "secretName": "bi-login"})
    ensure_persistent_user_secrets(kube(api), both)
    first = data(api, "orders-user-tupaia-read")
    assert first["username"] == "tupaia_read" and len(first["password"]) == 32
    meta = api.objects[("Secret", NS, "bi-login")]["metadata"]
    assert meta["labels"][LABEL_PERSISTENT_USER] == "bi"
    assert meta["labels"][LABEL_REPLICA] == "orders"
    assert meta["ownerReferences"][0]["uid"] == "uid-orders"

    # Never rewritten.
    ensure_persistent_user_secrets(kube(api), both)
    assert data(api, "orders-user-tupaia-read") == first

    # A look-alike someone labelled (not owned by the replica) stays.
    api.create(
        {
            "kind": "Secret",
            "metadata": {
                "name": "not-ours",
                "namespace": NS,
                "labels": {LABEL_REPLICA: "orders", LABEL_PERSISTENT_USER: "gone"},
            },
        }
    )
    deleted = ensure_persistent_user_secrets(kube(api), orders({"name": "tupaia_read"}))
    assert deleted == ["bi-login"]
    assert ("Secret", NS, "bi-login") not in api.objects
    assert ("Secret", NS, "not-ours") in api.objects
    assert data(api, "orders-user-tupaia-read") == first

    [(user, creds)] = persistent_user_credentials(kube(api), orders({"name": "tupaia_read"}))
    assert (user.name, creds.username, creds.password) == (
        "tupaia_read",
        "tupaia_read",
        first["password"],
    )


def test_a_secret_name_pointing_at_another_users_secret_is_refused() -> None:
    api = MemoryApi()
    ensure_persistent_user_secrets(kube(api), orders({"name": "a"}))
    thief = orders({"name": "a"}, {"name": "b", "secretName": "orders-user-a"})
    ensure_persistent_user_secrets(kube(api), thief)  # exists: left as it is
    with pytest.raises(LookupError, match="is not persistent user b's") as caught:
        persistent_user_credentials(kube(api), thief)
    assert data(api, "orders-user-a")["password"] not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "label"),
    [("tupaia_read", "tupaia_read"), ("Report.Reader-1", "Report.Reader-1")],
)
def test_valid_label_values_are_the_name(name: str, label: str) -> None:
    assert persistent_user_label(name) == label


def test_other_names_get_a_slug_and_hash_that_is_a_label_value() -> None:
    odd = persistent_user_label("weird name!")
    long = persistent_user_label("x" * 63 + "é")
    assert odd.startswith("weird-name-") and len(odd) <= 63
    assert len(long) <= 63 and long != persistent_user_label("x" * 63 + "è")
    assert persistent_user_label("!!!").isalnum()
