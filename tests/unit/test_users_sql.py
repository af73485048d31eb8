"""The pure parts of pgro.postgres.users: passwords, credentials, input checks, scrubbing."""

from __future__ import annotations

import pytest
from psycopg import errors

from pgro.api.users import ExtraUser
from pgro.postgres.users import (
    PASSWORD_ALPHABET,
    REDACTED,
    AnalyticsOutcome,
    ExtraUserOutcome,
    ProvisioningFailed,
    ProvisionReport,
    RoleCredentials,
    SchemaGrants,
    _plan_users,
    _Scrubber,
    _step,
    generate_password,
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
    scrub = _Scrubber(["TopSecretPassword1"])
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
    assert str(exc) == (
        f"cannot reset role x: bad value {REDACTED} near {REDACTED} (SQLSTATE 22023)"
    )
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
