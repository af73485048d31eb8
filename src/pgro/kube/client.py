"""The Kubernetes API as the operator uses it: plain JSON-able dicts over lightkube.

lightkube brings the configuration (kubeconfig or in-cluster service account), the
authentication, the request machinery and the resource catalogue. The operator itself
works on wire-form dicts: its builders produce them and its decisions read them, so this
module converts at the boundary and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from lightkube import ALL_NS, ApiError, Client, KubeConfig, codecs
from lightkube.core.resource import GlobalResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.batch_v1 import Job
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import (
    ConfigMap,
    Namespace,
    PersistentVolumeClaim,
    Pod,
    Secret,
    Service,
)
from lightkube.resources.events_v1 import Event
from lightkube.types import CascadeType, PatchType

from pgro.api.names import FIELD_MANAGER, GROUP, VERSION

log = logging.getLogger("pgro.operator.kube")

Replica = create_namespaced_resource(
    GROUP, VERSION, "PostgresPhysicalReplica", "postgresphysicalreplicas"
)
Restore = create_namespaced_resource(
    GROUP, VERSION, "PostgresPhysicalRestore", "postgresphysicalrestores"
)

# Any: lightkube types its calls per resource class; the operator picks classes by kind.
KINDS: Final[Mapping[str, Any]] = {
    "PostgresPhysicalReplica": Replica,
    "PostgresPhysicalRestore": Restore,
    "Job": Job,
    "Deployment": Deployment,
    "Pod": Pod,
    "Secret": Secret,
    "Service": Service,
    "PersistentVolumeClaim": PersistentVolumeClaim,
    "ConfigMap": ConfigMap,
    "Namespace": Namespace,
    "Lease": Lease,
    "Event": Event,
    "CustomResourceDefinition": CustomResourceDefinition,
}


# Objects are listed in pages of this many: the response to a whole-cluster list of
# thousands is never held (as bytes and as decoded objects) at once.
LIST_CHUNK: Final = 500


def _to_dict(obj: Any) -> dict[str, Any]:
    """The wire form, without `metadata.managedFields`: nothing reads it, and it is often
    the larger part of an object (a cache of thousands would hold it for nothing)."""
    out: dict[str, Any] = obj if isinstance(obj, dict) else obj.to_dict()
    (out.get("metadata") or {}).pop("managedFields", None)
    return out


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status.code == 404


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status.code == 409


@dataclass(frozen=True)
class Listed:
    items: list[dict[str, Any]]
    resource_version: str


def _warm_decoders() -> None:
    """Build every decoder the operator's threads will use, once, in the calling thread.

    lightkube decodes with msgspec, which builds a type's decoder on first use; two threads
    doing that at once for overlapping models (a Job list and a Pod list share PodSpec) can
    crash the interpreter.
    """
    from lightkube.core.decoders import decode_list
    from lightkube.models.meta_v1 import Status

    for res in (*KINDS.values(), Status):
        with contextlib.suppress(Exception):
            decode_list(b'{"items": []}', res)
        with contextlib.suppress(Exception):
            msgspec.json.decode(b"{}", type=res)


class KubeApi:
    """The calls the operator makes, on dicts. Errors are lightkube's `ApiError`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        _warm_decoders()

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
        """In-cluster when running in a pod, else `kubeconfig` / $KUBECONFIG / ~/.kube/config."""
        if kubeconfig:
            config: KubeConfig = KubeConfig.from_file(kubeconfig)
            return cls(Client(config.get(context_name=context), field_manager=FIELD_MANAGER))
        return cls(Client(field_manager=FIELD_MANAGER))

    # -- reads ------------------------------------------------------------------------
    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return _to_dict(self.client.get(KINDS[kind], name, namespace=namespace))
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    def list(
        self,
        kind: str,
        *,
        namespace: str | None = None,
        labels: Mapping[str, Any] | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> Listed:
        res = KINDS[kind]
        scope = None if issubclass(res, GlobalResource) else ALL_NS
        listing = self.client.list(
            res,
            namespace=namespace if namespace is not None else scope,
            chunk_size=LIST_CHUNK,
            labels=dict(labels) if labels else None,
            fields=dict(fields) if fields else None,
        )
        items = [_to_dict(o) for o in listing]
        return Listed(items, listing.resourceVersion)

    def watch(
        self,
        kind: str,
        *,
        resource_version: str,
        namespace: str | None = None,
        labels: Mapping[str, Any] | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        res = KINDS[kind]
        for event, obj in self.client.watch(
            res,
            namespace=namespace if namespace is not None else ALL_NS,
            labels=dict(labels) if labels else None,
            fields=dict(fields) if fields else None,
            resource_version=resource_version,
            server_timeout=240,
        ):
            yield event, _to_dict(obj)

    # -- writes -----------------------------------------------------------------------
    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return _to_dict(self.client.create(codecs.from_dict(dict(obj))))

    def create_if_missing(self, obj: Mapping[str, Any]) -> bool:
        """Create `obj`; False if it already existed (left untouched)."""
        try:
            self.create(obj)
        except ApiError as exc:
            if exc.status.code == 409:
                return False
            raise
        return True

    def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply: the fields pgro sets are pgro's; others' fields are kept."""
        return _to_dict(
            self.client.apply(codecs.from_dict(dict(obj)), field_manager=FIELD_MANAGER, force=force)
        )

    def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        res: Any = KINDS[kind]
        if status:
            res = res.Status
        return _to_dict(
            self.client.patch(
                res, name, dict(patch), namespace=namespace, patch_type=PatchType.MERGE
            )
        )

    def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT with the object's resourceVersion: fails with 409 if it changed meanwhile."""
        return _to_dict(self.client.replace(codecs.from_dict(dict(obj))))

    def pod_log(self, name: str, namespace: str, container: str, tail_lines: int) -> str:
        """The last `tail_lines` lines of a container's log in a pod, each ending in a
        newline. Raises ApiError when the log cannot be read (the pod gone, its node
        unreachable)."""
        return "".join(
            self.client.log(name, namespace=namespace, container=container, tail_lines=tail_lines)
        )

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete in the background (owners' dependents go via the garbage collector);
        False if it was already gone."""
        try:
            self.client.delete(
                KINDS[kind], name, namespace=namespace, cascade=CascadeType.BACKGROUND
            )
        except ApiError as exc:
            if exc.status.code == 404:
                return False
            raise
        return True
