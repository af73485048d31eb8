"""The pure parts of pgro.postgres.persistent_users: the SQL it sends and the input it takes
(reference `persistent_users.rs` unit tests)."""

from __future__ import annotations

import pytest
from psycopg import sql

from pgro.api.users import PersistentUser
from pgro.postgres.persistent_users import (
    PersistentUserOutcome,
    PersistentUsersReport,
    grant_statements,
    plan_persistent_users,
    role_statements,
)
from pgro.postgres.users import ProvisioningFailed, RoleCredentials


def render(statements: list[sql.Composed]) -> list[str]:
    return [s.as_string(None) for s in statements]


def user(name: str = "tupaia_read", **kw: object) -> PersistentUser:
    return PersistentUser.model_validate({"name": name, **kw})


def test_grants_cover_the_full_sequence_with_the_owner_named_explicitly() -> None:
    u = user(readSchemas=["analytics", "reporting"])
    statements, granted, missing = grant_statements(
        u, "tupaia", {"analytics": "app_owner", "reporting": "dbt", "other": "x"}
    )
    assert render(statements) == [
        'GRANT CONNECT ON DATABASE "tupaia" TO "tupaia_read"',
        'GRANT USAGE ON SCHEMA "analytics" TO "tupaia_read"',
        'GRANT SELECT ON ALL TABLES IN SCHEMA "analytics" TO "tupaia_read"',
        'GRANT SELECT, USAGE ON ALL SEQUENCES IN SCHEMA "analytics" TO "tupaia_read"',
        'ALTER DEFAULT PRIVILEGES FOR ROLE "app_owner" IN SCHEMA "analytics" '
        'GRANT SELECT ON TABLES TO "tupaia_read"',
        'ALTER DEFAULT PRIVILEGES FOR ROLE "app_owner" IN SCHEMA "analytics" '
        'GRANT SELECT, USAGE ON SEQUENCES TO "tupaia_read"',
        'GRANT USAGE ON SCHEMA "reporting" TO "tupaia_read"',
        'GRANT SELECT ON ALL TABLES IN SCHEMA "reporting" TO "tupaia_read"',
        'GRANT SELECT, USAGE ON ALL SEQUENCES IN SCHEMA "reporting" TO "tupaia_read"',
        'ALTER DEFAULT PRIVILEGES FOR ROLE "dbt" IN SCHEMA "reporting" '
        'GRANT SELECT ON TABLES TO "tupaia_read"',
        'ALTER DEFAULT PRIVILEGES FOR ROLE "dbt" IN SCHEMA "reporting" '
        'GRANT SELECT, USAGE ON SEQUENCES TO "tupaia_read"',
    ]
    assert (granted, missing) == (("analytics", "reporting"), ())
    # Nothing but reads: no write privilege, no schema the user did not list.
    text = " ".join(render(statements))
    for word in ("INSERT", "UPDATE", "DELETE", "CREATE", "TRUNCATE", '"other"'):
        assert word not in text


def test_absent_schemas_produce_no_grants_and_are_reported() -> None:
    u = user(readSchemas=["gone", "here", "gone"])
    statements, granted, missing = grant_statements(u, "db", {"here": "owner"})
    assert granted == ("here",)
    assert missing == ("gone",)
    assert not any('"gone"' in s for s in render(statements))
    report = PersistentUsersReport(
        "db", (PersistentUserOutcome(u.name, "created", granted, missing),)
    )
    assert report.missing == ["tupaia_read/gone"]
    assert "tupaia_read/gone" in report.missing_note() and "db" in report.missing_note()


def test_no_read_schemas_still_connects() -> None:
    statements, granted, missing = grant_statements(user(), "db", {"public": "postgres"})
    assert render(statements) == ['GRANT CONNECT ON DATABASE "db" TO "tupaia_read"']
    assert granted == missing == ()


def test_role_is_noinherit_and_search_path_is_optional() -> None:
    assert render(role_statements(user())) == ['ALTER ROLE "tupaia_read" WITH NOINHERIT']
    assert render(role_statements(user(searchPath=["analytics", "$user", "public"]))) == [
        'ALTER ROLE "tupaia_read" WITH NOINHERIT',
        'ALTER ROLE "tupaia_read" SET search_path = "analytics", "$user", "public"',
    ]


def test_identifiers_are_quoted() -> None:
    hostile = 'x"; DROP ROLE postgres; --'
    u = user(hostile, readSchemas=['s"1'], searchPath=['s"1'])
    text = render(role_statements(u)) + render(grant_statements(u, 'd"b', {'s"1': 'o"w'})[0])
    assert 'ALTER ROLE "x""; DROP ROLE postgres; --" WITH NOINHERIT' in text
    assert 'ALTER ROLE "x""; DROP ROLE postgres; --" SET search_path = "s""1"' in text
    assert 'GRANT CONNECT ON DATABASE "d""b" TO "x""; DROP ROLE postgres; --"' in text
    assert any('FOR ROLE "o""w" IN SCHEMA "s""1"' in s for s in text)


def test_plan_ignores_reserved_names_and_repeats() -> None:
    a, b = user("a"), user("b")
    kept, ignored = plan_persistent_users(
        [
            (a, RoleCredentials("a", "pa")),
            (user("analytics"), RoleCredentials("analytics", "px")),
            (user("postgres"), RoleCredentials("postgres", "py")),
            (b, RoleCredentials("b", "pb")),
            (user("a"), RoleCredentials("a", "pa2")),
        ],
        reserved=["postgres", "analytics"],
    )
    assert [u.name for u, _ in kept] == ["a", "b"]
    assert ignored == ["analytics", "postgres", "a"]
    note = PersistentUsersReport(None, ignored=tuple(ignored)).ignored_note()
    assert "analytics, postgres, a" in note


@pytest.mark.parametrize(
    ("creds", "message"),
    [
        (RoleCredentials("b", "pw"), "was given the credentials of 'b'"),
        (RoleCredentials("a", ""), "empty password"),
    ],
)
def test_plan_refuses_credentials_that_do_not_fit(creds: RoleCredentials, message: str) -> None:
    with pytest.raises(ProvisioningFailed) as caught:
        plan_persistent_users([(user("a"), creds)], reserved=[])
    assert message in caught.value.message
    assert caught.value.reason == "InvalidUsers"
