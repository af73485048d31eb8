"""The restore job description, its outcome and the failure classification
(`pgro.pipeline.job`): the wire formats both runtimes and the operator read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pgro.api.secret import FilesystemLocation, KopiaCredentials, S3Location, SecretInvalid
from pgro.canopy.sigv4 import SigningCredentials
from pgro.core.observations import RestoreWork, WorkState
from pgro.kopia.errors import EndpointUnreachable, KopiaError, WrongPassword
from pgro.pipeline import worker as restore_worker
from pgro.pipeline.job import (
    CanopyProxy,
    InvalidJob,
    RestoreJob,
    RestoreOutcome,
    classify,
)
from pgro.pipeline.restore_job import parse_fixes, parse_message
from pgro.postgres.layout import NotPostgres, UnsafeSnapshot
from pgro.postgres.server import StartupFailed

S3 = KopiaCredentials(
    location=S3Location(bucket="b", region="eu-west-1", prefix="p/"),
    repository_password="repo-pw-1",
    access_key_id="AKID",
    secret_access_key="s3-secret-2",
)
FS = KopiaCredentials(location=FilesystemLocation("/srv/repo"), repository_password="pw")


BASE = RestoreJob(
    snapshot_id="k0123",
    credentials=S3,
    target=Path("/pgdata/postgres"),
    kopia_dir=Path("/tmp/kopia/restore"),
    snapshot_size=4096,
    snapshot_time="2026-01-01T00:00:00Z",
    read_only=True,
    parallel=2,
    extra_config="work_mem = '64MB'\n",
)


def job(**changes: Any) -> RestoreJob:
    return replace(BASE, **changes)


@pytest.mark.parametrize(
    "original",
    [
        job(),
        job(credentials=FS, read_only=False, parallel=None, extra_config=""),
        job(proxy=CanopyProxy(Path("/var/run/pgro/proxy-port"), "::1")),
    ],
)
def test_the_job_environment_round_trips(original: RestoreJob) -> None:
    assert RestoreJob.from_env(original.to_env()) == original


def test_the_worker_json_round_trips_through_text() -> None:
    launch = {"brokerUrl": "http://127.0.0.1:9", "group": "g", "brokerToken": "tok-3"}
    original = job(
        target=Path("/run/restores/ns/r/data"),
        kopia_dir=Path("/run/restores/ns/r/kopia"),
        proxy=CanopyProxy(Path("/run/restores/ns/r/proxy-port"), launch=launch),
    )
    assert RestoreJob.from_json(json.loads(json.dumps(original.to_json()))) == original
    # The broker token is a secret of the job, like the credentials.
    assert set(original.secret_values()) == {"repo-pw-1", "AKID", "s3-secret-2", "tok-3"}


def test_the_worker_reads_what_pgro_run_writes() -> None:
    """The JSON runtimes/embedded/runtime.py sends (no parallel or extra config)."""
    doc = {
        "restoreDir": "/r",
        "snapshot": "k1",
        "snapshotSize": "2Ki",
        "snapshotTime": None,
        "readOnly": False,
        "credentials": restore_worker.credentials_to_json(FS),
        "canopyProxy": None,
    }
    parsed = RestoreJob.from_json(doc)
    assert (parsed.target, parsed.kopia_dir, parsed.snapshot.size_bytes) == (
        Path("/r/data"),
        Path("/r/kopia"),
        2048,
    )
    assert parsed.credentials == FS and parsed.proxy is None


def test_a_canopy_job_ignores_the_secrets_endpoint() -> None:
    env = {**job().to_env(), "KOPIA_ENDPOINT": "s3.example.org", "KOPIA_DISABLE_TLS": "true"}
    env["PGRO_CANOPY_PROXY_PORT_FILE"] = "/var/run/pgro/proxy-port"
    loc = RestoreJob.from_env(env).credentials.location
    assert isinstance(loc, S3Location) and loc.endpoint is None and not loc.disable_tls


def test_a_job_without_snapshot_or_key_is_refused_with_the_reason() -> None:
    env = job().to_env()
    with pytest.raises(InvalidJob, match="SNAPSHOT_ID is not set"):
        RestoreJob.from_env({**env, "SNAPSHOT_ID": ""})
    with pytest.raises(SecretInvalid, match="missing key: region"):
        RestoreJob.from_env({k: v for k, v in env.items() if k != "KOPIA_REGION"})


def test_settings_add_read_only_and_the_extra_config() -> None:
    settings = job(extra_config="# a comment\nwork_mem = '64MB'\nnot a setting\n").settings()
    assert settings["default_transaction_read_only"] == "on"
    assert settings["work_mem"] == "64MB"
    assert "default_transaction_read_only" not in job(read_only=False).settings()
    # The extra config cannot undo what pgro sets: read-only stays on, locales stay C.
    forced = job(extra_config="default_transaction_read_only = off\nlc_messages = 'de_DE'\n")
    assert forced.settings()["default_transaction_read_only"] == "on"
    assert forced.settings()["lc_messages"] == "C"


def test_the_proxy_route_brackets_ipv6_and_signs_with_the_client_keys() -> None:
    routed = CanopyProxy(Path("/p"), "::1").route(S3, 41234, SigningCredentials("PGROK", "sk"))
    assert routed.location == S3Location(
        bucket="b", region="eu-west-1", endpoint="[::1]:41234", disable_tls=True, prefix="p/"
    )
    assert (routed.access_key_id, routed.secret_access_key) == ("PGROK", "sk")
    assert routed.repository_password == "repo-pw-1"


# -- the outcome: termination message and result file --------------------------------------


def test_a_success_message_is_the_major_then_the_fixes() -> None:
    outcome = RestoreOutcome(ok=True, postgres_version="15", fixes={"removed_stale_pid": True})
    assert outcome.message == '15\n{"fixes": {"removed_stale_pid": true}}'
    assert (outcome.exit_code, parse_message(outcome.message)) == (0, ("15", ""))
    assert parse_fixes(outcome.message) == {"removed_stale_pid": True}
    assert RestoreOutcome.from_message(outcome.message) == outcome
    assert RestoreOutcome.from_message(outcome.message).work("r-restore") == RestoreWork(
        WorkState.SUCCEEDED, "r-restore", "15", fixes={"removed_stale_pid": True}
    )


def test_failure_and_foreign_messages_parse_as_before() -> None:
    assert parse_message("error: WrongPassword: the password is wrong") == (
        None,
        "WrongPassword: the password is wrong",
    )
    assert parse_message("14.2\n") == ("14.2", "")  # the reference's message: no fixes line
    assert parse_fixes("14.2\n") is None
    assert parse_fixes('15\n{"fixes": {"a": true, "b": "yes"}}') == {"a": True}
    assert parse_message("Killed") == (None, "Killed")
    assert parse_fixes("error: X: y") is None


def test_the_result_file_round_trips_and_reads_what_the_runtime_writes(tmp_path: Path) -> None:
    done = RestoreOutcome(True, "16", "/r/data/16/main", fixes={"a": False}, notes=["n"])
    assert RestoreOutcome.from_json(done.to_json()) == done
    # runtimes/embedded/runtime.py writes a refusal itself, from the dataclass's __dict__.
    refused = restore_worker.WorkResult(ok=False, reason="InsufficientDisk", error="no room")
    (tmp_path / restore_worker.RESULT).write_text(json.dumps(refused.__dict__))
    assert restore_worker.read_result(tmp_path) == refused
    assert refused.work() == RestoreWork(WorkState.FAILED, reason="InsufficientDisk: no room")
    assert restore_worker.read_result(tmp_path / "missing") is None


# -- one classification -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason", "exit_code"),
    [
        (WrongPassword("the password is wrong"), "WrongPassword", 2),
        (NotPostgres("no PG_VERSION"), "NotPostgres", 2),
        (UnsafeSnapshot("a link leaves the tree"), "UnsafeSnapshot", 2),
        (SecretInvalid("missing key: region"), "SecretInvalid", 2),
        (EndpointUnreachable("cannot open"), "EndpointUnreachable", 1),
        (KopiaError("kopia said: no S3 credentials: 502"), "CanopyCredentialsUnavailable", 1),
        (OSError("disk on fire"), "UnexpectedError", 1),
        # Another library's `reason` is not a pgro reason.
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "UnexpectedError", 1),
    ],
)
def test_each_failure_has_one_reason_and_retry_verdict(
    exc: Exception, reason: str, exit_code: int
) -> None:
    outcome = RestoreOutcome.failed(exc)
    assert (outcome.reason, outcome.exit_code) == (reason, exit_code)
    assert parse_message(outcome.message)[1].startswith(f"{reason}: ")


def test_classification_scrubs_secrets_and_explains_the_unexpected() -> None:
    reason, message = classify(RuntimeError("boom near repo-pw-1"), S3.secret_values())
    assert reason == "UnexpectedError"
    assert message.startswith("RuntimeError: boom near *** (this is a pgro bug")
    startup = StartupFailed("postgres exited with code 1", log_tail="FATAL: bad setting")
    assert classify(startup) == (
        "StartupFailed",
        "postgres exited with code 1. Server log:\nFATAL: bad setting",
    )
