"""Fetching the redaction manifest (features §2.6 step 4) over HTTP(S).

`fetch_manifest` GETs the manifest URL with the resolved version in it. On a 404, when
`versionFallbackToBase` is set and the version is `MAJOR.MINOR.PATCH` with PATCH != 0, it
tries `MAJOR.MINOR.0` once. Any other status that is not 2xx is an error. Redirects are
followed only within the same scheme, host and port (at most MAX_REDIRECTS): a manifest
server cannot send pgro to another host. The body is read up to MAX_MANIFEST_BYTES and
within an overall deadline (a server that drips bytes cannot hold the step), then parsed
(pgro.core.redaction_manifest).

Messages name URLs without user info, query or fragment (they may carry credentials or
tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import urljoin, urlsplit

import httpx

from pgro.api.replica import Redaction
from pgro.core.redaction_manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestInvalid,
    base_version,
    display_url,
    manifest_urls,
    parse_manifest,
)

MAX_REDIRECTS: Final = 5
CONNECT_TIMEOUT_S: Final = 10.0
READ_TIMEOUT_S: Final = 30.0
DEADLINE_S: Final = 120.0
USER_AGENT: Final = "pgro-redaction"


class ManifestFetchFailed(Exception):
    """The manifest could not be fetched or read; the message names the URL and why."""


@dataclass(frozen=True)
class FetchedManifest:
    url: str  # the URL the manifest came from (for logs: pass it through display_url)
    version: str | None  # the version whose manifest it is (the base one after a fallback)
    manifest: Manifest


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class _NotFound(Exception):
    pass


def _get(client: httpx.Client, url: str, max_bytes: int, deadline: float) -> bytes:
    """The body of a 2xx answer to GET `url`, following same-origin redirects only.
    _NotFound on a 404."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            with client.stream("GET", current) as response:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    target = urljoin(current, location)
                    if _origin(target) != _origin(current):
                        raise ManifestFetchFailed(
                            f"{display_url(current)} redirects to another host "
                            f"({display_url(target)}); pgro follows redirects only "
                            "within the same scheme, host and port"
                        )
                    current = target
                    continue
                if response.status_code == 404:
                    raise _NotFound
                if not response.is_success:
                    raise ManifestFetchFailed(
                        f"GET {display_url(current)} answered HTTP {response.status_code}"
                    )
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise ManifestFetchFailed(
                        f"the manifest at {display_url(current)} is larger than {max_bytes} bytes"
                    )
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ManifestFetchFailed(
                            f"the manifest at {display_url(current)} is larger than "
                            f"{max_bytes} bytes"
                        )
                    if time.monotonic() > deadline:
                        raise ManifestFetchFailed(
                            f"reading the manifest at {display_url(current)} took longer "
                            f"than {DEADLINE_S:.0f} s"
                        )
                return bytes(body)
        except httpx.TimeoutException:
            raise ManifestFetchFailed(f"GET {display_url(current)} timed out") from None
        except httpx.HTTPError as error:
            raise ManifestFetchFailed(
                f"GET {display_url(current)} failed: {type(error).__name__}"
            ) from None
    raise ManifestFetchFailed(f"{display_url(url)} redirects more than {MAX_REDIRECTS} times")


def fetch_manifest(
    redaction: Redaction,
    version: str | None,
    *,
    client: httpx.Client | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
    deadline_s: float = DEADLINE_S,
) -> FetchedManifest:
    """The manifest for `version` (already resolved and checked, see
    pgro.postgres.redaction.resolve_version), parsed. ManifestFetchFailed on any failure,
    ManifestInvalid included."""
    own = client is None
    http = client or httpx.Client(
        follow_redirects=False,
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
    )
    deadline = time.monotonic() + deadline_s
    urls = manifest_urls(redaction, version)
    try:
        for attempt, url in enumerate(urls):
            try:
                body = _get(http, url, max_bytes, deadline)
            except _NotFound:
                if attempt + 1 < len(urls):
                    continue
                tried = " and ".join(display_url(u) for u in urls)
                hint = (
                    ""
                    if len(urls) > 1 or not redaction.version_fallback_to_base
                    else " (no base version to fall back to)"
                )
                raise ManifestFetchFailed(f"no manifest at {tried}: HTTP 404{hint}") from None
            used = version if attempt == 0 or version is None else base_version(version)
            try:
                return FetchedManifest(url, used, parse_manifest(body))
            except ManifestInvalid as error:
                raise ManifestFetchFailed(f"the manifest at {display_url(url)}: {error}") from None
    finally:
        if own:
            http.close()
    raise AssertionError("unreachable: manifest_urls is never empty")
