"""What the operator sees: typed views over the informer caches, and the observations
the core decides on. Only the kopia Secret is read from the API (cached per replica
version) and passes wait for the cache to show the operator's own writes: docs/kubernetes.md
("Steady state", "Own writes first").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from pgro.api.names import (
    LABEL_RESTORE,
    data_check_job_name,
    restore_job_name,
    version_detect_job_name,
)
from pgro.api.phases import RestorePhase
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import (
    KopiaCredentials,
    SecretInvalid,
    decode_secret_data,
    parse_kopia_secret,
)
from pgro.api.timestamp import parse_rfc3339
from pgro.core import reasons
from pgro.core.observations import (
    DataCheckRun,
    ReplicaObservation,
    RestoreObservation,
    RestoreWork,
    SecretCheck,
    SecretState,
    Server,
    ServerState,
    VersionDetection,
    WorkState,
)
from pgro.core.plan import EmitEvent, EventType
from pgro.core.restore_set import is_in_progress
from pgro.kube.client import KubeApi
from pgro.kube.informer import Informer
from pgro.pipeline.data_check_job import parse_message as parse_check_message
from pgro.pipeline.job import RestoreOutcome
from pgro.reconciler.effects import GONE, Gone, ReplicaView
from pgro.reconciler.listing import ReplicaListings
from pgro.reconciler.shell import WorkKind
from pgro.runtimes.kubernetes.canopy import OperatorCanopy
from pgro.runtimes.kubernetes.scripts import SETUP_CONTAINER

log = logging.getLogger("pgro.operator")

# The longest a pass waits for the cache to show the operator's own write.
AWAIT_S: Final = 10.0

# How a version-detect Job ends without a version (the reference's words).
DETECT_NO_VERSION: Final = "version detection Job succeeded but did not report a postgres version"
DETECT_FAILED: Final = "version detection Job failed after backoff exhausted"

NO_CANOPY: Final = SecretCheck.invalid(
    "the replica's credentials come from canopy, but the operator has no CANOPY_BASE_URL",
    reasons.CANOPY_NOT_CONFIGURED,
)

# Record an event about an object in wire form (it may not validate).
EmitRaw = Callable[[Mapping[str, Any], EmitEvent], None]
# Reconcile this object ("namespace/name") again after this many seconds.
Requeue = Callable[[str, float], None]


# The restores informer's index of spec.replica.name; the pods informer's of their Job.
BY_REPLICA: Final = "replica"
JOB_NAME: Final = "job-name"


def replica_of(restore: Mapping[str, Any]) -> str | None:
    """The replica a restore in wire form belongs to (spec.replica.name)."""
    return ((restore.get("spec") or {}).get("replica") or {}).get("name") or None


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


# -- typed views of cached objects ----------------------------------------------------------
@dataclass(frozen=True)
class Meta:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    generation: int | None
    resource_version: str
    created: str  # RFC 3339: sorts as time does

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Meta:
        meta = obj.get("metadata") or {}
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            labels=meta.get("labels") or {},
            generation=meta.get("generation"),
            resource_version=meta.get("resourceVersion", ""),
            created=meta.get("creationTimestamp") or "",
        )


def _true_conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


@dataclass(frozen=True)
class PodView:
    meta: Meta
    phase: str
    ready: bool
    ip: str | None
    termination_message: str
    # A postgres pod's `setup` init container's termination message (`SetupReport`).
    setup_message: str = ""

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> PodView:
        status = obj.get("status") or {}
        message = ""
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated and terminated.get("message"):
                message = str(terminated["message"])
                break
        setup = ""
        for container in status.get("initContainerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if container.get("name") == SETUP_CONTAINER and terminated:
                setup = str(terminated.get("message") or "")
        return cls(
            meta=Meta.of(obj),
            phase=status.get("phase") or "",
            ready="Ready" in _true_conditions(obj),
            ip=status.get("podIP") or None,
            termination_message=message,
            setup_message=setup,
        )

    @property
    def of_job(self) -> bool:
        """A restore Job's pod, not a PostgreSQL server's."""
        return JOB_NAME in self.meta.labels

    @property
    def running(self) -> bool:
        return self.phase == "Running"


@dataclass(frozen=True)
class Caches:
    """The operator's watches: replicas and restores in every namespace, the Jobs and
    Deployments that carry a restore label, and the Pods that carry a replica label (indexed
    by their restore label and their Job)."""

    replicas: Informer
    restores: Informer
    jobs: Informer
    deployments: Informer
    pods: Informer


@dataclass(frozen=True)
class _KopiaRead:
    replica_version: str
    check: SecretCheck
    creds: KopiaCredentials | None


def secret_value(api: KubeApi, namespace: str, name: str, key: str) -> str:
    """One value of a Secret the operator created (credentials), by name."""
    secret = api.get("Secret", namespace, name)
    if secret is None:
        raise LookupError(
            f"Secret {namespace}/{name} not found; the operator creates it on the replica's "
            "next change (run `kubectl annotate` on the replica to make one)"
        )
    data = decode_secret_data(secret)
    if key not in data:
        raise LookupError(
            f"Secret {namespace}/{name} has no key {key}; delete it and annotate the replica "
            "to have it recreated"
        )
    return data[key].decode()


@dataclass(eq=False)
class Observer:
    api: KubeApi
    caches: Caches
    _: KW_ONLY
    listing: ReplicaListings
    canopy: OperatorCanopy | None
    provisioned: Callable[[PostgresPhysicalRestore, str], bool]
    emit_raw: EmitRaw
    requeue: Callable[[WorkKind, str, float], None]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # replica key -> (uid, generation) of the invalid spec last reported: InvalidSpec
    # is logged and recorded once per generation, not on every pass.
    _invalid: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    # replica key -> its kopia (or canopy creds) Secret as last read.
    _kopia: dict[str, _KopiaRead] = field(default_factory=dict)
    # (kind, key) -> (resourceVersion written, its replica's key, until when to wait).
    _awaiting: dict[tuple[WorkKind, str], tuple[str, str, float]] = field(default_factory=dict)

    def forget_replica(self, key: str) -> None:
        with self._lock:
            self._invalid.pop(key, None)
            self._kopia.pop(key, None)
        self.listing.forget(key)

    # -- the operator's own writes --------------------------------------------------------
    def wrote(self, kind: WorkKind, key: str, replica_key: str, written: Mapping[str, Any]) -> None:
        """The operator wrote this version of the object: passes wait for the cache to
        show it."""
        version = Meta.of(written).resource_version
        if version:
            with self._lock:
                self._awaiting[(kind, key)] = (version, replica_key, time.monotonic() + AWAIT_S)

    def _lagging(self, kind: WorkKind, key: str, cached: Mapping[str, Any] | None) -> bool:
        with self._lock:
            held = self._awaiting.get((kind, key))
            if held is None:
                return False
            version, _, until = held
            # Not cached at all: a restore created here that the watch has not shown yet.
            have = Meta.of(cached).resource_version if cached is not None else None
            if time.monotonic() < until and (have is None or not _not_older(have, version)):
                return True
            del self._awaiting[(kind, key)]
            return False

    def deleted(self, kind: WorkKind, key: str) -> None:
        """The operator deleted the object: nothing of it is to be waited for."""
        with self._lock:
            self._awaiting.pop((kind, key), None)

    def _put_off(self, kind: WorkKind, key: str) -> None:
        log.debug(
            "%s %s: the cache does not show the last write yet; looking again soon", kind, key
        )
        self.requeue(kind, key, 1.0)

    # -- replicas -------------------------------------------------------------------------
    def replica(self, key: str) -> PostgresPhysicalReplica | Gone | None:
        """None: it exists but its spec is invalid (reported once per generation)."""
        raw = self.caches.replicas.get(*split_key(key))
        if raw is None:
            return GONE
        return self._parse_replica(key, raw)

    def _parse_replica(self, key: str, raw: Mapping[str, Any]) -> PostgresPhysicalReplica | None:
        try:
            replica = PostgresPhysicalReplica.model_validate(raw)
        except ValidationError as exc:
            meta = Meta.of(raw)
            problem = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
            )
            seen = (meta.uid, meta.generation)
            with self._lock:
                new = self._invalid.get(key) != seen
                self._invalid[key] = seen
            if new:
                log.error("replica %s is invalid: %s", key, problem)
                note = f"The replica is invalid: {problem}"
                self.emit_raw(raw, EmitEvent(EventType.WARNING, "InvalidSpec", note))
            return None
        with self._lock:
            self._invalid.pop(key, None)
        return replica

    def restore(self, namespace: str, name: str) -> PostgresPhysicalRestore | None:
        raw = self.caches.restores.get(namespace, name)
        return None if raw is None else _restore_model(raw)

    def restores_of(self, replica: PostgresPhysicalReplica) -> list[PostgresPhysicalRestore]:
        raws = self.caches.restores.select(replica.namespace, BY_REPLICA, replica.name)
        return [m for m in map(_restore_model, raws) if m is not None]

    def observe_replica(self, key: str) -> ReplicaView | Gone | None:
        replica = self.replica(key)
        if isinstance(replica, Gone):
            self.forget_replica(key)
            return GONE
        if replica is None:
            return None
        with self._lock:
            restores = [
                k for (kind, k), v in self._awaiting.items() if kind == "restore" and v[1] == key
            ]
        if self._lagging("replica", key, self.caches.replicas.get(*split_key(key))) or any(
            self._lagging("restore", k, self.caches.restores.get(*split_key(k))) for k in restores
        ):
            self._put_off("replica", key)
            return None
        secret, creds = self.secret_check(replica)
        listing = self.listing.get(key) if creds is not None else None
        obs = ReplicaObservation(
            replica=replica, restores=self.restores_of(replica), secret=secret, listing=listing
        )
        return ReplicaView(obs, secrets=tuple(creds.secret_values()) if creds else ())

    def secret_check(
        self, replica: PostgresPhysicalReplica
    ) -> tuple[SecretCheck | None, KopiaCredentials | None]:
        version = authored_version(replica)
        if replica.spec.canopy_source is not None:
            if self.canopy is None:
                return NO_CANOPY, None
            refused = self.canopy.book.refusal(replica.key)
            if refused is not None:
                return refused, None
            # The syncer rewrites the Secret without touching the replica.
            version += f"+{self.canopy.creds_written[replica.key]}"
            read = self.canopy.read_creds
        elif replica.spec.kopia_secret_ref is None:
            return None, None
        else:
            read = self._read_kopia_secret
        with self._lock:
            held = self._kopia.get(replica.key)
        if (
            held is not None
            and held.replica_version == version
            and held.check.state is SecretState.VALID
        ):
            return held.check, held.creds
        check, creds = read(replica)
        with self._lock:
            self._kopia[replica.key] = _KopiaRead(version, check, creds)
        return check, creds

    def kopia_credentials(self, key: str) -> KopiaCredentials | None:
        """The replica's credentials as its last pass found them (None: none usable)."""
        with self._lock:
            held = self._kopia.get(key)
        return held.creds if held is not None else None

    def _read_kopia_secret(
        self, replica: PostgresPhysicalReplica
    ) -> tuple[SecretCheck, KopiaCredentials | None]:
        ref = replica.spec.kopia_secret_ref
        assert ref is not None
        secret = self.api.get("Secret", replica.namespace, ref.name)
        if secret is None:
            return SecretCheck.not_found(
                f"no Secret {ref.name!r} in namespace {replica.namespace}; create it or fix "
                "spec.kopiaSecretRef.name"
            ), None
        try:
            creds = parse_kopia_secret(decode_secret_data(secret))
        except SecretInvalid as exc:
            return SecretCheck.invalid(str(exc)), None
        return SecretCheck.valid(), creds

    # -- restores -------------------------------------------------------------------------
    def observe_restore(self, key: str) -> RestoreObservation | Gone | None:
        namespace, name = split_key(key)
        raw = self.caches.restores.get(namespace, name)
        if raw is None:
            self.deleted("restore", key)
            return GONE
        if self._lagging("restore", key, raw):
            self._put_off("restore", key)
            return None
        restore = _restore_model(raw)
        if restore is None:
            return None
        replica_key = f"{namespace}/{restore.replica_name}"
        replica = self.replica(replica_key)
        work = self.work(restore)
        detection = None
        if work.state is WorkState.SUCCEEDED and work.postgres_version:
            detection = VersionDetection(WorkState.SUCCEEDED, work.postgres_version)
        elif restore.effective_phase is RestorePhase.READY and not restore.status.postgres_version:
            # The restore Job's message was lost (an evicted pod): the volume says.
            detection = self.version_detection(restore)
        return RestoreObservation(
            restore=restore,
            replica=replica if isinstance(replica, PostgresPhysicalReplica) else None,
            work=work,
            server=self.server(restore),
            version_detection=detection,
            data_check=self.data_check(restore)
            if restore.effective_phase is RestorePhase.READY and restore.status.data_checks is None
            else None,
        )

    def work(self, restore: PostgresPhysicalRestore) -> RestoreWork:
        """The restore Job, as its conditions and its pods' termination messages say."""
        job_name = restore_job_name(restore.name)
        raw = self.caches.jobs.get(restore.namespace, job_name)
        if raw is None:
            return RestoreWork.not_started()
        conditions = _true_conditions(raw)
        pods = self.job_pods(restore.namespace, job_name)
        if "Complete" in conditions:
            message = next(
                (p.termination_message for p in reversed(pods) if p.phase == "Succeeded"), ""
            )
            outcome = RestoreOutcome.from_message(message)
            done = (raw.get("status") or {}).get("completionTime")
            return RestoreWork(
                WorkState.SUCCEEDED,
                name=job_name,
                postgres_version=outcome.postgres_version,
                completed_at=parse_rfc3339(done) if done else None,
                fixes=outcome.fixes,
            )
        if (cond := conditions.get("Failed")) is not None:
            messages = [p.termination_message for p in reversed(pods) if p.termination_message]
            reason = next((RestoreOutcome.from_message(m).failure for m in messages), "")
            if not reason:
                reason = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
            return RestoreWork(WorkState.FAILED, name=job_name, reason=reason)
        return RestoreWork(WorkState.RUNNING, name=job_name)

    def version_detection(self, restore: PostgresPhysicalRestore) -> VersionDetection:
        """The `<restore>-version-detect` Job, as its conditions and its pods' termination
        messages say (`pgro detect-version` writes the major version)."""
        job_name = version_detect_job_name(restore.name)
        raw = self.caches.jobs.get(restore.namespace, job_name)
        if raw is None:
            return VersionDetection(WorkState.NOT_STARTED)
        conditions = _true_conditions(raw)
        pods = self.job_pods(restore.namespace, job_name)
        if "Complete" in conditions:
            done = [p for p in pods if p.phase == "Succeeded"]
            if not done:
                # The pods' cache lags the Job's: judged when the pod shows.
                return VersionDetection(WorkState.RUNNING)
            version = RestoreOutcome.from_message(done[-1].termination_message).postgres_version
            if version:
                return VersionDetection(WorkState.SUCCEEDED, version)
            return VersionDetection(WorkState.FAILED, reason=DETECT_NO_VERSION)
        if (cond := conditions.get("Failed")) is not None:
            messages = [p.termination_message for p in reversed(pods) if p.termination_message]
            why = next((RestoreOutcome.from_message(m).failure for m in messages), "")
            if not why:
                why = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
            return VersionDetection(WorkState.FAILED, reason=f"{DETECT_FAILED} ({why})")
        return VersionDetection(WorkState.RUNNING)

    def data_check(self, restore: PostgresPhysicalRestore) -> DataCheckRun | None:
        """The `<restore>-data-check` Job: None before it exists, its verdict (the
        termination message of its succeeded pod) once Complete."""
        job_name = data_check_job_name(restore.name)
        raw = self.caches.jobs.get(restore.namespace, job_name)
        if raw is None:
            return None
        conditions = _true_conditions(raw)
        if "Complete" not in conditions and "Failed" not in conditions:
            return DataCheckRun(WorkState.RUNNING)
        # Its pod carries no restore label (the restore's Service selects that label):
        # read from the API by its Job's name, once the Job has ended.
        pods = sorted(
            (
                PodView.of(p)
                for p in self.api.list(
                    "Pod", namespace=restore.namespace, labels={JOB_NAME: job_name}
                ).items
            ),
            key=lambda p: p.meta.created,
        )
        if "Complete" in conditions:
            done = [p for p in pods if p.phase == "Succeeded"]
            if not done:
                return DataCheckRun(WorkState.FAILED, reason="its pod is gone")
            checks, why = parse_check_message(done[-1].termination_message)
            if checks is None:
                return DataCheckRun(WorkState.FAILED, reason=why)
            return DataCheckRun(WorkState.SUCCEEDED, checks)
        if (cond := conditions.get("Failed")) is not None:
            messages = [p.termination_message for p in reversed(pods) if p.termination_message]
            why = next((parse_check_message(m)[1] for m in messages), "")
            if not why:
                why = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
            return DataCheckRun(WorkState.FAILED, reason=why)
        return DataCheckRun(WorkState.RUNNING)

    def job_pods(self, namespace: str, job_name: str) -> list[PodView]:
        """A Job's pods, oldest first."""
        return sorted(
            (PodView.of(p) for p in self.caches.pods.select(namespace, JOB_NAME, job_name)),
            key=lambda p: p.meta.created,
        )

    def pods_of(self, namespace: str, restore: str) -> list[PodView]:
        """Every pod labelled for the restore: its Job's and its PostgreSQL server's."""
        return [PodView.of(p) for p in self.caches.pods.select(namespace, LABEL_RESTORE, restore)]

    def server_pods(self, namespace: str, restore: str) -> list[PodView]:
        """The restore's PostgreSQL pods (not its Job's)."""
        return [pod for pod in self.pods_of(namespace, restore) if not pod.of_job]

    def ready_pod(self, restore: PostgresPhysicalRestore) -> PodView | None:
        return next(
            (
                p
                for p in self.server_pods(restore.namespace, restore.name)
                if p.running and p.ready and p.ip
            ),
            None,
        )

    def server(self, restore: PostgresPhysicalRestore) -> Server:
        raw = self.caches.deployments.get(restore.namespace, restore.name)
        if raw is None or ((raw.get("status") or {}).get("readyReplicas") or 0) < 1:
            return Server(ServerState.NOT_READY)
        pod = self.ready_pod(restore)
        if pod is None:
            return Server(ServerState.NOT_READY)
        if self.provisioned(restore, pod.meta.uid):
            return Server(ServerState.READY)
        return Server(ServerState.NOT_READY, "provisioning users")

    # -- the admission queue --------------------------------------------------------------
    def restores_in_progress(self) -> dict[str, str]:
        out = {}
        for raw in self.caches.restores.items():
            restore = _restore_model(raw)
            if restore is not None and is_in_progress(restore):
                out[f"{restore.namespace}/{restore.replica_name}"] = restore.name
        return out

    def queue_positions(self) -> dict[str, int]:
        out = {}
        for raw in self.caches.replicas.items():
            meta = Meta.of(raw)
            position = (raw.get("status") or {}).get("queuePosition") or 0
            out[f"{meta.namespace}/{meta.name}"] = int(position)
        return out


def _not_older(have: str, want: str) -> bool:
    """Whether resourceVersion `have` is `want` or later. Versions are opaque to clients
    but etcd's are increasing integers; anything else is taken as caught up."""
    if have == want:
        return True
    try:
        return int(have) >= int(want)
    except ValueError:
        return True


def _restore_model(raw: Mapping[str, Any]) -> PostgresPhysicalRestore | None:
    try:
        return PostgresPhysicalRestore.model_validate(raw)
    except ValidationError as exc:
        meta = Meta.of(raw)
        log.warning(
            "restore %s/%s does not validate: %s",
            meta.namespace,
            meta.name,
            exc.errors()[0].get("msg"),
        )
        return None


def authored_version(replica: PostgresPhysicalReplica) -> str:
    """The replica as people change it: its spec (generation), labels and annotations.

    Not its resourceVersion: pgro's own status patches change that, and keying on it made
    every replica re-read its Secret and re-create what it owns after each of pgro's own
    writes. `kubectl annotate` still counts as a change (the documented way to make pgro
    look again at once)."""
    meta = replica.metadata
    return repr(
        (meta.uid, meta.generation, sorted(meta.labels.items()), sorted(meta.annotations.items()))
    )
