"""Watch-driven caches: list once, then follow the watch; relist when it breaks.

The reflector pattern of client-go, in a thread per watched kind. Decisions read these
caches instead of calling the API server, and every change calls `on_change` so the
objects it concerns are reconciled (level-triggered: the handler only says *which* key
to look at again, never what changed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pgro.runtimes.kubernetes.kube import KubeApi

log = logging.getLogger("pgro.operator.informer")

Key = tuple[str, str]
ChangeHandler = Callable[[dict[str, Any]], None]

RELIST_BACKOFF_S = 2.0


def object_key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata", {})
    return meta.get("namespace", ""), meta.get("name", "")


class Informer:
    def __init__(
        self,
        api: KubeApi,
        kind: str,
        on_change: ChangeHandler,
        *,
        labels: Mapping[str, Any] | None = None,
        namespace: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        self.api = api
        self.kind = kind
        self.labels = labels
        self.namespace = namespace
        self.fields = fields
        self.on_change = on_change
        self._items: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # The watch thread may be blocked in a long poll; it is a daemon and its events
        # are ignored from now on.
        self._stop.set()

    # -- reads ------------------------------------------------------------------------
    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get((namespace, name))

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def select(self, namespace: str, **labels: str) -> list[dict[str, Any]]:
        """Objects in `namespace` carrying all of `labels`."""
        with self._lock:
            return [
                o
                for (ns, _), o in self._items.items()
                if ns == namespace
                and all(
                    o.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items()
                )
            ]

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._relist()
                self.synced.set()
                for event, obj in self.api.watch(
                    self.kind,
                    resource_version=version,
                    namespace=self.namespace,
                    labels=self.labels,
                    fields=self.fields,
                ):
                    if self._stop.is_set():
                        return
                    self._apply(event, obj)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("watch of %s broke (%s); listing again", self.kind, exc)
            self._stop.wait(RELIST_BACKOFF_S)

    def _relist(self) -> str:
        listed = self.api.list(
            self.kind, namespace=self.namespace, labels=self.labels, fields=self.fields
        )
        fresh = {object_key(o): o for o in listed.items}
        with self._lock:
            gone = [o for k, o in self._items.items() if k not in fresh]
            changed = [
                o
                for k, o in fresh.items()
                if self._items.get(k, {}).get("metadata", {}).get("resourceVersion")
                != o.get("metadata", {}).get("resourceVersion")
            ]
            self._items = fresh
        for obj in (*gone, *changed):
            self.on_change(obj)
        return listed.resource_version

    def _apply(self, event: str, obj: dict[str, Any]) -> None:
        key = object_key(obj)
        with self._lock:
            if event == "DELETED":
                self._items.pop(key, None)
            else:
                self._items[key] = obj
        self.on_change(obj)
