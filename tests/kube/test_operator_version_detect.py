"""The operator's version-detect fallback (features.md §2.11) on the fake node.

The fake node drops the restore Job's termination message (as an evicted pod loses it), so
the operator learns no PostgreSQL version from the restore. It must run the
`<restore>-version-detect` Job (`pgro detect-version` on the data volume), take the version
from that Job's message, and carry the restore on to Active behind the stable Service.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgro.api.names import LABEL_JOB_TYPE
from pgro.api.secret import KopiaCredentials
from pgro.kube.client import KubeApi
from tests.kube.node import FakeNode
from tests.kube.operator_proc import (
    OperatorProcess,
    wait_for,
)
from tests.kube.test_operator import (
    _active,
    _diagnostics,
    _pod_ip,
    _replica,
    _s3_secret,
    _secret_value,
)

pytestmark = pytest.mark.timeout(900)


def test_a_lost_restore_message_is_recovered_by_the_version_detect_job(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    s3_repo: tuple[KopiaCredentials, str],
) -> None:
    ns = kube_namespace
    fake_node.lose_termination_messages(ns, "restore")
    creds, _ = s3_repo
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(_replica(ns, "orders", "kopia"))

    # The detect Job is left to its TTL: keep its last state while it exists.
    detect_jobs: dict[str, dict[str, Any]] = {}

    def active() -> Any:
        for job in admin.list("Job", namespace=ns, labels={LABEL_JOB_TYPE: "version-detect"}).items:
            detect_jobs[job["metadata"]["name"]] = job
        return _active(admin, ns, "orders")

    replica = wait_for(
        "the restore to become Active without the restore Job's message",
        active,
        300,
        context=lambda: _diagnostics(operator, fake_node),
    )
    restore_name = replica["status"]["currentRestore"]

    # The restore Job's message really was lost, and the detect Job read the volume.
    assert [
        (pod.startswith(f"{restore_name}-restore-"), container)
        for namespace, pod, container in fake_node.lost_messages
        if namespace == ns
    ] == [(True, "restore")]
    detect_name = f"{restore_name}-version-detect"
    assert list(detect_jobs) == [detect_name]
    job = detect_jobs[detect_name]
    assert job["metadata"]["labels"][LABEL_JOB_TYPE] == "version-detect"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] == 120
    assert job["status"].get("succeeded") == 1
    [pod] = [n for space, n, _ in fake_node.pods() if space == ns and n.startswith(detect_name)]
    assert "done: PostgreSQL 15 (PGDATA postgres/15/main, found via pgdata-link)" in (
        fake_node.logs(pod, ns)
    )

    restore = admin.get("PostgresPhysicalRestore", ns, restore_name)
    assert restore is not None
    assert restore["status"]["postgresVersion"] == "15"
    assert not [c for c in restore["status"].get("conditions") or [] if c["type"] == "Failed"]
    volume = fake_node.pvc_path(ns, f"{restore_name}-data")
    assert (volume / ".postgres-version").read_text() == "15\n"

    # And it serves: the analytics user reads the restored rows.
    password = _secret_value(admin, ns, "orders-creds", "password")
    with psycopg.connect(
        host=_pod_ip(admin, ns, restore_name),
        port=5432,
        user="analytics",
        password=password,
        dbname="myapp",
        connect_timeout=5,
    ) as conn:
        rows = conn.execute("SELECT count(*) FROM public.test_data").fetchone()
        assert rows is not None and rows[0] > 0
