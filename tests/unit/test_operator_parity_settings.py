"""The reference's small operator settings (features.md §2.18-2.19): `PGRO_LOG_LEVEL` on the
restored servers, `POD_NAME` for the version annotation, `usePortForward` refused."""

from __future__ import annotations

import pytest

from pgro.cli.operator_settings import parse_operator_settings
from pgro.runtimes.kubernetes import workloads as wl
from pgro.runtimes.kubernetes.config import (
    USE_PORT_FORWARD_UNSUPPORTED,
    OperatorConfig,
    parse_operator_config,
    parse_postgres_log_level,
)
from tests.fixtures import manifests

IMAGE = "ghcr.io/beyondessential/pgro:1.2.3"


@pytest.mark.parametrize(
    ("raw", "level"),
    [("warning", "warning"), ("DEBUG1", "debug1"), (" info ", "info"), ("panic", "panic")],
)
def test_a_postgres_level_is_taken_in_lower_case(raw: str, level: str) -> None:
    assert parse_postgres_log_level(raw) == (level, [])


@pytest.mark.parametrize("raw", [None, "", "  "])
def test_no_level_leaves_the_servers_own(raw: str | None) -> None:
    assert parse_postgres_log_level(raw) == (None, [])


@pytest.mark.parametrize("raw", ["warn", "debug", "trace", "info; DROP", "-c fsync=off"])
def test_an_unknown_level_is_ignored_with_a_warning(raw: str) -> None:
    level, warnings = parse_postgres_log_level(raw)
    assert level is None
    [warning] = warnings
    assert warning.startswith(f"PGRO_LOG_LEVEL: {raw!r} is not a PostgreSQL log_min_messages")
    assert "debug5, debug4" in warning and "ignored" in warning


def test_the_environment_reaches_the_settings() -> None:
    settings, warnings = parse_operator_settings(
        {"PGRO_LOG_LEVEL": "Notice", "POD_NAME": "postgres-restore-operator-abc12"}
    )
    assert warnings == []
    assert settings.postgres_log_level == "notice"
    assert settings.pod_name == "postgres-restore-operator-abc12"
    settings, warnings = parse_operator_settings({"PGRO_LOG_LEVEL": "verbose"})
    assert settings.postgres_log_level is None and settings.pod_name is None
    assert len(warnings) == 1 and "PGRO_LOG_LEVEL" in warnings[0]


def _postgres_args(config: OperatorConfig) -> list[str]:
    replica = manifests.replica("fiji", namespace="analytics", metadata={"uid": "u-1"})
    restore = manifests.restore(
        "fiji-20260301-120000", replica="fiji", namespace="analytics", snapshotSize="100Gi"
    )
    dep = wl.postgres_deployment(replica, restore, config, None, "15")
    [postgres] = dep["spec"]["template"]["spec"]["containers"]
    args: list[str] = postgres["args"]
    return args


def test_the_level_is_passed_to_the_restored_server_last() -> None:
    config, _ = parse_operator_config(None, default_image=IMAGE, postgres_log_level="debug2")
    args = _postgres_args(config)
    assert args[-2:] == ["-c", "log_min_messages=debug2"]
    assert args.count("-c") * 2 == len(args) - 2  # every setting is one `-c k=v` pair
    plain, _ = parse_operator_config(None, default_image=IMAGE)
    assert not any(a.startswith("log_min_messages=") for a in _postgres_args(plain))


def test_use_port_forward_is_refused_with_a_warning() -> None:
    config, warnings = parse_operator_config({"usePortForward": "true"}, default_image=IMAGE)
    assert config.use_port_forward is True  # read, so the operator can report it
    assert warnings == [USE_PORT_FORWARD_UNSUPPORTED]
    assert "not supported" in USE_PORT_FORWARD_UNSUPPORTED
    assert "pod IP" in USE_PORT_FORWARD_UNSUPPORTED
    for value in ("false", "", "yes"):
        assert parse_operator_config({"usePortForward": value}, default_image=IMAGE)[1] == []
