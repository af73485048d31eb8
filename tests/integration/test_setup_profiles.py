"""`scripts/setup.sh demo` installs what pgro needs and nothing only the tests need.

The script runs for real from a copy of the repository's scripts whose `build-kube.sh` and
`install-postgres-major.sh` only record that they were called; everything else it checks
(Debian packages, kopia, the virtualenv stamp) is already in place on a machine that runs the
tests, so no network is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _copy(tmp: Path, stamp_extras: str) -> Path:
    root = tmp / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    for name in ("build-kube", "install-postgres-major"):
        stub = root / "scripts" / f"{name}.sh"
        stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp / (name + "-called")}\n')
        stub.chmod(0o755)
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(ROOT / ".venv" / "bin" / "python")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (root / ".venv" / ".pgro-installed").write_text(f"{digest}{stamp_extras}\n")
    return root


def _setup(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGRO_CACHE_DIR": str(Path.home() / ".cache" / "pgro")}
    return subprocess.run(
        ["bash", str(root / "scripts" / "setup.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_demo_profile_skips_the_kubernetes_control_plane(tmp_path: Path) -> None:
    root = _copy(tmp_path, " dev")
    done = _setup(root, "demo")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "build-kube-called").exists(), "demo built the control plane"
    assert not (tmp_path / "install-postgres-major-called").exists()
    # A venv installed with the development extras serves the demo as it is.
    assert "installing" not in done.stderr
    assert (root / ".venv" / ".pgro-installed").read_text().endswith(" dev\n")


def test_test_profile_builds_the_control_plane(tmp_path: Path) -> None:
    root = _copy(tmp_path, " dev")
    done = _setup(root, "test")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "build-kube-called").read_text().split() == ["--quiet"]
    called = (tmp_path / "install-postgres-major-called").read_text().splitlines()
    assert called == ["13", "14", "16", "17"]  # one call per major beside Debian's 15
    assert "installing" not in done.stderr


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path, " dev")
    done = _setup(root, "everything")
    assert done.returncode == 2
    assert "usage: scripts/setup.sh [demo|test]" in done.stderr
    assert not (tmp_path / "build-kube-called").exists()
