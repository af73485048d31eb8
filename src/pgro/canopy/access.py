"""How kopia reaches a canopy repository: dummy keys, through a re-signing proxy.

A canopy replica's repository is described by the `<replica>-canopy-creds` data the
syncer writes (bucket, region, prefix, the real repository password, dummy S3 keys).
Kopia connects to a canopy proxy on loopback with the dummy keys; the proxy re-signs each
request with short-lived credentials from the broker. Restores run the proxy as a
separate process (`pgro canopy-proxy`); snapshot listings, which are short and run inside
pgro itself, run it in-process (`listing_access`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from pgro.api.secret import KopiaCredentials, S3Location, SecretInvalid
from pgro.canopy.broker import BrokerError, CredentialBroker
from pgro.canopy.materialise import PROXY_DUMMY_ACCESS_KEY, PROXY_DUMMY_SECRET_KEY
from pgro.canopy.proxy import (
    CanopyProxy,
    CredentialSource,
    CredentialsUnavailable,
    TemporaryCredentials,
    parse_credentials,
)
from pgro.canopy.sigv4 import SigningCredentials


@dataclass(frozen=True)
class CanopyRepository:
    bucket: str
    region: str
    prefix: str = ""
    repository_password: str = field(default="", repr=False)

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> CanopyRepository:
        for key in ("bucket", "region", "repositoryPassword"):
            if not data.get(key):
                raise SecretInvalid(f"missing key: {key}")
        return cls(
            bucket=data["bucket"],
            region=data["region"],
            prefix=data.get("prefix", ""),
            repository_password=data["repositoryPassword"],
        )

    @classmethod
    def behind(cls, creds: KopiaCredentials) -> CanopyRepository:
        """The repository `through` gave `creds` for (its location is S3)."""
        loc = creds.location
        return cls(
            bucket=getattr(loc, "bucket", ""),
            region=getattr(loc, "region", ""),
            prefix=getattr(loc, "prefix", ""),
            repository_password=creds.repository_password,
        )

    def through(self, endpoint: str, client: SigningCredentials | None = None) -> KopiaCredentials:
        """Kopia's credentials for a proxy listening on `endpoint` (`host:port`) that
        accepts requests signed with `client` (the placeholder keys when not known yet)."""
        return KopiaCredentials(
            location=S3Location(
                bucket=self.bucket,
                region=self.region,
                endpoint=endpoint,
                disable_tls=True,
                prefix=self.prefix,
            ),
            repository_password=self.repository_password,
            access_key_id=client.access_key_id if client else PROXY_DUMMY_ACCESS_KEY,
            secret_access_key=client.secret_access_key if client else PROXY_DUMMY_SECRET_KEY,
        )


def broker_source(
    broker: CredentialBroker, group: str, backup_type: str, run_id: str | None = None
) -> CredentialSource:
    """Credentials straight from an in-process broker (and its cache)."""

    def fetch() -> TemporaryCredentials:
        try:
            issued = broker.credentials(group, backup_type, run_id)
        except BrokerError as exc:
            raise CredentialsUnavailable(exc.message) from None
        return parse_credentials(issued.broker_json()["credentials"])

    return fetch


@contextmanager
def listing_access(
    repository: CanopyRepository,
    source: CredentialSource,
    *,
    s3_endpoint: str | None,
    host: str = "127.0.0.1",
) -> Iterator[KopiaCredentials]:
    """Kopia credentials valid while the block runs, through an in-process proxy."""
    proxy = CanopyProxy(source, region=repository.region, upstream=s3_endpoint, host=host)
    with proxy:
        yield repository.through(proxy.endpoint, proxy.client_credentials)
