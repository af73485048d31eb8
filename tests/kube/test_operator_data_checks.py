"""The data checks through the operator (issue 16) on the fake node: verify replicas of the
damaged fixtures of tests/fixtures/damage.py, in an S3 repository of their own.

- `db-heap` (a heap page of `orders` overwritten, data checksums on): the postgres pod's
  setup runs pg_checksums once the cluster is shut down cleanly, the `<restore>-data-check`
  Job reads that back through the server and names `public.orders` and the block;
- `db-leaf` (a leaf of `orders_pkey` out of place, checksums off): the Job's amcheck names
  `orders_pkey`.

Both restores fail `DataDamaged` before they are verified: the replica never records the
snapshot as verified, and the restore's `status.dataChecks` carries the findings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from pgro.api.names import LABEL_REPLICA
from pgro.api.secret import KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.kube.client import KubeApi
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from tests.conftest import s3_credentials
from tests.fixtures.damage import (
    DAMAGED_BLOCK,
    orders_cluster,
    overwrite_heap_page,
    replace_btree_leaf,
)
from tests.kube.node import FakeNode
from tests.kube.operator_proc import OperatorProcess, wait_for
from tests.kube.test_operator import _diagnostics, _replica, _s3_secret

pytestmark = pytest.mark.timeout(900)

BUCKET = "pgro-damage-bucket"


@pytest.fixture(scope="module")
def damaged_s3(
    moto_s3: str, scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> KopiaCredentials:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=f"http://{moto_s3}",
        region_name="us-east-1",
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
    ).create_bucket(Bucket=BUCKET)
    creds = s3_credentials(moto_s3, BUCKET)
    base = scratch_root / "kube-damage"
    base.mkdir()
    os.chmod(base, 0o711)
    kopia = KopiaRepository(creds, base / "kopia-state")
    kopia.create()
    try:
        for host, checksums, damage in (
            ("db-heap", True, overwrite_heap_page),
            ("db-leaf", False, replace_btree_leaf),
        ):
            work = base / host
            work.mkdir()
            os.chmod(work, 0o711)
            cluster = orders_cluster(work / "data", binaries, account, work, checksums=checksums)
            damage(cluster)
            kopia.snapshot_create(
                work / "data",
                tags={"kind": host},
                override_source=f"postgres@{host}:/var/lib/postgresql",
            )
    finally:
        kopia.close()
    return creds


def _failed_restore(admin: KubeApi, ns: str, replica: str) -> dict[str, Any] | None:
    restores = admin.list(
        "PostgresPhysicalRestore", namespace=ns, labels={LABEL_REPLICA: replica}
    ).items
    return next((r for r in restores if (r.get("status") or {}).get("phase") == "Failed"), None)


def test_damaged_snapshots_fail_their_verification_naming_orders(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    damaged_s3: KopiaCredentials,
) -> None:
    ns = kube_namespace
    admin.create(_s3_secret(ns, "kopia", damaged_s3))
    for name, host in (("heap", "db-heap"), ("leaf", "db-leaf")):
        admin.create(
            _replica(ns, name, "kopia", ephemeral=True, snapshotFilter={"hostPattern": host})
        )
    failed: dict[str, dict[str, Any]] = {}

    def both_failed() -> bool:
        for name in ("heap", "leaf"):
            if name not in failed and (restore := _failed_restore(admin, ns, name)):
                failed[name] = restore
        return len(failed) == 2

    wait_for(
        "both damaged verifications to fail",
        both_failed,
        420,
        context=lambda: _diagnostics(operator, fake_node),
    )

    heap = failed["heap"]["status"]
    checks = heap["dataChecks"]
    assert (checks["depth"], checks["verdict"]) == ("standard", "damaged")
    [checksums] = [c for c in checks["checks"] if c["name"] == "checksums"]
    assert checksums["status"] == "fail" and checksums["count"] >= 1
    assert ("public.orders", DAMAGED_BLOCK) in {
        (f.get("relation"), f.get("block")) for f in checksums["findings"]
    }
    [condition] = [c for c in heap["conditions"] if c["type"] == "Failed"]
    assert condition["message"].startswith("DataDamaged"), condition
    assert "shop.public.orders" in condition["message"]

    leaf = failed["leaf"]["status"]
    checks = leaf["dataChecks"]
    assert checks["verdict"] == "damaged"
    [btree] = [c for c in checks["checks"] if c["name"] == "btree"]
    assert btree["status"] == "fail"
    assert any(f.get("relation") == "public.orders_pkey" for f in btree["findings"])
    # Checksums off: not a failure, and said so.
    [off] = [c for c in checks["checks"] if c["name"] == "checksums"]
    assert off["status"] == "not_checked"

    for name in ("heap", "leaf"):
        replica = admin.get("PostgresPhysicalReplica", ns, name) or {}
        assert not replica.get("status", {}).get("verifiedSnapshotId"), name
        restore = failed[name]["metadata"]["name"]
        assert admin.get("Job", ns, f"{restore}-data-check") is not None
    # A failed restore is never re-checked: one data-check Job per restore.
    time.sleep(5)
    jobs = [
        j["metadata"]["name"]
        for j in admin.list("Job", namespace=ns).items
        if j["metadata"]["name"].endswith("-data-check")
    ]
    assert len(jobs) == len(set(jobs)) >= 2
