"""Watch-driven caches: list once, then follow the watch; relist when it breaks.

The reflector pattern of client-go, in a thread per watched kind. Decisions read these
caches instead of calling the API server, and every change calls `on_change` so the
objects it concerns are reconciled (level-triggered: the handler only says *which* key
to look at again, never what changed).

Lookups by label (or by any other string an `indexers` function extracts) go through an
index maintained on every change, so a pass reads only its own objects, never the whole
cache.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pgro.kube.client import KubeApi

log = logging.getLogger("pgro.operator.informer")

Key = tuple[str, str]
ChangeHandler = Callable[[dict[str, Any]], None]
# An index's value for an object (None: not indexed), e.g. one of its labels.
Indexer = Callable[[Mapping[str, Any]], str | None]

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
        indexers: Mapping[str, Indexer] | None = None,
    ) -> None:
        self.api = api
        self.kind = kind
        self.labels = labels
        self.namespace = namespace
        self.fields = fields
        self.on_change = on_change
        self._items: dict[Key, dict[str, Any]] = {}
        # A label key is indexed by the label's value unless `indexers` says otherwise.
        self.indexers: dict[str, Indexer] = {
            **{k: by_label(k) for k in labels or {}},
            **(indexers or {}),
        }
        # (index, namespace, value) -> keys of the objects with that value.
        self._index: dict[tuple[str, str, str], set[Key]] = {}
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

    def select(self, namespace: str, index: str, value: str) -> list[dict[str, Any]]:
        """Objects in `namespace` whose `index` (a label key or a named indexer) is `value`."""
        with self._lock:
            keys = self._index.get((index, namespace, value), ())
            return [self._items[k] for k in keys]

    def _put(self, key: Key, obj: dict[str, Any] | None) -> None:
        """Store (None: remove) one object and keep the index in step; under the lock."""
        old = self._items.pop(key, None) if obj is None else self._items.get(key)
        for name, indexer in self.indexers.items():
            before = indexer(old) if old is not None else None
            after = indexer(obj) if obj is not None else None
            if before == after:
                continue
            if before is not None:
                held = self._index.get((name, key[0], before))
                if held is not None:
                    held.discard(key)
                    if not held:
                        del self._index[(name, key[0], before)]
            if after is not None:
                self._index.setdefault((name, key[0], after), set()).add(key)
        if obj is not None:
            self._items[key] = obj

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
            self._items, self._index = {}, {}
            for key, obj in fresh.items():
                self._put(key, obj)
        for obj in (*gone, *changed):
            self.on_change(obj)
        return listed.resource_version

    def _apply(self, event: str, obj: dict[str, Any]) -> None:
        key = object_key(obj)
        with self._lock:
            self._put(key, None if event == "DELETED" else obj)
        self.on_change(obj)


def by_label(key: str) -> Indexer:
    return lambda obj: ((obj.get("metadata") or {}).get("labels") or {}).get(key)
