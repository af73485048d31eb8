"""One read-only rule for both runtimes (reference restore-pipeline §4.6)."""

from __future__ import annotations

from typing import Any

import pytest

from pgro.core.access import analytics_owned_schemas, effective_read_only
from tests.fixtures.manifests import replica, restore


@pytest.mark.parametrize(
    ("replica_spec", "restore_spec", "expected"),
    [
        ({}, {}, True),
        ({"readOnly": False}, {}, False),
        ({"persistentSchemas": ["reporting"]}, {}, False),
        ({"persistentSchemas": []}, {}, True),
        # Redaction writes as the superuser, in its own session: users never get a window.
        ({"redaction": {"manifestUrl": "https://x/{version}", "version": "1"}}, {}, True),
        (
            {
                "redaction": {"manifestUrl": "https://x/{version}", "version": "1"},
                "readOnly": False,
            },
            {},
            False,
        ),
        ({}, {"migrateTo": {"version": "2.1", "versionId": "v"}}, False),
    ],
)
def test_read_only_unless_a_later_step_must_write(
    replica_spec: dict[str, Any], restore_spec: dict[str, Any], expected: bool
) -> None:
    assert effective_read_only(replica(**replica_spec), restore(**restore_spec)) is expected


@pytest.mark.parametrize(
    ("replica_spec", "restore_spec", "expected"),
    [
        ({}, {}, ()),
        ({"readOnly": False}, {}, ()),
        ({"persistentSchemas": ["dbt", "reporting", "dbt"]}, {}, ("dbt", "reporting")),
        ({"persistentSchemas": []}, {}, ()),
        (
            {"persistentSchemas": ["dbt"], "readOnly": False},
            {"migrateTo": {"version": "2.1", "versionId": "v"}},
            ("dbt",),
        ),
        ({"redaction": {"manifestUrl": "https://x/{version}", "version": "1"}}, {}, ()),
    ],
)
def test_the_analytics_user_owns_only_the_persistent_schemas_of_a_writable_restore(
    replica_spec: dict[str, Any], restore_spec: dict[str, Any], expected: tuple[str, ...]
) -> None:
    assert analytics_owned_schemas(replica(**replica_spec), restore(**restore_spec)) == expected
