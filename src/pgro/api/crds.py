"""pgro's two CustomResourceDefinitions, generated from the `pgro.api` models.

The schemas come from the pydantic models, so the API server admits what pgro reads and
its pruning drops nothing pgro writes: a field added to a model appears here without
anyone remembering to add it. Pydantic's JSON Schema is rewritten into the *structural*
subset Kubernetes requires: every node has a `type` (unless it is int-or-string or
preserves unknown fields), `$ref`s are inlined, `anyOf [X, null]` becomes X with
`nullable: true`, and no `anyOf`/`oneOf` carries types. Anything the rewrite does not
know how to express raises, rather than being passed through or dropped.

Defaults are the models' own, serialised as pgro writes them (`10m`, not `PT10M`), so an
object the API server defaulted reads back as the model would have written it.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Final

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticUndefined, core_schema

from pgro.api.conditions import Condition
from pgro.api.data_checks import DataCheck, DataChecks
from pgro.api.migration import MigrationResult, SchemaBuildResult
from pgro.api.names import (
    CATEGORY,
    GROUP,
    REPLICA_KIND,
    REPLICA_PLURAL,
    REPLICA_SHORT_NAME,
    REPLICA_SINGULAR,
    RESTORE_KIND,
    RESTORE_PLURAL,
    RESTORE_SHORT_NAME,
    RESTORE_SINGULAR,
    VERSION,
)
from pgro.api.notifications import NotificationStatus
from pgro.api.phases import RedactionPhase, SchemaMigrationPhase
from pgro.api.replica import (
    UNCHECKED_QUANTITY_KEY,
    ConnectionInfo,
    EventPublisherConfig,
    PostgresPhysicalReplicaSpec,
    PostgresPhysicalReplicaStatus,
    SnapshotFilter,
)
from pgro.api.restore import JobStatus, PostgresPhysicalRestoreSpec, PostgresPhysicalRestoreStatus
from pgro.api.users import ExtraUser
from pgro.api.verification import PendingVerificationReport

CRD_NAMES: Final[tuple[str, str]] = (f"{REPLICA_PLURAL}.{GROUP}", f"{RESTORE_PLURAL}.{GROUP}")
CRD_LABELS: Final[Mapping[str, str]] = {
    "app.kubernetes.io/name": "pgro",
    "app.kubernetes.io/part-of": "pgro",
}

_Schema = dict[str, Any]

# Set on each model's JSON schema by `_MarkingGenerator` so the rewrite knows which model
# (and so which field defaults) a node came from; it never reaches the output.
_MODEL_KEY: Final = "x-pgro-model"

# Kubernetes' own pattern for resource.Quantity, as controller-gen emits it. It only
# applies to the string form; a plain integer is always a valid quantity.
_QUANTITY_PATTERN: Final = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_DURATION_HINT: Final = "A duration such as 30s, 10m, 2h30m, 1d or PT10M."
_QUANTITY_HINT: Final = "A Kubernetes quantity such as 50Gi, 2Ti or 5368709120."
_SPEC_QUANTITY_HINT: Final = (
    "A Kubernetes quantity such as 50Gi, 2Ti or 5368709120. Another value (100GB, '64 Gi') "
    "is admitted, as by the reference, but sets the condition SpecValid=False and no new "
    "restore is made until it is fixed."
)
_HINTS: Final = frozenset({_DURATION_HINT, _QUANTITY_HINT, _SPEC_QUANTITY_HINT})

# Formats the API server knows and pgro's values always satisfy. `duration` is missing on
# purpose: the server checks it with a Go duration parser, which rejects `1d` and
# `PT10M`, both of which pgro (like the reference) accepts, so durations are plain strings.
_KEPT_FORMATS: Final = frozenset({"date-time"})
_DROPPED_FORMATS: Final = frozenset({"duration"})

_SCALAR_TYPES: Final = frozenset({"string", "integer", "number", "boolean"})
_SCALAR_KEYS: Final = frozenset(
    {"type", "description", "enum", "const", "format", "pattern", "minimum", "maximum"}
    | {"exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"}
)

# Output key order, so the generated YAML reads like a hand-written CRD.
_KEY_ORDER: Final = (
    "description",
    "type",
    "format",
    "enum",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "nullable",
    "default",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "items",
    "additionalProperties",
    "properties",
    "required",
)

# Models whose wire form is not one JSON type. An `extraUsers` entry is a bare role name
# (the reference's form, and what pgro writes back for it) or `{name, schemas[]}`; a
# structural schema cannot say "string or object" (`anyOf` may not carry types), so the
# item keeps any value and the model checks it when pgro loads the replica.
_FREE_FORM_MODELS: Final[Mapping[type[BaseModel], str]] = {
    ExtraUser: (
        "A role name, or an object {name, schemas[]} whose grants are scoped to those schemas."
    ),
}

# Step phases are `<word>` or `failed: <reason>`; the reason may span lines.
_STEP_PHASES: Final = (SchemaMigrationPhase, RedactionPhase)

# `kubectl explain` text. Field descriptions live here rather than in the models because
# the models' comments are written for pgro's developers, not for people writing manifests.
_DESCRIPTIONS: Final[Mapping[type[BaseModel], Mapping[str, str]]] = {
    PostgresPhysicalReplicaSpec: {
        "kopia_secret_ref": (
            "Secret with the Kopia repository credentials: keys bucket, region, accessKeyId, "
            "secretAccessKey and repositoryPassword, optionally endpoint (host:port of an "
            "S3-compatible store) and disableTls. Only name is used: the Secret is read from "
            "the replica's namespace. Set exactly one of kopiaSecretRef and canopySource."
        ),
        "canopy_source": (
            "Route Kopia through the canopy proxy sidecar. Written by the canopy syncer, "
            "not by hand. Set exactly one of kopiaSecretRef and canopySource."
        ),
        "snapshot_filter": "Which snapshots may be restored; every criterion given must match.",
        "schedule": (
            "When scheduled restores start: a 5-field cron expression with an optional "
            "trailing IANA time zone (UTC when absent), e.g. '20 15 * * * Pacific/Auckland'. "
            "'H' (a stable per-replica value) is allowed in any field."
        ),
        "schedule_jitter": (
            "Random offset, drawn from [-jitter/2, +jitter/2), added to each scheduled time."
        ),
        "minimum_ttl": "Start no new restore until this long after the last switchover.",
        "switchover_grace_period": (
            "How long the previous restore keeps running after a switchover."
        ),
        "analytics_username": (
            "Login role provisioned in each restore; its credentials are in Secret <replica>-creds."
        ),
        "extra_users": (
            "Further login roles, each with its credentials in Secret "
            "<replica>-user-<name>-creds. Blank names, repeats and the analytics user are "
            "ignored."
        ),
        "persistent_users": (
            "Read-only roles re-created in every restore, with passwords kept across switchovers."
        ),
        "storage_class": "StorageClass of the restore volumes and the Kopia cache volume.",
        "storage_size_override": (
            "Smallest restore volume to request: a floor under the size derived from the "
            "snapshot, not a replacement for it."
        ),
        "storage_size_maximum": (
            "Largest restore volume to request; a snapshot that needs more fails. An "
            "unparsable value means 2Ti."
        ),
        "resources": (
            "Resources of the postgres container (a Kubernetes ResourceRequirements), used "
            "as given instead of being derived from the snapshot."
        ),
        "resources_floor": (
            "Lower bounds (a Kubernetes ResourceRequirements) for the resources derived from "
            "the snapshot; ignored when resources is set."
        ),
        "resources_maximum": "Cap on the memory derived from the snapshot.",
        "deployment_ready_timeout": (
            "How long a restore's Deployment may take to become ready; derived from the "
            "snapshot when unset."
        ),
        "shm_size_floor": "Smallest /dev/shm to give postgres pods.",
        "overlay_database": (
            "Not supported: the reference removed overlay databases (use persistentSchemas "
            "and persistentUsers). Admitted so reference manifests apply; a replica that "
            "sets it gets SpecValid=False and is restored without an overlay."
        ),
        "service_annotations": "Annotations on the replica's Service.",
        "pod_annotations": "Annotations on postgres pods.",
        "affinity": "Affinity of postgres pods (a Kubernetes Affinity).",
        "tolerations": "Tolerations of postgres pods (Kubernetes Tolerations).",
        "read_only": "Serve the restored database read-only.",
        "ephemeral": (
            "Tear each restore down once it is Active: proves the snapshot restores, then "
            "frees the resources."
        ),
        "postgres_extra_config": "Lines appended to postgresql.conf.",
        "notifications": "Targets called after each switchover.",
        "persistent_schemas": (
            "Schemas carried from the previous restore into the new one at switchover. "
            "Unset and empty differ: an empty list still runs the migration step."
        ),
        "pre_migrate_drop_schemas": (
            "Schemas dropped from each restore before its migrations run."
        ),
        "migrate_to": (
            "Application version whose migrations each restore applies; copied into each "
            "restore when it is created."
        ),
        "builder_image": (
            "Image that builds a reporting schema before switchover; copied into each "
            "restore when it is created."
        ),
        "redaction": "Mask data with postgresql_anonymizer before switchover.",
        "event_publisher": (
            "Publish each failed restore to a canopy-style /events endpoint over mTLS. "
            "Best effort: a failed delivery is logged, never retried, and never affects "
            "the replica."
        ),
    },
    EventPublisherConfig: {
        "url": "Full URL of the events endpoint, e.g. https://meta.tamanu.app/api/events.",
        "client_certificate_secret_ref": (
            "Secret with the mTLS client identity: keys tls.crt (PEM certificate, optionally "
            "with its chain) and tls.key (PEM private key), as in a kubernetes.io/tls "
            "Secret. namespace defaults to the replica's."
        ),
        "source": "Value of the event's source field.",
    },
    PostgresPhysicalReplicaStatus: {
        "phase": "Pending, Restoring or Ready.",
        "current_restore": "The restore the replica's Service points at.",
        "previous_restore": "The restore that served before the last switchover.",
        "service_name": "The replica's Service.",
        "last_restore_completed_at": "When the last switchover happened.",
        "next_scheduled_restore": "When the next restore starts.",
        "schedule_input_hash": "Hash of the schedule and jitter the next time was computed from.",
        "latest_available_snapshot": "Newest snapshot the last listing found.",
        "canopy_desired_snapshot_id": "The snapshot canopy wants restored.",
        "verified_snapshot_id": "Last snapshot an ephemeral replica restored and tore down.",
        "connection_info": "How to connect to the replica.",
        "queue_position": "1-based place in the restore queue while waiting; 0 otherwise.",
        "notifications": "Outcome of the last notification round, one entry per target.",
        "conditions": "Current state of the replica, as Kubernetes conditions.",
        "schema_migration_job": "The persistent-schema migration Job while it runs.",
        "schema_migration_phase": "State of the persistent-schema migration.",
        "persistent_schema_data_size": "Measured size of the persistent schemas.",
        "persistent_schemas_missing": (
            "Persistent schemas found missing from the new restore after the last migration."
        ),
        "consecutive_restore_failures": (
            "Restores failed in a row; reset by a switchover. Retries back off as it grows."
        ),
        "redaction_phase": "State of redaction of the current restore.",
        "redaction_version": "Redaction manifest version in use.",
        "redaction_columns_applied": "Columns redaction was applied to.",
        "pending_verification_reports": (
            "Canopy verification reports not yet accepted by canopy; retried with backoff."
        ),
    },
    PostgresPhysicalRestoreSpec: {
        "replica": "The replica this restore belongs to.",
        "snapshot": "ID of the Kopia snapshot to restore.",
        "snapshot_size": "Size of the snapshot.",
        "snapshot_time": "When the snapshot was taken, as Kopia wrote it.",
        "storage_size": "Size of the restore volume.",
        "migrate_to": "Application version whose migrations are applied after restoring.",
        "builder_image": "Image that builds a reporting schema before switchover.",
    },
    PostgresPhysicalRestoreStatus: {
        "phase": (
            "Pending, Restoring, Migrating, Ready, Switching, Active (serving the replica) "
            "or Failed."
        ),
        "run_id": "Canopy run this restore belongs to.",
        "fixes": "Repairs the restore step made to the data directory (reset_wal, ...).",
        "postgres_version": "PostgreSQL major version of the restored data.",
        "data_checks": (
            "What the checks that read the data found (page checksums, amcheck, full read), "
            "at the replica's pgro.bes.au/verify-depth."
        ),
        "created_at": "When the restore was picked up.",
        "restored_at": "When the data was restored.",
        "activated_at": "When the restore started serving the replica.",
        "restore_job": "The Kopia restore Job.",
        "migration_job": "The migration Job.",
        "migration_baseline": "Newest migration log time before migrating, as PostgreSQL wrote it.",
        "migration_result": "What the migrations did.",
        "schema_build_result": "What the reporting schema build did.",
        "schema_build_job": "The reporting schema build Job.",
        "schema_build_attempts": "Reporting schema builds tried.",
        "pvc": "The data volume claim.",
        "deployment": "The postgres Deployment.",
        "credentials_secret": "Secret with the restore's credentials.",
        "conditions": "Current state of the restore, as Kubernetes conditions.",
    },
    ConnectionInfo: {
        "host": "Host name of the replica's Service.",
        "port": "PostgreSQL port.",
        "database": "Database to connect to.",
        "username": "Login role (the analytics user).",
        "password_secret": "Secret with the password, key password.",
    },
    PendingVerificationReport: {
        "restore": "The restore the report is about.",
        "run_id": "The restore's canopy run.",
        "snapshot_id": "The snapshot restored.",
        "outcome": "success or failure.",
        "error": "Why the restore failed.",
        "observed_at": "When the outcome was recorded.",
        "postgres_version": "Major version of the restored server.",
        "health_details": "Free-form details sent to canopy (sizes, fixes, checks).",
        "traffic": "The canopy proxy's final S3 traffic counters.",
        "attempts": "Failed deliveries so far.",
        "next_attempt_at": "When delivery is tried again.",
        "last_error": "Why the last delivery failed.",
    },
    NotificationStatus: {
        "name": "The target: method and URL, or 'GraphQL <url>'.",
        "last_sent_at": "When the target was last called.",
        "success": "Whether that call succeeded.",
        "last_error": "Why it failed.",
    },
    JobStatus: {
        "phase": "Running, Succeeded or Failed.",
    },
    SnapshotFilter: {
        "tags": "Tags the snapshot must carry, with these values.",
        "host_pattern": "Glob the snapshot's host must match.",
        "description_pattern": "Glob the snapshot's description must match.",
        "path_pattern": "Glob the snapshot's path must match, written in Unix form (/D/Full*).",
    },
    Condition: {
        "observed_generation": "The .metadata.generation the condition was set from.",
    },
    MigrationResult: {
        "failed_migration": "The migration that failed; absent when all passed.",
    },
    SchemaBuildResult: {
        "schema_bytes": "Size of the built schema.",
    },
    DataChecks: {
        "depth": "quick, standard or full.",
        "verdict": "passed, damaged, incomplete (not judged) or not_run.",
        "message": "What the verdict rests on, or why the checks did not run.",
        "checks": "Each check and how it went.",
    },
    DataCheck: {
        "name": "checksums, btree, heap, full_read, not_checked or integrity_complete.",
        "status": "pass, fail, not_checked or incomplete.",
        "count": "How many findings in all.",
        "findings": "The first findings: database, relation, block and the tool's words.",
    },
}


class _MarkingGenerator(GenerateJsonSchema):
    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        json_schema[_MODEL_KEY] = schema["cls"]
        return json_schema


class _NoDefault:
    """The model has no default to emit for a field."""


_NO_DEFAULT: Final = _NoDefault()


def _tidy(text: str) -> str:
    """Docstring line wraps undone; paragraph breaks kept."""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _ordered(node: Mapping[str, Any]) -> _Schema:
    unknown = set(node) - set(_KEY_ORDER)
    if unknown:
        raise AssertionError(f"key order misses {sorted(unknown)}")
    return {key: node[key] for key in _KEY_ORDER if key in node}


def _wire_default(model: type[BaseModel], name: str, field: FieldInfo) -> Any:
    """The field's default as pgro writes it, or `_NO_DEFAULT`.

    None means "absent" on the wire, and a list the model leaves out when empty must not
    be put back by the API server either: the stored object would then differ from what
    pgro writes, and `[]` in a merge patch wipes what another writer put there.
    """
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is PydanticUndefined or value is None:
        return _NO_DEFAULT
    if value == [] and name in getattr(model, "omit_when_empty", frozenset()):
        return _NO_DEFAULT
    # The field's own validators and serialisers, so a Duration default is written `10m`.
    annotated: Any = Annotated
    base: Any = field.annotation
    hint = annotated[(base, *field.metadata)] if field.metadata else base
    return TypeAdapter[Any](hint).dump_python(value, mode="json", by_alias=True)


def _step_phase_pattern(field: FieldInfo) -> str | None:
    args = typing.get_args(field.annotation) or (field.annotation,)
    for phase in _STEP_PHASES:
        if phase in args:
            # `_WORDS` is the phase's own list of fixed words, so the pattern cannot drift
            # from what `parse` accepts; the words are plain [a-z-], no escaping needed.
            words = "|".join(phase._WORDS)
            return f"^(?:{words})$|^failed:"
    return None


def _field_description(model: type[BaseModel], name: str, field: FieldInfo) -> str | None:
    text = _DESCRIPTIONS.get(model, {}).get(name) or field.description
    return _tidy(text) if text else None


def _int_or_string(*, quantity: bool, pattern: bool = True) -> _Schema:
    node: _Schema = {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
    }
    if quantity:
        node["description"] = _QUANTITY_HINT if pattern else _SPEC_QUANTITY_HINT
        if pattern:
            node["pattern"] = _QUANTITY_PATTERN
    return node


def _is_int_or_string(options: list[_Schema]) -> bool:
    stripped = [{k: v for k, v in o.items() if k != "title"} for o in options]
    return sorted(stripped, key=lambda o: str(o.get("type"))) == [
        {"type": "integer"},
        {"type": "string"},
    ]


def _free_form(description: str) -> _Schema:
    # No `type`: the one structural way to accept values of more than one JSON type.
    return {"description": description, "x-kubernetes-preserve-unknown-fields": True}


def _phrase(option: Mapping[str, Any]) -> str:
    kind = option.get("type")
    if kind == "object":
        keys = ", ".join(option.get("properties", {}))
        return f"an object with {keys}" if keys else "an object"
    phrases = {
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "a boolean",
        "array": "a list",
    }
    if not isinstance(kind, str) or kind not in phrases:
        raise ValueError(f"no phrase for JSON schema {option!r}")
    return phrases[kind]


class _Converter:
    """Rewrites one pydantic JSON schema (with its `$defs`) into a structural schema."""

    def __init__(self, defs: Mapping[str, _Schema]) -> None:
        self._defs = defs

    def _resolve(self, node: Mapping[str, Any]) -> _Schema:
        """`node` with `$ref`s replaced by their targets; keys beside a `$ref` win."""
        result = dict(node)
        while "$ref" in result:
            ref = result.pop("$ref")
            name = ref.removeprefix("#/$defs/")
            if name == ref or name not in self._defs:
                raise ValueError(f"cannot resolve {ref!r}")
            result = {**self._defs[name], **result}
        return result

    def convert(self, raw: Mapping[str, Any], path: str) -> _Schema:
        node = self._resolve(raw)
        # Pydantic's titles are the field names again; its defaults are replaced by the
        # model's own (see `_wire_default`), set where the field is known.
        node.pop("title", None)
        node.pop("default", None)
        if "anyOf" in node or "oneOf" in node:
            return self._union(node, path)
        model = node.pop(_MODEL_KEY, None)
        if model is not None:
            free_form = _FREE_FORM_MODELS.get(model)
            if free_form is not None:
                return _free_form(free_form)
            return self._model(model, node, path)
        kind = node.get("type")
        if kind == "object":
            return self._mapping(node, path)
        if kind == "array":
            return self._array(node, path)
        if kind in _SCALAR_TYPES:
            return self._scalar(node, path)
        raise ValueError(f"{path}: no structural equivalent for JSON schema {node!r}")

    def _union(self, node: _Schema, path: str) -> _Schema:
        key = "anyOf" if "anyOf" in node else "oneOf"
        options: list[_Schema] = node.pop(key)
        discriminator = node.pop("discriminator", None)
        quantity = bool(node.pop("x-kubernetes-int-or-string", False))
        # A spec byte size the reference admitted as any string: checked at reconcile.
        unchecked = bool(node.pop(UNCHECKED_QUANTITY_KEY, False))
        description = node.pop("description", None)
        if node:
            raise ValueError(f"{path}: unexpected keys beside {key}: {sorted(node)}")
        present = [o for o in options if o != {"type": "null"}]
        resolved = [self._resolve(o) for o in present]
        if _is_int_or_string(resolved):
            # Quantity declares int-or-string itself and is checked by the model; a bare
            # `int | str` (storageSizeMaximum, deliberately unchecked) gets no pattern.
            result = _int_or_string(quantity=quantity, pattern=not unchecked)
        elif len(present) == 1:
            result = self.convert(present[0], path)
        elif discriminator is not None:
            result = self._tagged_union(resolved, discriminator["propertyName"], path)
        else:
            converted = [self.convert(o, path) for o in resolved]
            alternatives = [_phrase(o) for o in converted]
            text = f"{', '.join(alternatives[:-1])} or {alternatives[-1]}."
            result = _free_form(text[0].upper() + text[1:])
        if description is not None and "description" not in result:
            result["description"] = _tidy(description)
        if len(present) < len(options):
            result["nullable"] = True
        return _ordered(result)

    def _tagged_union(self, variants: list[_Schema], tag: str, path: str) -> _Schema:
        """One object with every variant's properties and the tag as an enum.

        Structural schemas cannot branch on the tag, so the per-variant required fields
        are left to the model; only what every variant needs is required here.
        """
        converted = [self.convert(v, path) for v in variants]
        tags: list[str] = []
        merged: dict[str, _Schema] = {}
        owners: dict[str, list[str]] = {}
        for variant in converted:
            (value,) = variant["properties"][tag]["enum"]
            tags.append(value)
            for name, prop in variant["properties"].items():
                if name == tag:
                    continue
                owners.setdefault(name, []).append(value)
                if name not in merged:
                    merged[name] = prop
                    continue
                if _shape(merged[name]) != _shape(prop):
                    raise ValueError(f"{path}.{name}: variants disagree on its schema")
                if merged[name].get("default", _NO_DEFAULT) != prop.get("default", _NO_DEFAULT):
                    merged[name] = {k: v for k, v in merged[name].items() if k != "default"}
        for name, prop in merged.items():
            # A default for a field some variants lack would be put on those too.
            if len(owners[name]) < len(converted) and "default" in prop:
                merged[name] = {k: v for k, v in prop.items() if k != "default"}
        required = [tag] + [
            name
            for name in converted[0].get("required", [])
            if name != tag and all(name in v.get("required", []) for v in converted)
        ]
        uses = "; ".join(
            f"{value}: {', '.join(n for n in merged if value in owners[n])}" for value in tags
        )
        tag_description = f"Which kind of entry this is. Fields each kind uses: {uses}."
        properties = {tag: {"description": tag_description, "type": "string", "enum": tags}}
        properties.update(merged)
        return {"type": "object", "properties": properties, "required": required}

    def _model(self, model: type[BaseModel], node: _Schema, path: str) -> _Schema:
        properties: Mapping[str, _Schema] = node.pop("properties", {})
        required: list[str] = node.pop("required", [])
        description = node.pop("description", None)
        if node.pop("type", None) != "object" or node:
            raise ValueError(f"{path}: unexpected model schema keys {sorted(node)}")
        fields = {field.alias or name: (name, field) for name, field in model.model_fields.items()}
        if set(fields) != set(properties):
            # The "no field silently dropped" guarantee: pydantic leaves a field out of its
            # JSON schema only when told to, and then the CRD would prune it.
            raise ValueError(
                f"{path}: {model.__name__} fields {sorted(fields)} differ from its JSON "
                f"schema properties {sorted(properties)}"
            )
        out: dict[str, _Schema] = {}
        for alias, raw in properties.items():
            name, field = fields[alias]
            prop = self.convert(raw, f"{path}.{alias}")
            own = _field_description(model, name, field)
            inner = prop.get("description")
            if own is not None:
                prop["description"] = f"{own} {inner}" if inner in _HINTS else own
            pattern = _step_phase_pattern(field)
            if pattern is not None:
                prop["pattern"] = pattern
            default = _wire_default(model, name, field)
            if default is not _NO_DEFAULT:
                prop["default"] = default
            out[alias] = _ordered(prop)
        result: _Schema = {"type": "object", "properties": out}
        if description is not None:
            result["description"] = _tidy(description)
        if required:
            result["required"] = list(required)
        return _ordered(result)

    def _mapping(self, node: _Schema, path: str) -> _Schema:
        additional = node.pop("additionalProperties", True)
        description = node.pop("description", None)
        node.pop("type")
        if node:
            raise ValueError(f"{path}: unexpected object schema keys {sorted(node)}")
        result: _Schema = {"type": "object"}
        if additional is True or additional == {}:
            # `dict[str, Any]`: in the models these are Kubernetes types kept verbatim
            # (Affinity, Toleration, ResourceRequirements) and handed back to the API
            # server. Repeating their schemas would tie pgro to one Kubernetes version;
            # the server validates them where they are used, in the pod spec.
            result["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(additional, dict):
            result["additionalProperties"] = self.convert(additional, f"{path}.*")
        else:
            raise ValueError(f"{path}: unsupported additionalProperties {additional!r}")
        if description is not None:
            result["description"] = _tidy(description)
        return _ordered(result)

    def _array(self, node: _Schema, path: str) -> _Schema:
        items = node.pop("items", None)
        if items is None:
            raise ValueError(f"{path}: a list without an item schema")
        result: _Schema = {"type": "array", "items": self.convert(items, f"{path}[]")}
        for key in ("description", "minItems", "maxItems"):
            if key in node:
                result[key] = node.pop(key)
        node.pop("type")
        if node:
            raise ValueError(f"{path}: unexpected array schema keys {sorted(node)}")
        return _ordered(result)

    def _scalar(self, node: _Schema, path: str) -> _Schema:
        unknown = set(node) - _SCALAR_KEYS
        if unknown:
            raise ValueError(f"{path}: unexpected keys {sorted(unknown)} in {node!r}")
        result = dict(node)
        if "const" in result:
            # OpenAPI v3.0, which Kubernetes speaks, has no `const`.
            result["enum"] = [result.pop("const")]
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            # JSON Schema's numeric exclusive bounds are OpenAPI v3.0's boolean flags.
            if bound in result and not isinstance(result[bound], bool):
                result[plain] = result[bound]
                result[bound] = True
        fmt = result.get("format")
        if fmt in _DROPPED_FORMATS:
            del result["format"]
            result.setdefault("description", _DURATION_HINT)
        elif fmt is not None and fmt not in _KEPT_FORMATS:
            raise ValueError(f"{path}: format {fmt!r} is not known to be safe for Kubernetes")
        if "description" in result:
            result["description"] = _tidy(result["description"])
        return _ordered(result)


def _shape(node: Mapping[str, Any]) -> Mapping[str, Any]:
    return {k: v for k, v in node.items() if k not in ("description", "default")}


def _structural_schema(model: type[BaseModel]) -> _Schema:
    raw = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_MarkingGenerator
    )
    defs = raw.pop("$defs", {})
    return _Converter(defs).convert(raw, model.__name__)


def _root_schema(
    description: str, spec: type[BaseModel], status: type[BaseModel]
) -> dict[str, Any]:
    return {
        "description": description,
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "Versioned schema of this representation of an object.",
                "type": "string",
            },
            "kind": {"description": "The REST resource this object represents.", "type": "string"},
            "metadata": {"type": "object"},
            "spec": {"description": "Desired state.", **_structural_schema(spec)},
            "status": {
                "description": "Observed state, written by the operator.",
                **_structural_schema(status),
            },
        },
        "required": ["spec"],
    }


def _column(name: str, kind: str, json_path: str) -> dict[str, str]:
    return {"name": name, "type": kind, "jsonPath": json_path}


def _age() -> dict[str, str]:
    return _column("Age", "date", ".metadata.creationTimestamp")


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_name: str,
    columns: list[dict[str, str]],
    schema: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": dict(CRD_LABELS)},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": [short_name],
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def crd_documents() -> list[dict[str, Any]]:
    """Both CRDs as plain JSON-able dicts, the replica's first."""
    replica = _crd(
        kind=REPLICA_KIND,
        plural=REPLICA_PLURAL,
        singular=REPLICA_SINGULAR,
        short_name=REPLICA_SHORT_NAME,
        columns=[
            _column("Phase", "string", ".status.phase"),
            _column("Service", "string", ".status.serviceName"),
            _age(),
            _column("Next restore", "date", ".status.nextScheduledRestore"),
        ],
        schema=_root_schema(
            "A PostgreSQL replica kept restored from Kopia snapshots of physical backups, "
            "served through a stable Service.",
            PostgresPhysicalReplicaSpec,
            PostgresPhysicalReplicaStatus,
        ),
    )
    restore = _crd(
        kind=RESTORE_KIND,
        plural=RESTORE_PLURAL,
        singular=RESTORE_SINGULAR,
        short_name=RESTORE_SHORT_NAME,
        columns=[
            _column("Phase", "string", ".status.phase"),
            _column("Replica", "string", ".spec.replica.name"),
            _column("Snapshot size", "string", ".spec.snapshotSize"),
            _column("Storage size", "string", ".spec.storageSize"),
            _column("Postgres version", "string", ".status.postgresVersion"),
            _age(),
        ],
        schema=_root_schema(
            "One restore of one snapshot for a PostgresPhysicalReplica, from Kopia to a "
            "serving database. Deleting it drops that database.",
            PostgresPhysicalRestoreSpec,
            PostgresPhysicalRestoreStatus,
        ),
    )
    # Through JSON and back: only JSON values, and no object shared between two places
    # (a `$def` used twice shares its lists), which YAML would write as anchors.
    documents: list[dict[str, Any]] = json.loads(json.dumps([replica, restore]))
    return documents


def crds_yaml() -> str:
    """Both CRDs as one multi-document YAML stream, as `deploy/crds.yaml` holds them."""
    return yaml.safe_dump_all(crd_documents(), sort_keys=False)
