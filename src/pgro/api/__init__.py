"""Typed models of pgro's two resources and the value formats they use.

`api` is pure: no I/O and no clock reads; times are passed in.
"""

from pgro.api.base import ApiModel
from pgro.api.conditions import Condition, ConditionStatus, get_condition, set_condition
from pgro.api.duration import Duration, format_duration, parse_duration
from pgro.api.meta import ObjectMeta
from pgro.api.migration import MigrateTo, MigrationResult, MigrationTiming, SchemaBuildResult
from pgro.api.names import API_VERSION, GROUP, VERSION
from pgro.api.notifications import (
    GraphQLNotification,
    NotificationConfig,
    NotificationStatus,
    SecretHeaderValue,
    WebhookNotification,
)
from pgro.api.objects import PgroObject, load_object
from pgro.api.phases import (
    JobPhase,
    RedactionPhase,
    ReplicaPhase,
    RestorePhase,
    SchemaMigrationPhase,
)
from pgro.api.quantity import Quantity, format_quantity, parse_quantity, parse_quantity_decimal
from pgro.api.references import LocalObjectReference, SecretKeySelector, SecretReference
from pgro.api.replica import (
    CanopySource,
    ConnectionInfo,
    PostgresPhysicalReplica,
    PostgresPhysicalReplicaSpec,
    PostgresPhysicalReplicaStatus,
    Redaction,
    SnapshotFilter,
)
from pgro.api.restore import (
    JobStatus,
    PostgresPhysicalRestore,
    PostgresPhysicalRestoreSpec,
    PostgresPhysicalRestoreStatus,
)
from pgro.api.timestamp import Timestamp, format_rfc3339, parse_rfc3339
from pgro.api.users import ExtraUser, PersistentUser

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ApiModel",
    "CanopySource",
    "Condition",
    "ConditionStatus",
    "ConnectionInfo",
    "Duration",
    "ExtraUser",
    "GraphQLNotification",
    "JobPhase",
    "JobStatus",
    "LocalObjectReference",
    "MigrateTo",
    "MigrationResult",
    "MigrationTiming",
    "NotificationConfig",
    "NotificationStatus",
    "ObjectMeta",
    "PersistentUser",
    "PgroObject",
    "PostgresPhysicalReplica",
    "PostgresPhysicalReplicaSpec",
    "PostgresPhysicalReplicaStatus",
    "PostgresPhysicalRestore",
    "PostgresPhysicalRestoreSpec",
    "PostgresPhysicalRestoreStatus",
    "Quantity",
    "Redaction",
    "RedactionPhase",
    "ReplicaPhase",
    "RestorePhase",
    "SchemaBuildResult",
    "SchemaMigrationPhase",
    "SecretHeaderValue",
    "SecretKeySelector",
    "SecretReference",
    "SnapshotFilter",
    "Timestamp",
    "WebhookNotification",
    "format_duration",
    "format_quantity",
    "format_rfc3339",
    "get_condition",
    "load_object",
    "parse_duration",
    "parse_quantity",
    "parse_quantity_decimal",
    "parse_rfc3339",
    "set_condition",
]
