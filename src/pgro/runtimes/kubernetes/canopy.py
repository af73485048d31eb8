"""Canopy in the operator: the worklist syncer (leader only), the credential broker and
the proxies' callbacks (every instance), and what passes ask of it (docs/canopy.md).
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from pgro.api.names import (
    CANOPY_MANAGED_BY_VALUE,
    LABEL_CANOPY_MANAGED_BY,
    REPLICA_KIND,
    canopy_creds_secret_name,
    restore_job_name,
)
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import KopiaCredentials, SecretInvalid, decode_secret_data
from pgro.canopy.access import CanopyRepository
from pgro.canopy.broker import serve
from pgro.canopy.client import CanopyClient, connect
from pgro.canopy.device_cert import DeviceIdentity
from pgro.canopy.materialise import ExistingReplica, ReplicaChange, canopy_creds_secret_data
from pgro.canopy.naming import REPLICA_NAME
from pgro.canopy.proxy import new_client_credentials
from pgro.canopy.session import CanopySession, restore_token
from pgro.canopy.settings import CanopySettings
from pgro.canopy.syncer import SyncTick
from pgro.canopy.tailscale import TailnetUrls
from pgro.canopy.tokens import BrokerTokens, new_key
from pgro.clock import utcnow
from pgro.core import reasons
from pgro.core.observations import SecretCheck
from pgro.kube.client import KubeApi
from pgro.runtimes.kubernetes import workloads

log = logging.getLogger("pgro.operator.canopy")

BROKER_KEY_DATA: Final = "key"


class OperatorCanopy(CanopySession):
    def __init__(
        self,
        api: KubeApi,
        settings: CanopySettings,
        client: CanopyClient,
        *,
        replicas: Callable[[], list[dict[str, Any]]],
        clock: Callable[[], datetime] = utcnow,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            client,
            settings,
            clock=clock,
            rnd=rnd,
            stats_key=lambda ns, restore: f"{ns}/{restore_job_name(restore)}",
        )
        self.api = api
        self.settings = settings
        if settings.tailscaled_socket:  # the `url` semantic
            self.courier.url_for = TailnetUrls(settings.tailscaled_socket).url_for
        self._replicas = replicas
        self._server: ThreadingHTTPServer | None = None
        self._syncer: threading.Thread | None = None
        self._stop = threading.Event()
        self._tokens: BrokerTokens | None = None
        # replica key -> how often canopy issued, refused or withdrew its credentials: a
        # pass re-reads the creds Secret when this moves (`Observer.secret_check`).
        self.creds_written: Counter[str] = Counter()

    @property
    def tokens(self) -> BrokerTokens:
        """The broker's token key, from its Secret (created with a fresh key by whichever
        instance comes first; every instance then reads the same one)."""
        if self._tokens is None:
            ns, name = self.settings.namespace, self.settings.broker_key_secret
            secret = self.api.get("Secret", ns, name)
            if secret is None:
                fresh = base64.b64encode(new_key()).decode()
                self.api.create_if_missing(_secret(ns, name, "data", {BROKER_KEY_DATA: fresh}))
                secret = self.api.get("Secret", ns, name)
            key = decode_secret_data(secret or {}).get(BROKER_KEY_DATA)
            if not key:
                raise RuntimeError(f"Secret {ns}/{name} has no {BROKER_KEY_DATA!r} key")
            self._tokens = BrokerTokens(key)
        return self._tokens

    @classmethod
    def connect(
        cls,
        api: KubeApi,
        settings: CanopySettings,
        *,
        state_dir: Path,
        replicas: Callable[[], list[dict[str, Any]]],
    ) -> OperatorCanopy | None:
        identity = None
        if settings.device_cert_secret:
            secret = api.get("Secret", settings.namespace, settings.device_cert_secret)
            if secret is None:
                log.error(
                    "CANOPY_DEVICE_CERT_SECRET names Secret %s/%s, which does not exist; "
                    "the mTLS route is off",
                    settings.namespace,
                    settings.device_cert_secret,
                )
            else:
                values = list(decode_secret_data(secret).values())
                if values:
                    # The reference takes the Secret's first value as the key PEM.
                    identity = DeviceIdentity(state_dir / "canopy-device", key_pem=values[0])
                    log.info(
                        "canopy device key SPKI SHA-256 %s (enrolled in canopy with role "
                        "backup-restore?)",
                        identity.fingerprint(),
                    )
        elif settings.base_url.startswith("https://"):
            log.warning(
                "CANOPY_DEVICE_CERT_SECRET is not set: the mTLS route to %s has no device "
                "certificate and canopy will answer 401",
                settings.base_url,
            )
        client = connect(
            settings.base_url,
            tailnet_url=settings.tailnet_url,
            socks5_proxy=settings.socks5_proxy,
            device_cert=identity,
        )
        if client is None:
            log.error("canopy client not configured: no route to canopy; canopy is off")
            return None
        return cls(api, settings, client, replicas=replicas)

    # -- lifecycle -------------------------------------------------------------------------
    def serve(self) -> None:
        """The broker and the callbacks: every instance, leader or not."""
        self._server = serve(
            self.broker,
            self.settings.broker_host,
            self.settings.broker_port,
            self.callbacks,
            tokens=self.tokens,
        )
        log.info(
            "canopy broker on [%s]:%d; sidecars use %s",
            self.settings.broker_host,
            self.settings.broker_port,
            self.settings.sidecar_base_url,
        )

    def start_syncer(self) -> None:
        self._stop.clear()
        self._syncer = threading.Thread(target=self._sync_loop, name="canopy-syncer", daemon=True)
        self._syncer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(10)
        self.close(self._server)

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self.capabilities.run(time.monotonic(), self.client.register_capabilities)
            try:
                self.apply(self.fetch_tick())
            except Exception:
                log.exception("canopy sync tick failed")
            self._stop.wait(self.next_tick_in())

    # -- one tick --------------------------------------------------------------------------
    def apply(self, tick: SyncTick) -> None:
        listed = self.api.list(
            "Namespace", labels={LABEL_CANOPY_MANAGED_BY: CANOPY_MANAGED_BY_VALUE}
        ).items
        replicas = {
            r["metadata"]["namespace"]: r
            for r in self._replicas()
            if r.get("metadata", {}).get("name") == REPLICA_NAME
        }

        def replica(namespace: str) -> PostgresPhysicalReplica | None:
            held = replicas.get(namespace)
            return None if held is None else PostgresPhysicalReplica.model_validate(held)

        self.book.apply(
            tick,
            self.clock(),
            existing={
                ns["metadata"]["name"]: ExistingReplica(
                    ns["metadata"]["name"],
                    (replicas.get(ns["metadata"]["name"]) or {})
                    .get("status", {})
                    .get("canopyDesiredSnapshotId"),
                )
                for ns in listed
            },
            replica=replica,
            put=self._apply_change,
            remove=lambda namespace: self.api.delete("Namespace", None, namespace),
        )
        for key in self.book.take_changes():
            self.creds_written[key] += 1

    def _apply_change(self, change: ReplicaChange, password: str | None) -> None:
        desired = change.desired
        ns = desired.namespace
        key = f"{ns}/{desired.name}"
        if change.create_namespace:
            self.api.create_if_missing(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns, "labels": dict(desired.labels)},
                }
            )
            log.info("canopy: Namespace %s created (%s)", ns, desired.entry.describe())
        if password is not None:
            data = canopy_creds_secret_data(desired.entry, password)
            self.api.apply(_secret(ns, canopy_creds_secret_name(desired.name), "stringData", data))
        self.api.apply(desired.manifest())
        if change.desired_snapshot_patch is not None:
            self.api.merge_patch(
                REPLICA_KIND,
                ns,
                desired.name,
                {"status": {"canopyDesiredSnapshotId": change.desired_snapshot_patch}},
                status=True,
            )
            log.info("canopy: %s should restore snapshot %s", key, change.desired_snapshot_patch)

    # -- what reconciles ask ---------------------------------------------------------------
    def read_creds(
        self, replica: PostgresPhysicalReplica
    ) -> tuple[SecretCheck, KopiaCredentials | None]:
        """The condition, and kopia's credentials for the in-process listing proxy (their
        endpoint is a placeholder: the proxy's port is known only once it listens)."""
        name = canopy_creds_secret_name(replica.name)
        secret = self.api.get("Secret", replica.namespace, name)
        if secret is None:
            return SecretCheck.not_found("waiting for the canopy syncer to write its Secret"), None
        data = {k: v.decode() for k, v in decode_secret_data(secret).items()}
        try:
            repo = CanopyRepository.from_secret_data(data)
        except SecretInvalid as exc:
            return SecretCheck.invalid(f"{name}: {exc}", reasons.SECRET_INVALID), None
        return SecretCheck.valid(), repo.through("canopy-proxy")

    def listing_access(
        self, replica: PostgresPhysicalReplica, creds: KopiaCredentials
    ) -> Callable[[], AbstractContextManager[KopiaCredentials]]:
        repo = CanopyRepository.behind(creds)
        return lambda: self.listing_through(replica, repo)

    def job_settings(
        self, replica: PostgresPhysicalReplica, restore: PostgresPhysicalRestore
    ) -> workloads.CanopyJobSettings:
        """What the restore Job's sidecar needs; first writes the restore's
        `<restore>-canopy-proxy` Secret (its broker token and kopia's key pair), which
        only that Job's containers reference, owned by the restore."""
        self.api.create_if_missing(
            proxy_secret(self.tokens, replica, restore, owner=restore.owner_reference())
        )
        base = self.settings.sidecar_base_url
        return workloads.CanopyJobSettings(
            broker_url=base, callback_base_url=base, s3_endpoint=self.settings.s3_endpoint
        )


def proxy_secret(
    tokens: BrokerTokens,
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    *,
    owner: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The `<restore>-canopy-proxy` Secret: the restore's broker token (bound to its
    group, type, run id and callback key) and a fresh key pair for its kopia."""
    job = f"{restore.namespace}/{restore_job_name(restore.name)}"
    client = new_client_credentials()
    token_key, key_id_key, secret_key = workloads.PROXY_SECRET_KEYS
    data = {
        token_key: restore_token(tokens, replica, restore.status.run_id, job),
        key_id_key: client.access_key_id,
        secret_key: client.secret_access_key,
    }
    name = workloads.canopy_proxy_secret_name(restore.name)
    return _secret(restore.namespace, name, "stringData", data, owner)


def _secret(
    namespace: str,
    name: str,
    field: str,
    data: Mapping[str, str],
    owner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Secret labelled as canopy's; `field` is "data" (base64) or "stringData"."""
    labels = {LABEL_CANOPY_MANAGED_BY: CANOPY_MANAGED_BY_VALUE}
    metadata = workloads.object_metadata(name, namespace, labels, owner)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata,
        field: dict(data),
    }
