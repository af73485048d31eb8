"""Names that are part of the wire contract: CRD identity, label keys, object names.

They match the reference operator exactly, so manifests, selectors and dashboards written
for it keep working against pgro.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "pgro.bes.au"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "pgro.bes.au/v1alpha1"
CATEGORY: Final = "all"

REPLICA_KIND: Final = "PostgresPhysicalReplica"
REPLICA_PLURAL: Final = "postgresphysicalreplicas"
REPLICA_SINGULAR: Final = "postgresphysicalreplica"
REPLICA_SHORT_NAME: Final = "ppr"

RESTORE_KIND: Final = "PostgresPhysicalRestore"
RESTORE_PLURAL: Final = "postgresphysicalrestores"
RESTORE_SINGULAR: Final = "postgresphysicalrestore"
RESTORE_SHORT_NAME: Final = "pprestore"

# The reference writes events and merge patches under this name.
FIELD_MANAGER: Final = "postgres-restore-operator"

LABEL_PREFIX: Final = f"{GROUP}/"

LABEL_REPLICA: Final = f"{LABEL_PREFIX}replica"
LABEL_RESTORE: Final = f"{LABEL_PREFIX}restore"
LABEL_READY_FOR_TRAFFIC: Final = f"{LABEL_PREFIX}ready-for-traffic"
LABEL_JOB_TYPE: Final = f"{LABEL_PREFIX}job-type"
LABEL_COMPONENT: Final = f"{LABEL_PREFIX}component"
LABEL_PROXY_SIDECAR: Final = f"{LABEL_PREFIX}proxy-sidecar"
LABEL_PERSISTENT_USER: Final = f"{LABEL_PREFIX}persistent-user"

LABEL_CANOPY_MANAGED_BY: Final = f"{LABEL_PREFIX}managed-by"
CANOPY_MANAGED_BY_VALUE: Final = "pgro-canopy"
LABEL_CANOPY_DECLARATION_ID: Final = f"{LABEL_PREFIX}declaration-id"
LABEL_CANOPY_GROUP: Final = f"{LABEL_PREFIX}group"
LABEL_CANOPY_SERVER: Final = f"{LABEL_PREFIX}server"
LABEL_CANOPY_TYPE: Final = f"{LABEL_PREFIX}type"
LABEL_CANOPY_INTENT: Final = f"{LABEL_PREFIX}intent"
# The worklist entry's `application_type` (pgro only), echoed in upgrade reports.
LABEL_CANOPY_APPLICATION_TYPE: Final = f"{LABEL_PREFIX}application-type"

ANNOTATION_VERSION: Final = f"{LABEL_PREFIX}version"
ANNOTATION_SCHEMA_BUILD_TOKEN: Final = f"{LABEL_PREFIX}schema-build-token"
ANNOTATION_SCHEMA_BUILD_POSTED: Final = f"{LABEL_PREFIX}schema-build-posted"
# How deep a verify replica's verification reads the data: quick | standard | full
# (`pgro.core.verify_depth`; an annotation so the CRD stays the reference's).
ANNOTATION_VERIFY_DEPTH: Final = f"{LABEL_PREFIX}verify-depth"
# Which engine masks a replica's restores for `spec.redaction`: native (default) | anon
# (`pgro.core.masks.parse_engine`; an annotation so the CRD stays the reference's).
ANNOTATION_REDACTION_ENGINE: Final = f"{LABEL_PREFIX}redaction-engine"

# Label values are strings on the wire; "true" is the only value the selectors use.
LABEL_TRUE: Final = "true"

JOB_TYPE_SNAPSHOT_LIST: Final = "snapshot-list"
JOB_TYPE_VERSION_DETECT: Final = "version-detect"
JOB_TYPE_CRED_RESET: Final = "cred-reset"

COMPONENT_KOPIA_CACHE: Final = "kopia-cache"
COMPONENT_SCHEMA_MIGRATION: Final = "schema-migration"
COMPONENT_SCHEMA_BUILD: Final = "schema-build"
COMPONENT_EXTRA_USER_CREDS: Final = "extra-user-creds"

POSTGRES_PORT: Final = 5432
# connectionInfo.database is always this, whatever the restored application database is.
CONNECTION_DATABASE: Final = "postgres"


def replica_creds_secret_name(replica: str) -> str:
    return f"{replica}-creds"


def admin_creds_secret_name(replica: str) -> str:
    """pgro's Kubernetes runtime: the restored server's `postgres` password, which the
    operator uses to provision users over SQL (not in the reference)."""
    return f"{replica}-admin-creds"


def canopy_creds_secret_name(replica: str) -> str:
    return f"{replica}-canopy-creds"


def user_slug(username: str) -> str:
    """The form of a role name that may appear in an object name (`report_writer` →
    `report-writer`): Kubernetes names allow neither `_` nor upper case."""
    return username.replace("_", "-").lower()


def extra_user_secret_name(replica: str, username: str) -> str:
    return f"{replica}-user-{user_slug(username)}-creds"


def snapshot_list_job_name(replica: str) -> str:
    return f"{replica}-snapshot-list"


def schema_migration_job_name(replica: str) -> str:
    return f"{replica}-schema-migration"


def schema_build_job_name(replica: str) -> str:
    return f"{replica}-schema-build"


def kopia_cache_pvc_name(replica: str) -> str:
    return f"{replica}-kopia-cache"


def restore_data_pvc_name(restore: str) -> str:
    return f"{restore}-data"


def restore_job_name(restore: str) -> str:
    return f"{restore}-restore"


def version_detect_job_name(restore: str) -> str:
    return f"{restore}-version-detect"


def cred_reset_job_name(restore: str) -> str:
    return f"{restore}-cred-reset"


def data_check_job_name(restore: str) -> str:
    return f"{restore}-data-check"


def migrate_job_name(restore: str) -> str:
    return f"{restore}-migrate"


def service_host(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"
