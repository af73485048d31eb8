"""The replica annotation `pgro.bes.au/redaction-engine` through the redaction step
(pgro.pipeline.redaction_step): an unknown value fails the step, recorded as
`failed: <message naming the annotation and the accepted values>` with a RedactionFailed
Warning, before anything connects to the restore's server."""

from __future__ import annotations

from typing import Any

import pytest

from pgro.api.names import ANNOTATION_REDACTION_ENGINE
from pgro.api.replica import PostgresPhysicalReplica, Redaction
from pgro.core.plan import EmitEvent, EventType, RunSwitchoverStep, SwitchoverStep
from pgro.core.redaction import EVENT_FAILED, EVENT_STARTED, Redacted
from pgro.pipeline.background import BackgroundTasks
from pgro.pipeline.redaction_step import RedactionRetries, RedactionStep, redact
from pgro.postgres.redaction import RedactionFailed

REDACTION = {
    "manifestUrl": "https://manifests.example/v{version}/manifest.json",
    "version": "1.0.0",
}
EXPECTED = (
    f"annotation {ANNOTATION_REDACTION_ENGINE} has the unknown value 'Anonymizer'; "
    "accepted values: native, anon (default native)"
)


def replica(annotations: dict[str, str]) -> PostgresPhysicalReplica:
    return PostgresPhysicalReplica.model_validate(
        {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalReplica",
            "metadata": {"name": "r", "namespace": "ns", "annotations": annotations},
            "spec": {"schedule": "0 0 * * *", "redaction": REDACTION},
        }
    )


def test_redact_refuses_an_unknown_engine_before_connecting() -> None:
    reached: list[str] = []

    def conninfo_for(database: str) -> str:
        reached.append(database)
        return "host=/nonexistent dbname=x"

    with pytest.raises(RedactionFailed) as caught:
        redact(conninfo_for, Redaction.model_validate(REDACTION), (), "Anonymizer")
    assert str(caught.value) == EXPECTED
    assert reached == []


def test_the_step_records_an_unknown_engine_as_failed() -> None:
    patches: list[dict[str, Any]] = []
    events: list[EmitEvent] = []
    reached: list[str] = []
    tasks: BackgroundTasks[Redacted] = BackgroundTasks()

    def conninfo_for(database: str) -> str:
        reached.append(database)
        return "host=/nonexistent dbname=x"

    step = RedactionStep(
        replica=replica({ANNOTATION_REDACTION_ENGINE: "Anonymizer"}),
        step=RunSwitchoverStep(kind=SwitchoverStep.REDACTION, restore="r-1"),
        tasks=tasks,
        retries=RedactionRetries(),
        conninfo_for=lambda: conninfo_for,
        patch=lambda p: patches.append(dict(p)),
        event=events.append,
        wake=lambda _seconds: None,
    )
    step.run()  # starts the task
    tasks.join(30)
    step.run()  # records its end
    assert [e.reason for e in events] == [EVENT_STARTED, EVENT_FAILED]
    assert events[1].type is EventType.WARNING and EXPECTED in events[1].note
    assert patches[-1] == {"redactionPhase": f"failed: {EXPECTED}", "redactionRestore": "r-1"}
    assert reached == []
