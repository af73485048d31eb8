"""`pgro restore-job`, the restore Job's entry point, against real kopia repositories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pgro.api.secret import KopiaCredentials, S3Location
from pgro.pipeline.restore_job import parse_fixes, parse_message
from pgro.postgres.layout import locate_data_directory
from tests.conftest import Repo


def _run(env: dict[str, str], root: Path) -> tuple[int, str, str]:
    log = root / "termination-log"
    full = {
        "PATH": os.environ["PATH"],
        "PGRO_DATA_ROOT": str(root / "pgdata-volume"),
        "PGRO_KOPIA_DIR": str(root / "kopia-cache"),
        "PGRO_TERMINATION_LOG": str(log),
        **env,
    }
    (root / "pgdata-volume").mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pgro.cli.main", "restore-job"],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = log.read_text() if log.exists() else ""
    return proc.returncode, message, proc.stdout + proc.stderr


def _fs_env(repo: Repo, snapshot: str, password: str | None = None) -> dict[str, str]:
    return {
        "SNAPSHOT_ID": snapshot,
        "KOPIA_FILESYSTEM_PATH": str(repo.path),
        "KOPIA_PASSWORD": password or repo.password,
    }


def test_restores_locates_and_reports_the_major_version(fs_repo: Repo, scratch: Path) -> None:
    code, message, output = _run(
        {**_fs_env(fs_repo, fs_repo.snapshots["poisoned"]), "PGRO_READ_ONLY": "true"}, scratch
    )
    assert code == 0, output
    # The reference's message (the major version) first; pgro's repairs on a second line.
    assert message.splitlines()[0] == "15"
    assert parse_message(message) == ("15", "")
    fixes = parse_fixes(message)
    assert fixes is not None and fixes["removed_stale_pid"] is True  # the poisoned cluster
    root = scratch / "pgdata-volume"
    link = root / "pgdata"
    # Relative, so the same path works wherever the volume is mounted.
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert os.readlink(link) == "postgres/15/main"
    assert (link / "PG_VERSION").read_text().strip() == "15"
    assert (root / ".postgres-version").read_text() == "15\n"
    assert not (link / "postmaster.pid").exists()
    assert not (link / "standby.signal").exists()
    hba = (link / "pg_hba.conf").read_text()
    assert "0.0.0.0/0" in hba and "scram-sha-256" in hba
    conf = (link / "postgresql.conf").read_text()
    assert "default_transaction_read_only = on" in conf
    # pg_stat_statements ships with the official image; timescaledb does not.
    preload = [ln for ln in conf.splitlines() if ln.startswith("shared_preload_libraries")]
    assert preload and "pg_stat_statements" in preload[-1] and "timescaledb" not in preload[-1]
    assert "restored" in output and "done: PostgreSQL 15" in output


def test_a_retried_pod_starts_over(fs_repo: Repo, scratch: Path) -> None:
    env = _fs_env(fs_repo, fs_repo.snapshots["clean"])
    assert _run(env, scratch)[0] == 0
    (scratch / "pgdata-volume" / "postgres" / "leftover").write_text("from a dead attempt")
    code, message, output = _run(env, scratch)
    assert code == 0, output
    assert not (scratch / "pgdata-volume" / "postgres" / "leftover").exists()
    assert (
        locate_data_directory(scratch / "pgdata-volume" / "postgres").major
        == (parse_message(message)[0])
    )


def test_not_postgres_is_a_permanent_failure(fs_repo: Repo, scratch: Path) -> None:
    code, message, _ = _run(_fs_env(fs_repo, fs_repo.snapshots["notpg"]), scratch)
    assert code == 2
    version, reason = parse_message(message)
    assert version is None and reason.startswith("NotPostgres: ")


def test_wrong_password_is_permanent_and_secret_free(fs_repo: Repo, scratch: Path) -> None:
    wrong = "not-the-password-4711"
    code, message, output = _run(_fs_env(fs_repo, fs_repo.snapshots["clean"], wrong), scratch)
    assert code == 2
    assert parse_message(message)[1].startswith("WrongPassword: ")
    assert wrong not in message and wrong not in output


def test_missing_credentials_name_the_key(scratch: Path) -> None:
    code, message, _ = _run({"SNAPSHOT_ID": "k0123456789abcdef", "KOPIA_BUCKET": "b"}, scratch)
    assert code == 2
    assert message == "error: SecretInvalid: missing key: region"


def test_s3_repository_via_the_reference_environment(
    s3_repo: tuple[KopiaCredentials, str], scratch: Path
) -> None:
    creds, snapshot = s3_repo
    loc = creds.location
    assert isinstance(loc, S3Location)
    assert creds.access_key_id and creds.secret_access_key
    env = {
        "SNAPSHOT_ID": snapshot,
        "KOPIA_BUCKET": loc.bucket,
        "KOPIA_REGION": loc.region,
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
        "KOPIA_PASSWORD": creds.repository_password,
        "KOPIA_ENDPOINT": loc.endpoint or "",
        "KOPIA_DISABLE_TLS": "true",
    }
    code, message, output = _run(env, scratch)
    assert code == 0, output
    assert parse_message(message) == ("15", "")


def test_unreachable_endpoint_is_worth_a_retry(fs_repo: Repo, scratch: Path) -> None:
    from pgro.postgres.server import free_port

    env = {
        "SNAPSHOT_ID": fs_repo.snapshots["clean"],
        "KOPIA_BUCKET": "pgro-unreachable",
        "KOPIA_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret-key-1234",
        "KOPIA_PASSWORD": "pw-5678-abcdef",
        "KOPIA_ENDPOINT": f"127.0.0.1:{free_port()}",
        "KOPIA_DISABLE_TLS": "true",
    }
    code, message, output = _run(env, scratch)
    assert code == 1, output
    assert "very-secret-key-1234" not in message + output
    assert "pw-5678-abcdef" not in message + output


def test_kopia_state_is_removed_after_the_job(fs_repo: Repo, scratch: Path) -> None:
    assert _run(_fs_env(fs_repo, fs_repo.snapshots["clean"]), scratch)[0] == 0
    assert not (scratch / "kopia-cache" / "restore").exists()
