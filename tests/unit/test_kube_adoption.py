"""The mark that tells pgro's restore Deployments from the reference operator's, which a
first start adopts as they are when they serve (docs/migrating-from-the-reference.md)."""

from __future__ import annotations

from pgro.api.names import LABEL_REPLICA, LABEL_RESTORE
from pgro.runtimes.kubernetes import workloads as wl
from pgro.runtimes.kubernetes.config import OperatorConfig
from tests.fixtures.manifests import replica, restore


def test_pgro_deployments_carry_the_mark() -> None:
    config = OperatorConfig(max_concurrent_restores=1, restore_image="ghcr.io/x/pgro:1")
    built = wl.postgres_deployment(replica(), restore(), config, None, "15")
    assert wl.made_by_pgro(built)


def test_the_reference_shape_does_not() -> None:
    # The reference labels its Deployment with the replica and the restore only, and
    # applies it under the same field manager pgro uses.
    reference = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "r-20260101-000000",
            "labels": {LABEL_REPLICA: "r", LABEL_RESTORE: "r-20260101-000000"},
        },
    }
    assert not wl.made_by_pgro(reference)
    assert not wl.made_by_pgro({"metadata": {}})
    other = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "helm"}}}
    assert not wl.made_by_pgro(other)
