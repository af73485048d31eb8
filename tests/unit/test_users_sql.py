"""The pure parts of pgro.postgres.users: passwords, credentials, input checks, scrubbing."""

from __future__ import annotations

import pytest
from psycopg import errors, sql

from pgro.api.users import ExtraUser
from pgro.core.secrets import MASK, Scrubber
from pgro.postgres.users import (
    PASSWORD_ALPHABET,
    AnalyticsOutcome,
    DatabaseCatalog,
    ExtraUserOutcome,
    ProvisioningFailed,
    ProvisionReport,
    RoleCredentials,
    SchemaGrants,
    _plan_users,
    _step,
    analytics_grant_statements,
    analytics_privilege,
    generate_password,
    public_lockdown_statements,
    reset_statements,
)


def test_generated_passwords_are_32_alphanumerics_and_differ() -> None:
    drawn = {generate_password() for _ in range(200)}
    assert len(drawn) == 200
    for password in drawn:
        assert len(password) == 32
        assert set(password) <= set(PASSWORD_ALPHABET)
    assert set(PASSWORD_ALPHABET) == set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    )
    # Every character class turns up across draws (not, say, digits only).
    seen = set("".join(drawn))
    assert any(c.islower() for c in seen) and any(c.isupper() for c in seen)
    assert any(c.isdigit() for c in seen)


def test_credentials_never_show_the_password() -> None:
    creds = RoleCredentials("analytics", "s3cretS3cret")
    assert "s3cretS3cret" not in repr(creds)
    assert "s3cretS3cret" not in str(creds)
    assert "analytics" in repr(creds)
    with pytest.raises(AttributeError):
        creds.password = "other"  # type: ignore[misc]


def creds(name: str) -> RoleCredentials:
    return RoleCredentials(name, f"pw-of-{name}")


def test_plan_ignores_the_analytics_user_and_repeats() -> None:
    users, ignored = _plan_users(
        creds("analytics"),
        [
            (ExtraUser(name="reader", schemas=["a"]), creds("reader")),
            (ExtraUser(name=" "), creds("")),
            (ExtraUser(name="analytics"), creds("analytics")),
            (ExtraUser(name="reader", schemas=["b"]), creds("reader")),
            (ExtraUser(name="bare"), creds("bare")),
        ],
        "postgres",
    )
    assert [(u.name, u.schemas) for u in users] == [("reader", ("a",)), ("bare", ())]
    assert ignored == ["analytics", "reader"]


@pytest.mark.parametrize(
    ("analytics", "extra", "needle"),
    [
        (creds("postgres"), [], "bootstrap superuser"),
        (RoleCredentials("analytics", ""), [], "empty password"),
        (RoleCredentials(" analytics", "pw"), [], "invalid analytics username"),
        (creds("analytics"), [(ExtraUser(name="reader"), creds("writer"))], "credentials of"),
        (creds("analytics"), [(ExtraUser(name="postgres"), creds("postgres"))], "bootstrap"),
        (creds("analytics"), [(ExtraUser(name="r"), RoleCredentials("r", ""))], "empty password"),
    ],
)
def test_plan_refuses_inconsistent_input(
    analytics: RoleCredentials,
    extra: list[tuple[ExtraUser, RoleCredentials]],
    needle: str,
) -> None:
    with pytest.raises(ProvisioningFailed) as failed:
        _plan_users(analytics, extra, "postgres")
    assert failed.value.reason == "InvalidUsers"
    assert needle in str(failed.value)
    for _, c in extra:
        if c.password:
            assert c.password not in str(failed.value)


def test_database_errors_are_wrapped_with_secrets_scrubbed() -> None:
    scrub = Scrubber(["TopSecretPassword1"])
    scrub.add("SCRAM-SHA-256$4096:salt$key:server")
    with (
        pytest.raises(ProvisioningFailed) as failed,
        _step(scrub, "RoleProvisioningFailed", "cannot reset role x", role="x"),
    ):
        raise errors.InvalidParameterValue(
            "bad value TopSecretPassword1 near SCRAM-SHA-256$4096:salt$key:server"
        )
    exc = failed.value
    assert exc.reason == "RoleProvisioningFailed" and exc.role == "x"
    assert str(exc) == f"cannot reset role x: bad value {MASK} near {MASK} (SQLSTATE 22023)"
    assert "TopSecretPassword1" not in repr(exc.args)
    assert exc.__cause__ is None and exc.__suppress_context__


def test_report_summary_and_dict_name_missing_schemas() -> None:
    reporter = ExtraUserOutcome(
        "reporter",
        "created",
        ("reporting", "missing"),
        grants=[
            SchemaGrants("myapp", ("reporting",), ("missing",)),
            SchemaGrants("postgres", (), ("reporting", "missing")),
        ],
    )
    report = ProvisionReport(
        server_version_num=150000,
        analytics=AnalyticsOutcome("analytics", "reset", "pg_read_all_data", True),
        extra_users=[reporter],
        passwords_neutralised=["app_rw"],
        databases=["myapp", "postgres"],
    )
    assert reporter.schemas_missing == ["missing"]
    assert report.as_dict()["extra_users"] == [
        {
            "name": "reporter",
            "action": "created",
            "schemas": ["reporting", "missing"],
            "schemas_missing": ["missing"],
            "memberships_revoked": [],
            "grants": [
                {"database": "myapp", "granted": ["reporting"], "skipped": ["missing"]},
                {"database": "postgres", "granted": [], "skipped": ["reporting", "missing"]},
            ],
        }
    ]
    assert report.summary() == (
        "analytics user analytics reset (pg_read_all_data, read-only sessions); "
        "1 extra users; 1 restored passwords removed; grants in 2 databases; "
        "schemas not found (reporter: missing)"
    )


# -- the SQL that decides what each role may do (issue 18 items 7 and 8) ------------------


def render(statements: list[sql.Composed]) -> list[str]:
    return [s.as_string(None) for s in statements]


CATALOG = DatabaseCatalog(
    name="my app",
    schema_owner={"public": "app_owner", "dbt": "app_owner", "reporting": "app_owner"},
    writable_tables=("public.items", '"reporting"."Sales"'),
    caller_routines=("public.add_one(integer)",),
    public_relation_writes=(
        ("public.open_t", False, ("INSERT", "TRUNCATE")),
        ("reporting.counter", True, ("UPDATE", "USAGE")),
    ),
    public_routine_revokes=(
        "lo_create(oid)",
        "lo_from_bytea(oid,bytea)",
        "pg_read_file(text)",
        "public.write_t(integer)",
    ),
    large_object_writers=("lo_create(oid)", "lo_from_bytea(oid,bytea)", "lowrite(integer,bytea)"),
)


@pytest.mark.parametrize(
    ("read_only", "version", "expected"),
    [
        (True, 170000, "pg_read_all_data"),
        (True, 140000, "pg_read_all_data"),
        (True, 130000, "select_grants"),
        (True, 100000, "select_grants"),
        (False, 170000, "read_write"),
        (False, 130000, "read_write"),
    ],
)
def test_the_analytics_user_is_never_a_superuser(
    read_only: bool, version: int, expected: str
) -> None:
    """Before: `superuser` for readOnly false and for PostgreSQL ≤ 13 even when read-only."""
    assert analytics_privilege(read_only, version) == expected
    for privilege in ("pg_read_all_data", "select_grants", "read_write"):
        text = " ".join(
            render(
                analytics_grant_statements(
                    CATALOG,
                    analytics="analytics",
                    privilege=privilege,
                    persistent_schemas=("dbt",),
                    server_version_num=version,
                )
            )
        )
        assert "SUPERUSER" not in text.upper().replace("NOSUPERUSER", "")
        for never in ("pg_execute_server_program", "pg_write_server_files", "lo_import", "TRIGGER"):
            assert never not in text


def test_read_only_on_postgresql_13_gets_select_not_superuser() -> None:
    assert render(
        analytics_grant_statements(
            CATALOG,
            analytics="analytics",
            privilege="select_grants",
            persistent_schemas=(),
            server_version_num=130012,
        )
    ) == [
        'GRANT CONNECT ON DATABASE "my app" TO "analytics"',
        'GRANT USAGE ON SCHEMA "public", "dbt", "reporting" TO "analytics"',
        'GRANT SELECT ON ALL TABLES IN SCHEMA "public", "dbt", "reporting" TO "analytics"',
        'GRANT SELECT ON ALL SEQUENCES IN SCHEMA "public", "dbt", "reporting" TO "analytics"',
        'GRANT EXECUTE ON ROUTINE public.add_one(integer) TO "analytics"',
    ]


def test_read_only_from_postgresql_14_relies_on_pg_read_all_data() -> None:
    assert render(
        analytics_grant_statements(
            CATALOG,
            analytics="analytics",
            privilege="pg_read_all_data",
            persistent_schemas=(),
            server_version_num=150000,
        )
    ) == [
        'GRANT CONNECT ON DATABASE "my app" TO "analytics"',
        'GRANT EXECUTE ON ROUTINE public.add_one(integer) TO "analytics"',
    ]


def test_write_capable_gets_dml_create_and_its_persistent_schemas() -> None:
    assert render(
        analytics_grant_statements(
            CATALOG,
            analytics="analytics",
            privilege="read_write",
            persistent_schemas=("dbt", "absent"),
            server_version_num=100000,
        )
    ) == [
        'GRANT CONNECT, CREATE, TEMPORARY ON DATABASE "my app" TO "analytics"',
        'GRANT USAGE, CREATE ON SCHEMA "public", "dbt", "reporting" TO "analytics"',
        'GRANT SELECT ON ALL TABLES IN SCHEMA "public", "dbt", "reporting" TO "analytics"',
        'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA "public", "dbt", "reporting" '
        'TO "analytics"',
        # Tables only: a write through a view is checked as the view's owner.
        'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLE public.items, "reporting"."Sales" '
        'TO "analytics"',
        "GRANT EXECUTE ON FUNCTION lo_create(oid), lo_from_bytea(oid,bytea), "
        'lowrite(integer,bytea) TO "analytics"',
        'ALTER SCHEMA "dbt" OWNER TO "analytics"',  # "absent" is not in this database
        'GRANT EXECUTE ON FUNCTION public.add_one(integer) TO "analytics"',  # ≤ 10: FUNCTION
    ]


def test_public_loses_every_write_path() -> None:
    """Before: only the application schemas' grants were revoked from PUBLIC; TEMP, CREATE
    on the database, SECURITY DEFINER functions and large-object writers stayed."""
    assert render(
        public_lockdown_statements(CATALOG, extra_users=["reader"], server_version_num=130000)
    ) == [
        'REVOKE CREATE, TEMPORARY ON DATABASE "my app" FROM PUBLIC',
        'REVOKE ALL ON SCHEMA "public", "dbt", "reporting" FROM PUBLIC, "reader"',
        'REVOKE ALL ON ALL TABLES IN SCHEMA "public", "dbt", "reporting" FROM PUBLIC, "reader"',
        'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "public", "dbt", "reporting" FROM PUBLIC, "reader"',
        'REVOKE ALL ON ALL ROUTINES IN SCHEMA "public", "dbt", "reporting" FROM PUBLIC, "reader"',
        "REVOKE INSERT, TRUNCATE ON TABLE public.open_t FROM PUBLIC",
        "REVOKE UPDATE, USAGE ON SEQUENCE reporting.counter FROM PUBLIC",
        "REVOKE EXECUTE ON ROUTINE lo_create(oid), lo_from_bytea(oid,bytea), "
        "pg_read_file(text), public.write_t(integer) FROM PUBLIC",
    ]


def test_an_unknown_privilege_name_never_reaches_the_sql() -> None:
    odd = DatabaseCatalog(
        name="db",
        schema_owner={},
        public_relation_writes=(("public.t", False, ("INSERT", "DROP TABLE x; --")),),
    )
    assert render(public_lockdown_statements(odd, extra_users=[], server_version_num=150000)) == [
        'REVOKE CREATE, TEMPORARY ON DATABASE "db" FROM PUBLIC',
        "REVOKE INSERT ON TABLE public.t FROM PUBLIC",
    ]


def test_reset_reassigns_and_drops_what_each_role_held() -> None:
    assert render(reset_statements(["analytics", 'we"ird'])) == [
        'REASSIGN OWNED BY "analytics" TO CURRENT_USER',
        'DROP OWNED BY "analytics"',
        'REASSIGN OWNED BY "we""ird" TO CURRENT_USER',
        'DROP OWNED BY "we""ird"',
    ]
