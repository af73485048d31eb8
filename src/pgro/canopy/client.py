"""The HTTP client pgro uses to talk to canopy (reference/canopy-protocol.md §2, §3, §8).

Two routes reach the same API:

* **tailnet** (preferred): `https://canopy.tail53aef.ts.net`, every path under `/public`,
  through the operator pod's Tailscale sidecar (a SOCKS5 proxy). The proxy is mounted for
  `*.ts.net` hosts only, so the other route never depends on the sidecar. The caller is
  identified by its tailnet node; no client certificate.
* **mTLS** (fallback): `CANOPY_BASE_URL` (e.g. `https://meta.tamanu.app`), paths at the
  root, the self-signed device certificate as client certificate (`device_cert`), renewed
  while the client runs.

The route follows from the base URL's host (`*.ts.net` is the tailnet). Bodies are JSON,
gzipped from 1 KiB. Redirects are not followed. Every failure is a `CanopyError`
subclass whose message names the call, canopy's own explanation (`title`/`detail` of its
problem document) and what to do; no message ever holds a credential, and response bodies
are never quoted (a credentials answer is one).

`connect` picks the route as the reference does: probe the tailnet, else mTLS.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import logging
import platform
import re
import ssl
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Final
from uuid import UUID

import httpx
from pydantic import ValidationError

from pgro import __version__
from pgro.canopy.device_cert import DeviceCertificateError, DeviceIdentity
from pgro.canopy.wire import (
    PGRO_INTENTS,
    IntentDescriptor,
    ProblemDocument,
    ProgressArgs,
    RestoreCredentials,
    RestoreCredentialsArgs,
    VerificationArgs,
    Worklist,
    capabilities_request,
    describe_validation_error,
    parse_problem,
    parse_worklist,
)
from pgro.clock import utcnow

log = logging.getLogger("pgro.canopy")

TAILNET_URL: Final = "https://canopy.tail53aef.ts.net"
TAILNET_SUFFIX: Final = ".ts.net"
PUBLIC_PREFIX: Final = "/public"
# The operator pod's Tailscale sidecar in userspace mode; "" disables the proxy.
DEFAULT_SOCKS5_PROXY: Final = "socks5://[::1]:1055"

GZIP_THRESHOLD: Final = 1024
# Connecting is bounded like the reference's tailnet client (5 s), so an unreachable
# canopy fails fast; reading is allowed 30 s (the reference's mTLS timeout), because a
# worklist can be large and 5 s is tight for it on a slow tailnet path.
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)
PROBE_TIMEOUT: Final = 5.0
# How often a running client checks that its device certificate is still fresh.
IDENTITY_RECHECK_SECONDS: Final = 600.0
IDENTITY_RETRY_SECONDS: Final = 60.0

# Capability registration at start-up: 8 attempts, 1 s doubling to at most 300 s between
# them (so 1, 2, 4 ... 64 s: seven waits), then give up until the next restart (§3.1).
CAPABILITIES_RETRY_DELAYS: Final = tuple(min(2**n, 300) for n in range(7))

USER_AGENT: Final = f"pgro/{__version__} (canopy client; {platform.system()}; {platform.machine()})"

_ERROR_TEXT_MAX: Final = 300


# -- errors ------------------------------------------------------------------------------------


class CanopyError(Exception):
    """A canopy call failed. `status` is the HTTP status (None: no answer), `problem`
    canopy's problem document when it sent one."""

    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        method: str,
        path: str,
        status: int | None = None,
        problem: ProblemDocument | None = None,
    ) -> None:
        super().__init__(message)
        self.method = method
        self.path = path
        self.status = status
        self.problem = problem


class CanopyForbidden(CanopyError):
    """401/403: canopy does not accept this device for this call. Definitive: retrying
    will not help until someone changes canopy's configuration (enrolment, role, an
    enabled declaration covering the group and type)."""


class CanopyNotReady(CanopyError):
    """409: the group has no backup configuration, or it is not ready yet. Retry later."""

    transient = True


class CanopyRateLimited(CanopyError):
    """429: slow down; `retry_after` is canopy's `Retry-After` in seconds, when it sent one."""

    transient = True

    def __init__(self, message: str, *, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class CanopyTransient(CanopyError):
    """5xx, a timeout, or no connection at all: retry later."""

    transient = True


class CanopyRejected(CanopyError):
    """Any other refusal (400, 404, 412, a redirect): the request itself is wrong for
    canopy, or names something canopy no longer has. Retrying the same request will not
    help."""


class CanopyProtocolError(CanopyError):
    """A 2xx answer pgro cannot read (not JSON, or not the expected shape)."""


# -- helpers -------------------------------------------------------------------------------------


def is_tailnet_host(host: str) -> bool:
    return host.lower().rstrip(".").endswith(TAILNET_SUFFIX)


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_problem(base_url: str, *, allowed: bool, flag: str) -> str | None:
    """Why `base_url` must not be used, or None. Plain `http://` to another host sends
    repository passwords and S3 credentials in the clear: refused unless `allowed` (the
    operator gave `flag`), and then logged as a warning. Loopback is always allowed."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return None  # the client names an unusable URL itself
    if url.scheme != "http" or not url.host or is_loopback_host(url.host):
        return None
    if not allowed:
        return (
            f"the canopy URL {_where(url)} is plain http to another host: repository "
            f"passwords and S3 credentials would cross the network unencrypted. Use https, "
            f"or set {flag} to accept that"
        )
    log.warning(
        "canopy at %s over plain http (%s): repository passwords and S3 credentials cross "
        "the network unencrypted",
        _where(url),
        flag,
    )
    return None


def _where(url: httpx.URL) -> str:
    """`https://host[:port]`: the URL without user information, path or query."""
    port = f":{url.port}" if url.port else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}"


def _clip(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 1] + "…"


def _retry_after(value: str | None, now: datetime) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _hint(method: str, path: str, status: int, slug: str | None) -> str:
    if status == 401:
        return {
            "auth-missing-certificate": (
                "no client certificate reached canopy: configure the device key (mTLS) or "
                "reach canopy through the tailnet"
            ),
            "auth-certificate-not-found": (
                "canopy does not know this device's key: enrol its public key in canopy "
                "with role backup-restore"
            ),
            "auth-tailnet-identity-missing": (
                "canopy could not tell which tailnet node called: check the Tailscale "
                "sidecar and that the node is enrolled in canopy as a device"
            ),
        }.get(
            slug or "", "canopy does not recognise this device: enrol it with role backup-restore"
        )
    if status == 403:
        if slug == "tagged-device-not-allowed":
            return f"tailnet devices may only use the {PUBLIC_PREFIX} routes; use {TAILNET_URL}"
        if path in ("/restore-credentials", "/restore-verification"):
            # Canopy uses one slug for both causes, so name both.
            return (
                "an enabled declaration of this consumer must cover this group and backup "
                "type, and the device needs the backup-restore role: check both in canopy"
            )
        if path == "/backup-progress":
            return "canopy accepts progress only from server devices; nothing to fix here"
        if slug == "auth-insufficient-permissions":
            return "the device needs the backup-restore role in canopy"
        return "canopy refused this device"
    if status == 404 and path == "/restore-verification":
        return "the declaration no longer exists in canopy; the report was refused, not recorded"
    if status == 409:
        return "the group's backup configuration is missing or not ready in canopy; retry later"
    if status == 412:
        return "canopy wants this device bound to a live server for this call"
    if status == 400:
        return "canopy found the request malformed: a pgro bug or a protocol mismatch"
    if slug == "backup-rotation-in-progress":
        return "a repository passphrase rotation is in progress; retry shortly"
    if status >= 500:
        return "canopy or a service behind it failed; retry later"
    return "canopy refused the request"


def _error_for(method: str, path: str, response: httpx.Response) -> CanopyError:
    status = response.status_code
    problem: ProblemDocument | None = None
    try:
        problem = parse_problem(response.json())
    except (ValueError, UnicodeDecodeError):
        problem = None
    slug = problem.slug if problem else None
    message = f"canopy answered {method} {path} with HTTP {status}"
    if slug:
        message += f" ({slug})"
    if problem and problem.reason:
        message += f": {_clip(problem.reason)}"
        if problem.title and problem.detail and problem.detail != problem.title:
            message += f" ({_clip(problem.detail)})"
    elif response.reason_phrase:
        message += f" {response.reason_phrase}"
    kwargs: dict[str, Any] = {"method": method, "path": path, "status": status, "problem": problem}
    if 300 <= status < 400:
        location = response.headers.get("location", "")
        shown = f" to {_where(httpx.URL(location))}" if location.startswith("http") else ""
        return CanopyRejected(
            f"{message}; redirects{shown} are not followed: set the canopy URL to the final "
            "address",
            **kwargs,
        )
    if status == 429:
        retry_after = _retry_after(response.headers.get("retry-after"), utcnow())
        wait = f"retry after {retry_after:g} s" if retry_after is not None else "back off"
        return CanopyRateLimited(
            f"{message}; canopy is rate-limiting this device: {wait}",
            retry_after=retry_after,
            **kwargs,
        )
    text = f"{message}; {_hint(method, path, status, slug)}"
    if status in (401, 403):
        return CanopyForbidden(text, **kwargs)
    if status == 409:
        return CanopyNotReady(text, **kwargs)
    if status >= 500:
        return CanopyTransient(text, **kwargs)
    return CanopyRejected(text, **kwargs)


# -- the client ------------------------------------------------------------------------------------


class CanopyClient:
    """One canopy route. Thread-safe; one instance serves the syncer, broker and reporter.

    `base_url`: the tailnet URL (a `*.ts.net` host: paths under `/public`) or the public
    one (paths at the root). `socks5_proxy`: used for `*.ts.net` hosts only; None or ""
    connects directly. `device_cert`: a `DeviceIdentity` (renewed as the client runs) or
    fixed `(cert_path, key_path)`, presented on non-tailnet routes. `ca_file`: trust
    these CAs instead of the system's (a test server). `transport` replaces the network
    entirely (tests); the proxy is then not used.

    Raises ValueError for an unusable URL or proxy URL, `DeviceCertificateError` for an
    unusable device key or certificate.
    """

    def __init__(
        self,
        base_url: str,
        *,
        socks5_proxy: str | None = None,
        device_cert: DeviceIdentity | tuple[Path, Path] | None = None,
        ca_file: Path | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise ValueError("the canopy URL is not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"the canopy URL {_where(url) if url.host else base_url!r} must be an "
                "http:// or https:// URL, e.g. https://meta.tamanu.app"
            )
        self.base_url = url.copy_with(query=None, fragment=None)
        self.where = _where(url)
        self.tailnet = is_tailnet_host(url.host)
        self._prefix = PUBLIC_PREFIX if self.tailnet else ""
        self._identity: DeviceIdentity | None = None
        self._identity_lock = threading.Lock()
        self._next_identity_check = 0.0
        self._cert_loaded = False

        self._ssl = (
            ssl.create_default_context(cafile=str(ca_file))
            if ca_file is not None
            else httpx.create_ssl_context()
        )
        if not self.tailnet and device_cert is not None:
            if isinstance(device_cert, DeviceIdentity):
                self._identity = device_cert
                cert_path, key_path, _ = device_cert.ensure()
                self._next_identity_check = time.monotonic() + IDENTITY_RECHECK_SECONDS
            else:
                cert_path, key_path = device_cert
            self._load_cert_chain(cert_path, key_path)

        mounts: dict[str, httpx.BaseTransport | None] | None = None
        if transport is None and socks5_proxy:
            try:
                mounts = {
                    f"all://*{TAILNET_SUFFIX}": httpx.HTTPTransport(
                        proxy=socks5_proxy, verify=self._ssl
                    )
                }
            except (ValueError, httpx.InvalidURL, ImportError) as error:
                raise ValueError(
                    f"the SOCKS5 proxy URL is unusable ({type(error).__name__}); expected "
                    f"something like {DEFAULT_SOCKS5_PROXY}, or an empty value to disable it"
                ) from None
        self._client = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            mounts=mounts,
            verify=self._ssl,
            timeout=timeout,
            follow_redirects=False,
            headers={"User-Agent": user_agent},
        )

    # -- lifecycle --
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CanopyClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        route = "tailnet" if self.tailnet else "mTLS" if self._cert_loaded else "direct"
        return f"CanopyClient({self.where}, {route})"

    def _load_cert_chain(self, cert_path: Path, key_path: Path) -> None:
        try:
            self._ssl.load_cert_chain(str(cert_path), str(key_path))
        except (OSError, ssl.SSLError) as error:
            raise DeviceCertificateError(
                f"cannot load the canopy device certificate {cert_path} with key {key_path}: "
                f"{getattr(error, 'reason', None) or error.strerror or type(error).__name__}"
            ) from None
        self._cert_loaded = True

    def _refresh_identity(self) -> None:
        if self._identity is None or time.monotonic() < self._next_identity_check:
            return
        with self._identity_lock:
            if time.monotonic() < self._next_identity_check:
                return
            try:
                cert_path, key_path, changed = self._identity.ensure()
                if changed:
                    self._load_cert_chain(cert_path, key_path)
                    log.info("renewed the canopy device certificate in %s", cert_path.parent)
            except (DeviceCertificateError, OSError) as error:
                # The certificate loaded earlier is still presented; try again soon.
                log.warning("could not renew the canopy device certificate: %s", error)
                self._next_identity_check = time.monotonic() + IDENTITY_RETRY_SECONDS
                return
            self._next_identity_check = time.monotonic() + IDENTITY_RECHECK_SECONDS

    # -- plumbing --
    def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> httpx.Response:
        self._refresh_identity()
        headers = {"Accept": "application/json, application/problem+json"}
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
            if len(content) >= GZIP_THRESHOLD:
                content = gzip.compress(content, mtime=0)
                headers["Content-Encoding"] = "gzip"
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._client.request(
                method, self._prefix + path, content=content, headers=headers, **extra
            )
        except httpx.TimeoutException as error:
            raise CanopyTransient(
                f"canopy {method} {path} at {self.where} timed out "
                f"({type(error).__name__}); retry later",
                method=method,
                path=path,
            ) from None
        except httpx.ProxyError as error:
            raise CanopyTransient(
                f"canopy {method} {path}: the SOCKS5 proxy could not reach {self.where} "
                f"({_clip(str(error)) or type(error).__name__}); check the Tailscale sidecar",
                method=method,
                path=path,
            ) from None
        except httpx.TransportError as error:
            raise CanopyTransient(
                f"canopy {method} {path}: could not reach {self.where} "
                f"({_clip(str(error)) or type(error).__name__}); retry later",
                method=method,
                path=path,
            ) from None
        if 200 <= response.status_code < 300:
            return response
        raise _error_for(method, path, response)

    def _json(self, method: str, path: str, response: httpx.Response) -> object:
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError):
            raise CanopyProtocolError(
                f"canopy answered {method} {path} with HTTP {response.status_code} and a body "
                f"that is not JSON ({response.headers.get('content-type', 'no content type')})",
                method=method,
                path=path,
                status=response.status_code,
            ) from None

    # -- the API --
    def probe(self) -> None:
        """`GET /public/servers` (root `/servers` off the tailnet): is canopy reachable on
        this route? Returns on 2xx, raises `CanopyError` saying why not."""
        self._send("GET", "/servers", timeout=PROBE_TIMEOUT)

    def register_capabilities(self, intents: tuple[IntentDescriptor, ...] = PGRO_INTENTS) -> None:
        """Replace the intents this device advertises (one attempt; see
        `CAPABILITIES_RETRY_DELAYS` for the reference's start-up retry schedule)."""
        self._send("POST", "/restore-capabilities", capabilities_request(intents).to_wire())

    def worklist(self) -> Worklist:
        """The replicas canopy wants now. Entries that cannot be decoded are returned in
        `rejected`; a body that is not a list is a `CanopyProtocolError`."""
        path = "/restore-worklist"
        data = self._json("GET", path, self._send("GET", path))
        try:
            return parse_worklist(data)
        except ValueError as error:
            raise CanopyProtocolError(
                f"canopy answered GET {path} with {error}", method="GET", path=path, status=200
            ) from None

    def restore_credentials(
        self, group: UUID | str, type: str, run_id: UUID | str | None = None
    ) -> RestoreCredentials:
        """Read-only S3 credentials for `group`'s repository and its password. Pass the
        restore's `run_id` for every call made on behalf of a restore run."""
        path = "/restore-credentials"
        try:
            args = RestoreCredentialsArgs.model_validate(
                {"group": group, "type": type, "run_id": run_id}
            )
        except ValidationError as error:
            raise ValueError(
                f"invalid restore-credentials request: {describe_validation_error(error)}"
            ) from None
        data = self._json("POST", path, self._send("POST", path, args.to_wire()))
        try:
            return RestoreCredentials.model_validate(data)
        except ValidationError as error:
            # Field paths only: the values may be the very secrets being issued.
            raise CanopyProtocolError(
                f"canopy answered POST {path} with credentials pgro cannot read: "
                f"{describe_validation_error(error)}",
                method="POST",
                path=path,
                status=200,
            ) from None

    def report_verification(self, report: VerificationArgs) -> None:
        self._send("POST", "/restore-verification", report.to_wire())

    def backup_progress(self, sample: ProgressArgs) -> None:
        self._send("POST", "/backup-progress", sample.to_wire())


def connect(
    base_url: str | None,
    *,
    tailnet_url: str | None = TAILNET_URL,
    socks5_proxy: str | None = DEFAULT_SOCKS5_PROXY,
    device_cert: DeviceIdentity | tuple[Path, Path] | None = None,
    ca_file: Path | None = None,
    transport: httpx.BaseTransport | None = None,
) -> CanopyClient | None:
    """Choose the route as the reference does (§2.2), or None when there is none.

    1. The tailnet, when `tailnet_url` answers the probe (through `socks5_proxy`).
    2. Else `base_url`, with the device certificate when one is configured. The reference
       gives up here when there is no device key; pgro still connects, so a plain-HTTP
       test canopy works and a real one answers 401 with a clear reason instead of the
       operator silently running without canopy.
    3. Neither: None.

    The choice is fixed for the client's life, as in the reference.
    """
    if tailnet_url:
        candidate = CanopyClient(tailnet_url, socks5_proxy=socks5_proxy, transport=transport)
        try:
            candidate.probe()
        except CanopyError as error:
            candidate.close()
            log.info("canopy is not reachable over the tailnet (%s)", error)
        else:
            log.info("canopy: using the tailnet route %s", candidate.where)
            return candidate
    if not base_url:
        return None
    client = CanopyClient(
        base_url,
        socks5_proxy=socks5_proxy,
        device_cert=device_cert,
        ca_file=ca_file,
        transport=transport,
    )
    log.info("canopy: using %r", client)
    return client
