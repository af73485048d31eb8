"""How a pipeline tells its caller what it is doing (a terminal, a log, a test)."""

from __future__ import annotations

from typing import Protocol

from pgro.kopia.repository import RestoreProgress


class Observer(Protocol):
    def step(self, name: str, message: str) -> None:
        """A step started (`name` is stable, `message` is for people)."""

    def restore_progress(self, progress: RestoreProgress) -> None:
        """kopia reported bytes restored so far."""

    def note(self, message: str) -> None:
        """Something worth telling a person (a repair applied, a choice made)."""


class SilentObserver:
    def step(self, name: str, message: str) -> None:
        pass

    def restore_progress(self, progress: RestoreProgress) -> None:
        pass

    def note(self, message: str) -> None:
        pass
