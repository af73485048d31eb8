"""pgro.pipeline.background: one task per key, its end taken once by the owner, an error
stored rather than lost on the thread."""

from __future__ import annotations

import threading

from pgro.pipeline.background import BackgroundTasks


def test_one_task_per_key_and_its_end_taken_once() -> None:
    tasks: BackgroundTasks[int] = BackgroundTasks()
    gate = threading.Event()
    woken = threading.Event()
    assert tasks.start("a", lambda: gate.wait(10) and 7, woken.set)
    assert tasks.running("a")
    assert not tasks.start("a", lambda: 8)  # one at a time
    gate.set()
    assert woken.wait(10)
    assert not tasks.running("a") and tasks.finished("a")
    assert not tasks.start("a", lambda: 9)  # its end not taken yet
    outcome = tasks.take("a")
    assert outcome is not None and outcome.value == 7 and outcome.error is None
    assert tasks.take("a") is None
    assert tasks.start("a", lambda: 9)
    tasks.join(10)
    again = tasks.take("a")
    assert again is not None and again.value == 9


def test_an_error_is_kept_for_the_owner() -> None:
    tasks: BackgroundTasks[int] = BackgroundTasks()

    def boom() -> int:
        raise RuntimeError("no")

    tasks.start("b", boom)
    tasks.join(10)
    outcome = tasks.take("b")
    assert outcome is not None and isinstance(outcome.error, RuntimeError)
    assert outcome.value is None
