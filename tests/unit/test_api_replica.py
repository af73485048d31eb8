from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pgro.api import (
    ExtraUser,
    GraphQLNotification,
    PostgresPhysicalReplica,
    PostgresPhysicalReplicaSpec,
    RedactionPhase,
    ReplicaPhase,
    SchemaMigrationPhase,
    SecretHeaderValue,
    WebhookNotification,
)
from pgro.api.replica import Redaction

MANIFEST = """
apiVersion: pgro.bes.au/v1alpha1
kind: PostgresPhysicalReplica
metadata:
  name: fiji-analytics
  namespace: analytics
  uid: 5f1c0a4e-0000-4000-8000-000000000001
  generation: 4
  resourceVersion: "123456"
  creationTimestamp: "2026-01-01T00:00:00Z"
  labels:
    team: data
  managedFields: [{manager: kubectl}]
spec:
  kopiaSecretRef:
    name: fiji-kopia
  snapshotFilter:
    tags:
      env: prod
    hostPattern: fiji-prod-*
    pathPattern: /D/Full*
  schedule: "20 15 * * * Pacific/Auckland"
  scheduleJitter: PT30M
  minimumTtl: 2h
  switchoverGracePeriod: 10 minutes
  analyticsUsername: reader
  extraUsers: [" writer ", "reader", "", "writer", "dbt"]
  storageClass: gp3
  storageSizeOverride: 50Gi
  storageSizeMaximum: 4Ti
  resources:
    requests: {memory: 2Gi, cpu: "1"}
  resourcesMaximum: 64Gi
  deploymentReadyTimeout: 90m
  shmSizeFloor: 512Mi
  serviceAnnotations:
    tailscale.com/expose: "true"
  podAnnotations:
    karpenter.sh/do-not-disrupt: "true"
  tolerations:
    - {key: purpose, operator: Equal, value: workload, effect: NoSchedule}
  readOnly: false
  ephemeral: true
  postgresExtraConfig: |
    shared_preload_libraries = 'pg_stat_statements'
  notifications:
    - target: webhook
      url: https://hooks.example.com/pgro
      method: PUT
      headers:
        X-Plain: hello
        Authorization:
          secretKeyRef: {name: hook-secret, key: token}
      includePassword: true
    - target: graphQL
      url: https://api.example.com/graphql
      mutation: "mutation($v: JSON!) { replicaReady(input: $v) }"
      variablesTemplate: '{"replica": "{{Replica}}"}'
  persistentSchemas: [dbt]
  migrateTo: {version: 2.63.2, versionId: 0b0c0d0e-0000-4000-8000-000000000002}
  builderImage: ghcr.io/example/builder:1
  redaction:
    manifestUrl: https://example.com/{version}/manifest.yml
    versionQuery: SELECT value FROM local_system_facts WHERE key = 'currentVersion'
  someFutureField: {nested: true}
status:
  phase: Ready
  currentRestore: fiji-analytics-20260101-000000
  previousRestore: fiji-analytics-20251231-000000
  serviceName: fiji-analytics
  lastRestoreCompletedAt: "2026-01-01T01:00:00Z"
  nextScheduledRestore: "2026-01-02T02:20:00Z"
  scheduleInputHash: 0123456789abcdef
  latestAvailableSnapshot: c6e9863aea1eb231ea6b4ba001936a97
  verifiedSnapshotId: c6e9863aea1eb231ea6b4ba001936a97
  connectionInfo:
    host: fiji-analytics.analytics.svc.cluster.local
    port: 5432
    database: postgres
    username: reader
    passwordSecret: fiji-analytics-creds
  queuePosition: 0
  notifications:
    - name: PUT https://hooks.example.com/pgro
      lastSentAt: "2026-01-01T01:00:00Z"
      success: true
  conditions:
    - type: KopiaSecretValid
      status: "True"
      reason: SecretValid
      message: All required keys present
      lastTransitionTime: "2026-01-01T00:00:00Z"
      observedGeneration: 4
  schemaMigrationJob: fiji-analytics-schema-migration
  schemaMigrationPhase: "failed: connection refused"
  persistentSchemaDataSize: "1073741824"
  consecutiveRestoreFailures: 2
  redactionPhase: partial
  redactionVersion: 2.63.0
  redactionColumnsApplied: 12
  futureStatusField: 1
"""


def _manifest() -> dict[str, Any]:
    loaded = yaml.safe_load(MANIFEST)
    assert isinstance(loaded, dict)
    return loaded


def _minimal(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalReplica",
        "metadata": {"name": "r"},
        "spec": {"schedule": "0 0 * * *", **spec},
    }


def test_realistic_manifest_parses_into_snake_case_fields() -> None:
    replica = PostgresPhysicalReplica.model_validate(_manifest())
    spec, status = replica.spec, replica.status
    assert replica.name == "fiji-analytics"
    assert replica.namespace == "analytics"
    assert replica.key == "analytics/fiji-analytics"
    assert replica.metadata.generation == 4
    assert replica.metadata.creation_timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert spec.kopia_secret_ref is not None
    assert spec.kopia_secret_ref.name == "fiji-kopia"
    assert spec.snapshot_filter is not None
    assert spec.snapshot_filter.tags == {"env": "prod"}
    assert spec.snapshot_filter.host_pattern == "fiji-prod-*"
    assert spec.snapshot_filter.description_pattern is None
    assert spec.schedule == "20 15 * * * Pacific/Auckland"
    assert spec.schedule_jitter == timedelta(minutes=30)
    assert spec.minimum_ttl == timedelta(hours=2)
    assert spec.switchover_grace_period == timedelta(minutes=10)
    assert spec.deployment_ready_timeout == timedelta(minutes=90)
    assert spec.analytics_username == "reader"
    assert [u.name for u in spec.extra_users] == ["writer", "dbt"]
    assert spec.storage_size_override == "50Gi"
    assert spec.storage_size_maximum_bytes() == 4 * 1024**4
    assert spec.resources == {"requests": {"memory": "2Gi", "cpu": "1"}}
    assert spec.tolerations[0]["effect"] == "NoSchedule"
    assert spec.read_only is False
    assert spec.ephemeral is True
    assert spec.persistent_schemas == ["dbt"]
    assert spec.migrate_to is not None
    assert spec.migrate_to.version_id == "0b0c0d0e-0000-4000-8000-000000000002"
    assert spec.builder_image == "ghcr.io/example/builder:1"
    assert spec.redaction is not None
    assert spec.redaction.problem() is None
    assert status.phase is ReplicaPhase.READY
    assert status.last_restore_completed_at == datetime(2026, 1, 1, 1, tzinfo=UTC)
    assert status.connection_info is not None
    assert status.connection_info.password_secret == "fiji-analytics-creds"
    assert status.queue_position == 0
    assert status.notifications[0].success is True
    assert status.conditions[0].observed_generation == 4
    assert status.schema_migration_phase == SchemaMigrationPhase.failed("connection refused")
    assert status.persistent_schema_data_size == "1073741824"
    assert status.consecutive_restore_failures == 2
    assert status.redaction_phase == RedactionPhase.PARTIAL
    assert status.redaction_columns_applied == 12


def test_notifications_are_tagged_by_target() -> None:
    spec = PostgresPhysicalReplica.model_validate(_manifest()).spec
    webhook, graphql = spec.notifications
    assert isinstance(webhook, WebhookNotification)
    assert webhook.effective_method == "PUT"
    # Named without the URL's path (a webhook's path is often its secret): see target_name.
    assert webhook.display_name.startswith("PUT https://hooks.example.com #")
    assert webhook.include_password is True
    assert webhook.headers is not None
    assert webhook.headers["X-Plain"] == "hello"
    secret_header = webhook.headers["Authorization"]
    assert isinstance(secret_header, SecretHeaderValue)
    assert (secret_header.secret_key_ref.name, secret_header.secret_key_ref.key) == (
        "hook-secret",
        "token",
    )
    assert isinstance(graphql, GraphQLNotification)
    assert graphql.display_name.startswith("GraphQL https://api.example.com #")
    assert graphql.variables_template == '{"replica": "{{Replica}}"}'
    assert graphql.include_password is False


@pytest.mark.parametrize(
    ("method", "effective"), [("POST", "POST"), ("put", "PUT"), ("GET", "POST")]
)
def test_webhook_method_is_put_or_post(method: str, effective: str) -> None:
    hook = WebhookNotification.model_validate({"url": "u", "method": method})
    assert hook.effective_method == effective


def test_graphql_target_spelling_is_normalised() -> None:
    replica = PostgresPhysicalReplica.model_validate(
        _minimal(
            notifications=[
                {"target": "graphql", "url": "u", "mutation": "m", "variablesTemplate": "{}"}
            ]
        )
    )
    notification = replica.spec.notifications[0]
    assert isinstance(notification, GraphQLNotification)
    assert replica.to_wire()["spec"]["notifications"][0]["target"] == "graphQL"


@pytest.mark.parametrize(
    "notification",
    [
        {"target": "email", "url": "u"},
        {"url": "u"},
        {"target": "graphQL", "url": "u"},
        {"target": "webhook"},
    ],
)
def test_bad_notifications_are_rejected(notification: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PostgresPhysicalReplica.model_validate(_minimal(notifications=[notification]))


def test_defaults_match_the_reference_table() -> None:
    spec = PostgresPhysicalReplica.model_validate(_minimal()).spec
    assert spec.schedule_jitter == timedelta(minutes=10)
    assert spec.switchover_grace_period == timedelta(minutes=5)
    assert spec.minimum_ttl is None
    assert spec.analytics_username == "analytics"
    assert spec.storage_size_maximum == "2Ti"
    assert spec.storage_size_maximum_bytes() == 2 * 1024**4
    assert spec.read_only is True
    assert spec.ephemeral is False
    assert spec.tolerations == []
    assert spec.notifications == []
    assert spec.extra_users == []
    assert spec.persistent_schemas is None
    assert spec.deployment_ready_timeout is None
    assert spec.kopia_secret_ref is None
    assert spec.canopy_source is None


def test_missing_schedule_is_rejected() -> None:
    document = _minimal()
    del document["spec"]["schedule"]
    with pytest.raises(ValidationError, match="schedule"):
        PostgresPhysicalReplica.model_validate(document)


@pytest.mark.parametrize("maximum", ["lots", "", "-1Gi", "1e999"])
def test_unparsable_storage_size_maximum_means_2ti(maximum: str) -> None:
    spec = PostgresPhysicalReplica.model_validate(_minimal(storageSizeMaximum=maximum)).spec
    assert spec.storage_size_maximum == maximum
    assert spec.storage_size_maximum_bytes() == 2 * 1024**4


def test_storage_size_maximum_as_integer() -> None:
    spec = PostgresPhysicalReplica.model_validate(_minimal(storageSizeMaximum=1000)).spec
    assert spec.storage_size_maximum_bytes() == 1000


def test_unparsable_storage_size_override_loads_and_is_reported_with_the_value() -> None:
    # Admitted like the reference did; reported at reconcile (`SpecValid=False`).
    spec = PostgresPhysicalReplica.model_validate(_minimal(storageSizeOverride="huge")).spec
    assert spec.storage_size_override == "huge"
    [problem] = spec.quantity_problems()
    assert "spec.storageSizeOverride 'huge' is not a Kubernetes quantity" in problem
    with pytest.raises(ValidationError, match="expected a quantity"):
        PostgresPhysicalReplica.model_validate(_minimal(storageSizeOverride=["1Gi"]))


def test_bad_duration_is_rejected_with_the_value() -> None:
    with pytest.raises(ValidationError, match="invalid duration '10 parsecs'"):
        PostgresPhysicalReplica.model_validate(_minimal(scheduleJitter="10 parsecs"))


@pytest.mark.parametrize(
    ("raw", "analytics", "expected"),
    [
        ([], "analytics", []),
        (["a", "b"], "analytics", ["a", "b"]),
        ([" a ", "a", "b", "a "], "analytics", ["a", "b"]),
        (["", "  ", "c"], "analytics", ["c"]),
        (["analytics", "b"], "analytics", ["b"]),
        ([" analytics "], "analytics", []),
        (["reader", "analytics"], "reader", ["analytics"]),
        (["z", "y", "x", "y"], "analytics", ["z", "y", "x"]),
        (["A", "a"], "analytics", ["A", "a"]),
    ],
)
def test_extra_users_normalisation(raw: list[str], analytics: str, expected: list[str]) -> None:
    spec = PostgresPhysicalReplica.model_validate(
        _minimal(extraUsers=raw, analyticsUsername=analytics)
    ).spec
    assert [u.name for u in spec.extra_users] == expected


def test_extra_users_accept_objects_with_schemas_and_write_back_each_form() -> None:
    replica = PostgresPhysicalReplica.model_validate(
        _minimal(
            extraUsers=[
                "plain",
                {"name": " scoped ", "schemas": ["dbt", " dbt ", "", "reporting"]},
                {"name": "scoped", "schemas": ["other"]},
                {"name": "unscoped"},
            ]
        )
    )
    users = replica.spec.extra_users
    assert users == [
        ExtraUser(name="plain"),
        ExtraUser(name="scoped", schemas=["dbt", "reporting"]),
        ExtraUser(name="unscoped"),
    ]
    assert replica.to_wire()["spec"]["extraUsers"] == [
        "plain",
        {"name": "scoped", "schemas": ["dbt", "reporting"]},
        "unscoped",
    ]


def test_persistent_users_and_their_secret_names() -> None:
    spec = PostgresPhysicalReplica.model_validate(
        _minimal(
            persistentUsers=[
                {"name": "tupaia_read", "readSchemas": ["dbt"], "searchPath": ["dbt", "public"]},
                {"name": "custom", "secretName": "my-secret"},
            ]
        )
    ).spec
    assert spec.persistent_users is not None
    first, second = spec.persistent_users
    assert first.read_schemas == ["dbt"]
    assert first.search_path == ["dbt", "public"]
    assert first.secret_name_for("pu-replica") == "pu-replica-user-tupaia-read"
    assert second.read_schemas == []
    assert second.secret_name_for("pu-replica") == "my-secret"


def test_persistent_schemas_empty_list_differs_from_absent() -> None:
    empty = PostgresPhysicalReplica.model_validate(_minimal(persistentSchemas=[]))
    absent = PostgresPhysicalReplica.model_validate(_minimal())
    assert empty.spec.persistent_schemas == []
    assert absent.spec.persistent_schemas is None
    assert empty.to_wire()["spec"]["persistentSchemas"] == []
    assert "persistentSchemas" not in absent.to_wire()["spec"]


def test_unknown_fields_are_ignored_at_every_level() -> None:
    document = _minimal(snapshotFilter={"hostPattern": "h", "newCriterion": "x"}, futureKnob=3)
    document["futureTopLevel"] = {"a": 1}
    document["status"] = {"phase": "Pending", "futureCounter": 9}
    replica = PostgresPhysicalReplica.model_validate(document)
    wire = replica.to_wire()
    assert "futureTopLevel" not in wire
    assert "futureKnob" not in wire["spec"]
    assert wire["spec"]["snapshotFilter"] == {"hostPattern": "h"}
    assert wire["status"] == {"phase": "Pending"}


def test_dump_is_camel_case_without_nulls_and_round_trips() -> None:
    replica = PostgresPhysicalReplica.model_validate(_manifest())
    wire = replica.to_wire()
    spec = wire["spec"]
    assert spec["kopiaSecretRef"] == {"name": "fiji-kopia"}
    assert spec["scheduleJitter"] == "30m"
    assert spec["switchoverGracePeriod"] == "10m"
    assert spec["minimumTtl"] == "2h"
    assert spec["deploymentReadyTimeout"] == "1h30m"
    assert spec["storageSizeOverride"] == "50Gi"
    assert spec["storageSizeMaximum"] == "4Ti"
    assert spec["readOnly"] is False
    assert spec["migrateTo"] == {
        "version": "2.63.2",
        "versionId": "0b0c0d0e-0000-4000-8000-000000000002",
    }
    assert spec["notifications"][1]["variablesTemplate"] == '{"replica": "{{Replica}}"}'
    assert "canopySource" not in spec
    assert "storageClass" in spec
    status = wire["status"]
    assert status["schemaMigrationPhase"] == "failed: connection refused"
    assert status["redactionPhase"] == "partial"
    assert status["lastRestoreCompletedAt"] == "2026-01-01T01:00:00Z"
    assert status["connectionInfo"]["passwordSecret"] == "fiji-analytics-creds"
    assert all("_" not in key for key in [*spec, *status, *wire["metadata"]])
    assert "managedFields" not in wire["metadata"]
    assert PostgresPhysicalReplica.model_validate(wire) == replica


def test_empty_lists_the_reference_omits_are_left_out() -> None:
    wire = PostgresPhysicalReplica.model_validate(_minimal()).to_wire()
    for key in ("extraUsers", "tolerations", "notifications"):
        assert key not in wire["spec"]
    assert wire["status"] == {}
    assert "ownerReferences" not in wire["metadata"]
    assert "finalizers" not in wire["metadata"]


def test_python_names_populate_too() -> None:
    spec = PostgresPhysicalReplicaSpec(
        schedule="0 * * * *",
        schedule_jitter="0s",
        analytics_username="a",
        extra_users=["a", "b"],
    )
    assert spec.schedule_jitter == timedelta(0)
    assert [u.name for u in spec.extra_users] == ["b"]
    assert spec.to_wire()["scheduleJitter"] == "0s"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"kopiaSecretRef": {"name": "s"}}, None),
        ({"canopySource": {"group": "g", "type": "tamanu-postgres"}}, None),
        (
            {
                "kopiaSecretRef": {"name": "s"},
                "canopySource": {"group": "g", "type": "tamanu-postgres"},
            },
            (
                "SecretRefAndCanopySource",
                "kopiaSecretRef and canopySource are mutually exclusive; set exactly one",
            ),
        ),
        ({}, ("NoCredentialSource", "one of kopiaSecretRef or canopySource must be set")),
    ],
)
def test_credential_source_rule_is_checked_after_parsing(
    spec: dict[str, Any], expected: tuple[str, str] | None
) -> None:
    replica = PostgresPhysicalReplica.model_validate(_minimal(**spec))
    assert replica.credential_source_problem() == expected


@pytest.mark.parametrize(
    ("redaction", "problem"),
    [
        ({"manifestUrl": "https://x/m.yml"}, None),
        ({"manifestUrl": "https://x/{version}/m.yml", "version": "1.2.3"}, None),
        ({"manifestUrl": "https://x/{version}/m.yml", "versionQuery": "SELECT 1"}, None),
        (
            {"manifestUrl": "https://x/{version}/m.yml", "version": "1", "versionQuery": "q"},
            "mutually exclusive",
        ),
        ({"manifestUrl": "https://x/{version}/m.yml"}, "neither"),
        ({"manifestUrl": "https://x/m.yml", "version": "1"}, "no {version} placeholder"),
    ],
)
def test_redaction_rules_are_checked_when_redaction_runs(
    redaction: dict[str, Any], problem: str | None
) -> None:
    parsed = PostgresPhysicalReplica.model_validate(_minimal(redaction=redaction)).spec.redaction
    assert parsed is not None
    found = parsed.problem()
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_redaction_url_substitution_and_default_fallback() -> None:
    redaction = Redaction.model_validate({"manifestUrl": "https://x/{version}/m.yml"})
    assert redaction.version_fallback_to_base is False
    assert redaction.manifest_url_for("2.1.0") == "https://x/2.1.0/m.yml"
    assert redaction.manifest_url_for(None) == "https://x/{version}/m.yml"


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("Upper", "lower-case"),
        ("under_score", "lower-case"),
        ("-leading", "start and end"),
        ("trailing-", "start and end"),
        ("has.dot", "lower-case"),
        ("", "must not be empty"),
        ("a" * 64, "at most 63"),
    ],
)
def test_metadata_name_must_be_a_kubernetes_name(name: str, detail: str) -> None:
    document = _minimal()
    document["metadata"]["name"] = name
    with pytest.raises(ValidationError, match="is not a valid name") as caught:
        PostgresPhysicalReplica.model_validate(document)
    assert detail in str(caught.value)
    assert "metadata.name" in str(caught.value)


def test_metadata_namespace_defaults_and_is_checked() -> None:
    assert PostgresPhysicalReplica.model_validate(_minimal()).namespace == "default"
    document = _minimal()
    document["metadata"]["namespace"] = "Bad_NS"
    with pytest.raises(ValidationError, match=r"metadata\.namespace"):
        PostgresPhysicalReplica.model_validate(document)


def test_metadata_name_is_required() -> None:
    document = _minimal()
    document["metadata"] = {"namespace": "x"}
    with pytest.raises(ValidationError, match="name"):
        PostgresPhysicalReplica.model_validate(document)


def test_owner_reference_and_derived_names() -> None:
    replica = PostgresPhysicalReplica.model_validate(_manifest())
    assert replica.owner_reference() == {
        "apiVersion": "pgro.bes.au/v1alpha1",
        "kind": "PostgresPhysicalReplica",
        "name": "fiji-analytics",
        "uid": "5f1c0a4e-0000-4000-8000-000000000001",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert replica.creds_secret_name == "fiji-analytics-creds"


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Exploded"},
        {"queuePosition": -1},
        {"consecutiveRestoreFailures": -1},
        {"schemaMigrationPhase": "halfway"},
        {"redactionPhase": "timeout-skipped"},
        {
            "connectionInfo": {
                "host": "h",
                "port": 70000,
                "database": "d",
                "username": "u",
                "passwordSecret": "p",
            }
        },
    ],
)
def test_invalid_status_values_are_rejected(status: dict[str, Any]) -> None:
    document = _minimal()
    document["status"] = status
    with pytest.raises(ValidationError):
        PostgresPhysicalReplica.model_validate(document)


def test_wrong_kind_or_version_in_a_typed_load_is_rejected() -> None:
    document = _minimal()
    document["kind"] = "PostgresPhysicalRestore"
    with pytest.raises(ValidationError, match="kind"):
        PostgresPhysicalReplica.model_validate(document)
