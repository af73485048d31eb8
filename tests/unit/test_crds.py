"""The generated CRDs: structural, complete, and in agreement with the `pgro.api` models.

The checker and validator below follow the API server's rules (apiextensions structural
schema invariants, kube-openapi value validation) closely enough to catch what it would
refuse; the integration tests apply the same CRDs to a real API server.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from pgro.api import (
    ConnectionInfo,
    JobPhase,
    JobStatus,
    MigrationResult,
    MigrationTiming,
    NotificationStatus,
    PostgresPhysicalReplica,
    PostgresPhysicalReplicaSpec,
    PostgresPhysicalReplicaStatus,
    PostgresPhysicalRestoreSpec,
    PostgresPhysicalRestoreStatus,
    RedactionPhase,
    ReplicaPhase,
    RestorePhase,
    SchemaBuildResult,
    SchemaMigrationPhase,
    SecretHeaderValue,
    parse_quantity,
    set_condition,
)
from pgro.api.crds import CRD_NAMES, crd_documents, crds_yaml
from pgro.api.data_checks import DataCheck, DataCheckFinding, DataChecks
from pgro.api.names import GROUP, VERSION
from pgro.api.users import ExtraUser
from pgro.api.verification import PendingVerificationReport
from pgro.cli.crds import crds_command
from tests.fixtures.manifests import replica_doc

ROOT = Path(__file__).resolve().parents[2]
CRDS_FILE = ROOT / "deploy" / "crds.yaml"

Schema = Mapping[str, Any]

NOW = datetime(2026, 5, 1, 3, 4, 5, tzinfo=UTC)

# --- the structural-schema checker ----------------------------------------------------------

# Every key of apiextensions/v1 JSONSchemaProps.
_SCHEMA_PROPS_KEYS = frozenset(
    {
        "id",
        "$schema",
        "$ref",
        "description",
        "type",
        "format",
        "title",
        "default",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "uniqueItems",
        "multipleOf",
        "enum",
        "maxProperties",
        "minProperties",
        "required",
        "items",
        "allOf",
        "oneOf",
        "anyOf",
        "not",
        "properties",
        "additionalProperties",
        "patternProperties",
        "dependencies",
        "additionalItems",
        "definitions",
        "externalDocs",
        "example",
        "nullable",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-int-or-string",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-list-type",
        "x-kubernetes-map-type",
        "x-kubernetes-validations",
    }
)
# Allowed by the API server but never needed here; their presence means the rewrite let
# pydantic output through unconverted.
_UNWANTED_KEYS = frozenset(
    {"id", "$schema", "$ref", "definitions", "title", "allOf", "oneOf", "not", "dependencies"}
    | {"patternProperties", "additionalItems", "uniqueItems", "x-kubernetes-embedded-resource"}
)
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})
_FORMATS = frozenset({"date-time", "int32", "int64"})
_INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]


def structural_problems(node: Any, path: str = "", level: str = "root") -> list[str]:
    """What the API server would refuse in `node` as a CRD schema (empty when structural)."""
    if not isinstance(node, Mapping):
        return [f"{path}: a schema must be a mapping, got {node!r}"]
    out: list[str] = []
    unknown = set(node) - _SCHEMA_PROPS_KEYS
    if unknown:
        out.append(f"{path}: not JSONSchemaProps keys: {sorted(unknown)}")
    unwanted = set(node) & _UNWANTED_KEYS
    if unwanted:
        out.append(f"{path}: unconverted keys {sorted(unwanted)}")
    kind = node.get("type")
    int_or_string = node.get("x-kubernetes-int-or-string", False)
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "x-kubernetes-preserve-unknown-fields" in node and preserve is not True:
        out.append(f"{path}: x-kubernetes-preserve-unknown-fields must be true when set")
    if int_or_string and preserve:
        out.append(f"{path}: int-or-string and preserve-unknown-fields exclude each other")
    if kind is None and not int_or_string and not preserve:
        out.append(f"{path}: type must not be empty ({level})")
    if kind is not None and kind not in _TYPES:
        out.append(f"{path}: unknown type {kind!r}")
    if int_or_string and kind is not None:
        out.append(f"{path}: an int-or-string node has no type")
    if level == "root" and kind != "object":
        out.append(f"{path}: the root must be an object")
    if "anyOf" in node and not (int_or_string and node["anyOf"] == _INT_OR_STRING_ANY_OF):
        out.append(f"{path}: anyOf is only allowed as int-or-string's [integer, string]")
    if kind == "array" and "items" not in node:
        out.append(f"{path}: an array needs items")
    if "items" in node and kind != "array":
        out.append(f"{path}: items on a non-array")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties exclude each other")
    if "additionalProperties" in node:
        if level == "root":
            out.append(f"{path}: additionalProperties at the root")
        if not isinstance(node["additionalProperties"], Mapping):
            out.append(f"{path}: additionalProperties must be a schema, not a boolean")
    if ("properties" in node or "additionalProperties" in node) and kind != "object":
        out.append(f"{path}: object keywords on a non-object")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            out.append(f"{path}: {key} must be a boolean in OpenAPI v3.0")
    if "format" in node and node["format"] not in _FORMATS:
        out.append(f"{path}: format {node['format']!r} is not one pgro's values are sure to pass")
    if "pattern" in node:
        pattern = node["pattern"]
        try:
            re.compile(pattern)
        except re.error as exc:
            out.append(f"{path}: pattern does not compile: {exc}")
        # Go's RE2 has no lookaround or backreferences.
        if re.search(r"\(\?[=!<]|\\[1-9]", pattern):
            out.append(f"{path}: pattern uses syntax RE2 lacks")
    if "description" in node and not isinstance(node["description"], str):
        out.append(f"{path}: description must be a string")
    if "nullable" in node and not isinstance(node["nullable"], bool):
        out.append(f"{path}: nullable must be a boolean")
    for value in node.get("enum", []):
        out += [f"{path}: enum {p}" for p in value_problems(node_without_enum(node), value, path)]
    if "default" in node:
        out += [f"{path}: default {p}" for p in value_problems(node, node["default"], path)]
    properties = node.get("properties", {})
    if not isinstance(properties, Mapping):
        out.append(f"{path}: properties must be a mapping")
        properties = {}
    for name in node.get("required", []):
        if name not in properties:
            out.append(f"{path}: required {name!r} is not a property")
    if (
        level == "root"
        and "metadata" in properties
        and properties["metadata"] != {"type": "object"}
    ):
        out.append(f"{path}.metadata: the root metadata may only be {{type: object}}")
    for name, child in properties.items():
        out += structural_problems(child, f"{path}.{name}", "field")
    if isinstance(node.get("additionalProperties"), Mapping):
        out += structural_problems(node["additionalProperties"], f"{path}.*", "field")
    if "items" in node:
        out += structural_problems(node["items"], f"{path}[]", "item")
    return out


def node_without_enum(node: Schema) -> Schema:
    return {k: v for k, v in node.items() if k not in ("enum", "default")}


# --- the value validator -------------------------------------------------------------------

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def value_problems(schema: Schema, value: Any, path: str = "") -> list[str]:
    """Why the API server would refuse `value`, or prune part of it (empty when neither).

    Pruning is reported as a problem: a field the schema does not know would be dropped
    silently on write, which is worse than a refusal.
    """
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null is not allowed"]
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: expected an integer or a string, got {value!r}"]
        pattern = schema.get("pattern")
        if isinstance(value, str) and pattern and re.search(pattern, value) is None:
            return [f"{path}: {value!r} does not match {pattern}"]
        return []
    kind = schema.get("type")
    if kind is None:
        # Only reachable with x-kubernetes-preserve-unknown-fields: any value is kept.
        return []
    ok = isinstance(value, _PY_TYPES[kind]) and not (
        kind in ("integer", "number") and isinstance(value, bool)
    )
    if not ok:
        return [f"{path}: expected {kind}, got {value!r}"]
    out: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if kind == "string":
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            out.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and _RFC3339.fullmatch(value) is None:
            out.append(f"{path}: {value!r} is not an RFC 3339 date-time")
    if kind in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: {value} is above {schema['maximum']}")
    if kind == "array":
        for index, item in enumerate(value):
            out += value_problems(schema["items"], item, f"{path}[{index}]")
    if kind == "object":
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                out += value_problems(properties[key], item, f"{path}.{key}")
            elif additional is not None:
                out += value_problems(additional, item, f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(f"{path}.{key}: unknown field, would be pruned")
        out += [f"{path}.{r}: required" for r in schema.get("required", []) if r not in value]
    return out


def apply_defaults(schema: Schema, value: Any) -> Any:
    """`value` as the API server stores it after structural defaulting."""
    if isinstance(value, dict) and schema.get("type") == "object":
        properties = schema.get("properties", {})
        result = {}
        for key, item in value.items():
            child = properties.get(key, schema.get("additionalProperties"))
            result[key] = apply_defaults(child, item) if child is not None else item
        for key, child in properties.items():
            if key not in result and "default" in child:
                result[key] = apply_defaults(child, child["default"])
        return result
    if isinstance(value, list) and schema.get("type") == "array":
        return [apply_defaults(schema["items"], item) for item in value]
    return value


# --- helpers -------------------------------------------------------------------------------


def crd(kind: str) -> dict[str, Any]:
    (found,) = [d for d in crd_documents() if d["spec"]["names"]["kind"] == kind]
    return found


def root_schema(kind: str) -> dict[str, Any]:
    (version,) = crd(kind)["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def spec_schema(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = root_schema(kind)["properties"]["spec"]
    return spec


def status_schema(kind: str) -> dict[str, Any]:
    status: dict[str, Any] = root_schema(kind)["properties"]["status"]
    return status


REPLICA = "PostgresPhysicalReplica"
RESTORE = "PostgresPhysicalRestore"


def aliases(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def all_nodes(node: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from all_nodes(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from all_nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from all_nodes(node["items"], f"{path}[]")


FULL_REPLICA_SPEC: dict[str, Any] = {
    "kopiaSecretRef": {"name": "kopia", "namespace": "analytics"},
    "canopySource": {"group": "0b5b7d3e-8f43-4a8e-9d7a-4c1a2f6e9b10", "type": "analytics"},
    "snapshotFilter": {
        "tags": {"env": "prod"},
        "hostPattern": "db-*",
        "descriptionPattern": "*nightly*",
        "pathPattern": "/D/Full*",
    },
    "schedule": "20 15 * * * Pacific/Auckland",
    "scheduleJitter": "PT30M",
    "minimumTtl": "1d",
    "switchoverGracePeriod": "2h30m",
    "analyticsUsername": "reader",
    "extraUsers": ["writer", {"name": "dbt", "schemas": ["reporting"]}],
    "persistentUsers": [
        {
            "name": "tupaia_read",
            "readSchemas": ["reporting"],
            "searchPath": ["reporting", "public"],
            "secretName": "tupaia-read",
        }
    ],
    "storageClass": "gp3",
    "storageSizeOverride": "50Gi",
    "storageSizeMaximum": 4398046511104,
    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    "resourcesFloor": {"requests": {"cpu": "500m", "memory": "1Gi"}},
    "resourcesMaximum": "64Gi",
    "deploymentReadyTimeout": "90m",
    "shmSizeFloor": 536870912,
    "serviceAnnotations": {"tailscale.com/expose": "true"},
    "podAnnotations": {"prometheus.io/scrape": "false"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]}
                ]
            }
        }
    },
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}
    ],
    "readOnly": False,
    "ephemeral": False,
    "postgresExtraConfig": "work_mem = '64MB'\nmax_parallel_workers = 4\n",
    "notifications": [
        {
            "target": "webhook",
            "url": "https://hooks.example/switched",
            "method": "PUT",
            "headers": {
                "Authorization": {"secretKeyRef": {"name": "hook", "key": "token"}},
                "X-Source": "pgro",
            },
            "includePassword": True,
        },
        {
            "target": "graphQL",
            "url": "https://api.example/graphql",
            "mutation": "mutation M($c: String!) { switched(connection: $c) }",
            "variablesTemplate": '{"c": "{{connectionString}}"}',
            "headers": {"X-Source": "pgro"},
        },
    ],
    "persistentSchemas": [],
    "preMigrateDropSchemas": ["scratch"],
    "migrateTo": {"version": "2.30.1", "versionId": "v-2301"},
    "builderImage": "ghcr.io/example/builder:1",
    "redaction": {
        "manifestUrl": "https://example.org/{version}/manifest.json",
        "version": "2.30",
        "versionFallbackToBase": True,
    },
    "eventPublisher": {
        "url": "https://meta.tamanu.app/api/events",
        "clientCertificateSecretRef": {"name": "pgro-canopy-client", "namespace": "analytics"},
        "source": "pgro",
    },
    "overlayDatabase": {"strategy": "fdw", "schemas": ["reporting"], "postgresVersion": 17},
}

FULL_RESTORE_SPEC: dict[str, Any] = {
    "replica": {"name": "fiji-analytics"},
    "snapshot": "c6e9863aea1eb231ea6b4ba001936a97",
    "snapshotSize": "3221225472",
    "snapshotTime": "2026-11-27T11:02:44.458139381Z",
    "storageSize": "4Gi",
    "migrateTo": {"version": "2.30.1", "versionId": "v-2301"},
    "builderImage": "ghcr.io/example/builder:1",
}


def full_replica_status() -> PostgresPhysicalReplicaStatus:
    conditions = set_condition([], "Ready", "True", "SwitchedOver", "serving", NOW, 3)
    conditions = set_condition(conditions, "KopiaSecretValid", "False", "", "", NOW)
    return PostgresPhysicalReplicaStatus(
        phase=ReplicaPhase.READY,
        current_restore="fiji-analytics-20260501-030405",
        previous_restore="fiji-analytics-20260430-030405",
        service_name="fiji-analytics",
        last_restore_completed_at=NOW,
        next_scheduled_restore=NOW + timedelta(days=1),
        schedule_input_hash="0123456789abcdef",
        latest_available_snapshot="k1",
        canopy_desired_snapshot_id="k1",
        verified_snapshot_id="k0",
        connection_info=ConnectionInfo(
            host="fiji-analytics.analytics.svc.cluster.local",
            port=5432,
            database="postgres",
            username="analytics",
            password_secret="fiji-analytics-creds",
        ),
        queue_position=0,
        notifications=[
            NotificationStatus(
                name="POST https://hooks.example/switched",
                last_sent_at=NOW,
                success=False,
                last_error="HTTP 500",
            )
        ],
        conditions=conditions,
        schema_migration_job="fiji-analytics-schema-migration",
        schema_migration_phase=SchemaMigrationPhase.failed("relation missing\nat line 2"),
        persistent_schema_data_size="1Gi",
        persistent_schemas_missing=["reporting"],
        consecutive_restore_failures=2,
        redaction_phase=RedactionPhase.PARTIAL,
        redaction_restore="orders-20260101-000000",
        redaction_version="2.30",
        redaction_columns_applied=12,
        pending_verification_reports=[
            PendingVerificationReport(
                restore="r-1",
                run_id="6f1c3a52-4d0e-4b7a-9b8e-2f51d7f4a1c3",
                snapshot_id="k1",
                outcome="failure",
                error="NotPostgres: no PG_VERSION",
                observed_at=NOW,
                postgres_version="15",
                health_details={"restore_duration_sec": 12, "sizes": {"app": 1024}},
                traffic={"s3_received_payload_bytes": 10},
                attempts=2,
                next_attempt_at=NOW,
                last_error="canopy answered 503",
            )
        ],
    )


def full_restore_status() -> PostgresPhysicalRestoreStatus:
    return PostgresPhysicalRestoreStatus(
        phase=RestorePhase.ACTIVE,
        run_id="7d0e3c52-5f0b-4f0e-a3f4-6a1f9d3c2b11",
        postgres_version="16",
        fixes={"reset_wal": False, "stale_pid": True},
        data_checks=DataChecks(
            depth="standard",
            verdict="damaged",
            message="one failed",
            checks=[
                DataCheck(
                    name="btree",
                    status="fail",
                    detail="1 problem",
                    count=1,
                    findings=[
                        DataCheckFinding(
                            message="bad",
                            database="app",
                            relation="public.orders_pkey",
                            table="public.orders",
                            file="base/1/2",
                            block=3,
                        )
                    ],
                )
            ],
        ),
        full_reindex="partial: full reindex after pg_resetwal (databases): rebuilt 2, 1 failed",
        created_at=NOW,
        restored_at=NOW + timedelta(minutes=20),
        activated_at=NOW + timedelta(minutes=30),
        restore_job=JobStatus(name="r-restore", phase=JobPhase.SUCCEEDED, completed_at=NOW),
        migration_job=JobStatus(name="r-migrate", phase=JobPhase.FAILED),
        migration_baseline="2026-04-30 01:02:03.456+00",
        migration_result=MigrationResult(
            total_elapsed_seconds=12,
            failed_migration="042-add-index",
            error="duplicate key",
            data_bytes_before=1000,
            data_bytes_after=2000,
            timings=[MigrationTiming(name="041-create", elapsed_seconds=3)],
        ),
        schema_build_result=SchemaBuildResult(
            built=True, error="warning only", total_elapsed_seconds=4, schema_bytes=100
        ),
        schema_build_job="r-schema-build",
        schema_build_attempts=1,
        pvc="r-data",
        deployment="r",
        credentials_secret="fiji-analytics-creds",
        conditions=set_condition([], "Ready", "True", "Serving", "ok", NOW, 1),
    )


# --- the checker itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {}}}, "type must not be empty"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "unconverted"),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}},
            "anyOf is only allowed",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "const": "x"}}},
            "not JSONSchemaProps",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "additionalProperties": True}},
            },
            "must be a schema",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "a": {
                        "type": "object",
                        "properties": {"b": {"type": "string"}},
                        "additionalProperties": {"type": "string"},
                    }
                },
            },
            "exclude each other",
        ),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, "needs items"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "default": 1}}},
            "default",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "format": "duration"}}},
            "format 'duration'",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "title": "A"}}},
            "unconverted",
        ),
        ({"type": "object", "required": ["a"]}, "not a property"),
        (
            {"type": "object", "properties": {"a": {"type": "integer", "exclusiveMinimum": 0}}},
            "must be a boolean",
        ),
    ],
)
def test_the_checker_catches_non_structural_schemas(schema: Schema, problem: str) -> None:
    problems = structural_problems(schema)
    assert any(problem in p for p in problems), problems


def test_the_validator_reports_pruned_fields_and_wrong_types() -> None:
    schema = spec_schema(REPLICA)
    problems = value_problems(schema, {"schedule": 5, "ephemerl": True}, ".spec")
    assert ".spec.schedule: expected string, got 5" in problems
    assert ".spec.ephemerl: unknown field, would be pruned" in problems


# --- shape of the CRDs ---------------------------------------------------------------------


def test_both_crds_are_structural() -> None:
    for document in crd_documents():
        (version,) = document["spec"]["versions"]
        assert structural_problems(version["schema"]["openAPIV3Schema"]) == []


def test_names_scope_versions_and_subresources() -> None:
    replica, restore = crd_documents()
    assert CRD_NAMES == (
        "postgresphysicalreplicas.pgro.bes.au",
        "postgresphysicalrestores.pgro.bes.au",
    )
    expected = [
        (replica, REPLICA, "postgresphysicalreplicas", "postgresphysicalreplica", "ppr"),
        (restore, RESTORE, "postgresphysicalrestores", "postgresphysicalrestore", "pprestore"),
    ]
    for document, kind, plural, singular, short in expected:
        assert document["apiVersion"] == "apiextensions.k8s.io/v1"
        assert document["kind"] == "CustomResourceDefinition"
        assert document["metadata"]["name"] == f"{plural}.{GROUP}"
        assert document["metadata"]["labels"] == {
            "app.kubernetes.io/name": "pgro",
            "app.kubernetes.io/part-of": "pgro",
        }
        spec = document["spec"]
        assert spec["group"] == "pgro.bes.au" == GROUP
        assert spec["scope"] == "Namespaced"
        assert spec["names"] == {
            "kind": kind,
            "listKind": f"{kind}List",
            "plural": plural,
            "singular": singular,
            "shortNames": [short],
            "categories": ["all"],
        }
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" == VERSION
        assert version["served"] is True
        assert version["storage"] is True
        assert version["subresources"] == {"status": {}}
    assert [d["metadata"]["name"] for d in crd_documents()] == list(CRD_NAMES)


def test_printer_columns() -> None:
    def columns(kind: str) -> list[tuple[str, str, str]]:
        (version,) = crd(kind)["spec"]["versions"]
        return [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]

    assert columns(REPLICA) == [
        ("Phase", "string", ".status.phase"),
        ("Service", "string", ".status.serviceName"),
        ("Age", "date", ".metadata.creationTimestamp"),
        ("Next restore", "date", ".status.nextScheduledRestore"),
    ]
    assert columns(RESTORE) == [
        ("Phase", "string", ".status.phase"),
        ("Replica", "string", ".spec.replica.name"),
        ("Snapshot size", "string", ".spec.snapshotSize"),
        ("Storage size", "string", ".spec.storageSize"),
        ("Postgres version", "string", ".status.postgresVersion"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


def test_only_spec_is_required_at_the_top() -> None:
    for kind in (REPLICA, RESTORE):
        root = root_schema(kind)
        assert root["required"] == ["spec"]
        assert set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
        assert "required" not in status_schema(kind)
    assert spec_schema(REPLICA)["required"] == ["schedule"]
    assert spec_schema(RESTORE)["required"] == [
        "replica",
        "snapshot",
        "snapshotSize",
        "storageSize",
    ]


def _object_nodes(node: Schema) -> Iterator[Schema]:
    """The object schemas a field's values are described by (through lists and maps)."""
    if "properties" in node:
        yield node
    if "items" in node:
        yield from _object_nodes(node["items"])
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from _object_nodes(node["additionalProperties"])


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg)


FREE_FORM_MODELS = (ExtraUser, SecretHeaderValue)


def _missing_fields(model: type[BaseModel], node: Schema, path: str) -> list[str]:
    missing = [f"{path}.{a}" for a in sorted(aliases(model) - set(node["properties"]))]
    for name, field in model.model_fields.items():
        alias = field.alias or name
        child = node["properties"].get(alias)
        if child is None:
            continue
        for nested in _nested_models(field.annotation):
            if nested in FREE_FORM_MODELS:
                # A string or an object on the wire, which a structural schema can only
                # describe as "any value"; the model checks it when pgro loads the object.
                free = child.get("items", child.get("additionalProperties"))
                assert free == {
                    "description": free["description"],
                    "x-kubernetes-preserve-unknown-fields": True,
                }, f"{path}.{alias}"
                continue
            (object_node,) = _object_nodes(child)
            missing += _missing_fields(nested, object_node, f"{path}.{alias}")
    return missing


def test_every_model_field_is_in_the_schema() -> None:
    for kind, spec, status in (
        (REPLICA, PostgresPhysicalReplicaSpec, PostgresPhysicalReplicaStatus),
        (RESTORE, PostgresPhysicalRestoreSpec, PostgresPhysicalRestoreStatus),
    ):
        assert set(spec_schema(kind)["properties"]) == aliases(spec)
        assert set(status_schema(kind)["properties"]) == aliases(status)
        assert _missing_fields(spec, spec_schema(kind), ".spec") == []
        assert _missing_fields(status, status_schema(kind), ".status") == []


# --- defaults --------------------------------------------------------------------------------


def test_replica_defaults_are_the_reference_ones() -> None:
    properties = spec_schema(REPLICA)["properties"]
    defaults = {name: p["default"] for name, p in properties.items() if "default" in p}
    assert defaults == {
        "scheduleJitter": "10m",
        "switchoverGracePeriod": "5m",
        "analyticsUsername": "analytics",
        "storageSizeMaximum": "2Ti",
        "readOnly": True,
        "ephemeral": False,
    }
    # Lists the model leaves out when empty get no default, or the server would write the
    # `[]` back that pgro deliberately never writes.
    for name in ("extraUsers", "tolerations", "notifications"):
        assert "default" not in properties[name]
    # Unset and [] mean different things for persistentSchemas.
    assert properties["persistentSchemas"].get("nullable") is True
    assert "default" not in properties["persistentSchemas"]


@pytest.mark.parametrize(
    ("kind", "model", "minimal"),
    [
        (REPLICA, PostgresPhysicalReplicaSpec, {"schedule": "H 3 * * *"}),
        (RESTORE, PostgresPhysicalRestoreSpec, FULL_RESTORE_SPEC),
        (REPLICA, PostgresPhysicalReplicaStatus, {}),
        (RESTORE, PostgresPhysicalRestoreStatus, {}),
    ],
)
def test_server_defaulting_writes_what_the_model_writes(
    kind: str, model: type[BaseModel], minimal: dict[str, Any]
) -> None:
    schema = spec_schema(kind) if model.__name__.endswith("Spec") else status_schema(kind)
    defaulted = apply_defaults(schema, minimal)
    written = model.model_validate(minimal).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    assert defaulted == written


def test_nested_defaults_match_the_models() -> None:
    spec = spec_schema(REPLICA)
    notification = spec["properties"]["notifications"]["items"]["properties"]
    assert notification["includePassword"]["default"] is False
    # Only webhooks have a method; a default would be stamped on GraphQL targets too.
    assert "default" not in notification["method"]
    assert (
        spec["properties"]["redaction"]["properties"]["versionFallbackToBase"]["default"] is False
    )
    condition = status_schema(REPLICA)["properties"]["conditions"]["items"]["properties"]
    assert condition["reason"]["default"] == ""
    assert condition["message"]["default"] == ""
    assert "default" not in status_schema(REPLICA)["properties"]["conditions"]


# --- value formats ---------------------------------------------------------------------------


DURATIONS = ("scheduleJitter", "minimumTtl", "switchoverGracePeriod", "deploymentReadyTimeout")
QUANTITIES = ("storageSizeOverride", "resourcesMaximum", "shmSizeFloor")


def test_no_format_the_api_server_would_check_differently() -> None:
    for kind in (REPLICA, RESTORE):
        for path, node in all_nodes(root_schema(kind)):
            assert node.get("format") in (None, "date-time"), path


@pytest.mark.parametrize("value", ["10m", "1d", "2h30m", "1h 30m", "PT10M", "P1DT2H", "30s"])
def test_durations_are_plain_strings(value: str) -> None:
    properties = spec_schema(REPLICA)["properties"]
    for name in DURATIONS:
        assert properties[name]["type"] == "string"
        assert "pattern" not in properties[name]
        assert value_problems(properties[name], value) == []


@pytest.mark.parametrize("value", ["50Gi", "2Ti", "5368709120", "1.5Gi", "1e9", "500M", 1024])
def test_quantities_accept_what_the_model_accepts(value: str | int) -> None:
    parse_quantity(value)
    for written_by_pgro in (True, False):
        for node in _quantity_nodes(written_by_pgro=written_by_pgro):
            assert value_problems(node, value) == []


@pytest.mark.parametrize("value", ["50 GB", "lots", "2TB", "", True, 1.5])
def test_quantities_refuse_what_the_model_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(value)
    for node in _quantity_nodes(written_by_pgro=True):
        assert value_problems(node, value) != []


@pytest.mark.parametrize("value", ["100GB", "64 Gi", "lots", ""])
def test_spec_quantities_admit_what_the_reference_admitted(value: str) -> None:
    # The reference's CRD had no pattern here; the replica reports the value instead
    # (`SpecValid=False`, tests/unit/test_core_spec_validity.py).
    for node in _quantity_nodes(written_by_pgro=False):
        assert "pattern" not in node
        assert value_problems(node, value) == []
        assert "SpecValid=False" in node["description"]
    assert value_problems(_quantity_nodes(written_by_pgro=False)[0], True) != []


def _quantity_nodes(*, written_by_pgro: bool) -> list[Schema]:
    replica = spec_schema(REPLICA)["properties"]
    restore = spec_schema(RESTORE)["properties"]
    status = status_schema(REPLICA)["properties"]
    nodes = [replica[n] for n in QUANTITIES]
    if written_by_pgro:
        nodes = [restore["snapshotSize"], restore["storageSize"]]
        nodes.append(status["persistentSchemaDataSize"])
    for node in nodes:
        assert node["x-kubernetes-int-or-string"] is True
        assert "type" not in node
    return nodes


def test_storage_size_maximum_is_int_or_string_without_a_pattern() -> None:
    # The model does not check it (an unparsable value means 2Ti), so neither may the server.
    node = spec_schema(REPLICA)["properties"]["storageSizeMaximum"]
    assert node["x-kubernetes-int-or-string"] is True
    assert "pattern" not in node
    assert value_problems(node, "whatever") == []


def test_status_times_are_date_times() -> None:
    replica = status_schema(REPLICA)["properties"]
    restore = status_schema(RESTORE)["properties"]
    for node in (
        replica["lastRestoreCompletedAt"],
        replica["nextScheduledRestore"],
        restore["createdAt"],
        restore["restoredAt"],
        restore["activatedAt"],
        restore["restoreJob"]["properties"]["completedAt"],
        replica["conditions"]["items"]["properties"]["lastTransitionTime"],
    ):
        assert (node["type"], node["format"]) == ("string", "date-time")


def test_kubernetes_types_are_kept_verbatim() -> None:
    properties = spec_schema(REPLICA)["properties"]
    for node in (
        properties["affinity"],
        properties["resources"],
        properties["resourcesFloor"],
        properties["tolerations"]["items"],
    ):
        assert node["type"] == "object"
        assert node["x-kubernetes-preserve-unknown-fields"] is True
        assert "properties" not in node


def test_phases_are_enums() -> None:
    replica = status_schema(REPLICA)["properties"]
    restore = status_schema(RESTORE)["properties"]
    assert replica["phase"]["enum"] == [p.value for p in ReplicaPhase]
    assert restore["phase"]["enum"] == [p.value for p in RestorePhase]
    assert restore["restoreJob"]["properties"]["phase"]["enum"] == [p.value for p in JobPhase]
    condition = replica["conditions"]["items"]
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert condition["required"] == ["type", "status", "lastTransitionTime"]
    assert value_problems(replica["phase"], "Bogus") != []


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        (
            "schemaMigrationPhase",
            ["active", "complete", "partial", "timeout-skipped", "failed: x\ny", "failed: "],
            ["done", "Failed: x", "active ", "timeout_skipped"],
        ),
        (
            "redactionPhase",
            ["active", "complete", "partial", "failed: no manifest"],
            ["timeout-skipped", "completed", ""],
        ),
    ],
)
def test_step_phases_match_what_the_model_parses(
    field: str, good: list[str], bad: list[str]
) -> None:
    node = status_schema(REPLICA)["properties"][field]
    phase = SchemaMigrationPhase if field == "schemaMigrationPhase" else RedactionPhase
    for value in good:
        phase.parse(value)
        assert value_problems(node, value) == [], value
    for value in bad:
        with pytest.raises(ValueError):
            phase.parse(value)
        assert value_problems(node, value) != [], value


def test_notifications_are_one_object_tagged_by_target() -> None:
    items = spec_schema(REPLICA)["properties"]["notifications"]["items"]
    assert items["type"] == "object"
    assert items["required"] == ["target", "url"]
    assert items["properties"]["target"]["enum"] == ["webhook", "graphQL"]
    assert set(items["properties"]) == {
        "target",
        "url",
        "method",
        "headers",
        "includePassword",
        "mutation",
        "variablesTemplate",
    }
    header = items["properties"]["headers"]["additionalProperties"]
    assert header == {
        "description": "A string or an object with secretKeyRef.",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    assert value_problems(items, {"target": "webhook"}) == [".url: required"]
    assert value_problems(items, {"url": "https://x"}) == [".target: required"]
    assert value_problems(items, {"target": "slack", "url": "https://x"}) != []


def test_extra_users_take_both_forms() -> None:
    items = spec_schema(REPLICA)["properties"]["extraUsers"]["items"]
    assert "type" not in items
    assert items["x-kubernetes-preserve-unknown-fields"] is True
    for entry in ("writer", {"name": "dbt", "schemas": ["reporting"]}):
        assert value_problems(items, entry) == []
        ExtraUser.model_validate(entry)


# --- manifests and statuses validate ---------------------------------------------------------


def test_the_full_replica_spec_covers_every_field() -> None:
    assert set(FULL_REPLICA_SPEC) == aliases(PostgresPhysicalReplicaSpec)
    assert set(FULL_RESTORE_SPEC) == aliases(PostgresPhysicalRestoreSpec)


@pytest.mark.parametrize(
    "doc",
    [
        replica_doc("plain"),
        replica_doc("no-secret", secret=None, canopySource={"group": "g", "type": "verify"}),
        replica_doc("with-extras", extraUsers=["a", "b"], storageSizeOverride="10Gi"),
        replica_doc("int-sizes", storageSizeMaximum=2**40, shmSizeFloor=2**29),
        {**replica_doc("full"), "spec": FULL_REPLICA_SPEC},
    ],
    ids=["plain", "canopy", "extras", "int-sizes", "full"],
)
def test_replica_manifests_validate(doc: dict[str, Any]) -> None:
    replica = PostgresPhysicalReplica.model_validate(doc)
    # The API server validates metadata itself; the schema only says it is an object.
    assert root_schema(REPLICA)["properties"]["metadata"] == {"type": "object"}
    body = {k: v for k, v in doc.items() if k != "metadata"}
    assert value_problems(root_schema(REPLICA), body) == []
    # What pgro writes back validates too, and the server's defaults change nothing in it.
    written = replica.spec.to_wire()
    assert value_problems(spec_schema(REPLICA), written, ".spec") == []
    assert apply_defaults(spec_schema(REPLICA), written) == written


def test_restore_spec_validates() -> None:
    spec = PostgresPhysicalRestoreSpec.model_validate(FULL_RESTORE_SPEC)
    assert value_problems(spec_schema(RESTORE), FULL_RESTORE_SPEC) == []
    assert value_problems(spec_schema(RESTORE), spec.to_wire()) == []


@pytest.mark.parametrize(
    ("kind", "status"),
    [(REPLICA, full_replica_status()), (RESTORE, full_restore_status())],
    ids=["replica", "restore"],
)
def test_statuses_pgro_writes_validate(kind: str, status: BaseModel) -> None:
    wire = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    # Every field is set, so nothing in the schema goes unexercised.
    assert set(wire) == set(status_schema(kind)["properties"])
    assert value_problems(status_schema(kind), wire, ".status") == []
    assert apply_defaults(status_schema(kind), wire) == wire


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"ephemeral": True}, ".spec.schedule: required"),
        ({"schedule": "x", "readOnly": "yes"}, ".spec.readOnly: expected boolean"),
        ({"schedule": "x", "storageSizeOverride": {"size": "1Gi"}}, "storageSizeOverride"),
        ({"schedule": "x", "migrateTo": {"version": "1"}}, ".spec.migrateTo.versionId: required"),
        ({"schedule": "x", "tolerations": {"key": "a"}}, ".spec.tolerations: expected array"),
    ],
)
def test_bad_replica_specs_are_refused(spec: dict[str, Any], problem: str) -> None:
    problems = value_problems(spec_schema(REPLICA), spec, ".spec")
    assert any(problem in p for p in problems), problems


def test_bad_statuses_are_refused() -> None:
    schema = status_schema(REPLICA)
    assert value_problems(schema, {"phase": "Done"}) != []
    assert value_problems(schema, {"queuePosition": -1}) != []
    assert value_problems(schema, {"connectionInfo": {"host": "h", "port": 70000}}) != []
    assert value_problems(schema, {"nextScheduledRestore": "tomorrow"}) != []


# --- output ----------------------------------------------------------------------------------


def test_yaml_is_the_documents_without_anchors() -> None:
    text = crds_yaml()
    assert list(yaml.safe_load_all(text)) == crd_documents()
    assert not re.search(r"[&*]id\d", text)
    assert text.count("\n---\n") == 1


def test_deploy_crds_yaml_is_up_to_date() -> None:
    assert CRDS_FILE.read_text(encoding="utf-8") == crds_yaml(), (
        "deploy/crds.yaml is stale; regenerate it with `.venv/bin/pgro crds -o deploy/crds.yaml`"
    )


def test_cli_prints_the_crds() -> None:
    result = CliRunner().invoke(crds_command, [])
    assert result.exit_code == 0, result.output
    assert result.output == crds_yaml()


def test_cli_writes_the_crds_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "crds.yaml"
    result = CliRunner().invoke(crds_command, ["-o", str(target)])
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert target.read_text(encoding="utf-8") == crds_yaml()
    help_text = CliRunner().invoke(crds_command, ["--help"]).output
    assert "kubectl apply --server-side -f -" in help_text
    assert "--no-install-crds" in help_text
