"""Notifications at a completed switchover (reference §5), delivered off the runtime's loop.

The reference sends every target sequentially inside the reconcile and retries with delays
of 0, 30, 120, 600 and 3600 s, so one failing target blocks the replica for ~73 minutes.
Here `Notifier.notify` starts a *round* on background threads (one per target) and returns
at once; the runtime picks the round's statuses up later with `take_status` and writes
`status.notifications` (replaced wholesale, only when non-empty) as the reference does.

Differences from the reference, on purpose:

- `lastError` keeps the real, secret-free cause of the last attempt ("HTTP 500 Internal
  Server Error from https://host", "connection to https://host failed: …") instead of "max
  retries exhausted".
- A target is named without its secrets (`target_name`: method, `scheme://host[:port]`
  and a fingerprint) in the status, the metric label and the log, and errors name only the
  URL's origin: webhook URLs carry their token in the path or `user:password@`.
- A header Secret the runtime refused to read (the operator reads only Secrets labelled
  `pgro.bes.au/notification-secret: "true"`) ends the target with the refusal's message.
- An error no retry can change within the round (a header Secret missing from the
  manifest, a template that does not render valid JSON, an invalid URL or header) ends the
  target at once instead of repeating the same failure for 73 minutes.
- Redirects are not followed (reqwest follows them): a header read from a Secret must not
  be forwarded to whatever host a `Location` names. A 3xx is a failure that says so.
- A newer round for the same replica supersedes one still running (its remaining retries
  are cancelled and its statuses discarded): the status describes the latest switchover.
- Metrics use one label set, `name` (the target's secret-free name) and `event="restore_completed"`;
  `sent` counts each target delivered, `failed` each target that gave up, once.

GraphQL `variablesTemplate`s are rendered with `render_template`, a strict subset of
Handlebars that matches handlebars-rust 6 (the reference's engine) in the non-strict
default mode: `{{path}}` (HTML-escaped as Handlebars does: & < > " ' = and backtick),
`{{{path}}}` / `{{&path}}` (raw), comments, `\\{{` escapes, `~` whitespace control,
`{{#if}}`, `{{#unless}}`, `{{#with}}`, `{{#each}}` (with `@key`, `@index`, `@first`,
`@last`), `{{else}}` / `{{^}}` / `{{else if …}}`, mustache-style sections `{{#path}}` and
`{{^path}}`, and paths with `.`/`/`, `this`, `../` and `@root`. A missing value renders as
"", `null` as "", booleans as `true`/`false`, an object as `[object]`. Anything else
(helpers with arguments, partials, literals, decorators) is rejected with a message naming
the construct and its position, never rendered silently wrong. Handlebars' "standalone
line" whitespace removal is not done: the output is parsed as JSON, where it cannot matter.
No maintained Python Handlebars library exists (pybars3: last release 2019, silently
renders an unclosed `{{#if}}` as "", escapes a different character set), hence this one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import pydantic

from pgro import __version__
from pgro.api.notifications import (
    GraphQLNotification,
    HeaderValue,
    NotificationStatus,
    WebhookNotification,
    url_origin,
)
from pgro.api.replica import ConnectionInfo, PostgresPhysicalReplica
from pgro.api.secret import SecretInvalid, decode_secret_data
from pgro.api.timestamp import format_rfc3339
from pgro.clock import utcnow
from pgro.core.secrets import scrub
from pgro.observability import Metrics

log = logging.getLogger("pgro.notifications")

EVENT: Final = "restore_completed"
DEFAULT_DELAYS: Final = (0.0, 30.0, 120.0, 600.0, 3600.0)
DEFAULT_HTTP_TIMEOUT: Final = 10.0
USER_AGENT: Final = f"pgro/{__version__}"

Target = WebhookNotification | GraphQLNotification


# -- errors -------------------------------------------------------------------------------


class NotificationError(Exception):
    """One attempt failed. The message is shown in `status.notifications[].lastError` and
    logged, so it never carries a secret: no header value, password or rendered body.

    `permanent` errors cannot change by retrying within the round (the inputs are fixed
    when the round starts), so the target gives up at once.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class TemplateError(NotificationError):
    """`variablesTemplate` uses syntax the renderer does not support, or is malformed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


# -- what a round sends -------------------------------------------------------------------


@dataclass(frozen=True)
class RoundInput:
    """Everything one switchover's notifications are built from, fixed when it starts."""

    replica_name: str
    namespace: str
    restore_name: str
    snapshot: str
    postgres_version: str
    connection_info: ConnectionInfo
    timestamp: str
    password: str | None = field(default=None, repr=False)
    secrets: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict, repr=False)
    # (namespace, name) of header Secrets the runtime would not or could not read, and why
    # (with the fix).
    unavailable: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def password_for(self, target: Target) -> str | None:
        """The password goes out only to targets that ask for it (`includePassword`)."""
        return self.password if target.include_password else None


def webhook_payload(inp: RoundInput, password: str | None) -> dict[str, Any]:
    """The webhook JSON body (§5.3); `password` only when given (and so asked for)."""
    ci = inp.connection_info
    connection: dict[str, Any] = {
        "host": ci.host,
        "port": ci.port,
        "database": ci.database,
        "username": ci.username,
        "passwordSecret": ci.password_secret,
    }
    if password is not None:
        connection["password"] = password
    return {
        "timestamp": inp.timestamp,
        "replica": {"name": inp.replica_name, "namespace": inp.namespace},
        "restore": {
            "name": inp.restore_name,
            "snapshot": inp.snapshot,
            "postgresVersion": inp.postgres_version,
        },
        "connectionInfo": connection,
    }


def graphql_context(inp: RoundInput, password: str | None) -> dict[str, Any]:
    """What `variablesTemplate` is rendered against (§5.4)."""
    ci = inp.connection_info
    return {
        "Replica": inp.replica_name,
        "ConnectionInfo": {
            "Host": ci.host,
            "Port": ci.port,
            "Database": ci.database,
            "Username": ci.username,
            "PasswordSecret": ci.password_secret,
            "Password": password,
        },
        # As the reference: true only when the password is actually included.
        "IncludePassword": password is not None,
        "Timestamp": inp.timestamp,
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def graphql_body(target: GraphQLNotification, inp: RoundInput) -> dict[str, Any]:
    """`{"query": mutation, "variables": <rendered template, parsed>}`.

    The rendered text is never put in an error: it may hold the password.
    """
    rendered = render_template(
        target.variables_template, graphql_context(inp, inp.password_for(target))
    )
    try:
        variables = json.loads(rendered, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise NotificationError(
            f"variablesTemplate did not render valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}",
            permanent=True,
        ) from None
    except ValueError as exc:
        raise NotificationError(
            f"variablesTemplate did not render valid JSON: {exc}", permanent=True
        ) from None
    return {"query": target.mutation, "variables": variables}


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible ASCII, with spaces or tabs only between visible characters (what h11 sends).
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[ \t]*[\x21-\x7e])*)?")


def resolve_headers(
    headers: Mapping[str, HeaderValue] | None,
    namespace: str,
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
    unavailable: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, str]:
    """Plain values as written; `secretKeyRef` values read from the given Secrets in the
    replica's namespace (a Secret in `unavailable` fails with that reason). Errors name the
    header, Secret and key, never the value."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if _HEADER_NAME.fullmatch(name) is None:
            raise NotificationError(
                f"header name {name!r} is not a valid HTTP header name", permanent=True
            )
        if isinstance(value, str):
            source = "its value"
            resolved = value
        else:
            ref = value.secret_key_ref
            source = f"Secret {namespace}/{ref.name} key {ref.key!r}"
            reason = (unavailable or {}).get((namespace, ref.name))
            if reason is not None:
                raise NotificationError(f"header {name!r}: {reason}", permanent=True)
            resolved = _secret_value(name, namespace, ref.name, ref.key, secrets)
        if _HEADER_VALUE.fullmatch(resolved) is None:
            raise NotificationError(
                f"header {name!r}: {source} has leading or trailing whitespace (often a "
                "trailing newline), a control character or a non-ASCII character, which "
                "HTTP headers cannot carry; store the value without it",
                permanent=True,
            )
        out[name] = resolved
    return out


def _secret_value(
    header: str,
    namespace: str,
    secret_name: str,
    key: str,
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
) -> str:
    doc = secrets.get((namespace, secret_name))
    if doc is None:
        raise NotificationError(
            f"header {header!r}: Secret {secret_name!r} is not in namespace {namespace!r}: "
            "add a `kind: Secret` document to the manifest",
            permanent=True,
        )
    try:
        data = decode_secret_data(doc)
    except SecretInvalid as exc:
        raise NotificationError(
            f"header {header!r}: Secret {namespace}/{secret_name}: {exc}", permanent=True
        ) from None
    raw = data.get(key)
    if raw is None:
        raise NotificationError(
            f"header {header!r}: Secret {namespace}/{secret_name} has no key {key!r}",
            permanent=True,
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotificationError(
            f"header {header!r}: Secret {namespace}/{secret_name} key {key!r} is not valid UTF-8",
            permanent=True,
        ) from None


@dataclass(frozen=True)
class PreparedRequest:
    """One attempt's request. The URL, headers and body may hold secrets: kept out of
    `repr`."""

    method: str
    url: str = field(repr=False)
    body: dict[str, Any] = field(repr=False)
    headers: dict[str, str] = field(repr=False)

    def sensitive_values(self) -> list[str]:
        return [*self.headers.values(), *url_secrets(self.url)]


def prepare_request(target: Target, inp: RoundInput) -> PreparedRequest:
    """Method, URL, headers and JSON body for one attempt at `target`."""
    _check_url(target.url)
    headers = resolve_headers(target.headers, inp.namespace, inp.secrets, inp.unavailable)
    if isinstance(target, WebhookNotification):
        body = webhook_payload(inp, inp.password_for(target))
        return PreparedRequest(target.effective_method, target.url, body, headers)
    return PreparedRequest("POST", target.url, graphql_body(target, inp), headers)


def _check_url(url: str) -> None:
    # The URL is not quoted back: its path or user information may be the secret.
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise NotificationError(
            f"url (origin {url_origin(url)}) is not a valid URL", permanent=True
        ) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise NotificationError(
            f"url (origin {url_origin(url)}) is not an http:// or https:// URL", permanent=True
        )


def safe_url(url: str) -> str:
    """`url` without user information (`https://user:pass@host` → `https://host`)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@]*@", r"\1", url)


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that may be secret (whole URL, user information, path, query and
    fragment, each as written and as httpx normalises it), for scrubbing messages of
    exceptions we do not build ourselves."""
    parts = [url]
    try:
        split = urlsplit(url)
        parts += [split.netloc.rpartition("@")[0], split.path, split.query, split.fragment]
        parts += [seg for seg in split.path.split("/") if len(seg) >= 6]
        parsed = httpx.URL(url)
        parts += [str(parsed), parsed.userinfo.decode("ascii", "replace"), parsed.raw_path.decode()]
    except (ValueError, TypeError, httpx.InvalidURL, UnicodeDecodeError):
        pass
    return [p for p in dict.fromkeys(parts) if p and p != "/"]


def send(client: httpx.Client, request: PreparedRequest, password: str | None) -> None:
    """One HTTP attempt; a non-2xx status or a transport error is a `NotificationError`."""
    where = url_origin(request.url)
    try:
        with client.stream(
            request.method, request.url, json=request.body, headers=request.headers
        ) as response:
            status = response.status_code
            reason = response.reason_phrase
    except httpx.TimeoutException:
        raise NotificationError(f"timed out sending {request.method} to {where}") from None
    except httpx.ConnectError as exc:
        detail = scrub(str(exc), [*request.sensitive_values(), password]) or "no detail"
        raise NotificationError(f"connection to {where} failed: {detail}") from None
    except httpx.HTTPError as exc:
        detail = scrub(str(exc), [*request.sensitive_values(), password]) or "no detail"
        raise NotificationError(
            f"{request.method} to {where} failed ({type(exc).__name__}): {detail}"
        ) from None
    if 200 <= status < 300:
        return
    text = f"HTTP {status}{' ' + reason if reason else ''} from {where}"
    if 300 <= status < 400:
        text += " (redirects are not followed: set url to the final address)"
    raise NotificationError(text)


class _HttpxUrlRedaction(logging.Filter):
    """httpx logs every request's full URL at INFO ("HTTP Request: POST https://…"), and a
    webhook URL is a secret. The CLIs set the `httpx` logger to WARNING; this filter keeps
    the URL out even where a process logs httpx at INFO or DEBUG: it reduces every URL
    argument of an httpx record to its origin."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(
                url_origin(str(a)) if isinstance(a, httpx.URL) else a for a in record.args
            )
        return True


_HTTPX_URL_REDACTION: Final = _HttpxUrlRedaction()


def redact_http_client_logs() -> None:
    """Install the URL redaction on the `httpx` logger (idempotent)."""
    logging.getLogger("httpx").addFilter(_HTTPX_URL_REDACTION)


# -- the notifier -------------------------------------------------------------------------


@dataclass(eq=False)
class _Round:
    key: str
    statuses: list[NotificationStatus | None]
    remaining: int
    cancel: threading.Event = field(default_factory=threading.Event)


class Notifier:
    """Runs notification rounds on background threads; the caller is never blocked.

    `notify` starts a round (one thread per target), `take_status` hands back a finished
    round's statuses exactly once, `cancel` drops a replica's running round, `shutdown`
    cancels pending retries and waits briefly for attempts in flight.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utcnow,
        delays: Sequence[float] = DEFAULT_DELAYS,
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not delays:
            raise ValueError("delays must hold at least one attempt (e.g. (0,))")
        if any(d < 0 for d in delays):
            raise ValueError("delays must not be negative")
        self.metrics = metrics
        self.clock = clock
        self.delays = tuple(float(d) for d in delays)
        self.http_timeout = http_timeout
        redact_http_client_logs()
        self._client = httpx.Client(
            transport=transport,
            timeout=http_timeout,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )
        self._lock = threading.Lock()
        self._running: dict[str, _Round] = {}
        self._finished: dict[str, list[NotificationStatus]] = {}
        self._threads: set[threading.Thread] = set()
        self._closed = False

    # -- the runtime's side ----------------------------------------------------------------
    def notify(
        self,
        replica_key: str,
        replica: PostgresPhysicalReplica,
        restore_name: str,
        snapshot: str | None,
        postgres_version: str | None,
        connection_info: Mapping[str, Any] | ConnectionInfo,
        password: str | None,
        secrets: Mapping[tuple[str, str], Mapping[str, Any]],
        unavailable: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """Start one round for every target in `replica.spec.notifications`; return at once.

        `connection_info` is `status.connectionInfo` (wire or Python field names).
        `password` is the analytics user's; it goes only to targets with `includePassword`.
        `secrets` are the header Secret documents by (namespace, name); `unavailable` the ones
        the runtime would not or could not read, with the reason and fix (a target needing one fails
        with that reason and is not sent).
        A round already running for `replica_key` is superseded.
        """
        if self._closed:
            raise RuntimeError("the notifier is shut down")
        targets: list[Target] = list(replica.spec.notifications)
        if not targets:
            return
        inp = RoundInput(
            replica_name=replica.name,
            namespace=replica.namespace,
            restore_name=restore_name,
            snapshot=snapshot or "",
            postgres_version=postgres_version or "",
            connection_info=_connection_info(connection_info),
            timestamp=format_rfc3339(self.clock()),
            password=password,
            secrets=dict(secrets),
            unavailable=dict(unavailable or {}),
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("the notifier is shut down")
            previous = self._running.pop(replica_key, None)
            if previous is not None:
                previous.cancel.set()
                log.info(
                    "%s: a newer switchover supersedes the notifications in flight", replica_key
                )
            self._finished.pop(replica_key, None)
            round_ = _Round(replica_key, [None] * len(targets), len(targets))
            self._running[replica_key] = round_
            for index, target in enumerate(targets):
                thread = threading.Thread(
                    target=self._deliver,
                    args=(round_, index, target, inp),
                    name=f"notify-{replica_key}-{index}",
                    daemon=True,
                )
                self._threads.add(thread)
                thread.start()

    def take_status(self, replica_key: str) -> list[NotificationStatus] | None:
        """The finished round's statuses, in spec order, once; None while running or after."""
        with self._lock:
            return self._finished.pop(replica_key, None)

    def running(self, replica_key: str) -> bool:
        with self._lock:
            return replica_key in self._running

    def cancel(self, replica_key: str) -> None:
        """Drop the replica's running round (e.g. the replica was removed)."""
        with self._lock:
            round_ = self._running.pop(replica_key, None)
            self._finished.pop(replica_key, None)
        if round_ is not None:
            round_.cancel.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel pending retries, wait up to `timeout` (default: one HTTP timeout) for
        attempts in flight, then close the HTTP client. Unfinished rounds are dropped."""
        with self._lock:
            self._closed = True
            rounds = list(self._running.values())
            self._running.clear()
            threads = list(self._threads)
        for round_ in rounds:
            round_.cancel.set()
        limit = self.http_timeout + 1.0 if timeout is None else timeout
        deadline = time.monotonic() + limit
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._client.close()

    # -- delivery --------------------------------------------------------------------------
    def _deliver(self, round_: _Round, index: int, target: Target, inp: RoundInput) -> None:
        try:
            status = self._deliver_target(round_, target, inp)
        except Exception as exc:  # a bug must not leave the round unfinished
            # The message could hold a header value or the password: type and place only.
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            log.error(
                "%s: notification %s crashed: %s at %s:%s",
                round_.key,
                target.display_name,
                type(exc).__name__,
                frame.filename,
                frame.lineno,
            )
            self.metrics.notifications_failed.labels(name=target.display_name, event=EVENT).inc()
            status = NotificationStatus(
                name=target.display_name,
                last_sent_at=self.clock(),
                success=False,
                last_error="internal error while sending (see the pgro log)",
            )
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
        if status is None:
            return
        with self._lock:
            if self._running.get(round_.key) is not round_:
                return  # superseded or cancelled meanwhile
            round_.statuses[index] = status
            round_.remaining -= 1
            if round_.remaining == 0:
                del self._running[round_.key]
                self._finished[round_.key] = [s for s in round_.statuses if s is not None]

    def _deliver_target(
        self, round_: _Round, target: Target, inp: RoundInput
    ) -> NotificationStatus | None:
        name = target.display_name
        label = name
        sent_at = self.clock()
        last_error = "no attempt was made"
        attempts = len(self.delays)
        for attempt, delay in enumerate(self.delays, start=1):
            if delay > 0 and round_.cancel.wait(delay):
                return None
            if round_.cancel.is_set():
                return None
            try:
                request = prepare_request(target, inp)
                send(self._client, request, inp.password)
            except NotificationError as exc:
                last_error = exc.message
                if exc.permanent:
                    log.warning(
                        "%s: notification %s failed and cannot succeed by retrying: %s",
                        round_.key,
                        label,
                        last_error,
                    )
                    break
                log.warning(
                    "%s: notification %s attempt %d/%d failed: %s",
                    round_.key,
                    label,
                    attempt,
                    attempts,
                    last_error,
                )
                continue
            self.metrics.notifications_sent.labels(name=name, event=EVENT).inc()
            log.info("%s: notification %s delivered (attempt %d)", round_.key, label, attempt)
            return NotificationStatus(name=name, last_sent_at=sent_at, success=True)
        self.metrics.notifications_failed.labels(name=name, event=EVENT).inc()
        log.warning("%s: notification %s gave up: %s", round_.key, label, last_error)
        return NotificationStatus(
            name=name, last_sent_at=sent_at, success=False, last_error=last_error
        )


def _connection_info(value: Mapping[str, Any] | ConnectionInfo) -> ConnectionInfo:
    if isinstance(value, ConnectionInfo):
        return value
    try:
        return ConnectionInfo.model_validate(dict(value))
    except pydantic.ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        raise ValueError(f"connection_info is incomplete or invalid ({fields})") from None


# -- Handlebars subset --------------------------------------------------------------------

_MISSING: Final = object()
_ESCAPES: Final = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "'": "&#x27;",
        "`": "&#x60;",
        "=": "&#x3D;",
    }
)
_ID: Final = r"[^\s!\"#%-,\./;->@\[-\^`\{-~]+"
_SEGMENT: Final = rf"(?:{_ID}|\[[^\]]*\])"
_PATH_BODY: Final = re.compile(rf"{_SEGMENT}(?:[./]{_SEGMENT})*")
_SEGMENT_RE: Final = re.compile(_SEGMENT)
_BLOCK_HELPERS: Final = frozenset({"if", "unless", "with", "each"})
_SUPPORTED: Final = "supported: {{path}}, {{{path}}}, comments, and the if/unless/with/each blocks"


@dataclass(frozen=True)
class _Path:
    data: bool  # @root, @key, @index, @first, @last
    up: int  # number of ../
    parts: tuple[str, ...]


@dataclass
class _Text:
    text: str


@dataclass
class _Var:
    path: _Path
    escape: bool


@dataclass
class _Block:
    kind: str  # if, unless, with, each, section, inverted
    name: str  # what closes it: {{/name}}
    path: _Path
    where: str
    body: list[_Node] = field(default_factory=list)
    inverse: list[_Node] = field(default_factory=list)


_Node = _Text | _Var | _Block


@dataclass
class _Tag:
    content: str
    raw: bool  # {{{ }}}
    strip_left: bool
    strip_right: bool
    where: str


def _position(source: str, index: int) -> str:
    line = source.count("\n", 0, index) + 1
    column = index - (source.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


_CLOSE: Final = re.compile(r"(~?)\}\}")
_CLOSE_RAW: Final = re.compile(r"\}(~?)\}\}")
_COMMENT_LONG_END: Final = re.compile(r"--(~?)\}\}")


def _tokenize(source: str) -> list[_Text | _Tag]:
    tokens: list[_Text | _Tag] = []
    pos = 0
    while True:
        start = source.find("{{", pos)
        if start < 0:
            tokens.append(_Text(source[pos:]))
            return tokens
        if start >= 1 and source[start - 1] == "\\":
            if start >= 2 and source[start - 2] == "\\":
                tokens.append(_Text(source[pos : start - 1]))  # \\{{x}}: "\" then x
            else:
                tokens.append(_Text(source[pos : start - 1] + "{{"))  # \{{: literal
                pos = start + 2
                continue
        else:
            tokens.append(_Text(source[pos:start]))
        where = _position(source, start)
        if source.startswith("{{{{", start):
            raise TemplateError(f"raw blocks {_tag('{{…}}')} at {where} are not supported")
        i = start + 2
        strip_left = source.startswith("~", i)
        if strip_left:
            i += 1
        raw = source.startswith("{", i)
        if raw:
            i += 1
        if not raw and source.startswith("!", i):
            long = source.startswith("!--", i)
            end_re = _COMMENT_LONG_END if long else _CLOSE
            end = end_re.search(source, i)
            if end is None:
                raise TemplateError(f"comment opened at {where} is never closed")
            tokens.append(_Tag("!", False, strip_left, bool(end.group(1)), where))
            pos = end.end()
            continue
        end = (_CLOSE_RAW if raw else _CLOSE).search(source, i)
        if end is None:
            closing = "}}}" if raw else "}}"
            raise TemplateError(f"tag opened at {where} is never closed with {closing}")
        content = source[i : end.start()]
        if "{{" in content:
            raise TemplateError(f"tag opened at {where} is not closed before the next {{{{")
        tokens.append(_Tag(content.strip(), raw, strip_left, bool(end.group(1)), where))
        pos = end.end()


def _apply_whitespace_control(tokens: list[_Text | _Tag]) -> None:
    for i, token in enumerate(tokens):
        if not isinstance(token, _Tag):
            continue
        if token.strip_left and i > 0 and isinstance(tokens[i - 1], _Text):
            previous = tokens[i - 1]
            assert isinstance(previous, _Text)
            previous.text = previous.text.rstrip()
        if token.strip_right and i + 1 < len(tokens) and isinstance(tokens[i + 1], _Text):
            following = tokens[i + 1]
            assert isinstance(following, _Text)
            following.text = following.text.lstrip()


def _tag(content: str) -> str:
    return "{{" + content + "}}"


def _parse_path(text: str, where: str) -> _Path:
    original = text
    data = text.startswith("@")
    if data:
        text = text[1:]
    up = 0
    while text.startswith("../"):
        up += 1
        text = text[3:]
    if data and up:
        raise TemplateError(f"{_tag(original)} at {where}: @../ is not supported; {_SUPPORTED}")
    if text == "..":
        return _Path(False, up + 1, ())
    if not data and text in ("", ".", "this"):
        return _Path(False, up, ())
    if not data:
        for prefix in ("./", "this.", "this/"):
            if text.startswith(prefix):
                text = text[len(prefix) :]
                break
    if _PATH_BODY.fullmatch(text) is None:
        raise TemplateError(f"{_tag(original)} at {where} is not a path; {_SUPPORTED}")
    parts = tuple(
        m.group(0)[1:-1] if m.group(0).startswith("[") else m.group(0)
        for m in _SEGMENT_RE.finditer(text)
    )
    if data and parts[0] not in ("root", "key", "index", "first", "last"):
        raise TemplateError(f"unknown data variable @{parts[0]} at {where}")
    return _Path(data, up, parts)


class _Parser:
    """Tokens to a tree; a stack of open blocks, each filling its body or its inverse."""

    def __init__(self) -> None:
        self.root: list[_Node] = []
        # (block, chained, in_inverse); a chained block comes from {{else if …}} and is
        # closed by its parent's {{/…}}.
        self.stack: list[tuple[_Block, bool, bool]] = []

    def current(self) -> list[_Node]:
        if not self.stack:
            return self.root
        block, _, in_inverse = self.stack[-1]
        return block.inverse if in_inverse else block.body

    def parse(self, source: str) -> list[_Node]:
        tokens = _tokenize(source)
        _apply_whitespace_control(tokens)
        for token in tokens:
            if isinstance(token, _Text):
                if token.text:
                    self.current().append(token)
            elif token.content != "!":
                self.tag(token)
        for block, chained, _ in reversed(self.stack):
            if not chained:
                raise TemplateError(
                    f"{_tag('#' + block.name)} opened at {block.where} is never closed"
                )
        return self.root

    def tag(self, token: _Tag) -> None:
        content, where = token.content, token.where
        words = content.split()
        if token.raw:
            self.current().append(_Var(_single_path(content, where), escape=False))
        elif content.startswith("&"):
            self.current().append(_Var(_single_path(content[1:], where), escape=False))
        elif content.startswith((">", "*", "#>", "#*")):
            raise TemplateError(
                f"{_tag(content)} at {where}: partials and decorators are not supported; "
                f"{_SUPPORTED}"
            )
        elif content.startswith("#"):
            block = _open_block(content[1:].split(), where)
            self.current().append(block)
            self.stack.append((block, False, False))
        elif content == "^" or words[:1] == ["else"]:
            self.else_(content, words[1:] if words[:1] == ["else"] else [], where)
        elif content.startswith("^"):
            names = content[1:].split()
            if len(names) != 1:
                raise TemplateError(
                    f"{_tag(content)} at {where}: an inverted section takes one path"
                )
            block = _Block("inverted", names[0], _parse_path(names[0], where), where)
            self.current().append(block)
            self.stack.append((block, False, False))
        elif content.startswith("/"):
            self.close(content[1:].strip(), where)
        else:
            self.current().append(_Var(_single_path(content, where), escape=True))

    def else_(self, content: str, chain: list[str], where: str) -> None:
        if not self.stack:
            raise TemplateError(f"{_tag(content)} at {where} is outside any block")
        block, chained, in_inverse = self.stack[-1]
        if in_inverse:
            raise TemplateError(
                f"a second {_tag('else')} at {where} in the block opened at {block.where}"
            )
        self.stack[-1] = (block, chained, True)
        if chain:
            if chain[0] not in _BLOCK_HELPERS:
                raise TemplateError(f"{_tag(content)} at {where} is not supported; {_SUPPORTED}")
            nested = _open_block(chain, where, closes_as=block.name)
            block.inverse.append(nested)
            self.stack.append((nested, True, False))

    def close(self, name: str, where: str) -> None:
        while self.stack and self.stack[-1][1]:
            self.stack.pop()  # chained blocks end with their parent
        if not self.stack:
            raise TemplateError(f"{_tag('/' + name)} at {where} closes no open block")
        block = self.stack.pop()[0]
        if name != block.name:
            raise TemplateError(
                f"{_tag('/' + name)} at {where} does not match {_tag('#' + block.name)} "
                f"opened at {block.where}"
            )


def _single_path(content: str, where: str) -> _Path:
    words = content.split()
    if len(words) != 1:
        raise TemplateError(
            f"{_tag(content)} at {where}: helper calls are not supported; {_SUPPORTED}"
        )
    return _parse_path(words[0], where)


def _open_block(words: list[str], where: str, closes_as: str | None = None) -> _Block:
    if not words:
        raise TemplateError(f"empty block tag at {where}")
    name, args = words[0], words[1:]
    if name in _BLOCK_HELPERS:
        if len(args) != 1:
            raise TemplateError(
                f"{_tag('#' + name)} at {where} takes exactly one path argument, got {len(args)}"
            )
        return _Block(name, closes_as or name, _parse_path(args[0], where), where)
    if args:
        raise TemplateError(
            f"{_tag('#' + ' '.join(words))} at {where}: block helper {name!r} is not "
            f"supported; {_SUPPORTED}"
        )
    return _Block("section", closes_as or name, _parse_path(name, where), where)


@dataclass(frozen=True)
class _Frame:
    value: Any
    data: Mapping[str, Any]


def _lookup(value: Any, parts: Iterable[str]) -> Any:
    for part in parts:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _resolve(path: _Path, frames: list[_Frame]) -> Any:
    if path.data:
        if path.parts[0] == "root":
            return _lookup(frames[0].value, path.parts[1:])
        frame = frames[-1]
        if path.parts[0] not in frame.data:
            return _MISSING
        return _lookup(frame.data[path.parts[0]], path.parts[1:])
    depth = len(frames) - 1 - path.up
    if depth < 0:
        return _MISSING
    return _lookup(frames[depth].value, path.parts)


def _truthy(value: Any) -> bool:
    """handlebars-rust `is_truthy(include_zero=false)`."""
    if value is _MISSING or value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0 and not math.isnan(value)
    if isinstance(value, str | list | Mapping):
        return len(value) > 0
    return True


def _stringify(value: Any) -> str:
    """handlebars-rust `JsonRender`."""
    if value is _MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + "".join(_stringify(v) + ", " for v in value) + "]"
    if isinstance(value, Mapping):
        return "[object]"
    return str(value)


def _each(block: _Block, value: Any, frames: list[_Frame], out: list[str]) -> None:
    """Lists and objects iterate; anything else renders the inverse (non-strict mode)."""
    items: list[tuple[Any, Any]] = []
    if isinstance(value, list):
        items = list(enumerate(value))
    elif isinstance(value, Mapping):
        items = list(value.items())
    if not items:
        _render(block.inverse, frames, out)
        return
    for index, (key, item) in enumerate(items):
        data = {
            **frames[-1].data,
            "key": key,
            "index": index,
            "first": index == 0,
            "last": index == len(items) - 1,
        }
        _render(block.body, [*frames, _Frame(item, data)], out)


def _render(nodes: list[_Node], frames: list[_Frame], out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Var):
            text = _stringify(_resolve(node.path, frames))
            out.append(text.translate(_ESCAPES) if node.escape else text)
        else:
            value = _resolve(node.path, frames)
            truthy = _truthy(value)
            kind = node.kind
            if kind in ("if", "unless", "inverted"):
                show = truthy if kind == "if" else not truthy
                _render(node.body if show else node.inverse, frames, out)
            elif kind == "with":
                if truthy:
                    _render(node.body, [*frames, _Frame(value, frames[-1].data)], out)
                else:
                    _render(node.inverse, frames, out)
            elif kind == "each" or (kind == "section" and isinstance(value, list)):
                _each(node, value, frames, out)
            elif not truthy:
                _render(node.inverse, frames, out)
            elif value is True:
                _render(node.body, frames, out)
            else:
                _render(node.body, [*frames, _Frame(value, frames[-1].data)], out)


def render_template(template: str, context: Mapping[str, Any]) -> str:
    """Render `template` against `context` with the Handlebars subset described above;
    raises `TemplateError` (with the position) for anything outside it."""
    nodes = _Parser().parse(template)
    out: list[str] = []
    _render(nodes, [_Frame(context, {})], out)
    return "".join(out)
