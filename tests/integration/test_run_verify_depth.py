"""The verification of `pgro run`'s ephemeral replicas reads the data (issue 16).

The restore worker checks the data at the replica's depth during its first start
(`pipeline.data_checks`, the code `pgro verify` runs): damage fails the restore with
`DataDamaged` naming the relation, so the snapshot is never verified; the sound twin is;
the `pgro.bes.au/verify-depth: quick` annotation lets the damaged index through, as every
verification did before.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgro.api.names import ANNOTATION_VERIFY_DEPTH
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from tests.fixtures.damage import DAMAGED_BLOCK
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import StartRun
from tests.integration.test_verify_depth import build_damaged_repo


def _failed(entry: dict[str, Any]) -> dict[str, Any] | None:
    conds = entry["status"].get("conditions", [])
    found = [c for c in conds if c["type"] == "LastRestoreFailed" and c["status"] == "True"]
    return found[0] if found else None


def test_ephemeral_verification_fails_damaged_snapshots_naming_the_relation(
    scratch: Path,
    scratch_root: Path,
    account: RunAccount,
    binaries: PostgresBinaries,
    start_run: StartRun,
) -> None:
    # Short: the fixture servers' socket paths must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="rvd-", dir=scratch_root))
    os.chmod(base, 0o711)
    repo = build_damaged_repo(base, account, binaries)

    def verify_replica(name: str, host: str, **metadata: Any) -> dict[str, Any]:
        return replica_doc(
            name,
            ephemeral=True,
            schedule="* * * * *",
            scheduleJitter="0s",
            snapshotFilter={"hostPattern": host},
            metadata=metadata or None,
        )

    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc(
            "kopia", {"filesystemPath": str(repo.path), "repositoryPassword": repo.password}
        ),
        verify_replica("heap", "db-heap"),
        verify_replica("leaf", "db-leaf"),
        verify_replica("sound", "db-sound"),
        verify_replica("leaf-quick", "db-leaf", annotations={ANNOTATION_VERIFY_DEPTH: "quick"}),
    )
    run = start_run(manifest, "--max-concurrent-restores", "4")

    def failed(name: str) -> Callable[[], bool]:
        return lambda: _failed(run.replica(name)) is not None

    def verified(name: str) -> Callable[[], bool]:
        return lambda: bool(run.replica(name)["status"].get("verifiedSnapshotId"))

    for name in ("heap", "leaf"):
        run.wait_for(f"{name}'s failed verification", failed(name), timeout=240)
    for name in ("sound", "leaf-quick"):
        run.wait_for(f"{name}'s verification", verified(name), timeout=240)

    heap = run.replica("heap")
    message = _failed(heap)["message"]  # type: ignore[index]
    assert "DataDamaged" in message, message
    assert "shop.public.orders file " in message and f"block {DAMAGED_BLOCK}" in message, message
    assert "checksum mismatch" in message
    assert not heap["status"].get("verifiedSnapshotId")
    # The restore's status names the damage, finding by finding (what canopy reports get).
    recorded = [
        r["status"]["dataChecks"] for r in heap["restores"] if r["status"].get("dataChecks")
    ]
    assert recorded and recorded[0]["verdict"] == "damaged" and recorded[0]["depth"] == "standard"
    [checksums] = [c for c in recorded[0]["checks"] if c["name"] == "checksums"]
    assert checksums["status"] == "fail" and checksums["count"] >= 1
    assert {(f.get("relation"), f.get("block")) for f in checksums["findings"]} >= {
        ("public.orders", DAMAGED_BLOCK)
    }

    leaf = run.replica("leaf")
    message = _failed(leaf)["message"]  # type: ignore[index]
    assert "DataDamaged" in message and "btree" in message, message
    assert "shop.public.orders_pkey (of public.orders)" in message, message
    assert not leaf["status"].get("verifiedSnapshotId")
    events = [e["note"] for e in leaf["events"] if e["reason"] == "RestoreFailed"]
    assert any("orders_pkey" in e for e in events), leaf["events"]

    assert run.replica("sound")["status"]["verifiedSnapshotId"] == repo.snapshots["db-sound"]
    quick = run.replica("leaf-quick")
    assert quick["status"]["verifiedSnapshotId"] == repo.snapshots["db-leaf"]
    assert _failed(quick) is None
    assert run.stop() == 0
