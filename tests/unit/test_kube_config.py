"""Operator ConfigMap and environment parsing, and the placement merge rules
(reference replica-lifecycle.md §4.1-4.2, restore-pipeline.md §8.6)."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

from pgro.cli import operator_settings
from pgro.cli.operator_settings import parse_listen_addr, parse_operator_settings
from pgro.runtimes.kubernetes.config import (
    USE_PORT_FORWARD_UNSUPPORTED,
    OperatorConfig,
    Placement,
    Toleration,
    parse_operator_config,
    with_placement,
)

IMAGE = "ghcr.io/beyondessential/pgro:1.2.3"


def parse(data: dict[str, str] | None) -> tuple[OperatorConfig, list[str]]:
    return parse_operator_config(data, default_image=IMAGE)


# ---------------------------------------------------------------------- ConfigMap


def test_missing_config_map_gives_defaults() -> None:
    config, warnings = parse(None)
    assert config == OperatorConfig(
        max_concurrent_restores=2, restore_image=IMAGE, use_port_forward=False
    )
    assert config.placement.is_empty
    assert warnings == []


def test_empty_config_map_gives_defaults() -> None:
    assert parse({}) == parse(None)


def test_every_key_parsed() -> None:
    config, warnings = parse(
        {
            "maxConcurrentRestores": "5",
            "kopiaImage": "registry.local/pgro:test",
            "usePortForward": "true",
            "nodeSelector": "bes.node.purpose=workload",
            "podAnnotations": "karpenter.sh/do-not-disrupt=true",
            "tolerations": "dedicated=db:NoSchedule",
        }
    )
    # Read, and refused with a warning: pgro connects by pod IP (docs/operator.md).
    assert warnings == [USE_PORT_FORWARD_UNSUPPORTED]
    assert config.max_concurrent_restores == 5
    assert config.restore_image == "registry.local/pgro:test"
    assert config.use_port_forward is True
    assert dict(config.placement.node_selector) == {"bes.node.purpose": "workload"}
    assert dict(config.placement.pod_annotations) == {"karpenter.sh/do-not-disrupt": "true"}
    assert config.placement.tolerations == (
        Toleration(key="dedicated", operator="Equal", value="db", effect="NoSchedule"),
    )


@pytest.mark.parametrize("raw", ["abc", "-1", "0", "1.5", " "])
def test_invalid_max_concurrent_restores_falls_back_with_warning(raw: str) -> None:
    config, warnings = parse({"maxConcurrentRestores": raw})
    assert config.max_concurrent_restores == 2
    if raw.strip():
        assert len(warnings) == 1
        assert "maxConcurrentRestores" in warnings[0]
        assert repr(raw) in warnings[0]
    else:
        assert warnings == []


def test_max_concurrent_restores_trims_whitespace() -> None:
    assert parse({"maxConcurrentRestores": " 7 "})[0].max_concurrent_restores == 7


@pytest.mark.parametrize("raw", ["", "   "])
def test_empty_image_means_default(raw: str) -> None:
    assert parse({"kopiaImage": raw})[0].restore_image == IMAGE


@pytest.mark.parametrize(
    "raw",
    ["kopia/kopia:0.22.3", "docker.io/kopia/kopia:latest", "ghcr.io/acme/kopia@sha256:ab12"],
)
def test_the_references_kopia_image_is_ignored_with_a_warning(raw: str) -> None:
    config, warnings = parse({"kopiaImage": raw})
    assert config.restore_image == IMAGE
    [warning] = warnings
    assert raw in warning and IMAGE in warning and "kopiaImage" in warning


@pytest.mark.parametrize("raw", ["registry.local/pgro:test", "ghcr.io/acme/kopia-tools/pgro:1"])
def test_a_pgro_image_is_used_as_given(raw: str) -> None:
    config, warnings = parse({"kopiaImage": raw})
    assert (config.restore_image, warnings) == (raw, [])


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("True", False), ("1", False)])
def test_port_forward_only_exact_true(raw: str, expected: bool) -> None:
    assert parse({"usePortForward": raw})[0].use_port_forward is expected


def test_pairs_split_on_first_equals_and_trim() -> None:
    config, warnings = parse({"nodeSelector": " a = 1 ,, c= ", "podAnnotations": "b=x=y"})
    assert dict(config.placement.node_selector) == {"a": "1", "c": ""}
    assert dict(config.placement.pod_annotations) == {"b": "x=y"}
    assert warnings == []


def test_values_the_api_server_would_reject_are_skipped_with_a_warning() -> None:
    """The reference copies them into every pod, and then no pod can be created."""
    config, warnings = parse(
        {"nodeSelector": "zone=a=b,bad key=x,example.com/tier=gold,-x=1", "podAnnotations": "a b=1"}
    )
    assert dict(config.placement.node_selector) == {"example.com/tier": "gold"}
    assert dict(config.placement.pod_annotations) == {}
    assert len(warnings) == 4
    assert any("zone='a=b'" in w and "label value" in w for w in warnings)
    assert any("'bad key'" in w for w in warnings)


def test_malformed_pairs_are_skipped_and_named() -> None:
    config, warnings = parse({"podAnnotations": "good=1,novalue,=orphan", "nodeSelector": "x"})
    assert dict(config.placement.pod_annotations) == {"good": "1"}
    assert dict(config.placement.node_selector) == {}
    assert len(warnings) == 3
    assert any("'novalue'" in w and w.startswith("podAnnotations") for w in warnings)
    assert any("'=orphan'" in w for w in warnings)
    assert any(w.startswith("nodeSelector") and "'x'" in w for w in warnings)


def test_tolerations_equal_exists_and_malformed() -> None:
    config, warnings = parse(
        {
            "tolerations": "a=b:NoSchedule, c:NoExecute ,d=e:Bogus,noeffect,:NoSchedule,"
            "f=g=h:PreferNoSchedule,c:NoExecute"
        }
    )
    assert [t.to_wire() for t in config.placement.tolerations] == [
        {"key": "a", "operator": "Equal", "value": "b", "effect": "NoSchedule"},
        {"key": "c", "operator": "Exists", "effect": "NoExecute"},
    ]
    assert len(warnings) == 4
    for bad in ("'d=e:Bogus'", "'noeffect'", "':NoSchedule'", "f='g=h'"):
        assert any(bad in w for w in warnings), bad


# ---------------------------------------------------------------------- environment


def test_settings_defaults() -> None:
    settings, warnings = parse_operator_settings({})
    assert warnings == []
    assert settings.ready_timeout_floor_secs == 1800
    assert settings.namespace == "postgres-restore-operator"
    assert (settings.metrics_host, settings.metrics_port) == ("::", 8080)
    assert (
        settings.pgro_image == f"ghcr.io/beyondessential/pgro:{importlib.metadata.version('pgro')}"
    )


def test_settings_from_env() -> None:
    settings, warnings = parse_operator_settings(
        {
            "DEPLOYMENT_READY_TIMEOUT_SECS": "3600",
            "OPERATOR_NAMESPACE": "ops",
            "METRICS_ADDR": "0.0.0.0:9090",
            "PGRO_IMAGE": "registry.local/pgro:dev",
        },
        serviceaccount_namespace="from-file",
    )
    assert warnings == []
    assert settings.ready_timeout_floor_secs == 3600
    assert settings.namespace == "ops"
    assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", 9090)  # noqa: S104
    assert settings.pgro_image == "registry.local/pgro:dev"


def test_namespace_from_serviceaccount_file_when_env_unset() -> None:
    settings, _ = parse_operator_settings({}, serviceaccount_namespace="pgro-system\n")
    assert settings.namespace == "pgro-system"


@pytest.mark.parametrize("raw", ["soon", "-5", "1.5"])
def test_invalid_ready_timeout_falls_back_with_warning(raw: str) -> None:
    settings, warnings = parse_operator_settings({"DEPLOYMENT_READY_TIMEOUT_SECS": raw})
    assert settings.ready_timeout_floor_secs == 1800
    assert len(warnings) == 1
    assert "DEPLOYMENT_READY_TIMEOUT_SECS" in warnings[0]


@pytest.mark.parametrize("raw", ["8080", "[::]", "host:", "host:99999", "[::1:80"])
def test_invalid_metrics_addr_falls_back_with_warning(raw: str) -> None:
    settings, warnings = parse_operator_settings({"METRICS_ADDR": raw})
    assert (settings.metrics_host, settings.metrics_port) == ("::", 8080)
    assert len(warnings) == 1
    assert "METRICS_ADDR" in warnings[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("[::]:8080", ("::", 8080)),
        ("[::1]:9", ("::1", 9)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_listen_addr(raw: str, expected: tuple[str, int]) -> None:
    assert parse_listen_addr(raw) == expected


def test_version_falls_back_to_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert operator_settings.default_pgro_image() == "ghcr.io/beyondessential/pgro:dev"


# ---------------------------------------------------------------------- placement


PLACEMENT = Placement(
    node_selector={"bes.node.purpose": "workload", "zone": "a"},
    pod_annotations={"karpenter.sh/do-not-disrupt": "true", "team": "ops"},
    tolerations=(
        Toleration(key="dedicated", operator="Equal", value="db", effect="NoSchedule"),
        Toleration(key="spot", operator="Exists", effect="NoExecute"),
    ),
)


def template() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"x": "y"}, "annotations": {"team": "analytics"}},
        "spec": {
            "nodeSelector": {"zone": "b"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoExecute"}],
            "containers": [{"name": "c"}],
        },
    }


def test_existing_keys_on_template_win() -> None:
    merged = with_placement(template(), PLACEMENT)
    assert merged["metadata"]["annotations"] == {
        "team": "analytics",
        "karpenter.sh/do-not-disrupt": "true",
    }
    assert merged["spec"]["nodeSelector"] == {"zone": "b", "bes.node.purpose": "workload"}
    assert merged["metadata"]["labels"] == {"x": "y"}


def test_tolerations_appended_without_duplicates() -> None:
    merged = with_placement(template(), PLACEMENT)
    assert merged["spec"]["tolerations"] == [
        {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
        {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"},
    ]


def test_placement_onto_bare_template() -> None:
    merged = with_placement({"spec": {"containers": []}}, PLACEMENT)
    assert merged["metadata"]["annotations"] == dict(PLACEMENT.pod_annotations)
    assert merged["spec"]["nodeSelector"] == dict(PLACEMENT.node_selector)
    assert len(merged["spec"]["tolerations"]) == 2


def test_empty_placement_leaves_template_identical() -> None:
    original = template()
    assert with_placement(original, Placement()) == original
    bare = {"metadata": {"labels": {}}, "spec": {"containers": []}}
    assert with_placement(bare, Placement()) == bare


def test_with_placement_does_not_mutate_its_input() -> None:
    original = template()
    with_placement(original, PLACEMENT)
    assert original == template()
