"""The operator's data-check Job: its shape, its environment and its termination message."""

from __future__ import annotations

import json

import pytest

from pgro.api.data_checks import DataCheck, DataCheckFinding, DataChecks
from pgro.api.names import LABEL_RESTORE, admin_creds_secret_name
from pgro.pipeline import data_check_job as job
from pgro.runtimes.kubernetes import workloads
from pgro.runtimes.kubernetes.config import OperatorConfig
from tests.fixtures.manifests import replica, restore


def _damaged(findings: int, detail: int = 300) -> DataChecks:
    return DataChecks(
        depth="full",
        verdict="damaged",
        message="m" * 900,
        checks=[
            DataCheck(
                name=name,
                status="fail",
                detail="d" * detail,
                count=findings,
                findings=[
                    DataCheckFinding(
                        message="x" * 900, database="shop", relation="public.orders", block=i
                    )
                    for i in range(findings)
                ],
            )
            for name in ("checksums", "btree", "heap", "full_read")
        ],
    )


def test_the_verdict_fits_a_termination_message_and_keeps_its_verdict() -> None:
    big = _damaged(5, 1000)
    text = job.fit(big)
    assert len(text.encode()) <= job.MESSAGE_LIMIT
    parsed, why = job.parse_message(text)
    assert parsed is not None and why == ""
    assert parsed.verdict == "damaged" and parsed.depth == "full"
    assert [c.name for c in parsed.checks] == ["checksums", "btree", "heap", "full_read"]
    assert all(c.status == "fail" for c in parsed.checks)
    small = DataChecks(
        depth="standard",
        verdict="damaged",
        checks=[
            DataCheck(
                name="btree",
                status="fail",
                detail="1 problem",
                count=1,
                findings=[DataCheckFinding(message="bad", relation="public.orders_pkey")],
            )
        ],
    )
    assert job.parse_message(job.fit(small))[0] == small  # nothing cut when it fits


def test_unreadable_or_failed_messages_say_why() -> None:
    assert job.parse_message("")[0] is None
    checks, why = job.parse_message("error: InvalidJob: PGRO_CHECK_HOST not set")
    assert checks is None and why == "InvalidJob: PGRO_CHECK_HOST not set"
    checks, why = job.parse_message('{"depth": "deep", "verdict": "passed"}')
    assert checks is None and "unreadable" in why
    checks, why = job.parse_message("not json")
    assert checks is None and "unreadable" in why


def test_the_environment_is_read_and_checked() -> None:
    env = {
        job.ENV_HOST: "r-1",
        job.ENV_PASSWORD: "Secret123",
        job.ENV_DEPTH: "full",
        job.ENV_BUDGET: "120",
    }
    parsed = job.CheckJob.from_env(env)
    assert (parsed.host, parsed.port, parsed.user) == ("r-1", 5432, "postgres")
    assert parsed.depth == "full"
    assert parsed.budget_s == 120.0 and parsed.workers == 2
    assert "password=Secret123" in parsed.conninfo_for("shop")
    with pytest.raises(job.CheckJobInvalid, match="PGRO_CHECK_HOST"):
        job.CheckJob.from_env({job.ENV_PASSWORD: "x"})
    with pytest.raises(job.CheckJobInvalid, match="unknown verification depth"):
        job.CheckJob.from_env({**env, job.ENV_DEPTH: "deepest"})


def test_the_job_reaches_the_restore_as_admin_without_joining_its_service() -> None:
    rep = replica("verify", namespace="ns")
    res = restore("verify-1", replica="verify", namespace="ns")
    config = OperatorConfig(max_concurrent_restores=2, restore_image="pgro:test")
    doc = workloads.data_check_job(rep, res, config, "standard")
    assert doc["metadata"]["name"] == "verify-1-data-check"
    # The Job wakes its restore; its pod must not be selected by the restore's Service.
    assert doc["metadata"]["labels"][LABEL_RESTORE] == "verify-1"
    pod = doc["spec"]["template"]
    assert LABEL_RESTORE not in pod["metadata"]["labels"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["pgro", "check-data"]
    assert container["image"] == "pgro:test"
    env = {e["name"]: e for e in container["env"]}
    assert env[job.ENV_HOST]["value"] == "verify-1"
    assert env[job.ENV_DEPTH]["value"] == "standard"
    assert env[job.ENV_PASSWORD]["valueFrom"]["secretKeyRef"] == {
        "name": admin_creds_secret_name("verify"),
        "key": "password",
    }
    assert "value" not in env[job.ENV_PASSWORD]
    assert doc["spec"]["backoffLimit"] == workloads.DATA_CHECK_BACKOFF_LIMIT
    assert "ttlSecondsAfterFinished" not in doc["spec"]
    assert json.dumps(doc)  # plain JSON, as the API server takes it
