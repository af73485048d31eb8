"""Operator housekeeping outside the core's plans, in the Kubernetes runtime only: what the
reference does on each pass with objects the core never observes (pods, a Job's TTL).

- **Orphan pod sweep** (features.md §2.16, reference `controllers/replica.rs`): after each
  replica pass, a pod labelled `pgro.bes.au/replica=<replica>` that has no
  `ownerReferences` and whose `pgro.bes.au/restore` label is absent or names none of the
  replica's restores is deleted. Such a pod is left behind when a cascade deletion did not
  reach it; it may hold a volume (the `pvc-protection` finalizer keeps a PVC while a pod
  uses it). A pod with any owner is its owner's business and is never touched. This is
  runtime-side, not a plan step: the core's observations carry no pods (the embedded
  runtime has none), and the sweep changes nothing the core decides on.
- **Failed restore Job log retention** (features.md §2.17, reference restore-pipeline
  §1.2): once the restore Job has failed, its `ttlSecondsAfterFinished` goes from the
  default 120 s to a day when the replica had no failure in a row before this one, else
  10 minutes, so `kubectl logs` still finds the pod. Done once: only a Job still at the
  default TTL is patched. The Job is owned by its restore, so it goes when the failed
  restore is deleted (`failed_restore_retention` after the restore's creation) whatever
  its TTL: docs/kubernetes.md, "Failed restores".

- **Kopia cache pressure** (features.md §2.12): `pgro restore-job` evicts the kept kopia
  caches on the `<replica>-kopia-cache` volume when it finds it 85 % full or more, and says
  so in its termination message (`cachePressure`); a restore that failed for want of disk
  (`InsufficientDisk`) says the same. Once per Job, the operator grows the volume's
  `requests.storage` to min(current × 1.15, 2 × max(10Gi, 20 % of the snapshot)), only if
  that is larger. The Job is annotated first (`CACHE_PRESSURE_ANNOTATION`), so a Job seen
  again on later passes never grows it twice.

All are best effort: a failure is logged and the pass goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from fractions import Fraction
from math import ceil
from typing import Any, Final

from pgro.api.names import (
    LABEL_PREFIX,
    LABEL_REPLICA,
    LABEL_RESTORE,
    RESTORE_KIND,
    kopia_cache_pvc_name,
    restore_job_name,
)
from pgro.api.quantity import format_quantity, parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.observations import RestoreObservation, RestoreWork, WorkState
from pgro.core.pod_sizing import kopia_cache_size
from pgro.core.restore_machine import counted_failure
from pgro.kopia.errors import DiskFull
from pgro.kube.client import KubeApi
from pgro.pipeline.job import RestoreOutcome
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.observe import Meta, Observer

log = logging.getLogger("pgro.operator")


# -- orphan pods ----------------------------------------------------------------------------
def orphan_pods(pods: Iterable[Mapping[str, Any]], restores: Collection[str]) -> list[str]:
    """The names of the pods to delete: no owner, not being deleted already, and no
    `pgro.bes.au/restore` label naming one of `restores`."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("ownerReferences") or meta.get("deletionTimestamp"):
            continue
        restore = (meta.get("labels") or {}).get(LABEL_RESTORE)
        if restore and restore in restores:
            continue
        out.append(str(meta.get("name") or ""))
    return [name for name in out if name]


def sweep_orphan_pods(api: KubeApi, observer: Observer, replica: PostgresPhysicalReplica) -> None:
    """Delete the replica's orphan pods (the pods watch selects the replica label)."""
    ns = replica.namespace
    try:
        pods = observer.caches.pods.select(ns, LABEL_REPLICA, replica.name)
        listed = {r.name for r in observer.restores_of(replica)}
        for name in orphan_pods(pods, listed):
            pod = next(p for p in pods if Meta.of(p).name == name)
            restore = Meta.of(pod).labels.get(LABEL_RESTORE)
            # The restores cache may not show one created a moment ago: ask before deleting.
            if restore and api.get(RESTORE_KIND, ns, restore) is not None:
                continue
            why = f"restore {restore} no longer exists" if restore else "no restore label"
            if api.delete("Pod", ns, name):
                log.info("%s: deleted orphaned pod %s (no owner; %s)", replica.key, name, why)
    except Exception as exc:
        log.warning("%s: the orphaned pod sweep failed: %s", replica.key, exc)


# -- failed restore Job -----------------------------------------------------------------
def failures_before(obs: RestoreObservation) -> int:
    """The replica's failed restores in a row before this restore's failure: its counter,
    less this failure once the counter has taken it in (the marker names the restore)."""
    replica = obs.replica
    if replica is None:
        return 0
    failures = replica.status.consecutive_restore_failures or 0
    if counted_failure(replica.status) == obs.restore.name:
        failures -= 1
    return max(failures, 0)


def retain_failed_job_logs(api: KubeApi, observer: Observer, obs: RestoreObservation) -> None:
    """Patch a failed restore Job's TTL once (see the module docstring)."""
    if obs.work.state is not WorkState.FAILED:
        return
    restore = obs.restore
    name = obs.work.name or restore_job_name(restore.name)
    job = observer.caches.jobs.get(restore.namespace, name)
    if job is None or (job.get("spec") or {}).get("ttlSecondsAfterFinished") != (
        workloads.JOB_TTL_S
    ):
        return
    ttl = workloads.failed_restore_job_ttl(failures_before(obs))
    try:
        api.merge_patch("Job", restore.namespace, name, workloads.job_ttl_patch(ttl))
    except Exception as exc:
        log.warning(
            "restore %s/%s: the failed Job's TTL was not extended: %s",
            restore.namespace,
            restore.name,
            exc,
        )
        return
    log.info(
        "restore %s/%s: Job %s failed; kept %d s after it finished, for its pod's log",
        restore.namespace,
        restore.name,
        name,
        ttl,
    )


# -- kopia cache pressure -----------------------------------------------------------------
# On a restore Job once the operator has acted on its cache pressure: the size it asked
# for, or "unchanged".
CACHE_PRESSURE_ANNOTATION: Final = f"{LABEL_PREFIX}cache-pressure-handled"
CACHE_GROWTH: Final = Fraction(115, 100)
CACHE_GROWTH_CAP: Final = 2


def _handled(job: Mapping[str, Any]) -> bool:
    return CACHE_PRESSURE_ANNOTATION in ((job.get("metadata") or {}).get("annotations") or {})


def grown_cache_size(current: int, snapshot_size: str | int) -> int | None:
    """The kopia-cache volume's size after pressure: min(current × 1.15, 2 × its default
    size for the snapshot, `pod_sizing.kopia_cache_size`), or None when that is not larger
    than `current` (the volume is at or past the cap already)."""
    cap = CACHE_GROWTH_CAP * kopia_cache_size(snapshot_size)
    want = min(ceil(current * CACHE_GROWTH), cap)
    return want if want > current else None


def cache_pressure(work: RestoreWork, messages: Iterable[str]) -> str | None:
    """Why the finished restore work asks for a larger cache volume, or None: a pod's
    termination message reporting `cachePressure`, or a failure for want of disk."""
    if work.state is WorkState.FAILED:
        if work.reason.startswith(f"{DiskFull.reason}:"):
            return "the restore ran out of disk space"
        return None
    if work.state is not WorkState.SUCCEEDED:
        return None
    for message in messages:
        percent = RestoreOutcome.from_message(message).cache_pressure
        if percent is not None:
            return f"the restore Job found it {percent}% full and evicted the cache"
    return None


def grow_cache_volume(
    api: KubeApi,
    restore: PostgresPhysicalRestore,
    job: Mapping[str, Any],
    why: str,
) -> int | None:
    """Grow the replica's kopia-cache volume once for this finished `job` (see the module
    docstring). Returns the size patched, None when nothing was (already handled, at the
    cap, or an error: logged only)."""
    ns, job_name = restore.namespace, Meta.of(job).name
    if _handled(job):
        return None
    replica = restore.replica_name
    pvc_name = kopia_cache_pvc_name(replica)
    try:
        pvc = api.get("PersistentVolumeClaim", ns, pvc_name)
        if pvc is None:
            return None
        requests = (pvc.get("spec") or {}).get("resources", {}).get("requests", {})
        current = parse_quantity(str(requests.get("storage", "0")))
        want = grown_cache_size(current, restore.spec.snapshot_size)
        mark = format_quantity(want) if want is not None else "unchanged"
        # Marked first: a Job seen again grows the volume at most once.
        api.merge_patch(
            "Job", ns, job_name, {"metadata": {"annotations": {CACHE_PRESSURE_ANNOTATION: mark}}}
        )
        if want is None:
            log.info(
                "%s/%s: kopia cache under pressure (%s); %s is at its cap already",
                ns,
                replica,
                why,
                pvc_name,
            )
            return None
        api.merge_patch(
            "PersistentVolumeClaim",
            ns,
            pvc_name,
            {"spec": {"resources": {"requests": {"storage": format_quantity(want)}}}},
        )
    except Exception as exc:
        # Not every storage class can expand: the next restore evicts again.
        log.warning("%s/%s: the kopia cache volume was not grown: %s", ns, replica, exc)
        return None
    log.info(
        "%s/%s: kopia cache under pressure (%s); %s grown to %s",
        ns,
        replica,
        why,
        pvc_name,
        format_quantity(want),
    )
    return want


def grow_cache_under_pressure(api: KubeApi, observer: Observer, obs: RestoreObservation) -> None:
    """After a restore Job finished: grow the cache volume if the Job asked for it."""
    if obs.work.state not in (WorkState.SUCCEEDED, WorkState.FAILED):
        return
    restore = obs.restore
    name = obs.work.name or restore_job_name(restore.name)
    job = observer.caches.jobs.get(restore.namespace, name)
    if job is None or _handled(job):
        return
    pods = observer.job_pods(restore.namespace, name)
    why = cache_pressure(obs.work, (p.termination_message for p in reversed(pods)))
    if why is not None:
        grow_cache_volume(api, restore, job, why)
