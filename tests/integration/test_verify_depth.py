"""`pgro verify --depth` end to end (issue 16): the real CLI, real kopia, real PostgreSQL.

One repository (built once for the module) holds the damaged fixtures of
tests/fixtures/damage.py and their sound twin, each under its own host:
- `db-heap`: a heap page of `orders` overwritten, data checksums on;
- `db-leaf`: a leaf page of `orders_pkey` replaced by an earlier leaf, checksums off;
- `db-sound`: the same cluster, undamaged, checksums on.
The default depth fails both damaged ones naming `orders` / `orders_pkey`, `--depth quick`
passes them (what every verification did before: the depth is what catches them), and the
sound twin passes every depth.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pgro.api.names import ANNOTATION_VERIFY_DEPTH
from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from tests.conftest import REPO_PASSWORD, Repo
from tests.fixtures.damage import (
    DAMAGED_BLOCK,
    orders_cluster,
    overwrite_heap_page,
    replace_btree_leaf,
)
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.integration.test_verify_cli import PGRO, run_verify


def _dir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    os.chmod(path, 0o711)
    return path


def build_damaged_repo(base: Path, account: RunAccount, binaries: PostgresBinaries) -> Repo:
    """A repository (under `base`) with a snapshot of each cluster: hosts `db-heap`,
    `db-leaf` and `db-sound` (also used by test_run_verify_depth)."""
    repo = Repo(path=base / "repository", password=REPO_PASSWORD)
    kopia = KopiaRepository(repo.credentials, base / "kopia-state")
    kopia.create()
    try:
        for host, checksums, damage in (
            ("db-heap", True, overwrite_heap_page),
            ("db-leaf", False, replace_btree_leaf),
            ("db-sound", True, None),
        ):
            work = _dir(base, host)
            cluster = orders_cluster(work / "data", binaries, account, work, checksums=checksums)
            if damage is not None:
                damage(cluster)
            repo.snapshots[host] = kopia.snapshot_create(
                work / "data",
                tags={"kind": host},
                override_source=f"postgres@{host}:/var/lib/postgresql",
            )
    finally:
        kopia.close()
    return repo


@pytest.fixture(scope="module")
def damaged_repo(scratch_root: Path, account: RunAccount, binaries: PostgresBinaries) -> Repo:
    return build_damaged_repo(_dir(scratch_root, "verify-depth"), account, binaries)


def _manifest(
    scratch: Path, repo: Repo, host: str, annotations: dict[str, str] | None = None
) -> Path:
    return write_manifest(
        scratch / "m.yaml",
        secret_doc(
            "kopia", {"filesystemPath": str(repo.path), "repositoryPassword": repo.password}
        ),
        replica_doc(
            "verify-me",
            metadata={"annotations": annotations} if annotations else None,
            snapshotFilter={"hostPattern": host},
        ),
    )


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["health_details"]["checks"]}


def test_heap_page_overwritten_fails_the_default_depth_naming_orders_and_the_block(
    damaged_repo: Repo, scratch: Path
) -> None:
    code, report, stderr = run_verify(_manifest(scratch, damaged_repo, "db-heap"), scratch / "w")
    assert code == 1, json.dumps(report, indent=1) + stderr
    assert report["replica_healthy"] is False and report["outcome"] == "failure"
    assert report["reason"] == "DataDamaged"
    assert report["verify_depth"] == "standard"
    checksums = _checks(report)["checksums"]
    assert checksums["status"] == "fail" and checksums["count"] == 1, checksums
    [finding] = checksums["findings"]
    assert (finding["database"], finding["relation"], finding["block"]) == (
        "shop",
        "public.orders",
        DAMAGED_BLOCK,
    )
    assert "checksum mismatch" in finding["message"]
    assert f"shop.public.orders file {finding['file']} block {DAMAGED_BLOCK}" in report["error"]
    # The indexes are sound: only the checksums fail.
    assert _checks(report)["btree"]["status"] == "pass"


def test_btree_leaf_replaced_fails_the_default_depth_naming_the_index_and_orders(
    damaged_repo: Repo, scratch: Path
) -> None:
    code, report, stderr = run_verify(_manifest(scratch, damaged_repo, "db-leaf"), scratch / "w")
    assert code == 1, json.dumps(report, indent=1) + stderr
    assert report["replica_healthy"] is False and report["reason"] == "DataDamaged"
    checks = _checks(report)
    # Initialised without checksums: not checked, which is no failure.
    assert checks["checksums"]["status"] == "not_checked", checks["checksums"]
    assert "no data checksums" in checks["checksums"]["detail"]
    btree = checks["btree"]
    assert btree["status"] == "fail" and btree["count"] == 1, btree
    assert [(f["database"], f["relation"], f["table"]) for f in btree["findings"]] == [
        ("shop", "public.orders_pkey", "public.orders")
    ]
    assert "shop.public.orders_pkey (of public.orders)" in report["error"]


@pytest.mark.parametrize("host", ["db-heap", "db-leaf"])
def test_quick_depth_passes_the_damaged_snapshots(
    host: str, damaged_repo: Repo, scratch: Path
) -> None:
    """What every verification did before issue 16: the damage goes unseen at quick."""
    code, report, stderr = run_verify(
        _manifest(scratch, damaged_repo, host), scratch / "w", "--depth", "quick"
    )
    assert code == 0, json.dumps(report, indent=1) + stderr
    assert report["replica_healthy"] is True and report["verify_depth"] == "quick"
    assert not {"checksums", "btree", "heap", "full_read"} & set(_checks(report))


@pytest.mark.parametrize("depth", ["quick", "standard", "full"])
def test_the_sound_twin_passes_every_depth(depth: str, damaged_repo: Repo, scratch: Path) -> None:
    code, report, stderr = run_verify(
        _manifest(scratch, damaged_repo, "db-sound"), scratch / "w", "--depth", depth
    )
    assert code == 0, json.dumps(report, indent=1) + stderr
    assert report["replica_healthy"] is True and report["verify_depth"] == depth
    checks = _checks(report)
    assert all(c["status"] in ("pass", "not_checked") for c in checks.values()), checks
    expected = {
        "quick": set(),
        "standard": {"checksums", "btree"},
        "full": {"checksums", "btree", "heap", "full_read"},
    }[depth]
    assert {n for n, c in checks.items() if c["status"] == "pass"} >= expected, checks
    if depth != "quick":
        assert "blocks checked, no damage found" in checks["checksums"]["detail"]


def test_the_human_report_shows_the_damage(damaged_repo: Repo, scratch: Path) -> None:
    work = _dir(scratch, "w")
    manifest = _manifest(scratch, damaged_repo, "db-leaf")
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--work-dir", str(work), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAILED" in out and "DataDamaged" in out
    assert "damage found by btree (1 in all" in out, out
    assert "public.orders_pkey (of public.orders)" in out
    assert "not checked" in out  # the checksums of a cluster without them


def test_a_budget_that_runs_out_is_incomplete_and_exits_2(
    damaged_repo: Repo, scratch: Path
) -> None:
    code, report, stderr = run_verify(
        _manifest(scratch, damaged_repo, "db-sound"),
        scratch / "w",
        "--depth",
        "full",
        "--verify-budget",
        "0s",
    )
    assert code == 2, json.dumps(report, indent=1) + stderr
    assert report["reason"] == "VerificationIncomplete" and report["replica_healthy"] is False
    assert "did not finish within the time budget" in report["error"]
    assert _checks(report)["integrity_complete"]["status"] == "incomplete"


def test_the_annotation_sets_the_depth_and_an_invalid_one_warns(
    damaged_repo: Repo, scratch: Path
) -> None:
    quick = _manifest(scratch, damaged_repo, "db-leaf", {ANNOTATION_VERIFY_DEPTH: "quick"})
    code, report, stderr = run_verify(quick, scratch / "w")
    assert code == 0 and report["verify_depth"] == "quick", stderr
    bad = _manifest(scratch, damaged_repo, "db-leaf", {ANNOTATION_VERIFY_DEPTH: "deepest"})
    code, report, stderr = run_verify(bad, scratch / "w")
    assert code == 1 and report["verify_depth"] == "standard", stderr
    assert f"annotation {ANNOTATION_VERIFY_DEPTH}" in stderr and "'deepest'" in stderr
    # The flag beats the annotation.
    code, report, stderr = run_verify(quick, scratch / "w", "--depth", "standard")
    assert code == 1 and report["reason"] == "DataDamaged", stderr
