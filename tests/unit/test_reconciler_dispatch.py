"""Every planned step reaches a handler, and a step without one is a type error.

Two halves: at run time, each member of `PlanStep` is dispatched to the effect it names
(none falls through); and mypy, run on a copy of the package with one step type added to
the union (or planned without being added), reports the missing handler. Before the shell,
both runtimes ended their `match` with `case _: log.debug`, so such a step was dropped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.core import plan
from pgro.core.plan import EventType, PlanStep, SwitchoverStep, VerificationOutcome
from pgro.reconciler.dispatch import NotARestorePlan, dispatch
from tests.fixtures.manifests import replica_doc, restore

ROOT = Path(__file__).resolve().parents[2]


def _replica() -> PostgresPhysicalReplica:
    return PostgresPhysicalReplica.model_validate(replica_doc("fiji", namespace="analytics"))


def _restore() -> PostgresPhysicalRestore:
    return restore("fiji-1", "fiji", namespace="analytics", snapshot="k1")


def _example(cls: type[Any]) -> PlanStep:
    """One instance of each step type, whatever its fields."""
    examples: dict[type[Any], PlanStep] = {
        plan.PatchReplicaStatus: plan.PatchReplicaStatus({"phase": "Ready"}),
        plan.EnsureReplicaResources: plan.EnsureReplicaResources("analytics", (), None),
        plan.ListSnapshots: plan.ListSnapshots(),
        plan.CreateRestore: plan.CreateRestore(_restore()),
        plan.DeleteRestore: plan.DeleteRestore("fiji-1"),
        plan.RunSwitchoverStep: plan.RunSwitchoverStep(SwitchoverStep.REDACTION, "fiji-1"),
        plan.ProvisionUsers: plan.ProvisionUsers("fiji-1"),
        plan.PointServiceAt: plan.PointServiceAt("fiji-1"),
        plan.MarkOutgoing: plan.MarkOutgoing("fiji-0"),
        plan.SendNotifications: plan.SendNotifications("fiji-1"),
        plan.ReportVerification: plan.ReportVerification("fiji-1", VerificationOutcome.SUCCESS),
        plan.EmitEvent: plan.EmitEvent(EventType.NORMAL, "RestoreStarted", "note"),
        plan.PatchRestoreStatus: plan.PatchRestoreStatus("fiji-1", {"phase": "Ready"}),
        plan.PrepareRestoreStorage: plan.PrepareRestoreStorage("fiji-1"),
        plan.StartRestoreWork: plan.StartRestoreWork("fiji-1", None),
        plan.CleanupRestoreWork: plan.CleanupRestoreWork("fiji-1"),
        plan.DetectPostgresVersion: plan.DetectPostgresVersion("fiji-1"),
        plan.EnsureServer: plan.EnsureServer("fiji-1"),
        plan.MarkReadyForTraffic: plan.MarkReadyForTraffic("fiji-1"),
        plan.RunMigration: plan.RunMigration("fiji-1"),
        plan.CheckData: plan.CheckData("fiji-1", "standard"),
        plan.ReindexAfterReset: plan.ReindexAfterReset("fiji-1"),
    }
    return examples[cls]


class _Recorder:
    """Effects that record which method each step reached."""

    runtime_name = "the recorder"
    supported_switchover_steps = frozenset({SwitchoverStep.REDACTION})

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.calls.append(name)

        return record


@pytest.mark.parametrize("cls", typing.get_args(PlanStep), ids=lambda c: c.__name__)
def test_every_planned_step_reaches_one_handler(cls: type[Any]) -> None:
    effects = _Recorder()
    orchestrated: list[str] = []
    dispatch(
        effects,
        _example(cls),
        _replica(),
        _restore(),
        switchover_unsupported=lambda *_: orchestrated.append("switchover"),
        notify=lambda *_: orchestrated.append("notify"),
    )
    assert len(effects.calls) + len(orchestrated) == 1, (effects.calls, orchestrated)


def test_every_step_class_in_core_plan_is_a_plan_step() -> None:
    """A Step subclass outside the union could not be planned (mypy), so it is dead code."""
    declared = {
        obj
        for obj in vars(plan).values()
        if isinstance(obj, type) and issubclass(obj, plan.Step) and obj is not plan.Step
    }
    assert declared == set(typing.get_args(PlanStep))


def test_an_unsupported_switchover_step_goes_to_the_shell() -> None:
    effects = _Recorder()
    seen: list[str] = []
    dispatch(
        effects,
        plan.RunSwitchoverStep(SwitchoverStep.SCHEMA_BUILD, "fiji-1"),
        _replica(),
        None,
        switchover_unsupported=lambda *_: seen.append("unsupported"),
        notify=lambda *_: seen.append("notify"),
    )
    assert seen == ["unsupported"] and effects.calls == []


def test_a_restore_step_without_its_restore_is_refused() -> None:
    with pytest.raises(NotARestorePlan, match="EnsureServer"):
        dispatch(
            _Recorder(),
            plan.EnsureServer("fiji-1"),
            _replica(),
            None,
            switchover_unsupported=lambda *_: None,
            notify=lambda *_: None,
        )


NEW_STEP = '''

@dataclass(frozen=True)
class RotateCredentials(Step):
    """A step type added by a later change."""

    restore: str
'''


def _mypy(tmp_path: Path, *, in_union: bool, extra: str = "") -> subprocess.CompletedProcess[str]:
    """mypy on a copy of the package whose core/plan.py declares one more step type
    (`in_union`: also added to `PlanStep`, as a change adding a step would)."""
    copy = tmp_path / "pkg"
    shutil.copytree(
        ROOT / "src" / "pgro", copy / "pgro", ignore=shutil.ignore_patterns("__pycache__")
    )
    plan_py = copy / "pgro" / "core" / "plan.py"
    source = plan_py.read_text()
    marker = "# Every step a decision can plan."
    assert marker in source
    source = source.replace(marker, NEW_STEP.strip() + "\n\n\n" + marker)
    if in_union:
        last = "    | ReindexAfterReset\n)"
        assert last in source
        source = source.replace(last, "    | ReindexAfterReset\n    | RotateCredentials\n)")
    plan_py.write_text(source)
    targets = ["pgro/reconciler/dispatch.py"]
    if extra:
        (copy / "planner.py").write_text(extra)
        targets.append("planner.py")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--config-file=/dev/null",
            *targets,
        ],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.timeout(900)
def test_mypy_rejects_a_step_type_added_to_the_plan_without_a_handler(tmp_path: Path) -> None:
    untouched = _mypy(tmp_path / "a", in_union=False)
    assert untouched.returncode == 0, untouched.stdout
    added = _mypy(tmp_path / "b", in_union=True)
    assert added.returncode != 0
    assert "dispatch.py" in added.stdout and "assert_never" in added.stdout, added.stdout


@pytest.mark.timeout(900)
def test_mypy_rejects_planning_a_step_type_missing_from_the_union(tmp_path: Path) -> None:
    planner = (
        "from pgro.core.plan import PlanStep, RotateCredentials\n\n"
        "steps: list[PlanStep] = []\n"
        "steps.append(RotateCredentials('fiji-1'))\n"
    )
    result = _mypy(tmp_path, in_union=False, extra=planner)
    assert result.returncode != 0
    assert "planner.py" in result.stdout and "RotateCredentials" in result.stdout, result.stdout


def test_timedelta_is_not_a_step() -> None:
    # Guards the examples above: a non-step given to dispatch is refused by assert_never.
    with pytest.raises(AssertionError):
        dispatch(
            _Recorder(),
            timedelta(seconds=1),  # type: ignore[arg-type]
            _replica(),
            None,
            switchover_unsupported=lambda *_: None,
            notify=lambda *_: None,
        )
