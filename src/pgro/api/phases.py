"""Phase values written to status, with the exact strings of the wire contract."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Self

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema


class ReplicaPhase(StrEnum):
    PENDING = "Pending"
    RESTORING = "Restoring"
    READY = "Ready"
    # In the enum for compatibility; the reference never writes it.
    FAILED = "Failed"


class RestorePhase(StrEnum):
    PENDING = "Pending"
    RESTORING = "Restoring"
    MIGRATING = "Migrating"
    READY = "Ready"
    SWITCHING = "Switching"
    ACTIVE = "Active"
    FAILED = "Failed"


class JobPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


_FAILED_PREFIX: Final = "failed:"


@dataclass(frozen=True)
class _StepPhase:
    """A step's phase, flat on the wire: a fixed word, or `failed: <reason>`.

    The strings are read by dashboards and alerts, so they are a public contract: a
    failed phase always round-trips as `failed: <reason>`, and any other string is an
    error rather than a guess.
    """

    state: str
    reason: str = ""

    _WORDS: ClassVar[tuple[str, ...]]
    _WHAT: ClassVar[str]

    def __post_init__(self) -> None:
        if self.state != "failed" and self.state not in self._WORDS:
            raise ValueError(f"unknown {self._WHAT} state {self.state!r}")
        if self.state != "failed" and self.reason:
            raise ValueError(f"only a failed {self._WHAT} carries a reason")

    @classmethod
    def parse(cls, text: str) -> Self:
        if text.startswith(_FAILED_PREFIX):
            return cls("failed", text.removeprefix(_FAILED_PREFIX).strip())
        if text in cls._WORDS:
            return cls(text)
        expected = ", ".join(repr(w) for w in cls._WORDS)
        raise ValueError(
            f"unknown {cls._WHAT} {text!r}: expected one of {expected} or 'failed: <reason>'"
        )

    @classmethod
    def failed(cls, reason: str) -> Self:
        return cls("failed", reason.strip())

    @property
    def wire(self) -> str:
        return f"{_FAILED_PREFIX} {self.reason}" if self.state == "failed" else self.state

    def __str__(self) -> str:
        return self.wire

    @property
    def is_active(self) -> bool:
        return self.state == "active"

    @property
    def is_failed(self) -> bool:
        return self.state == "failed"

    @property
    def settled(self) -> bool:
        """Nothing is running. Deliberately "not active" rather than a list of end states,
        so a state added later cannot re-create the sweep deadlock of the reference."""
        return not self.is_active

    @classmethod
    def _coerce(cls, value: object) -> Self:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(f"invalid {cls._WHAT} {value!r}: expected a string")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._coerce,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda phase: phase.wire, return_schema=core_schema.str_schema()
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        words = ", ".join(f"'{w}'" for w in cls._WORDS)
        return {"type": "string", "description": f"{words} or 'failed: <reason>'"}


@dataclass(frozen=True)
class SchemaMigrationPhase(_StepPhase):
    """`status.schemaMigrationPhase` of a replica."""

    _WORDS = ("active", "complete", "partial", "timeout-skipped")
    _WHAT = "schema migration phase"

    ACTIVE: ClassVar[SchemaMigrationPhase]
    COMPLETE: ClassVar[SchemaMigrationPhase]
    PARTIAL: ClassVar[SchemaMigrationPhase]
    TIMEOUT_SKIPPED: ClassVar[SchemaMigrationPhase]


SchemaMigrationPhase.ACTIVE = SchemaMigrationPhase("active")
SchemaMigrationPhase.COMPLETE = SchemaMigrationPhase("complete")
SchemaMigrationPhase.PARTIAL = SchemaMigrationPhase("partial")
SchemaMigrationPhase.TIMEOUT_SKIPPED = SchemaMigrationPhase("timeout-skipped")


@dataclass(frozen=True)
class RedactionPhase(_StepPhase):
    """`status.redactionPhase` of a replica."""

    _WORDS = ("active", "complete", "partial")
    _WHAT = "redaction phase"

    ACTIVE: ClassVar[RedactionPhase]
    COMPLETE: ClassVar[RedactionPhase]
    PARTIAL: ClassVar[RedactionPhase]

    @property
    def done(self) -> bool:
        """Redaction did what it will do and the switchover may go ahead. Narrower than
        `settled`: a failed redaction is settled but must never let an unredacted
        restore go live."""
        return self.state in ("complete", "partial")


RedactionPhase.ACTIVE = RedactionPhase("active")
RedactionPhase.COMPLETE = RedactionPhase("complete")
RedactionPhase.PARTIAL = RedactionPhase("partial")
