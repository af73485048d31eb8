"""Canopy's request and response bodies (reference/canopy-protocol.md §3).

Canopy's wire is snake_case, so these models do not use `pgro.api.base.ApiModel` (which
writes camelCase); the one exception, the AWS `credential_process` object inside
`/restore-credentials` answers, spells its PascalCase names as explicit aliases.

The contract moved several times (§0), so the two directions differ on purpose:

* what canopy sends (`WorklistEntry`, `RestoreCredentials`, `ProblemDocument`) is decoded
  leniently: unknown fields are ignored, old and new field names are both read, and one
  malformed worklist entry is set aside (`Worklist.rejected`) instead of failing the rest;
* what pgro sends (`RestoreCapabilitiesArgs`, `VerificationArgs`, `ProgressArgs`,
  `RestoreCredentialsArgs`) is checked strictly when it is built (unknown fields refused,
  required fields required, immutable afterwards) and written in the newest shape, with
  unmeasured values left out rather than zeroed.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal
from uuid import UUID

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pgro.api.migration import MigrateTo, MigrationResult
from pgro.api.timestamp import parse_rfc3339

# -- value types --------------------------------------------------------------------------

INT64_MAX: Final = 2**63 - 1


def format_canopy_time(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, fractional seconds only when non-zero (as jiff prints)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"timestamp {value!r} has no timezone; pass an aware datetime")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _aware_time(value: object) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"timestamp {value!r} has no timezone; pass an aware datetime")
        return value.astimezone(UTC)
    if isinstance(value, str):
        return parse_rfc3339(value)
    raise ValueError(f"expected an RFC 3339 timestamp, got {type(value).__name__}")


CanopyTime = Annotated[
    datetime,
    BeforeValidator(_aware_time),
    PlainSerializer(format_canopy_time, return_type=str),
]
"""An aware UTC time: RFC 3339 text in (any offset, fraction optional), `…Z` text out."""


def _clamp_int64(value: object) -> object:
    # Counters come from u64 sources (the sidecar's byte counts); canopy stores int64.
    if isinstance(value, int) and not isinstance(value, bool) and value > INT64_MAX:
        return INT64_MAX
    return value


Counter = Annotated[int, BeforeValidator(_clamp_int64), Field(ge=0, strict=True)]
"""A non-negative int64; larger values are clamped to the int64 maximum, as pgro does."""


# -- bases ----------------------------------------------------------------------------------


class CanopyRequest(BaseModel):
    """A body pgro sends: strict, immutable, snake_case, unset fields omitted."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class CanopyResponse(BaseModel):
    """A body canopy sends: unknown fields ignored so newer servers still decode."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, defer_build=True)


# -- problem documents (§2.3) ----------------------------------------------------------------


class ProblemDocument(CanopyResponse):
    """An RFC 7807 error body: `{"type": "/errors/<slug>", "title", "status", "detail"}`."""

    type: str | None = None
    title: str | None = None
    status: int | None = None
    detail: str | None = None

    @property
    def slug(self) -> str | None:
        """`auth-insufficient-permissions` for type `/errors/auth-insufficient-permissions`."""
        if not self.type:
            return None
        return self.type.rstrip("/").rsplit("/", 1)[-1] or None

    @property
    def reason(self) -> str | None:
        """What the client surfaces: `title`, falling back to `detail`."""
        return self.title or self.detail or None


def parse_problem(data: object) -> ProblemDocument | None:
    """The problem document in an error body, or None when the body is not one."""
    if not isinstance(data, dict):
        return None
    try:
        problem = ProblemDocument.model_validate(data)
    except ValidationError:
        return None
    if problem.title is None and problem.detail is None and problem.type is None:
        return None
    return problem


# -- POST /restore-capabilities (§3.1) ------------------------------------------------------

INTENT_VERIFY: Final = "verify"
INTENT_UPGRADE: Final = "upgrade"
INTENT_ANALYTICS: Final = "analytics"

# What canopy acts on; other values are stored and ignored.
SEMANTIC_CHECK: Final = "check"
SEMANTIC_ONCE: Final = "once"
SEMANTIC_URL: Final = "url"
SEMANTIC_MIGRATE: Final = "migrate"
SEMANTIC_REDACT: Final = "redact"
SEMANTIC_REPORTING_SCHEMA: Final = "reporting-schema"

ParamType = Literal["duration", "bytes", "boolean", "integer", "text"]

# The analytics intent's parameters (15, as the reference's newest generation).
PARAM_MINIMUM_TTL: Final = "minimum_ttl"
PARAM_SWITCHOVER_GRACE: Final = "switchover_grace"
PARAM_STORAGE_SIZE_MAXIMUM: Final = "storage_size_maximum"
PARAM_PERSISTENT_SCHEMAS: Final = "persistent_schemas"
PARAM_EXPOSE: Final = "expose"
PARAM_EXTRA_USERS: Final = "extra_users"
PARAM_MEMORY_REQUEST: Final = "memory_request"
PARAM_MEMORY_LIMIT: Final = "memory_limit"
PARAM_CPU_REQUEST: Final = "cpu_request"
PARAM_CPU_LIMIT: Final = "cpu_limit"
PARAM_RESOURCES_MAXIMUM: Final = "resources_maximum"
PARAM_DEPLOYMENT_READY_TIMEOUT: Final = "deployment_ready_timeout"
PARAM_REDACTION_MANIFEST_URL: Final = "redaction_manifest_url"
PARAM_REDACTION_VERSION_QUERY: Final = "redaction_version_query"
PARAM_REDACTION_VERSION_FALLBACK_TO_BASE: Final = "redaction_version_fallback_to_base"
PARAM_MIGRATE_TO: Final = "migrate_to"

DEFAULT_MINIMUM_TTL: Final = timedelta(seconds=7200)
DEFAULT_ANALYTICS_SWITCHOVER_GRACE: Final = timedelta(seconds=120)


_PARAM_EXPECTATIONS: Final[dict[str, str]] = {
    "duration": "a non-negative whole number of seconds",
    "bytes": "a non-negative whole number of bytes",
    "boolean": "true or false",
    "integer": "a whole number",
    "text": "a string",
}


def check_param_value(name: str, param_type: ParamType, value: object) -> None:
    """Raise ValueError naming the parameter when `value` is not of `param_type`."""
    ok: bool
    if param_type in ("duration", "bytes"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif param_type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif param_type == "boolean":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(
            f"parameter {name!r} must be {_PARAM_EXPECTATIONS[param_type]} "
            f"({param_type}), got {value!r}"
        )


class ParamSpec(CanopyRequest):
    """A parameter's type and, when it has one, its default (omitted otherwise).

    Values travel as JSON: `duration` and `bytes` are non-negative whole numbers
    (seconds, bytes), `boolean` a JSON boolean, `integer` a number, `text` a string.
    """

    type: ParamType
    default: JsonValue = None

    @model_validator(mode="after")
    def _default_matches_type(self) -> ParamSpec:
        if self.default is not None:
            check_param_value("default", self.type, self.default)
        return self


class IntentDescriptor(CanopyRequest):
    intent: str = Field(min_length=1)
    description: str | None = None
    semantics: tuple[str, ...] = ()
    # None (not {}) when the intent takes none: the key is then left out, as pgro does.
    params: dict[str, ParamSpec] | None = None


class RestoreCapabilitiesArgs(CanopyRequest):
    """Replaces the device's advertised intents wholesale; only these are dispatched."""

    intents: tuple[IntentDescriptor, ...]


VERIFY_DESCRIPTOR: Final = IntentDescriptor(
    intent=INTENT_VERIFY,
    description="Restore the snapshot to prove it is restorable, then discard it.",
    semantics=(SEMANTIC_CHECK, SEMANTIC_ONCE),
)
UPGRADE_DESCRIPTOR: Final = IntentDescriptor(
    intent=INTENT_UPGRADE,
    description=(
        "Restore the snapshot, apply the next version's schema migrations to it to prove "
        "the upgrade survives this deployment's data, then discard it."
    ),
    semantics=(SEMANTIC_CHECK, SEMANTIC_ONCE, SEMANTIC_MIGRATE),
)
ANALYTICS_DESCRIPTOR: Final = IntentDescriptor(
    intent=INTENT_ANALYTICS,
    description="Keep a long-lived read-only query replica restored from the latest snapshot.",
    semantics=(SEMANTIC_CHECK, SEMANTIC_URL, SEMANTIC_REDACT),
    params={
        PARAM_MINIMUM_TTL: ParamSpec(
            type="duration", default=int(DEFAULT_MINIMUM_TTL.total_seconds())
        ),
        PARAM_SWITCHOVER_GRACE: ParamSpec(
            type="duration", default=int(DEFAULT_ANALYTICS_SWITCHOVER_GRACE.total_seconds())
        ),
        PARAM_STORAGE_SIZE_MAXIMUM: ParamSpec(type="bytes"),
        PARAM_PERSISTENT_SCHEMAS: ParamSpec(type="text"),
        PARAM_EXPOSE: ParamSpec(type="boolean", default=False),
        PARAM_EXTRA_USERS: ParamSpec(type="text"),
        PARAM_MEMORY_REQUEST: ParamSpec(type="bytes"),
        PARAM_MEMORY_LIMIT: ParamSpec(type="bytes"),
        PARAM_CPU_REQUEST: ParamSpec(type="text"),
        PARAM_CPU_LIMIT: ParamSpec(type="text"),
        PARAM_RESOURCES_MAXIMUM: ParamSpec(type="bytes"),
        PARAM_DEPLOYMENT_READY_TIMEOUT: ParamSpec(type="duration"),
        PARAM_REDACTION_MANIFEST_URL: ParamSpec(type="text"),
        PARAM_REDACTION_VERSION_QUERY: ParamSpec(type="text"),
        PARAM_REDACTION_VERSION_FALLBACK_TO_BASE: ParamSpec(type="boolean", default=False),
        PARAM_MIGRATE_TO: ParamSpec(type="text"),
    },
)

PGRO_INTENTS: Final = (VERIFY_DESCRIPTOR, UPGRADE_DESCRIPTOR, ANALYTICS_DESCRIPTOR)
"""What pgro advertises: the intents `materialise` can turn into a replica, no more."""


def capabilities_request(
    intents: tuple[IntentDescriptor, ...] = PGRO_INTENTS,
) -> RestoreCapabilitiesArgs:
    return RestoreCapabilitiesArgs(intents=intents)


# -- GET /restore-worklist (§3.2) ------------------------------------------------------------


def _lenient_time(value: object) -> datetime | None:
    # `snapshot_at` is informational: an unreadable one must not cost the whole entry.
    if value is None:
        return None
    try:
        return _aware_time(value)
    except ValueError:
        return None


def _params_or_empty(value: object) -> object:
    return {} if value is None else value


class WorklistEntry(CanopyResponse):
    """One replica canopy wants: a declaration applied to one machine.

    Read leniently across the protocol's generations: `machine_id` or the older
    `server_id` (the same value; both are sent today), `overdue_after_seconds` or the
    older `freshness_seconds`, `params` missing on the oldest servers.
    """

    replica_id: UUID
    group_id: UUID
    machine_id: UUID = Field(validation_alias=AliasChoices("machine_id", "server_id"))
    application_type: str | None = None
    type: str
    intent: str
    name: str
    overdue_after_seconds: int | None = Field(
        default=None, validation_alias=AliasChoices("overdue_after_seconds", "freshness_seconds")
    )
    params: Annotated[dict[str, JsonValue], BeforeValidator(_params_or_empty)] = Field(
        default_factory=dict
    )
    snapshot_id: str | None = None
    snapshot_at: Annotated[datetime | None, BeforeValidator(_lenient_time)] = None
    storage: str = "s3"
    bucket: str
    prefix: str = ""
    region: str
    target_version: str | None = None
    target_version_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_machine(cls, data: object) -> object:
        if isinstance(data, dict):
            machine, server = data.get("machine_id"), data.get("server_id")
            if machine is not None and server is not None and str(machine) != str(server):
                raise ValueError(
                    f"machine_id {machine!r} and server_id {server!r} differ; canopy sends "
                    "the same machine under both names"
                )
            if machine is None and server is not None:
                # AliasChoices would stop at an explicit `"machine_id": null`.
                data = {**data, "machine_id": server}
        return data

    @field_validator("snapshot_id", "target_version", "target_version_id", "application_type")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def server_id(self) -> UUID:
        """The deprecated name of `machine_id`; the reference's labels and hash use it."""
        return self.machine_id

    @property
    def migrate_to(self) -> MigrateTo | None:
        """The upgrade target, only when canopy named both the version and its id."""
        if self.target_version and self.target_version_id:
            return MigrateTo(version=self.target_version, version_id=self.target_version_id)
        return None

    def describe(self) -> str:
        """How messages name the entry: its declaration name, intent and machine."""
        return f"{self.intent} replica {self.name!r} (machine {self.machine_id})"


@dataclass(frozen=True)
class RejectedEntry:
    """A worklist entry that could not be decoded, with whatever identity it showed."""

    index: int
    problem: str
    replica_id: str | None = None
    machine_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Worklist:
    entries: tuple[WorklistEntry, ...]
    rejected: tuple[RejectedEntry, ...] = ()


def describe_validation_error(error: ValidationError) -> str:
    """Field paths and messages only: the offending values are left out, as they may be
    secrets (a malformed credentials answer) or too long to log."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _text_or_none(value: object) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def parse_worklist(data: object) -> Worklist:
    """Decode a worklist answer entry by entry.

    Raises ValueError when the body is not a JSON array (nothing can be trusted then);
    an entry that fails to decode is kept in `rejected` with whatever identity it had,
    so the caller can avoid tearing down the replica it describes.
    """
    if not isinstance(data, list):
        raise ValueError(f"the worklist must be a JSON array of entries, got {type(data).__name__}")
    entries: list[WorklistEntry] = []
    rejected: list[RejectedEntry] = []
    for index, item in enumerate(data):
        try:
            entries.append(WorklistEntry.model_validate(item))
        except ValidationError as error:
            fields = item if isinstance(item, dict) else {}
            rejected.append(
                RejectedEntry(
                    index=index,
                    problem=describe_validation_error(error),
                    replica_id=_text_or_none(fields.get("replica_id")),
                    machine_id=_text_or_none(fields.get("machine_id") or fields.get("server_id")),
                    name=_text_or_none(fields.get("name")),
                )
            )
    return Worklist(tuple(entries), tuple(rejected))


# -- POST /restore-credentials (§3.3) --------------------------------------------------------


class RestoreCredentialsArgs(CanopyRequest):
    group: UUID
    type: str = Field(min_length=1)
    # Optional only for old clients; pgro sends it for every restore run (§4).
    run_id: UUID | None = None


class AwsCredentials(CanopyResponse):
    """The AWS `credential_process` object, PascalCase on the wire; `Version` is 1."""

    version: int = Field(default=1, alias="Version")
    access_key_id: str = Field(alias="AccessKeyId", min_length=1)
    secret_access_key: SecretStr = Field(alias="SecretAccessKey")
    # STS always issues one; optional so static test credentials (MinIO) decode too.
    session_token: SecretStr | None = Field(default=None, alias="SessionToken")
    expiration: CanopyTime = Field(alias="Expiration")

    def expires_within(self, now: datetime, margin: timedelta) -> bool:
        """True when these must be refreshed before use (`Expiration − margin ≤ now`)."""
        return self.expiration - margin <= now

    def credential_process_json(self) -> dict[str, Any]:
        """The `credential_process` object with the secrets revealed, for the broker to
        hand to a restore's sidecar. Never log it."""
        body: dict[str, Any] = {
            "Version": self.version,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key.get_secret_value(),
        }
        if self.session_token is not None:
            body["SessionToken"] = self.session_token.get_secret_value()
        body["Expiration"] = format_canopy_time(self.expiration)
        return body


class RestoreCredentials(CanopyResponse):
    """Read-only S3 credentials for one group's bucket, and the repository password.

    Secrets are `SecretStr`: they print as `**********` in reprs, logs and exceptions.
    """

    credentials: AwsCredentials
    repo_password: SecretStr

    def broker_json(self) -> dict[str, Any]:
        """The broker's answer to a sidecar (§5.2), secrets revealed. Never log it."""
        return {
            "credentials": self.credentials.credential_process_json(),
            "repo_password": self.repo_password.get_secret_value(),
        }


# -- POST /restore-verification (§3.4) -------------------------------------------------------

Outcome = Literal["success", "failure"]
# "not_checked" and "incomplete": the data checks' (issue 16) verdicts that are not a
# failure (a hash index amcheck cannot check; a budget that ran out).
CheckStatus = Literal["pass", "fail", "not_checked", "incomplete"]

MIGRATION_ERROR_MAX: Final = 2000


class CheckFinding(CanopyRequest):
    """Where a data check found damage: database, relation, block, and the tool's words."""

    message: str
    database: str | None = None
    relation: str | None = None
    table: str | None = None
    file: str | None = None
    block: int | None = Field(default=None, ge=0)


class CheckResult(CanopyRequest):
    """One check pgro ran on the restored server (`connect`, `primary`, ..., and the data
    checks `checksums`, `btree`, `heap`, `full_read`, with their first findings)."""

    name: str = Field(min_length=1)
    status: CheckStatus
    detail: str = ""
    count: int | None = Field(default=None, ge=0)
    findings: tuple[CheckFinding, ...] | None = None


class HealthDetails(CanopyRequest):
    """Free-form details canopy stores and shows verbatim; snake_case keys.

    The reference's keys are `restore_duration_sec` (now − the restore's creation),
    `sizes` (database → bytes), `fixes` (the repairs' flags) and `url` (exposed analytics
    replicas). `checks`, the checks pgro ran and how each went, is pgro's addition. The
    change that introduced verify replicas upstream (PR #87) had to leave all of
    `health_details` out, checks included, because its canopy crate (0.4.3) had no such
    field yet; the newest canopy accepts any JSON here.

    Unmeasured parts are left out (None, or empty); `is_empty` tells the report to leave
    the whole field out.
    """

    restore_duration_sec: int | None = Field(default=None, ge=0)
    sizes: dict[str, Counter] | None = None
    fixes: dict[str, bool] | None = None
    url: str | None = None
    checks: tuple[CheckResult, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        data = super().to_wire()
        return {key: value for key, value in data.items() if value not in ({}, [])}

    def is_empty(self) -> bool:
        return not self.to_wire()


class MigrationTimingArgs(CanopyRequest):
    name: str
    elapsed_seconds: Counter


class MigrationArgs(CanopyRequest):
    """What an `upgrade` (migrate) restore did; canopy reads `failed_migration` as the
    version-readiness verdict, separately from restore health."""

    target_version: str | None = None
    target_version_id: str | None = None
    application_type: str | None = None
    total_elapsed_seconds: Counter
    failed_migration: str | None = None
    error: str | None = None
    data_bytes_before: Counter
    data_bytes_after: Counter
    timings: tuple[MigrationTimingArgs, ...] = ()

    @model_validator(mode="after")
    def _names_a_target(self) -> MigrationArgs:
        if not self.target_version and not self.target_version_id:
            raise ValueError(
                "a migration report must name target_version and/or target_version_id "
                "(canopy answers 400 otherwise)"
            )
        return self

    @field_validator("error")
    @classmethod
    def _truncate(cls, value: str | None) -> str | None:
        # Canopy keeps the first 2000 characters; sending more only costs bytes.
        return value[:MIGRATION_ERROR_MAX] if value is not None else None

    def to_wire(self) -> dict[str, Any]:
        data = super().to_wire()
        data["timings"] = [t.to_wire() for t in self.timings]  # required, even when empty
        return data

    @classmethod
    def from_result(
        cls, result: MigrationResult, target: MigrateTo, application_type: str | None
    ) -> MigrationArgs:
        return cls(
            target_version=target.version,
            target_version_id=target.version_id,
            application_type=application_type,
            total_elapsed_seconds=result.total_elapsed_seconds,
            failed_migration=result.failed_migration,
            error=result.error,
            data_bytes_before=result.data_bytes_before,
            data_bytes_after=result.data_bytes_after,
            timings=tuple(
                MigrationTimingArgs(name=t.name, elapsed_seconds=t.elapsed_seconds)
                for t in result.timings
            ),
        )


class RedactionArgs(CanopyRequest):
    outcome: Literal["complete", "partial", "failed"]
    manifest_version: str | None = None
    columns_masked: Counter | None = None
    columns_skipped: Counter | None = None
    error: str | None = None


class VerificationArgs(CanopyRequest):
    """The restore-health verdict (signal 3), in the newest server's shape.

    `replica_id` is always sent (the newest server requires it). The machine goes in
    exactly one of `machine_id` (newest name) or `server_id` (deprecated, and what the
    reference sends; every server generation accepts it); naming both, or neither, is a
    400 at canopy and a ValueError here. Byte counters the sidecar never reported are
    left out, not sent as 0 (the reference sends 0; canopy asks to omit them), and an
    empty `health_details` is left out.
    """

    replica_id: UUID
    group: UUID
    machine_id: UUID | None = None
    server_id: UUID | None = None
    type: str = Field(min_length=1)
    intent: str = Field(min_length=1)
    snapshot_id: str | None = None
    outcome: Outcome
    error: str | None = None
    replica_healthy: bool
    postgres_version: str | None = None
    observed_at: CanopyTime
    s3_sent_raw_bytes: Counter | None = None
    s3_sent_payload_bytes: Counter | None = None
    s3_received_raw_bytes: Counter | None = None
    s3_received_payload_bytes: Counter | None = None
    health_details: HealthDetails | None = None
    run_id: UUID | None = None
    migration: MigrationArgs | None = None
    redaction: RedactionArgs | None = None

    @model_validator(mode="after")
    def _exactly_one_machine(self) -> VerificationArgs:
        if (self.machine_id is None) == (self.server_id is None):
            raise ValueError(
                "a verification report names its machine in exactly one of machine_id or "
                "server_id (canopy answers 400 to both or neither)"
            )
        return self

    @model_validator(mode="after")
    def _healthy_means_success(self) -> VerificationArgs:
        # Canopy settles a snapshot on success + healthy; a healthy failure is a bug here.
        if self.replica_healthy and self.outcome != "success":
            raise ValueError("replica_healthy is true but outcome is 'failure'")
        return self

    def to_wire(self) -> dict[str, Any]:
        data = super().to_wire()
        if self.health_details is not None:
            details = self.health_details.to_wire()
            if details:
                data["health_details"] = details
            else:
                data.pop("health_details", None)
        if self.migration is not None:
            data["migration"] = self.migration.to_wire()
        return data


# -- POST /backup-progress (§3.5) ------------------------------------------------------------


class ProgressArgs(CanopyRequest):
    """An in-flight restore sample relayed to canopy.

    Counters are cumulative since the run started (a lost or repeated sample only costs
    resolution). Every counter not measured is left out, never zeroed; for a restore only
    the four `s3_*` byte counts are measured.
    """

    run_id: UUID
    type: str = Field(min_length=1)
    purpose: str = "restore"
    s3_sent_raw_bytes: Counter | None = None
    s3_sent_payload_bytes: Counter | None = None
    s3_received_raw_bytes: Counter | None = None
    s3_received_payload_bytes: Counter | None = None
    bytes_hashed: Counter | None = None
    bytes_uploaded: Counter | None = None
    bytes_cached: Counter | None = None
    bytes_estimated: Counter | None = None
    bytes_read: Counter | None = None
    files_done: Counter | None = None
    files_estimated: Counter | None = None
    errors: Counter | None = None
    ignored_errors: Counter | None = None
    current_path: str | None = None
    snapshot_taken_at: CanopyTime | None = None
    extra: dict[str, JsonValue] = Field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        data = super().to_wire()
        data["extra"] = self.extra  # the reference always sends it, `{}` when empty
        return data
