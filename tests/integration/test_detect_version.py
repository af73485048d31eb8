"""`pgro detect-version` on a volume `pgro restore-job` really filled (real kopia, the
fs_repo snapshots): what it re-creates is what the restore made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Repo


def _pgro(command: str, env: dict[str, str], log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgro.cli.main", command],
        env={"PATH": os.environ["PATH"], "PGRO_TERMINATION_LOG": str(log), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("kind", ["clean", "poisoned"])
def test_detect_version_recreates_what_the_restore_made(
    fs_repo: Repo, scratch: Path, kind: str
) -> None:
    volume = scratch / "pgdata-volume"
    volume.mkdir()
    restore_env = {
        "SNAPSHOT_ID": fs_repo.snapshots[kind],
        "KOPIA_FILESYSTEM_PATH": str(fs_repo.path),
        "KOPIA_PASSWORD": fs_repo.password,
        "PGRO_DATA_ROOT": str(volume),
        "PGRO_KOPIA_DIR": str(scratch / "kopia-cache"),
    }
    restored = _pgro("restore-job", restore_env, scratch / "restore-log")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    link, version_file = volume / "pgdata", volume / ".postgres-version"
    made = (os.readlink(link), version_file.read_bytes(), version_file.stat().st_mode)
    # What an evicted pod's volume may look like: the data, without what points at it.
    link.unlink()
    version_file.unlink()

    log = scratch / "detect-log"
    detected = _pgro("detect-version", {"PGRO_DATA_ROOT": str(volume)}, log)
    assert detected.returncode == 0, detected.stdout + detected.stderr
    assert log.read_text() == "15"
    assert (os.readlink(link), version_file.read_bytes(), version_file.stat().st_mode) == made

    # Run again with the link in place: it is read, not rewritten.
    before = os.lstat(link).st_ino
    again = _pgro("detect-version", {"PGRO_DATA_ROOT": str(volume)}, log)
    assert again.returncode == 0 and "found via pgdata-link" in again.stdout
    assert os.lstat(link).st_ino == before and log.read_text() == "15"
