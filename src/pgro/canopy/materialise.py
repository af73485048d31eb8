"""Worklist entries → replicas, and one syncer tick's plan (reference/canopy-protocol.md §6).

`materialise` turns one entry into the `PostgresPhysicalReplica` pgro keeps for it (the
intent → spec table of §6.3); `plan_sync` compares a fetched worklist with the canopy
Namespaces that exist and says what to apply and what to delete. The syncer in a runtime
applies the plan: it re-asserts every spec each tick (so hand edits are reverted), writes
`status.canopyDesiredSnapshotId` when canopy offers a different snapshot, and deletes the
Namespaces canopy no longer lists.

Safety rules, all from the reference, plus one of pgro's:

* a failed worklist fetch (`None`) plans nothing at all: no apply, no delete;
* an entry that cannot be materialised (an intent pgro does not handle, a bad parameter)
  is reported and skipped, and its Namespace is kept, because canopy still wants it;
* the desired snapshot is only ever set, never cleared (a `null` snapshot means
  "nothing restorable yet", not "forget the last one");
* (pgro) when an entry of the worklist could not even be decoded and its Namespace
  cannot be told, no Namespace is deleted that tick.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final
from uuid import UUID

from pgro.api.meta import ObjectMeta
from pgro.api.migration import MigrateTo
from pgro.api.names import canopy_creds_secret_name
from pgro.api.quantity import format_quantity, parse_quantity_decimal
from pgro.api.replica import (
    CanopySource,
    PostgresPhysicalReplica,
    PostgresPhysicalReplicaSpec,
    Redaction,
)
from pgro.api.users import ExtraUser
from pgro.canopy import wire
from pgro.canopy.naming import REPLICA_NAME, canopy_labels, namespace_name, slug
from pgro.canopy.wire import ParamType, RejectedEntry, Worklist, WorklistEntry

SUPPORTED_INTENTS: Final = frozenset(
    {wire.INTENT_VERIFY, wire.INTENT_UPGRADE, wire.INTENT_ANALYTICS}
)

# Belt and braces: the real trigger is the desired snapshot in the status, but the hourly
# schedule keeps the snapshot list fresh if a status write is ever lost.
FALLBACK_SCHEDULE: Final = "H * * * *"
FALLBACK_SCHEDULE_JITTER: Final = timedelta(minutes=10)
ANALYTICS_USERNAME: Final = "analytics"
STORAGE_SIZE_MAXIMUM: Final = "2Ti"

# verify / upgrade: short-lived, small.
CHECK_RESOURCES_FLOOR: Final[dict[str, dict[str, str]]] = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}
CHECK_RESOURCES_MAXIMUM: Final = "8Gi"
CHECK_STORAGE_SIZE_OVERRIDE: Final = "20Gi"
CHECK_SHM_SIZE_FLOOR: Final = "512Mi"
CHECK_SWITCHOVER_GRACE: Final = timedelta(minutes=5)

# analytics: long-lived query replicas, sized for an idle one (the reference's intents spec,
# "Analytics resource sizing"): half a core requested and no CPU limit, so queries burst
# on the node's spare CPU; memory from the snapshot, request = limit.
ANALYTICS_RESOURCES_FLOOR: Final[dict[str, dict[str, str]]] = {
    "requests": {"cpu": "500m", "memory": "2Gi"},
    "limits": {"memory": "8Gi"},
}
ANALYTICS_RESOURCES_MAXIMUM: Final = "64Gi"
ANALYTICS_STORAGE_SIZE_OVERRIDE: Final = "50Gi"

EXPOSE_ANNOTATION: Final = "tailscale.com/expose"
HOSTNAME_ANNOTATION: Final = "tailscale.com/hostname"
EXPOSED_HOSTNAME_PREFIX: Final = "infra-replica-"
_DNS_LABEL: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
_DNS_LABEL_MAX: Final = 63

# What the canopy-creds Secret gives kopia instead of real keys: the sidecar re-signs.
PROXY_DUMMY_ACCESS_KEY: Final = "PROXY_DUMMY_ACCESS_KEY"
PROXY_DUMMY_SECRET_KEY: Final = "PROXY_DUMMY_SECRET_KEY"  # noqa: S105 - a placeholder, not a key


class MaterialiseError(ValueError):
    """An entry pgro cannot turn into a replica; the message names the entry and the fix."""


class UnsupportedIntent(MaterialiseError):
    pass


class InvalidEntry(MaterialiseError):
    pass


@dataclass(frozen=True)
class DesiredReplica:
    """What pgro keeps for one worklist entry: its Namespace, labels, spec and the
    snapshot canopy wants restored (None: nothing restorable yet)."""

    namespace: str
    labels: Mapping[str, str]
    spec: PostgresPhysicalReplicaSpec
    desired_snapshot_id: str | None
    entry: WorklistEntry
    name: str = REPLICA_NAME

    @property
    def creds_secret_name(self) -> str:
        return canopy_creds_secret_name(self.name)

    def replica(self) -> PostgresPhysicalReplica:
        return PostgresPhysicalReplica(
            metadata=ObjectMeta(name=self.name, namespace=self.namespace, labels=dict(self.labels)),
            spec=self.spec,
        )

    def manifest(self) -> dict[str, Any]:
        """The replica to server-side-apply: metadata and spec, no status (the desired
        snapshot goes through the status subresource)."""
        body = self.replica().to_wire()
        body.pop("status", None)
        return body


def canopy_creds_secret_data(entry: WorklistEntry, repo_password: str) -> dict[str, str]:
    """The `<replica>-canopy-creds` Secret's keys (§5.4).

    Kopia gets the real repository password but dummy S3 keys: its requests go to the
    canopy-proxy sidecar, which re-signs them with credentials only it holds.
    """
    return {
        "bucket": entry.bucket,
        "region": entry.region,
        "prefix": entry.prefix,
        "repositoryPassword": repo_password,
        "accessKeyId": PROXY_DUMMY_ACCESS_KEY,
        "secretAccessKey": PROXY_DUMMY_SECRET_KEY,
    }


# -- parameters --------------------------------------------------------------------------------


class _Params:
    """Typed access to an entry's `params`; a wrong type is an `InvalidEntry`."""

    def __init__(self, entry: WorklistEntry) -> None:
        self.entry = entry
        self.values = entry.params

    def _get(self, name: str, param_type: ParamType) -> Any:
        value = self.values.get(name)
        if value is None:
            return None
        try:
            wire.check_param_value(name, param_type, value)
        except ValueError as error:
            raise InvalidEntry(
                f"{self.entry.describe()}: {error}; fix the declaration's parameters in canopy"
            ) from None
        return value

    def duration(self, name: str) -> timedelta | None:
        seconds = self._get(name, "duration")
        return None if seconds is None else timedelta(seconds=seconds)

    def bytes(self, name: str) -> int | None:
        value: int | None = self._get(name, "bytes")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, "boolean")
        return default if value is None else bool(value)

    def text(self, name: str) -> str | None:
        """The trimmed text, None when unset or blank."""
        value = self._get(name, "text")
        if value is None:
            return None
        stripped = str(value).strip()
        return stripped or None

    def text_list(self, name: str) -> list[str] | None:
        """A comma list, items trimmed, empties dropped; None when nothing is left."""
        text = self.text(name)
        if text is None:
            return None
        items = [item.strip() for item in text.split(",")]
        return [item for item in items if item] or None

    def cpu(self, name: str) -> str | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            if parse_quantity_decimal(text) <= 0:
                raise ValueError("must be positive")
        except ValueError:
            raise InvalidEntry(
                f"{self.entry.describe()}: parameter {name!r} must be a positive Kubernetes "
                f"CPU quantity like '500m' or '2', got {text!r}; fix the declaration's "
                "parameters in canopy"
            ) from None
        return text


# -- intent → spec (§6.3) ----------------------------------------------------------------------


def _common(entry: WorklistEntry) -> dict[str, Any]:
    return {
        "kopia_secret_ref": None,
        "canopy_source": CanopySource(group=str(entry.group_id), type=entry.type),
        "snapshot_filter": None,
        "schedule": FALLBACK_SCHEDULE,
        "schedule_jitter": FALLBACK_SCHEDULE_JITTER,
        "analytics_username": ANALYTICS_USERNAME,
        "read_only": True,
        "storage_size_maximum": STORAGE_SIZE_MAXIMUM,
        "migrate_to": entry.migrate_to,
    }


def _check_spec(entry: WorklistEntry) -> dict[str, Any]:
    return {
        **_common(entry),
        "ephemeral": True,
        "resources_floor": copy.deepcopy(CHECK_RESOURCES_FLOOR),
        "resources_maximum": CHECK_RESOURCES_MAXIMUM,
        "storage_size_override": CHECK_STORAGE_SIZE_OVERRIDE,
        "switchover_grace_period": CHECK_SWITCHOVER_GRACE,
        "shm_size_floor": CHECK_SHM_SIZE_FLOOR,
    }


def _upgrade_spec(entry: WorklistEntry) -> dict[str, Any]:
    if entry.migrate_to is None:
        # The reference would restore without migrating and report a plain success,
        # which says nothing about the upgrade; canopy only sends upgrade entries that
        # carry a candidate version, so this is a malformed entry.
        raise InvalidEntry(
            f"{entry.describe()}: an upgrade entry needs both target_version and "
            "target_version_id, and canopy sent "
            f"target_version={entry.target_version!r}, "
            f"target_version_id={entry.target_version_id!r}"
        )
    return _check_spec(entry)


def _exposed_hostname(name: str) -> str:
    # The reference uses the raw declaration name; pgro does too when it is a valid DNS
    # label, and falls back to its slug otherwise so the Service still gets a hostname.
    candidate = f"{EXPOSED_HOSTNAME_PREFIX}{name}"
    if len(candidate) <= _DNS_LABEL_MAX and _DNS_LABEL.fullmatch(candidate):
        return candidate
    return f"{EXPOSED_HOSTNAME_PREFIX}{slug(name)}"[:_DNS_LABEL_MAX].rstrip("-")


def _quantity(value: int | str) -> str:
    return format_quantity(value) if isinstance(value, int) else value


def _settle(
    entry: WorklistEntry,
    resource: str,
    requests: dict[str, str],
    limits: dict[str, str],
    request: str | None,
    limit: str | None,
) -> None:
    """Put the set `request`/`limit` of `resource` in; a value kept from the floor that
    would put the request above the limit is moved to the set one, so the pod stays
    valid; two set values that contradict each other are the declaration's error."""
    if request is not None:
        requests[resource] = request
    if limit is not None:
        limits[resource] = limit
    if resource not in requests or resource not in limits:
        return
    if parse_quantity_decimal(requests[resource]) <= parse_quantity_decimal(limits[resource]):
        return
    if request is not None and limit is not None:
        raise InvalidEntry(
            f"{entry.describe()}: the {resource} request {requests[resource]} is above "
            f"the {resource} limit {limits[resource]}; fix the declaration's parameters "
            "in canopy"
        )
    if request is not None:
        limits[resource] = requests[resource]
    else:
        requests[resource] = limits[resource]


def _analytics_sizing(
    entry: WorklistEntry, params: _Params
) -> tuple[dict[str, dict[str, str]], dict[str, Any] | None]:
    """(`resourcesFloor`, `resources`) of an analytics replica, as the reference's intents
    spec sizes it: each parameter touches only the resource it names.

    - `cpu_request` / `cpu_limit` change the floor's CPU. They do not set `resources`, so
      memory stays derived from the snapshot (request = limit, capped by
      `resourcesMaximum`).
    - `memory_request` / `memory_limit` pin memory in `resources`, replacing the derived
      value; one alone pins both the request and the limit to it. CPU there is the
      floor's, as the CPU parameters left it.
    """
    memory_request = params.bytes(wire.PARAM_MEMORY_REQUEST)
    memory_limit = params.bytes(wire.PARAM_MEMORY_LIMIT)
    cpu_request = params.cpu(wire.PARAM_CPU_REQUEST)
    cpu_limit = params.cpu(wire.PARAM_CPU_LIMIT)
    floor = copy.deepcopy(ANALYTICS_RESOURCES_FLOOR)
    _settle(entry, "cpu", floor["requests"], floor["limits"], cpu_request, cpu_limit)
    if memory_request is None and memory_limit is None:
        return floor, None
    # One alone pins both.
    request = _quantity(memory_request) if memory_request is not None else None
    limit = _quantity(memory_limit) if memory_limit is not None else None
    request, limit = request or limit, limit or request
    resources = copy.deepcopy(floor)
    requests, limits = resources["requests"], resources["limits"]
    requests.pop("memory", None)
    limits.pop("memory", None)
    _settle(entry, "memory", requests, limits, request, limit)
    return floor, resources


def _analytics_spec(entry: WorklistEntry) -> dict[str, Any]:
    params = _Params(entry)
    storage_maximum = params.bytes(wire.PARAM_STORAGE_SIZE_MAXIMUM)
    resources_maximum = params.bytes(wire.PARAM_RESOURCES_MAXIMUM)
    minimum_ttl = params.duration(wire.PARAM_MINIMUM_TTL)
    grace = params.duration(wire.PARAM_SWITCHOVER_GRACE)
    extra_users = params.text_list(wire.PARAM_EXTRA_USERS)
    resources_floor, resources = _analytics_sizing(entry, params)
    spec: dict[str, Any] = {
        **_common(entry),
        "ephemeral": False,
        "resources_floor": resources_floor,
        "resources_maximum": (
            format_quantity(resources_maximum)
            if resources_maximum is not None
            else ANALYTICS_RESOURCES_MAXIMUM
        ),
        "storage_size_override": ANALYTICS_STORAGE_SIZE_OVERRIDE,
        "storage_size_maximum": (
            format_quantity(storage_maximum)
            if storage_maximum is not None
            else STORAGE_SIZE_MAXIMUM
        ),
        "minimum_ttl": minimum_ttl if minimum_ttl is not None else wire.DEFAULT_MINIMUM_TTL,
        "switchover_grace_period": (
            grace if grace is not None else wire.DEFAULT_ANALYTICS_SWITCHOVER_GRACE
        ),
        "deployment_ready_timeout": params.duration(wire.PARAM_DEPLOYMENT_READY_TIMEOUT),
        "persistent_schemas": params.text_list(wire.PARAM_PERSISTENT_SCHEMAS),
        "extra_users": [ExtraUser(name=n) for n in extra_users or ()],
        "resources": resources,
        # §2.14: each restore migrates to this version and then serves (long-lived). No
        # version id: canopy files results by one, so none is reported (canopy.reports).
        # Unset, the replica is plain, whatever target the entry carries.
        "migrate_to": (
            MigrateTo(version=version, version_id="")
            if (version := params.text(wire.PARAM_MIGRATE_TO)) is not None
            else None
        ),
    }
    if params.boolean(wire.PARAM_EXPOSE, default=False):
        spec["service_annotations"] = {
            EXPOSE_ANNOTATION: "true",
            HOSTNAME_ANNOTATION: _exposed_hostname(entry.name),
        }
    manifest_url = params.text(wire.PARAM_REDACTION_MANIFEST_URL)
    if manifest_url is not None:
        spec["redaction"] = Redaction(
            manifest_url=manifest_url,
            version_query=params.text(wire.PARAM_REDACTION_VERSION_QUERY),
            version_fallback_to_base=params.boolean(
                wire.PARAM_REDACTION_VERSION_FALLBACK_TO_BASE, default=False
            ),
        )
    return spec


_SPEC_BUILDERS: Final = {
    wire.INTENT_VERIFY: _check_spec,
    wire.INTENT_UPGRADE: _upgrade_spec,
    wire.INTENT_ANALYTICS: _analytics_spec,
}


def materialise(entry: WorklistEntry) -> DesiredReplica:
    """The replica pgro keeps for `entry`.

    Raises `UnsupportedIntent` for an intent pgro does not advertise and `InvalidEntry`
    for an entry it cannot use (bad parameter, upgrade without a target, storage other
    than S3, a backup type that cannot be a label value).
    """
    build = _SPEC_BUILDERS.get(entry.intent)
    if build is None:
        raise UnsupportedIntent(
            f"{entry.describe()}: pgro does not handle intent {entry.intent!r} (it handles "
            f"{', '.join(sorted(SUPPORTED_INTENTS))}); the replica is left as it is"
        )
    if entry.storage != "s3":
        raise InvalidEntry(
            f"{entry.describe()}: storage {entry.storage!r} is not supported (only 's3')"
        )
    try:
        labels = canopy_labels(
            replica_id=entry.replica_id,
            group_id=entry.group_id,
            server_id=entry.server_id,
            type=entry.type,
            intent=entry.intent,
            application_type=entry.application_type,
        )
    except ValueError as error:
        raise InvalidEntry(f"{entry.describe()}: {error}") from None
    try:
        spec = PostgresPhysicalReplicaSpec(**build(entry))
    except ValueError as error:
        # Canopy's parameters are remote input (e.g. extra user names): one bad entry is a
        # problem on that entry, never a failed tick for every other replica.
        raise InvalidEntry(f"{entry.describe()}: {error}") from None
    return DesiredReplica(
        namespace=namespace_name(entry.name, entry.replica_id, entry.server_id),
        labels=labels,
        spec=spec,
        desired_snapshot_id=entry.snapshot_id,
        entry=entry,
    )


# -- one syncer tick (§6.1, §6.6) -------------------------------------------------------------


@dataclass(frozen=True)
class ExistingReplica:
    """A canopy-managed Namespace as observed, and its replica's
    `status.canopyDesiredSnapshotId` (None when unset or the replica is missing)."""

    namespace: str
    desired_snapshot_id: str | None = None


@dataclass(frozen=True)
class ReplicaChange:
    """One replica to (re)apply this tick; applying is idempotent, so every listed entry
    is applied every tick, which also reverts hand edits."""

    desired: DesiredReplica
    # No managed Namespace of that name was observed: create it first.
    create_namespace: bool
    # Write `status.canopyDesiredSnapshotId` to this; None when it already holds it, or
    # canopy offers no snapshot (the desired id is never cleared).
    desired_snapshot_patch: str | None


@dataclass(frozen=True)
class SyncPlan:
    fetched: bool
    apply: tuple[ReplicaChange, ...] = ()
    delete: tuple[str, ...] = ()
    # Namespaces kept although nothing is applied to them (their entry is listed but
    # could not be materialised).
    kept: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())
    # Why deletions were held back this tick, when they were.
    deletions_withheld: str | None = None


def _rejected_namespace(rejected: RejectedEntry) -> str | None:
    if rejected.replica_id is None or rejected.machine_id is None or rejected.name is None:
        return None
    try:
        return namespace_name(rejected.name, UUID(rejected.replica_id), UUID(rejected.machine_id))
    except ValueError:
        return None


def plan_sync(
    worklist: Worklist | None,
    existing: Iterable[ExistingReplica] | Mapping[str, ExistingReplica],
) -> SyncPlan:
    """What one syncer tick does, given the fetched worklist (None: the fetch failed) and
    the canopy-managed Namespaces that exist."""
    if worklist is None:
        return SyncPlan(fetched=False)
    observed = (
        dict(existing)
        if isinstance(existing, Mapping)
        else {item.namespace: item for item in existing}
    )
    wanted: set[str] = set()
    changes: list[ReplicaChange] = []
    kept: list[str] = []
    problems: list[str] = []
    withheld: str | None = None

    for entry in worklist.entries:
        namespace = namespace_name(entry.name, entry.replica_id, entry.server_id)
        if namespace in wanted:
            problems.append(
                f"{entry.describe()}: same declaration and machine as an earlier entry "
                f"(Namespace {namespace}); the first one is used"
            )
            continue
        wanted.add(namespace)
        try:
            desired = materialise(entry)
        except MaterialiseError as error:
            problems.append(str(error))
            if namespace in observed:
                kept.append(namespace)
            continue
        current = observed.get(namespace)
        snapshot = desired.desired_snapshot_id
        patch = (
            snapshot
            if snapshot is not None and (current is None or current.desired_snapshot_id != snapshot)
            else None
        )
        changes.append(
            ReplicaChange(
                desired=desired, create_namespace=current is None, desired_snapshot_patch=patch
            )
        )

    for rejected in worklist.rejected:
        rejected_namespace = _rejected_namespace(rejected)
        label = f"worklist entry #{rejected.index}" + (
            f" ({rejected.name!r})" if rejected.name else ""
        )
        problems.append(f"{label} could not be read: {rejected.problem}")
        if rejected_namespace is None:
            withheld = (
                f"{label} could not be read and its Namespace cannot be told, so no "
                "Namespace is deleted this tick"
            )
        else:
            wanted.add(rejected_namespace)
            if rejected_namespace in observed:
                kept.append(rejected_namespace)

    delete = () if withheld else tuple(sorted(set(observed) - wanted))
    return SyncPlan(
        fetched=True,
        apply=tuple(changes),
        delete=delete,
        kept=tuple(sorted(set(kept))),
        problems=tuple(problems),
        deletions_withheld=withheld,
    )


# -- removals (pgro's grace, and reports that still wait) -----------------------------------


@dataclass(frozen=True)
class Removals:
    """Which Namespaces a tick removes now, which it holds for their waiting reports, and
    since when each Namespace canopy does not list has been missing (carry it to the next
    tick)."""

    remove: tuple[str, ...]
    held: tuple[str, ...]
    absent_since: dict[str, datetime]


def plan_removals(
    plan: SyncPlan,
    absent_since: Mapping[str, datetime],
    now: datetime,
    grace: timedelta,
    holds: Callable[[str], bool],
) -> Removals:
    """The plan's deletions, after the removal grace: a Namespace goes once canopy has not
    listed it for `grace`, and not while `holds(namespace)` (its replica still has reports
    to deliver). A Namespace listed again starts over."""
    since = {ns: t for ns, t in absent_since.items() if ns in plan.delete}
    remove: list[str] = []
    held: list[str] = []
    for namespace in plan.delete:
        first = since.setdefault(namespace, now)
        if now - first < grace:
            continue
        if holds(namespace):
            held.append(namespace)
            continue
        remove.append(namespace)
    return Removals(tuple(remove), tuple(held), since)
