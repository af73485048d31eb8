"""The operator's keyed work queue: dedupe, one worker per key, delayed adds."""

from __future__ import annotations

import threading
import time

from pgro.reconciler.workqueue import WorkQueue


def test_a_queued_key_is_queued_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert q.get(0) == "a"
    assert q.get(0) == "b"
    assert q.get(0) is None


def test_a_key_added_while_held_comes_back_after_done_not_before() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(0) == "a"
    q.add("a")  # a change seen mid-reconcile
    assert q.get(0) is None  # never handed to a second worker meanwhile
    q.done("a")
    assert q.get(0) == "a"


def test_delayed_add_keeps_the_earliest_time() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a", delay=30)
    q.add("a", delay=0.05)
    assert q.get(0) is None
    assert q.get(2) == "a"
    q.done("a")
    assert q.get(0.1) is None  # the 30 s add was superseded


def test_close_wakes_blocked_workers() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(2)
    assert got == [None]


def test_concurrent_workers_never_share_a_key() -> None:
    q: WorkQueue[int] = WorkQueue()
    active: set[int] = set()
    clashes: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def worker() -> None:
        while True:
            key = q.get(0.2)
            if key is None:
                if done.is_set():
                    return
                continue
            with lock:
                if key in active:
                    clashes.append(key)
                active.add(key)
            time.sleep(0.001)
            with lock:
                active.discard(key)
            q.done(key)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(400):
        q.add(i % 5)
    time.sleep(0.3)
    done.set()
    for t in threads:
        t.join(5)
    assert clashes == []
