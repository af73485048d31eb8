"""The canopy variant of the restore Job (reference canopy-protocol §5.3/§5.4), field by
field, each Job loaded into lightkube's typed models to catch misspelled fields: the
`canopy-proxy` native sidecar, the shared in-memory volume, the env of both containers,
the pod label and the longer deadline."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
from lightkube import codecs

from pgro.pipeline.restore_job import SECRET_ENV
from pgro.runtimes.kubernetes import workloads as wl
from pgro.runtimes.kubernetes.config import OperatorConfig, Placement
from tests.fixtures import manifests

NS = "canopy-fiji-verify"
IMAGE = "ghcr.io/beyondessential/pgro:1.2.3"
CONFIG = OperatorConfig(max_concurrent_restores=2, restore_image=IMAGE)
RESTORE = "canopy-replica-20260701-000000"
JOB = f"{RESTORE}-restore"
GROUP = "22222222-2222-2222-2222-222222222222"
TYPE = "tamanu-postgres"
RUN_ID = "0b6f4f8e-6a43-4bb5-9a56-5b3c1f0f2a11"
SECRET = "canopy-replica-canopy-creds"
BROKER = "http://pgro-operator.pgro-system.svc:9091"
CALLBACKS = "http://pgro-operator.pgro-system.svc:8080/"
SETTINGS = wl.CanopyJobSettings(broker_url=BROKER, callback_base_url=CALLBACKS)
RESTORE_LABELS = {
    "pgro.bes.au/replica": "canopy-replica",
    "app.kubernetes.io/managed-by": "pgro",
    "pgro.bes.au/restore": RESTORE,
}


replica = functools.partial(
    manifests.replica,
    "canopy-replica",
    None,
    namespace=NS,
    metadata={"uid": "replica-uid"},
    schedule="H * * * *",
    ephemeral=None,
    canopySource={"group": GROUP, "type": TYPE},
)
NOT_CANOPY: dict[str, Any] = {"canopySource": None, "kopiaSecretRef": {"name": "kopia"}}
restore = functools.partial(
    manifests.restore,
    RESTORE,
    "canopy-replica",
    namespace=NS,
    metadata={"uid": "restore-uid"},
    snapshot="k000000000000000000000000000000f",
    snapshotSize="10Gi",
    storageSize="20Gi",
    status={"phase": "Restoring", "runId": RUN_ID},
)


def canopy_job(
    run_id: str | None = RUN_ID, settings: wl.CanopyJobSettings = SETTINGS
) -> dict[str, Any]:
    status = {"phase": "Restoring", "runId": run_id} if run_id is not None else None
    return wl.restore_job(replica(), restore(status=status), CONFIG, canopy=settings)


def assert_kubernetes_valid(obj: dict[str, Any]) -> None:
    """lightkube loads it into the typed model and writes back exactly the same content."""
    typed = codecs.from_dict(obj)
    assert typed.to_dict() == obj  # type: ignore[no-untyped-call]


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in container["env"]:
        assert entry["name"] not in out, f"duplicate env {entry['name']}"
        out[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return out


def secret_ref(key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": SECRET, "key": key}
    if optional:
        ref["optional"] = True
    return {"secretKeyRef": ref}


def pod(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


# ---------------------------------------------------------------------- the Job and pod


def test_canopy_job_object() -> None:
    job = canopy_job()
    assert job["metadata"] == {
        "name": JOB,
        "namespace": NS,
        "labels": RESTORE_LABELS,  # the Job itself keeps the plain labels
        "ownerReferences": [
            {
                "apiVersion": "pgro.bes.au/v1alpha1",
                "kind": "PostgresPhysicalRestore",
                "name": RESTORE,
                "uid": "restore-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] == 14400
    assert spec["backoffLimit"] == 3
    assert spec["ttlSecondsAfterFinished"] == 120
    # The permanent-failure rule names the restore container, never the sidecar.
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["containerName"] == "restore"
    assert spec["template"]["metadata"] == {
        "labels": {**RESTORE_LABELS, "pgro.bes.au/proxy-sidecar": "true"}
    }
    assert pod(job)["restartPolicy"] == "Never"
    assert pod(job)["terminationGracePeriodSeconds"] == 30
    assert pod(job)["volumes"] == [
        {"name": "pgdata", "persistentVolumeClaim": {"claimName": f"{RESTORE}-data"}},
        {
            "name": "kopia-cache",
            "persistentVolumeClaim": {"claimName": "canopy-replica-kopia-cache"},
        },
        {"name": "proxy-shared", "emptyDir": {"medium": "Memory"}},
    ]
    assert_kubernetes_valid(job)


def test_canopy_proxy_is_a_native_sidecar() -> None:
    [sidecar] = pod(canopy_job())["initContainers"]
    assert sidecar["name"] == "canopy-proxy"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE  # the restore container's image
    assert sidecar["command"] == ["pgro", "canopy-proxy"]
    assert "args" not in sidecar
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert sidecar["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert sidecar["volumeMounts"] == [{"name": "proxy-shared", "mountPath": "/var/run/pgro"}]


def test_canopy_proxy_env_with_a_run_id() -> None:
    [sidecar] = pod(canopy_job())["initContainers"]
    assert env_map(sidecar) == {
        "PGRO_BROKER_URL": BROKER,
        "PGRO_GROUP": GROUP,
        "PGRO_TYPE": TYPE,
        "PGRO_REGION": secret_ref("region"),
        "PGRO_RUN_ID": RUN_ID,
        # The trailing slash of the callback base is not doubled.
        "PGRO_PROGRESS_CALLBACK_URL": (
            f"http://pgro-operator.pgro-system.svc:8080/api/v1/canopy-progress/{NS}/{JOB}"
        ),
        "PGRO_STATS_CALLBACK_URL": (
            f"http://pgro-operator.pgro-system.svc:8080/api/v1/canopy-stats/{NS}/{JOB}"
        ),
        "PGRO_PROXY_PORT_FILE": "/var/run/pgro/proxy-port",
        "PGRO_PROXY_LISTEN_HOST": "127.0.0.1",
        # The restore's own Secret, never a literal in the Job (issue 18 item 9).
        "PGRO_BROKER_TOKEN": proxy_ref("brokerToken"),
        "PGRO_PROXY_ACCESS_KEY_ID": proxy_ref("accessKeyId"),
        "PGRO_PROXY_SECRET_ACCESS_KEY": proxy_ref("secretAccessKey"),
    }


def proxy_ref(key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": f"{RESTORE}-canopy-proxy", "key": key}}


def test_only_the_sidecar_gets_the_broker_token() -> None:
    spec = pod(canopy_job())
    [container] = spec["containers"]
    assert "PGRO_BROKER_TOKEN" not in env_map(container)
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for c in spec["containers"] + spec["initContainers"]
        for e in c["env"]
        if "valueFrom" in e and e["valueFrom"]["secretKeyRef"]["key"] == "brokerToken"
    ]
    assert refs == [{"name": f"{RESTORE}-canopy-proxy", "key": "brokerToken"}]


def test_canopy_proxy_env_without_a_run_id_has_no_progress_sampling() -> None:
    [sidecar] = pod(canopy_job(run_id=None))["initContainers"]
    env = env_map(sidecar)
    assert "PGRO_RUN_ID" not in env
    assert "PGRO_PROGRESS_CALLBACK_URL" not in env
    assert env["PGRO_STATS_CALLBACK_URL"].endswith(f"/api/v1/canopy-stats/{NS}/{JOB}")


def test_canopy_proxy_s3_endpoint_only_when_set() -> None:
    [plain] = pod(canopy_job())["initContainers"]
    assert "PGRO_S3_ENDPOINT" not in env_map(plain)
    settings = wl.CanopyJobSettings(BROKER, CALLBACKS, s3_endpoint="http://minio.test:9000")
    job = canopy_job(settings=settings)
    [sidecar] = pod(job)["initContainers"]
    assert env_map(sidecar)["PGRO_S3_ENDPOINT"] == "http://minio.test:9000"
    assert_kubernetes_valid(job)


def test_canopy_restore_container() -> None:
    [container] = pod(canopy_job())["containers"]
    assert container["name"] == "restore"
    assert container["command"] == ["pgro", "restore-job"]
    assert container["volumeMounts"] == [
        {"name": "pgdata", "mountPath": "/pgdata"},
        {"name": "kopia-cache", "mountPath": "/tmp/kopia"},
        {"name": "proxy-shared", "mountPath": "/var/run/pgro"},
    ]
    env = env_map(container)
    assert env["PGRO_CANOPY_PROXY_PORT_FILE"] == "/var/run/pgro/proxy-port"
    assert env["PGRO_CANOPY_PROXY_HOST"] == "127.0.0.1"
    # The canopy-creds Secret: bucket, region and the real password; kopia's S3 keys are
    # the restore's own, which its sidecar checks every request against.
    assert env["KOPIA_BUCKET"] == secret_ref("bucket", optional=True)
    assert env["KOPIA_REGION"] == secret_ref("region", optional=True)
    assert env["AWS_ACCESS_KEY_ID"] == proxy_ref("accessKeyId")
    assert env["AWS_SECRET_ACCESS_KEY"] == proxy_ref("secretAccessKey")
    assert env["KOPIA_PASSWORD"] == secret_ref("repositoryPassword")
    # kopia's endpoint is the proxy, whatever the Secret holds.
    for name in ("KOPIA_ENDPOINT", "KOPIA_DISABLE_TLS", "KOPIA_FILESYSTEM_PATH"):
        assert name not in env
    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert from_secret.items() <= SECRET_ENV.items()  # what `pgro restore-job` reads


def test_canopy_job_holds_no_literal_credentials() -> None:
    """Every key reaches the pod by reference; the spec itself carries no secret value."""
    text = json.dumps(canopy_job())
    for word in ("PROXY_DUMMY", "repo_password", "SecretAccessKey", "AccessKeyId"):
        assert word not in text


def test_canopy_job_keeps_placement() -> None:
    placement = Placement(
        node_selector={"bes.node.purpose": "workload"},
        pod_annotations={"karpenter.sh/do-not-disrupt": "true"},
    )
    job = wl.restore_job(replica(), restore(), CONFIG, placement, canopy=SETTINGS)
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["pgro.bes.au/proxy-sidecar"] == "true"
    assert template["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}
    assert template["spec"]["nodeSelector"] == {"bes.node.purpose": "workload"}
    assert_kubernetes_valid(job)


# ---------------------------------------------------------------------- the other paths


def test_canopy_replica_without_settings_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"canopySource.*CanopyJobSettings"):
        wl.restore_job(replica(), restore(), CONFIG)


def test_non_canopy_job_is_unchanged_by_canopy_settings() -> None:
    """A kopiaSecretRef replica gets the plain Job, settings or not."""
    plain = wl.restore_job(replica(**NOT_CANOPY), restore(), CONFIG)
    with_settings = wl.restore_job(replica(**NOT_CANOPY), restore(), CONFIG, canopy=SETTINGS)
    assert with_settings == plain
    assert "initContainers" not in pod(plain)
    assert plain["spec"]["activeDeadlineSeconds"] == 7200
    assert "pgro.bes.au/proxy-sidecar" not in plain["spec"]["template"]["metadata"]["labels"]
    assert [v["name"] for v in pod(plain)["volumes"]] == ["pgdata", "kopia-cache"]
    [container] = pod(plain)["containers"]
    env = env_map(container)
    assert "PGRO_CANOPY_PROXY_PORT_FILE" not in env
    assert env["KOPIA_ENDPOINT"] == {
        "secretKeyRef": {"name": "kopia", "key": "endpoint", "optional": True}
    }
    assert [m["name"] for m in container["volumeMounts"]] == ["pgdata", "kopia-cache"]


def test_builder_does_not_share_mutable_state() -> None:
    first = canopy_job()
    snapshot = copy.deepcopy(first)
    pod(first)["initContainers"][0]["resources"]["limits"]["cpu"] = "9"
    pod(first)["containers"][0]["volumeMounts"].clear()
    assert canopy_job() == snapshot


# ---------------------------------------------------------------------- `pgro restore-job`


class _Connected(Exception):
    """Raised by the stand-in repository once it has been given its credentials."""


def _restore_job_env(tmp_path: Any, port_file: Any) -> dict[str, str]:
    """The restore container's environment as the fake kubelet would resolve it, with a
    canopy-creds Secret whose (ignored) endpoint keys point elsewhere."""
    return {
        "SNAPSHOT_ID": "k000000000000000000000000000000f",
        "PGRO_DATA_ROOT": str(tmp_path / "pgdata"),
        "PGRO_KOPIA_DIR": str(tmp_path / "kopia"),
        "KOPIA_BUCKET": "canopy-int-test",
        "KOPIA_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "PROXY_DUMMY_ACCESS_KEY",
        "AWS_SECRET_ACCESS_KEY": "PROXY_DUMMY_SECRET_KEY",
        "KOPIA_PASSWORD": "real-repo-password",
        "KOPIA_ENDPOINT": "s3.example.org",
        "KOPIA_DISABLE_TLS": "false",
        "PGRO_CANOPY_PROXY_PORT_FILE": str(port_file),
        "PGRO_CANOPY_PROXY_HOST": "127.0.0.1",
    }


def test_restore_job_connects_kopia_through_the_proxy(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgro.api.secret import KopiaCredentials, S3Location
    from pgro.pipeline import restore_job

    seen: list[KopiaCredentials] = []

    class Repository:
        def __init__(self, creds: KopiaCredentials, state: Any, **_: Any) -> None:
            seen.append(creds)
            raise _Connected

    monkeypatch.setattr(restore_job, "KopiaRepository", Repository)
    port_file = tmp_path / "run" / "proxy-port"
    port_file.parent.mkdir()
    port_file.write_text("41234")
    outcome = restore_job.run(_restore_job_env(tmp_path, port_file))
    assert outcome.message.startswith("error: UnexpectedError: _Connected")
    [creds] = seen
    assert creds.location == S3Location(
        bucket="canopy-int-test", region="us-east-1", endpoint="127.0.0.1:41234", disable_tls=True
    )
    assert creds.access_key_id == "PROXY_DUMMY_ACCESS_KEY"
    assert creds.secret_access_key == "PROXY_DUMMY_SECRET_KEY"
    assert creds.repository_password == "real-repo-password"

    # An IPv6 loopback goes in brackets, as kopia's --endpoint wants it.
    seen.clear()
    env = {**_restore_job_env(tmp_path, port_file), "PGRO_CANOPY_PROXY_HOST": "::1"}
    restore_job.run(env)
    assert isinstance(seen[0].location, S3Location)
    assert seen[0].location.endpoint == "[::1]:41234"


def test_restore_job_without_the_port_file_fails_retryably(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgro.pipeline import restore_job

    monkeypatch.setattr(restore_job, "PROXY_PORT_TIMEOUT_S", 0.3)
    outcome = restore_job.run(_restore_job_env(tmp_path, tmp_path / "never-written"))
    assert outcome.exit_code == 1
    assert outcome.message == (
        "error: CanopyProxyNotReady: canopy-proxy sidecar did not write port file within 0.3s"
    )


def test_restore_job_names_missing_canopy_credentials_and_retries(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgro.kopia.errors import KopiaError
    from pgro.pipeline import restore_job

    class Repository:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise KopiaError(
                "cannot open S3 bucket 'b'. kopia said: no S3 credentials: "
                "CredentialsUnavailable: credential broker answered 502: canopy said no "
                "(real-repo-password)"
            )

    monkeypatch.setattr(restore_job, "KopiaRepository", Repository)
    port_file = tmp_path / "proxy-port"
    port_file.write_text("41234")
    outcome = restore_job.run(_restore_job_env(tmp_path, port_file))
    assert outcome.exit_code == 1  # canopy may come back: the Job retries
    assert outcome.message.startswith("error: CanopyCredentialsUnavailable: cannot open")
    assert "real-repo-password" not in outcome.message  # scrubbed


def test_restore_job_default_port_timeout_is_the_references() -> None:
    from pgro.pipeline import restore_job

    assert restore_job.PROXY_PORT_TIMEOUT_S == 30
