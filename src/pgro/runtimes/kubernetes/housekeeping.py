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

Both are best effort: a failure is logged and the pass goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from pgro.api.names import LABEL_REPLICA, LABEL_RESTORE, RESTORE_KIND, restore_job_name
from pgro.api.replica import PostgresPhysicalReplica
from pgro.core.observations import RestoreObservation, WorkState
from pgro.core.restore_machine import counted_failure
from pgro.kube.client import KubeApi
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
