"""A reference-shaped manifest set applies unchanged to pgro's CRDs (issue 17, "Done when").

Every spec field of the reference's CRDs, as the union of its revisions: the mainline's
newest (`src/types/replica.rs`, `src/types/restore.rs`, `src/types.rs` of
beyondessential/postgres-restore-operator: canopy source, redaction, migrateTo, builderImage,
persistent schemas and users, structured extra users, the resource floor and maximum, shm
floor, ready timeout) and its side revisions (`eventPublisher`; the overlay revision's
`overlayDatabase` with every one of its fields). Each is stored as written: nothing pruned,
nothing refused. The status the reference wrote (every mainline status field of both kinds)
is kept too, so a replica and a restore carried over from a reference install read back as
the reference left them until pgro reconciles them.
"""

from __future__ import annotations

from typing import Any

from pgro.kube.client import KubeApi

API = "pgro.bes.au/v1alpha1"

AFFINITY: dict[str, Any] = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]}
            ]
        }
    },
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 50,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"pgro.bes.au/replica": "everything"}},
                },
            }
        ]
    },
}
TOLERATIONS: list[dict[str, Any]] = [
    {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"},
    {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
]
RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "500m", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}

# Every field of the replica spec across the reference's revisions (kopiaSecretRef and
# canopySource are exclusive at reconcile time; the second replica below carries the other).
REPLICA_SPEC: dict[str, Any] = {
    "kopiaSecretRef": {"name": "kopia", "namespace": "elsewhere"},
    "snapshotFilter": {
        "tags": {"purpose": "analytics", "tag:env": "prod"},
        "hostPattern": "db-*",
        "descriptionPattern": "*nightly*",
        "pathPattern": "/D/Full/*",
    },
    "schedule": "0 3 * * * Pacific/Auckland",
    "scheduleJitter": "15m",
    "minimumTtl": "12h",
    "switchoverGracePeriod": "10m",
    "analyticsUsername": "reporting",
    "extraUsers": ["metabase", {"name": "dbt", "schemas": ["reporting", "staging"]}],
    "persistentUsers": [
        {
            "name": "superset",
            "readSchemas": ["reporting"],
            "searchPath": ["reporting", "public"],
            "secretName": "superset-creds",
        }
    ],
    "storageClass": "gp3",
    "storageSizeOverride": "100GB",
    "storageSizeMaximum": "4Ti",
    "resources": RESOURCES,
    "resourcesFloor": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
    "resourcesMaximum": "64Gi",
    "deploymentReadyTimeout": "2h",
    "shmSizeFloor": "1Gi",
    "serviceAnnotations": {"tailscale.com/expose": "true"},
    "podAnnotations": {"karpenter.sh/do-not-disrupt": "true"},
    "affinity": AFFINITY,
    "tolerations": TOLERATIONS,
    "readOnly": False,
    "ephemeral": False,
    "postgresExtraConfig": "work_mem = 64MB\nshared_preload_libraries = 'pg_stat_statements'",
    "notifications": [
        {
            "target": "webhook",
            "url": "https://hooks.example.com/pgro",
            "method": "PUT",
            "headers": {
                "X-Plain": "yes",
                "Authorization": {"secretKeyRef": {"name": "hook-token", "key": "token"}},
            },
            "includePassword": True,
        },
        {
            "target": "graphQL",
            "url": "https://api.example.com/graphql",
            "mutation": "mutation($input: ReplicaInput!) { replicaReady(input: $input) }",
            "variablesTemplate": '{"input": {"host": "{{host}}"}}',
            "headers": {"X-Api-Key": {"secretKeyRef": {"name": "gql", "key": "key"}}},
            "includePassword": False,
        },
    ],
    "persistentSchemas": ["reporting", "dbt_snapshots"],
    "preMigrateDropSchemas": ["fhir"],
    "migrateTo": {"version": "2.63.2", "versionId": "6f1c2b9e-2d4f-4c77-9e1a-0c6b9f8a1d2e"},
    "builderImage": "ghcr.io/beyondessential/reporting-builder:1.4.0",
    "redaction": {
        "manifestUrl": "https://manifests.example.com/masks/{version}.json",
        "versionQuery": "SELECT value FROM local_system_facts WHERE key = 'currentVersion'",
        "versionFallbackToBase": True,
    },
    # Side revision: event publishing.
    "eventPublisher": {
        "url": "https://meta.tamanu.app/api/events",
        "clientCertificateSecretRef": {"name": "pgro-canopy-client", "namespace": "pgro"},
        "source": "pgro-analytics",
    },
    # Side revision (removed from the mainline): the overlay database, every field.
    "overlayDatabase": {
        "postgresVersion": 17,
        "imageCatalog": {"name": "postgresql", "kind": "ClusterImageCatalog"},
        "storageSizeOverride": "20Gi",
        "storageClass": "gp3",
        "resources": RESOURCES,
        "affinity": AFFINITY,
        "tolerations": TOLERATIONS,
        "serviceAnnotations": {"tailscale.com/expose": "true"},
        "schemaMapping": {"public": "tamanu", "reporting": "reporting"},
        "importGenerated": True,
    },
}

CANOPY_SPEC: dict[str, Any] = {
    "canopySource": {"group": "7c0a4c5e-8f3e-4c1e-9a55-2b8f0d0b7f11", "type": "tamanu-postgres"},
    "schedule": "H 3 * * *",
    "ephemeral": True,
    "redaction": {"manifestUrl": "https://manifests.example.com/masks.json", "version": "2.1.0"},
}

REPLICA_STATUS: dict[str, Any] = {
    "phase": "Ready",
    "currentRestore": "everything-20261201-030000",
    "previousRestore": "everything-20261130-030000",
    "serviceName": "everything",
    "lastRestoreCompletedAt": "2026-12-01T03:20:00Z",
    "nextScheduledRestore": "2026-12-02T03:04:00Z",
    "latestAvailableSnapshot": "k5d1e2f3a4b5c6d7e8f90",
    "canopyDesiredSnapshotId": "k5d1e2f3a4b5c6d7e8f90",
    "verifiedSnapshotId": "k0a1b2c3d4e5f60718293",
    "connectionInfo": {
        "host": "everything.analytics.svc.cluster.local",
        "port": 5432,
        "database": "postgres",
        "username": "reporting",
        "passwordSecret": "everything-creds",
    },
    "queuePosition": 2,
    "notifications": [
        {
            "name": "PUT https://hooks.example.com/pgro",
            "lastSentAt": "2026-12-01T03:20:05Z",
            "success": False,
            "lastError": "HTTP 502",
        }
    ],
    "conditions": [
        {
            "type": "KopiaSecretValid",
            "status": "True",
            "reason": "SecretValid",
            "message": "Secret is valid",
            "lastTransitionTime": "2026-11-01T00:00:00Z",
        }
    ],
    "scheduleInputHash": "9f86d081884c7d65",
    "schemaMigrationJob": "everything-20261201-030000-schema-migrate",
    "schemaMigrationPhase": "failed: no callback received",
    "persistentSchemaDataSize": "1536Mi",
    "consecutiveRestoreFailures": 1,
    "redactionPhase": "partial",
    "redactionVersion": "2.63.0",
    "redactionColumnsApplied": 41,
}

RESTORE_SPEC: dict[str, Any] = {
    "replica": {"name": "everything"},
    "snapshot": "k5d1e2f3a4b5c6d7e8f90",
    "snapshotSize": "120Gi",
    "snapshotTime": "2026-12-01T02:58:11.123456Z",
    "storageSize": "132Gi",
    "migrateTo": {"version": "2.63.2", "versionId": "6f1c2b9e-2d4f-4c77-9e1a-0c6b9f8a1d2e"},
    "builderImage": "ghcr.io/beyondessential/reporting-builder:1.4.0",
}

RESTORE_STATUS: dict[str, Any] = {
    "phase": "Active",
    "runId": "0e0a9a59-6f49-4a7c-8c1b-0b8f3b1f9d64",
    "postgresVersion": "16",
    "createdAt": "2026-12-01T03:00:00Z",
    "restoredAt": "2026-12-01T03:12:00Z",
    "activatedAt": "2026-12-01T03:20:00Z",
    "restoreJob": {
        "name": "everything-20261201-030000-restore",
        "phase": "Succeeded",
        "completedAt": "2026-12-01T03:12:00Z",
    },
    "migrationJob": {"name": "everything-20261201-030000-migrate", "phase": "Failed"},
    "migrationBaseline": "2026-11-28 22:01:13.52+13",
    "migrationResult": {
        "totalElapsedSeconds": 312,
        "failedMigration": "1732000000000-addPatientField",
        "error": 'column "x" contains null values',
        "dataBytesBefore": 128849018880,
        "dataBytesAfter": 129922760704,
        "timings": [{"name": "1731000000000-addIndex", "elapsedSeconds": 41}],
    },
    "schemaBuildResult": {
        "built": True,
        "totalElapsedSeconds": 95,
        "schemaBytes": 73400320,
    },
    "schemaBuildJob": "everything-20261201-030000-schema-build",
    "schemaBuildAttempts": 1,
    "pvc": "everything-20261201-030000-data",
    "deployment": "everything-20261201-030000",
    "credentialsSecret": "everything-creds",
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Active",
            "message": "serving",
            "lastTransitionTime": "2026-12-01T03:20:00Z",
        }
    ],
}


def _differences(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Where `stored` lost or changed something `sent` had (the server may add defaults)."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [f"{path or '.'}: {stored!r}"]
        out: list[str] = []
        for key, value in sent.items():
            if key not in stored:
                out.append(f"{path}.{key}: pruned")
            else:
                out += _differences(value, stored[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [f"{path}: {stored!r}"]
        return [d for i, v in enumerate(sent) for d in _differences(v, stored[i], f"{path}[{i}]")]
    return [] if sent == stored else [f"{path}: {sent!r} became {stored!r}"]


def _doc(kind: str, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def test_every_reference_replica_field_is_stored_as_written(
    admin: KubeApi, kube_namespace: str
) -> None:
    ns = kube_namespace
    for name, spec in (("everything", REPLICA_SPEC), ("canopy-sourced", CANOPY_SPEC)):
        admin.create(_doc("PostgresPhysicalReplica", ns, name, spec))
        stored = admin.get("PostgresPhysicalReplica", ns, name)
        assert stored is not None
        assert _differences(spec, stored["spec"]) == [], name

    admin.merge_patch(
        "PostgresPhysicalReplica", ns, "everything", {"status": REPLICA_STATUS}, status=True
    )
    stored = admin.get("PostgresPhysicalReplica", ns, "everything")
    assert stored is not None
    assert _differences(REPLICA_STATUS, stored["status"]) == []


def test_every_reference_restore_field_is_stored_as_written(
    admin: KubeApi, kube_namespace: str
) -> None:
    ns = kube_namespace
    name = "everything-20261201-030000"
    admin.create(_doc("PostgresPhysicalRestore", ns, name, RESTORE_SPEC))
    admin.merge_patch("PostgresPhysicalRestore", ns, name, {"status": RESTORE_STATUS}, status=True)
    stored = admin.get("PostgresPhysicalRestore", ns, name)
    assert stored is not None
    assert _differences(RESTORE_SPEC, stored["spec"]) == []
    assert _differences(RESTORE_STATUS, stored["status"]) == []


def test_the_oldest_shapes_apply_too(admin: KubeApi, kube_namespace: str) -> None:
    # The overlay revision's kopiaSecretRef was required and carried only a name; extraUsers
    # were plain names (their `LOGIN SUPERUSER` days); a webhook without a method.
    spec = {
        "kopiaSecretRef": {"name": "kopia"},
        "schedule": "0 3 * * *",
        "extraUsers": ["ops", "metabase"],
        "notifications": [{"target": "webhook", "url": "https://hooks.example.com/x"}],
        "overlayDatabase": {"schemaMapping": {"public": "tamanu"}},
    }
    admin.create(_doc("PostgresPhysicalReplica", kube_namespace, "old", spec))
    stored = admin.get("PostgresPhysicalReplica", kube_namespace, "old")
    assert stored is not None
    assert _differences(spec, stored["spec"]) == []
