"""`PostgresPhysicalReplica`: a long-lived replica, kept restored from Kopia snapshots."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Final, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from pgro.api.base import ApiModel
from pgro.api.conditions import Condition
from pgro.api.duration import Duration
from pgro.api.meta import ObjectMeta
from pgro.api.migration import MigrateTo
from pgro.api.names import API_VERSION, REPLICA_KIND, replica_creds_secret_name
from pgro.api.notifications import NotificationConfig, NotificationStatus
from pgro.api.phases import RedactionPhase, ReplicaPhase, SchemaMigrationPhase
from pgro.api.quantity import Quantity, parse_quantity
from pgro.api.references import SecretReference
from pgro.api.timestamp import Timestamp
from pgro.api.users import ExtraUser, PersistentUser, RoleName, normalize_extra_users
from pgro.api.verification import PendingVerificationReport

DEFAULT_SCHEDULE_JITTER: Final = timedelta(minutes=10)
DEFAULT_SWITCHOVER_GRACE_PERIOD: Final = timedelta(minutes=5)
DEFAULT_ANALYTICS_USERNAME: Final = "analytics"
DEFAULT_STORAGE_SIZE_MAXIMUM: Final = "2Ti"
DEFAULT_EVENT_SOURCE: Final = "pgro"

REASON_BOTH_CREDENTIAL_SOURCES: Final = "SecretRefAndCanopySource"
REASON_NO_CREDENTIAL_SOURCE: Final = "NoCredentialSource"

VERSION_PLACEHOLDER: Final = "{version}"

# The JSON-schema key that tells the CRD generator a quantity is checked at reconcile, not
# by a pattern at apply (see `SpecQuantity`).
UNCHECKED_QUANTITY_KEY: Final = "x-pgro-unchecked-quantity"
# The spec's byte-size fields a person writes, by their wire names.
SPEC_QUANTITY_FIELDS: Final = ("storageSizeOverride", "resourcesMaximum", "shmSizeFloor")
QUANTITY_FORMS: Final = (
    "a number with an optional suffix and no space: Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) "
    "or k, M, G, T, P, E (powers of 1000), e.g. 100Gi, 100G or 107374182400"
)


def _int_or_string(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a quantity (an integer or a string), got {value!r}")
    return value


SpecQuantity = Annotated[
    int | str,
    PlainValidator(_int_or_string, json_schema_input_type=int | str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            UNCHECKED_QUANTITY_KEY: True,
        }
    ),
]
"""A byte size in the spec, kept as written and checked when the replica is reconciled.

The reference's CRD admitted any string here (`100GB`, `"64 Gi"`), so a pattern at apply
would refuse manifests that worked with it. An unusable value is reported as the replica's
`SpecValid=False` condition instead, and no restore is sized from it
(`PostgresPhysicalReplicaSpec.quantity_problems`)."""


def _suggestion(value: str) -> str | None:
    """What a person probably meant by an unusable quantity (`100GB` → `100G`,
    `64 Gi` → `64Gi`, `1GiB` → `1Gi`, `512KB` → `512k`), if that is a quantity."""
    guess = "".join(value.split())
    unit = re.fullmatch(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))([kKMGTPE])(i?)[Bb]?", guess)
    if unit is not None:
        number, prefix, binary = unit.groups()
        if prefix in "kK":
            prefix = "K" if binary else "k"
        guess = f"{number}{prefix}{binary}"
    try:
        parse_quantity(guess)
    except ValueError:
        return None
    return guess if guess != value else None


class CanopySource(ApiModel):
    """Route kopia through the canopy proxy; written by the canopy syncer, not people."""

    group: str
    type: str


class SnapshotFilter(ApiModel):
    """Which snapshots the legacy path may restore; every present criterion must match.

    Patterns are globs in which `*` also crosses `/`. `pathPattern` is matched against the
    snapshot path after Windows normalisation (`D:\\Full` → `/D/Full`), so write it in
    that Unix form.
    """

    tags: dict[str, str] | None = None
    host_pattern: str | None = None
    description_pattern: str | None = None
    path_pattern: str | None = None


class Redaction(ApiModel):
    manifest_url: str
    version: str | None = None
    version_query: str | None = None
    version_fallback_to_base: bool = False

    def problem(self) -> str | None:
        """Why this redaction cannot run, or None.

        Checked when redaction runs, not when the manifest is read, like the reference:
        a bad redaction then shows as a failed phase on a replica that still loads.
        """
        has_placeholder = VERSION_PLACEHOLDER in self.manifest_url
        if self.version is not None and self.version_query is not None:
            return "redaction.version and redaction.versionQuery are mutually exclusive; set one"
        if has_placeholder and self.version is None and self.version_query is None:
            return (
                f"redaction.manifestUrl contains {VERSION_PLACEHOLDER} but neither "
                "redaction.version nor redaction.versionQuery is set"
            )
        if not has_placeholder and (self.version is not None or self.version_query is not None):
            return (
                f"redaction.version or redaction.versionQuery is set but manifestUrl has no "
                f"{VERSION_PLACEHOLDER} placeholder to put it in"
            )
        return None

    def manifest_url_for(self, version: str | None) -> str:
        return (
            self.manifest_url
            if version is None
            else self.manifest_url.replace(VERSION_PLACEHOLDER, version)
        )


class EventPublisherConfig(ApiModel):
    """Where restore failures are published: a canopy-style `/events` endpoint, over mTLS.

    `clientCertificateSecretRef` names a `kubernetes.io/tls`-shaped Secret (keys `tls.crt`
    and `tls.key`); unlike `kopiaSecretRef` its namespace is honoured, as in the reference,
    and defaults to the replica's.
    """

    url: str
    client_certificate_secret_ref: SecretReference
    source: str = DEFAULT_EVENT_SOURCE


class ConnectionInfo(ApiModel):
    host: str
    port: int = Field(ge=0, le=65535)
    database: str
    username: str
    password_secret: str


class PostgresPhysicalReplicaSpec(ApiModel):
    omit_when_empty = frozenset({"extra_users", "tolerations", "notifications"})

    kopia_secret_ref: SecretReference | None = None
    canopy_source: CanopySource | None = None
    snapshot_filter: SnapshotFilter | None = None
    schedule: str
    schedule_jitter: Duration = DEFAULT_SCHEDULE_JITTER
    minimum_ttl: Duration | None = None
    switchover_grace_period: Duration = DEFAULT_SWITCHOVER_GRACE_PERIOD
    analytics_username: RoleName = DEFAULT_ANALYTICS_USERNAME
    extra_users: list[ExtraUser] = Field(default_factory=list)
    persistent_users: list[PersistentUser] | None = None
    storage_class: str | None = None
    storage_size_override: SpecQuantity | None = None
    # Not validated: an unparsable maximum means 2Ti, as in the reference; see
    # `storage_size_maximum_bytes`.
    storage_size_maximum: int | str = DEFAULT_STORAGE_SIZE_MAXIMUM
    resources: dict[str, Any] | None = None
    resources_floor: dict[str, Any] | None = None
    resources_maximum: SpecQuantity | None = None
    deployment_ready_timeout: Duration | None = None
    shm_size_floor: SpecQuantity | None = None
    service_annotations: dict[str, str] | None = None
    pod_annotations: dict[str, str] | None = None
    affinity: dict[str, Any] | None = None
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    read_only: bool = True
    ephemeral: bool = False
    postgres_extra_config: str | None = None
    notifications: list[NotificationConfig] = Field(default_factory=list)
    # None and [] differ: [] still runs (and completes) the migration step.
    persistent_schemas: list[str] | None = None
    pre_migrate_drop_schemas: list[str] | None = None
    migrate_to: MigrateTo | None = None
    builder_image: str | None = None
    redaction: Redaction | None = None
    event_publisher: EventPublisherConfig | None = None
    # Removed from the reference's mainline and not built here; admitted (any shape) so a
    # reference manifest applies, and refused at reconcile with a `SpecValid` condition.
    overlay_database: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _normalize_extra_users(self) -> PostgresPhysicalReplicaSpec:
        self.extra_users = normalize_extra_users(self.extra_users, self.analytics_username)
        return self

    def storage_size_maximum_bytes(self) -> int:
        try:
            return parse_quantity(self.storage_size_maximum)
        except ValueError:
            return parse_quantity(DEFAULT_STORAGE_SIZE_MAXIMUM)

    def quantity_problems(self) -> list[str]:
        """One message per byte-size field whose value is not a quantity, naming the field,
        the value and the accepted form (empty when all are usable)."""
        problems: list[str] = []
        for alias in SPEC_QUANTITY_FIELDS:
            name = next(n for n, f in type(self).model_fields.items() if f.alias == alias)
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parse_quantity(value)
            except ValueError:
                hint = _suggestion(value) if isinstance(value, str) else None
                problems.append(
                    f"spec.{alias} {value!r} is not a Kubernetes quantity"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; write {QUANTITY_FORMS}"
                )
        return problems

    def credential_source_problem(self) -> tuple[str, str] | None:
        """(reason, message) when not exactly one credential source is set.

        A reconcile-time check, as in the reference: the replica still loads, and the
        problem becomes a `KopiaSecretValid=False` condition a person can read.
        """
        if self.kopia_secret_ref is not None and self.canopy_source is not None:
            return (
                REASON_BOTH_CREDENTIAL_SOURCES,
                "kopiaSecretRef and canopySource are mutually exclusive; set exactly one",
            )
        if self.kopia_secret_ref is None and self.canopy_source is None:
            return (
                REASON_NO_CREDENTIAL_SOURCE,
                "one of kopiaSecretRef or canopySource must be set",
            )
        return None


class PostgresPhysicalReplicaStatus(ApiModel):
    omit_when_empty = frozenset({"notifications", "conditions", "pending_verification_reports"})

    phase: ReplicaPhase | None = None
    current_restore: str | None = None
    previous_restore: str | None = None
    service_name: str | None = None
    last_restore_completed_at: Timestamp | None = None
    next_scheduled_restore: Timestamp | None = None
    schedule_input_hash: str | None = None
    latest_available_snapshot: str | None = None
    canopy_desired_snapshot_id: str | None = None
    verified_snapshot_id: str | None = None
    connection_info: ConnectionInfo | None = None
    queue_position: int | None = Field(default=None, ge=0)
    notifications: list[NotificationStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    schema_migration_job: str | None = None
    schema_migration_phase: SchemaMigrationPhase | None = None
    persistent_schema_data_size: Quantity | None = None
    persistent_schemas_missing: list[str] | None = None
    consecutive_restore_failures: int | None = Field(default=None, ge=0)
    redaction_phase: RedactionPhase | None = None
    # The restore `redactionPhase` describes (pgro's addition): a phase recorded for another
    # restore never lets this one switch over.
    redaction_restore: str | None = None
    redaction_version: str | None = None
    redaction_columns_applied: int | None = Field(default=None, ge=0)
    pending_verification_reports: list[PendingVerificationReport] = Field(default_factory=list)


class PostgresPhysicalReplica(ApiModel):
    api_version: Literal["pgro.bes.au/v1alpha1"] = API_VERSION
    kind: Literal["PostgresPhysicalReplica"] = REPLICA_KIND
    metadata: ObjectMeta
    spec: PostgresPhysicalReplicaSpec
    status: PostgresPhysicalReplicaStatus = Field(default_factory=PostgresPhysicalReplicaStatus)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def key(self) -> str:
        """`<namespace>/<name>`: distinct across namespaces, unlike the bare name (the
        reference's queue once shared one slot between every `canopy-replica`)."""
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def creds_secret_name(self) -> str:
        return replica_creds_secret_name(self.metadata.name)

    def credential_source_problem(self) -> tuple[str, str] | None:
        return self.spec.credential_source_problem()

    def owner_reference(self) -> dict[str, Any]:
        """What objects owned by this replica carry, so deleting it cascades."""
        return {
            "apiVersion": API_VERSION,
            "kind": REPLICA_KIND,
            "name": self.metadata.name,
            "uid": self.metadata.uid or "",
            "controller": True,
            "blockOwnerDeletion": True,
        }
