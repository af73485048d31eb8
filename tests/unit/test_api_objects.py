from __future__ import annotations

import pytest
from pydantic import ValidationError

from pgro.api import PostgresPhysicalReplica, PostgresPhysicalRestore, load_object, names
from tests.fixtures.manifests import replica_doc, restore_doc


def test_dispatches_on_kind() -> None:
    assert isinstance(load_object(replica_doc()), PostgresPhysicalReplica)
    assert isinstance(load_object(restore_doc()), PostgresPhysicalRestore)


@pytest.mark.parametrize(
    ("api_version", "kind", "fragment"),
    [
        ("bes.au/v1alpha1", "PostgresPhysicalReplica", "unsupported apiVersion 'bes.au/v1alpha1'"),
        ("pgro.bes.au/v1", "PostgresPhysicalReplica", "unsupported apiVersion 'pgro.bes.au/v1'"),
        (None, "PostgresPhysicalReplica", "unsupported apiVersion None"),
        (
            "pgro.bes.au/v1alpha1",
            "PostgresLogicalReplica",
            "unsupported kind 'PostgresLogicalReplica'",
        ),
        ("pgro.bes.au/v1alpha1", None, "unsupported kind None"),
        ("pgro.bes.au/v1alpha1", "postgresphysicalreplica", "unsupported kind"),
    ],
)
def test_wrong_group_version_or_kind_is_a_clear_error(
    api_version: str | None, kind: str | None, fragment: str
) -> None:
    document = replica_doc()
    document["apiVersion"] = api_version
    document["kind"] = kind
    with pytest.raises(ValueError, match="unsupported") as caught:
        load_object(document)
    assert fragment in str(caught.value)
    assert "pgro.bes.au/v1alpha1" in str(caught.value)


def test_unknown_kind_lists_the_known_ones() -> None:
    document = replica_doc()
    document["kind"] = "Other"
    with pytest.raises(ValueError, match="'PostgresPhysicalReplica' or 'PostgresPhysicalRestore'"):
        load_object(document)


def test_not_a_mapping() -> None:
    with pytest.raises(ValueError, match="expected a mapping"):
        load_object(["not", "a", "dict"])  # type: ignore[arg-type]


def test_invalid_body_raises_validation_error_which_is_a_value_error() -> None:
    document = restore_doc()
    del document["spec"]["snapshot"]
    with pytest.raises(ValidationError):
        load_object(document)
    assert issubclass(ValidationError, ValueError)


def test_names_match_the_reference() -> None:
    assert names.GROUP == "pgro.bes.au"
    assert names.VERSION == "v1alpha1"
    assert names.API_VERSION == "pgro.bes.au/v1alpha1"
    assert (names.REPLICA_PLURAL, names.REPLICA_SHORT_NAME) == ("postgresphysicalreplicas", "ppr")
    assert (names.RESTORE_PLURAL, names.RESTORE_SHORT_NAME) == (
        "postgresphysicalrestores",
        "pprestore",
    )
    assert names.LABEL_REPLICA == "pgro.bes.au/replica"
    assert names.LABEL_RESTORE == "pgro.bes.au/restore"
    assert names.LABEL_READY_FOR_TRAFFIC == "pgro.bes.au/ready-for-traffic"
    assert names.LABEL_JOB_TYPE == "pgro.bes.au/job-type"
    assert names.LABEL_COMPONENT == "pgro.bes.au/component"
    assert names.LABEL_CANOPY_MANAGED_BY == "pgro.bes.au/managed-by"
    assert names.LABEL_CANOPY_DECLARATION_ID == "pgro.bes.au/declaration-id"


@pytest.mark.parametrize(
    ("made", "expected"),
    [
        (names.replica_creds_secret_name("r"), "r-creds"),
        (names.canopy_creds_secret_name("r"), "r-canopy-creds"),
        (names.extra_user_secret_name("r", "report_writer"), "r-user-report-writer-creds"),
        (names.snapshot_list_job_name("r"), "r-snapshot-list"),
        (names.schema_migration_job_name("r"), "r-schema-migration"),
        (names.schema_build_job_name("r"), "r-schema-build"),
        (names.kopia_cache_pvc_name("r"), "r-kopia-cache"),
        (names.restore_data_pvc_name("x"), "x-data"),
        (names.restore_job_name("x"), "x-restore"),
        (names.version_detect_job_name("x"), "x-version-detect"),
        (names.cred_reset_job_name("x"), "x-cred-reset"),
        (names.migrate_job_name("x"), "x-migrate"),
        (names.service_host("r", "ns"), "r.ns.svc.cluster.local"),
    ],
)
def test_object_names(made: str, expected: str) -> None:
    assert made == expected
