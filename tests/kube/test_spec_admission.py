"""What the reference's CRD admitted, pgro's admits too (issue 17): byte sizes written as the
reference allowed (`100GB`, `"64 Gi"`), the side revision's `eventPublisher` and the removed
`overlayDatabase` are stored as written, none pruned. pgro reports what it cannot use as the
replica's `SpecValid` condition (tests/unit/test_core_spec_validity.py)."""

from __future__ import annotations

from typing import Any

import pytest
from lightkube import ApiError

from pgro.kube.client import KubeApi
from tests.fixtures.manifests import replica_doc

REFERENCE_SHAPED: dict[str, Any] = {
    "storageSizeOverride": "100GB",
    "resourcesMaximum": "64 Gi",
    "shmSizeFloor": "1GiB",
    "storageSizeMaximum": "4TB",
    "eventPublisher": {
        "url": "https://meta.tamanu.app/api/events",
        "clientCertificateSecretRef": {"name": "pgro-canopy-client", "namespace": "pgro"},
        "source": "pgro",
    },
    "overlayDatabase": {
        "strategy": "fdw",
        "schemas": ["reporting"],
        "postgresVersion": 17,
        "storage": {"size": "5Gi", "storageClass": "gp3"},
    },
}


def test_reference_shaped_values_are_admitted_and_kept(admin: KubeApi, kube_namespace: str) -> None:
    doc = replica_doc("reference-shaped", namespace=kube_namespace, **REFERENCE_SHAPED)
    admin.create(doc)
    stored = admin.get("PostgresPhysicalReplica", kube_namespace, "reference-shaped")
    assert stored is not None
    spec = stored["spec"]
    assert {k: spec.get(k) for k in REFERENCE_SHAPED} == REFERENCE_SHAPED
    # The server's defaulting applies to what the manifest left out, as before.
    assert spec["eventPublisher"]["source"] == "pgro"
    assert spec["scheduleJitter"] == "10m"


def test_a_quantity_of_the_wrong_json_type_is_still_refused(
    admin: KubeApi, kube_namespace: str
) -> None:
    doc = replica_doc("wrong-type", namespace=kube_namespace, storageSizeOverride={"size": "100Gi"})
    with pytest.raises(ApiError) as refused:
        admin.create(doc)
    assert refused.value.status.code == 422
    assert "storageSizeOverride" in str(refused.value.status.message)
