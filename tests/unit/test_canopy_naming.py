"""Canopy Namespace names and labels, against the reference's test vectors (§6.2)."""

from __future__ import annotations

from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgro.api.meta import dns1123_label_problem
from pgro.canopy.naming import (
    MANAGED_SELECTOR,
    REPLICA_NAME,
    canopy_labels,
    label_value_problem,
    name_hash,
    namespace_name,
    slug,
)

REPLICA = UUID("11111111-1111-1111-1111-111111111111")
GROUP = UUID("22222222-2222-2222-2222-222222222222")
SERVER = UUID("33333333-3333-3333-3333-333333333333")


# -- every vector the reference lists --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Nauru Prod Analytics!", "nauru-prod-analytics"),
        ("a__b--c/d.e", "a-b-c-d-e"),
    ],
)
def test_reference_slug_vectors(name: str, expected: str) -> None:
    assert slug(name) == expected


@pytest.mark.parametrize(
    ("server", "expected"),
    [(SERVER, "15de9039"), (GROUP, "2488bf71")],
)
def test_reference_hash_vectors(server: UUID, expected: str) -> None:
    assert name_hash(REPLICA, server) == expected


def test_reference_stub_fixture_namespace() -> None:
    assert namespace_name("int-test", REPLICA, SERVER) == "int-test-15de9039"


# -- the slug rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "replica"),
        ("!!!", "replica"),
        ("---", "replica"),
        ("ÑANDÚ", "and"),  # non-ASCII letters are separators, not transliterated
        ("日本", "replica"),
        ("  Fiji  Central ", "fiji-central"),
        ("ABC123", "abc123"),
        ("a" * 60, "a" * 50),
        # Cut at 50, which leaves a trailing '-' that is then trimmed.
        ("a" * 49 + " bcd", "a" * 49),
    ],
)
def test_slug_rules(name: str, expected: str) -> None:
    assert slug(name) == expected


def test_hash_depends_on_order_of_ids() -> None:
    assert name_hash(REPLICA, SERVER) != name_hash(SERVER, REPLICA)


@given(st.text(max_size=200), st.uuids(), st.uuids())
def test_namespace_is_always_a_valid_kubernetes_name(
    name: str, replica: UUID, server: UUID
) -> None:
    namespace = namespace_name(name, replica, server)
    assert dns1123_label_problem(namespace) is None
    assert len(namespace) <= 59


# -- labels ------------------------------------------------------------------------------------


def test_labels_name_the_declaration_group_machine_type_and_intent() -> None:
    labels = canopy_labels(
        replica_id=REPLICA,
        group_id=GROUP,
        server_id=SERVER,
        type="tamanu-postgres",
        intent="verify",
    )
    assert labels == {
        "pgro.bes.au/managed-by": "pgro-canopy",
        "pgro.bes.au/declaration-id": str(REPLICA),
        "pgro.bes.au/group": str(GROUP),
        "pgro.bes.au/server": str(SERVER),
        "pgro.bes.au/type": "tamanu-postgres",
        "pgro.bes.au/intent": "verify",
    }
    assert MANAGED_SELECTOR == "pgro.bes.au/managed-by=pgro-canopy"
    assert REPLICA_NAME == "canopy-replica"


@pytest.mark.parametrize("bad", ["tamanu postgres", "-lead", "x" * 64, "a/b"])
def test_a_type_that_cannot_be_a_label_is_refused_with_the_key(bad: str) -> None:
    assert label_value_problem(bad) is not None
    with pytest.raises(ValueError, match=r"pgro\.bes\.au/type"):
        canopy_labels(
            replica_id=REPLICA, group_id=GROUP, server_id=SERVER, type=bad, intent="verify"
        )


@pytest.mark.parametrize("good", ["", "tamanu-postgres", "a.b_c-d", "x" * 63])
def test_valid_label_values(good: str) -> None:
    assert label_value_problem(good) is None
