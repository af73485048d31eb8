"""`eventPublisher` end to end: `pgro run` restores a snapshot that is not PostgreSQL, the
restore fails, and the failure reaches an mTLS endpoint with the manifest Secret's identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fixtures.events_endpoint import serve_events_endpoint
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import StartRun


def test_a_failed_restore_is_published_over_mtls(
    fs_repo: Any, scratch: Path, start_run: StartRun
) -> None:
    with serve_events_endpoint(scratch / "events") as endpoint:
        cert = endpoint.client("pgro-run-client")
        manifest = write_manifest(
            scratch / "m.yaml",
            secret_doc(
                "fixtures",
                {"filesystemPath": str(fs_repo.path), "repositoryPassword": fs_repo.password},
            ),
            secret_doc("canopy-client", {"tls.crt": cert.cert_pem, "tls.key": cert.key_pem}),
            replica_doc(
                "notpg",
                secret="fixtures",
                snapshotFilter={"hostPattern": "files-host"},
                eventPublisher={
                    "url": endpoint.url,
                    "clientCertificateSecretRef": {"name": "canopy-client"},
                    "source": "pgro-e2e",
                },
            ),
        )
        # The endpoint's CA, as a cluster's own CA would be given to the operator.
        run = start_run(manifest, env={"SSL_CERT_FILE": str(endpoint.ca_file)})
        run.wait_for("the failure to be published", lambda: len(endpoint.received) > 0, timeout=180)
        status = run.replica("notpg")
        (restore,) = status["restores"]
        got = endpoint.received[0]
        assert got.client_common_name == "pgro-run-client"
        assert got.body["source"] == "pgro-e2e"
        assert got.body["ref"] == "default/notpg/restore-failed"
        assert got.body["description"] == "Restore failed: default/notpg"
        assert got.body["severity"] == "error" and got.body["active"] is True
        prefix = f"{restore['name']}, snapshot {restore['spec']['snapshot']}: "
        assert got.body["message"].startswith(prefix), got.body["message"]
        failed = next(c for c in restore["status"]["conditions"] if c["type"] == "Failed")
        assert got.body["message"] == prefix + failed["message"]
        assert "NotPostgres" in json.dumps(status["status"])
        # One failure, one event: later passes over the Failed restore publish nothing.
        assert run.metric("postgres_restore_failed_total") == 1
        assert len(endpoint.received) == 1
        log = run.log.read_text()
        assert "restore failure published" in log
        assert cert.key_pem.splitlines()[1] not in log
        assert run.stop() == 0
