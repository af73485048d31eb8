"""Notifications (reference §5): payloads, GraphQL templates, headers, method, outcomes.

Fast: HTTP goes to `httpx.MockTransport`. The real-HTTP behaviour (retries against a
server, not blocking the caller) is in tests/integration/test_notifications.py.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from pgro.api.notifications import (
    GraphQLNotification,
    NotificationStatus,
    WebhookNotification,
    target_name,
    url_fingerprint,
    url_origin,
)
from pgro.api.replica import ConnectionInfo
from pgro.notifications import (
    EVENT,
    NotificationError,
    Notifier,
    RoundInput,
    TemplateError,
    graphql_body,
    prepare_request,
    render_template,
    resolve_headers,
    safe_url,
    url_secrets,
    webhook_payload,
)
from pgro.observability import Metrics
from tests.fixtures.manifests import replica

NAMESPACE = "team-a"
PASSWORD = "Pw-0123456789abcdefXYZ"
TOKEN = "tok-SECRET-9f8e7d6c5b4a"
CONNECTION = {
    "host": "127.0.0.1",
    "port": 6432,
    "database": "postgres",
    "username": "analytics",
    "passwordSecret": "analytics-creds",
}
SECRETS: dict[tuple[str, str], dict[str, Any]] = {
    (NAMESPACE, "hook"): {"data": {"token": base64.b64encode(TOKEN.encode()).decode()}},
    (NAMESPACE, "plain"): {"stringData": {"token": "from-string-data"}},
    (NAMESPACE, "binary"): {"data": {"token": base64.b64encode(b"\xff\xfe").decode()}},
    (NAMESPACE, "newline"): {"stringData": {"token": TOKEN + "\n"}},
    (NAMESPACE, "badb64"): {"data": {"token": "not base64!"}},
    ("other-namespace", "elsewhere"): {"stringData": {"token": "x"}},
}
WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def round_input(password: str | None = PASSWORD) -> RoundInput:
    return RoundInput(
        replica_name="analytics",
        namespace=NAMESPACE,
        restore_name="analytics-20260304050607",
        snapshot="k1a2b3c4",
        postgres_version="16",
        connection_info=ConnectionInfo.model_validate(CONNECTION),
        timestamp="2026-03-04T05:06:07Z",
        password=password,
        secrets=SECRETS,
    )


def webhook(**fields: Any) -> WebhookNotification:
    return WebhookNotification.model_validate({"url": "http://hooks.test/restored", **fields})


def graphql(template: str, **fields: Any) -> GraphQLNotification:
    return GraphQLNotification.model_validate(
        {
            "target": "graphQL",
            "url": "http://api.test/graphql",
            "mutation": "mutation M($input: In!) { restored(input: $input) { ok } }",
            "variablesTemplate": template,
            **fields,
        }
    )


# The replica of these tests, with the notification targets given.
analytics = functools.partial(replica, "analytics", namespace=NAMESPACE)


# -- webhook payload ----------------------------------------------------------------------


def test_webhook_payload_without_password() -> None:
    inp = round_input()
    assert webhook_payload(inp, inp.password_for(webhook())) == {
        "timestamp": "2026-03-04T05:06:07Z",
        "replica": {"name": "analytics", "namespace": NAMESPACE},
        "restore": {
            "name": "analytics-20260304050607",
            "snapshot": "k1a2b3c4",
            "postgresVersion": "16",
        },
        "connectionInfo": {
            "host": "127.0.0.1",
            "port": 6432,
            "database": "postgres",
            "username": "analytics",
            "passwordSecret": "analytics-creds",
        },
    }


def test_webhook_payload_with_include_password() -> None:
    inp = round_input()
    body = webhook_payload(inp, inp.password_for(webhook(includePassword=True)))
    assert body["connectionInfo"]["password"] == PASSWORD
    assert list(body) == ["timestamp", "replica", "restore", "connectionInfo"]


def test_include_password_without_a_password_omits_the_key() -> None:
    inp = round_input(password=None)
    body = webhook_payload(inp, inp.password_for(webhook(includePassword=True)))
    assert "password" not in body["connectionInfo"]


def test_unknown_snapshot_and_version_are_empty_strings() -> None:
    seen: list[dict[str, Any]] = []
    notifier = Notifier(Metrics(), clock=lambda: WHEN, delays=(0,), transport=_recorder(seen))
    try:
        notifier.notify(
            "team-a/analytics",
            analytics(notifications=[{"target": "webhook", "url": "http://hooks.test/a"}]),
            "r1",
            None,
            None,
            {**CONNECTION},
            None,
            {},
        )
        _wait_status(notifier)
    finally:
        notifier.shutdown()
    assert seen[0]["json"]["restore"] == {"name": "r1", "snapshot": "", "postgresVersion": ""}
    assert seen[0]["json"]["timestamp"] == "2026-03-04T05:06:07Z"


# -- GraphQL ------------------------------------------------------------------------------

FULL_TEMPLATE = """{"input": {
  "replica": "{{Replica}}", "host": "{{ConnectionInfo.Host}}", "port": {{ConnectionInfo.Port}},
  "database": "{{ConnectionInfo.Database}}", "user": "{{ConnectionInfo.Username}}",
  "secret": "{{ConnectionInfo.PasswordSecret}}", "at": "{{Timestamp}}",
  "included": {{IncludePassword}},
  "password": {{#if IncludePassword}}"{{ConnectionInfo.Password}}"{{else}}null{{/if}}
}}"""


def test_graphql_body_renders_the_documented_context() -> None:
    inp = round_input()
    target = graphql(FULL_TEMPLATE)
    assert graphql_body(target, inp) == {
        "query": target.mutation,
        "variables": {
            "input": {
                "replica": "analytics",
                "host": "127.0.0.1",
                "port": 6432,
                "database": "postgres",
                "user": "analytics",
                "secret": "analytics-creds",
                "at": "2026-03-04T05:06:07Z",
                "included": False,
                "password": None,
            }
        },
    }


def test_graphql_password_only_with_include_password() -> None:
    inp = round_input()
    variables = graphql_body(graphql(FULL_TEMPLATE, includePassword=True), inp)["variables"]
    assert variables["input"]["included"] is True
    assert variables["input"]["password"] == PASSWORD


def test_graphql_invalid_json_fails_without_showing_the_rendered_text() -> None:
    inp = round_input()
    target = graphql('{"password": "{{ConnectionInfo.Password}}" oops}', includePassword=True)
    with pytest.raises(NotificationError) as caught:
        graphql_body(target, inp)
    assert caught.value.permanent
    assert "did not render valid JSON" in caught.value.message
    assert "line 1 column" in caught.value.message
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_graphql_rejects_non_json_constants(constant: str) -> None:
    with pytest.raises(NotificationError, match="not valid JSON"):
        graphql_body(graphql('{"x": ' + constant + "}"), round_input())


def test_graphql_template_syntax_error_is_permanent() -> None:
    with pytest.raises(TemplateError) as caught:
        graphql_body(graphql('{"x": "{{Replica"}'), round_input())
    assert caught.value.permanent
    assert "line 1, column 8" in caught.value.message


# -- the Handlebars subset ------------------------------------------------------------------

CONTEXT: dict[str, Any] = {
    "Replica": "r1",
    "ConnectionInfo": {"Host": "h", "Port": 5432, "Password": None, "User": "a\"<&'`=>"},
    "IncludePassword": True,
    "Off": False,
    "Zero": 0,
    "Empty": "",
    "List": ["x", "y"],
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{Replica}}", "r1"),
        ("{{ Replica }}", "r1"),
        ("{{ConnectionInfo.Host}}/{{ConnectionInfo/Port}}", "h/5432"),
        ("{{IncludePassword}} {{Off}}", "true false"),
        ("[{{ConnectionInfo.Password}}][{{Missing}}][{{Missing.Deeper}}]", "[][][]"),
        ("{{ConnectionInfo.User}}", "a&quot;&lt;&amp;&#x27;&#x60;&#x3D;&gt;"),
        ("{{{ConnectionInfo.User}}}", "a\"<&'`=>"),
        ("{{&ConnectionInfo.User}}", "a\"<&'`=>"),
        ("{{ConnectionInfo}}", "[object]"),
        ("{{List}}", "[x, y, ]"),
        ('{"port": {{ConnectionInfo.Port}}}', '{"port": 5432}'),
        ("{{#if IncludePassword}}yes{{else}}no{{/if}}", "yes"),
        ("{{#if Off}}yes{{else}}no{{/if}}", "no"),
        ("{{#if Zero}}yes{{^}}no{{/if}}", "no"),
        ("{{#if Empty}}yes{{else}}no{{/if}}", "no"),
        ("{{#if ConnectionInfo.Password}}a{{else if Replica}}b{{else}}c{{/if}}", "b"),
        ("{{#if Off}}a{{else if Empty}}b{{else}}c{{/if}}", "c"),
        ("{{#unless Off}}shown{{/unless}}", "shown"),
        ("{{#with ConnectionInfo}}{{Host}} {{../Replica}} {{@root.Replica}}{{/with}}", "h r1 r1"),
        ("{{#with Missing}}a{{else}}b{{/with}}", "b"),
        ("{{#each List}}{{@index}}={{this}}{{#unless @last}},{{/unless}}{{/each}}", "0=x,1=y"),
        ("{{#each ConnectionInfo}}{{#if @first}}{{@key}}{{/if}}{{/each}}", "Host"),
        ("{{#each Missing}}a{{else}}none{{/each}}", "none"),
        ("{{#IncludePassword}}{{Replica}}{{/IncludePassword}}", "r1"),
        ("{{#ConnectionInfo}}{{Host}}{{/ConnectionInfo}}", "h"),
        ("{{#List}}{{.}}{{/List}}", "xy"),
        ("{{^Off}}inverted{{/Off}}", "inverted"),
        ("a {{~Replica~}} b", "ar1b"),
        ("a\n  {{~#if IncludePassword~}}\n  b\n  {{~/if~}}\n  c", "abc"),
        ("{{! a comment }}{{!-- with }} inside --}}ok", "ok"),
        ("\\{{Replica}} {{Replica}}", "{{Replica}} r1"),
        ("\\\\{{Replica}}", "\\r1"),
        ("{{this.Replica}} {{./Replica}} {{[Replica]}}", "r1 r1 r1"),
    ],
)
def test_template_renders_like_handlebars(template: str, expected: str) -> None:
    assert render_template(template, CONTEXT) == expected


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{Replica", "never closed"),
        ("{{{Replica}}", "never closed"),
        ("{{#if IncludePassword}}x", "{{#if}} opened at line 1, column 1 is never closed"),
        ("{{/if}}", "closes no open block"),
        ("{{#if Off}}x{{/with}}", "does not match {{#if}}"),
        ("{{else}}", "outside any block"),
        ("{{#if Off}}a{{else}}b{{else}}c{{/if}}", "second {{else}}"),
        ("{{#if}}x{{/if}}", "takes exactly one path argument"),
        ("{{#if a b}}x{{/if}}", "takes exactly one path argument"),
        ("{{lookup ConnectionInfo 'Host'}}", "helper calls are not supported"),
        ('{{"literal"}}', "is not a path"),
        ("{{> partial}}", "partials and decorators are not supported"),
        ("{{#> layout}}x{{/layout}}", "partials and decorators are not supported"),
        ("{{#custom Replica}}x{{/custom}}", "block helper 'custom' is not supported"),
        ("{{{{raw}}}}x{{{{/raw}}}}", "raw blocks"),
        ("{{@nope}}", "unknown data variable @nope"),
        ("x\n  {{Replica", "line 2, column 3"),
    ],
)
def test_template_rejects_what_it_cannot_render_faithfully(template: str, problem: str) -> None:
    with pytest.raises(TemplateError) as caught:
        render_template(template, CONTEXT)
    assert problem in caught.value.message


# -- headers ------------------------------------------------------------------------------


def secret_header(name: str, key: str = "token") -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


def test_headers_plain_and_from_secrets() -> None:
    target = webhook(
        headers={
            "X-Plain": "hello",
            "Authorization": secret_header("hook"),
            "X-From-String-Data": secret_header("plain"),
        }
    )
    assert resolve_headers(target.headers, NAMESPACE, SECRETS) == {
        "X-Plain": "hello",
        "Authorization": TOKEN,
        "X-From-String-Data": "from-string-data",
    }


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (secret_header("absent"), "Secret 'absent' is not in namespace 'team-a'"),
        # A Secret of the same name elsewhere is not the replica's.
        (secret_header("elsewhere"), "Secret 'elsewhere' is not in namespace 'team-a'"),
        (secret_header("hook", "nokey"), "Secret team-a/hook has no key 'nokey'"),
        (secret_header("binary"), "Secret team-a/binary key 'token' is not valid UTF-8"),
        (secret_header("badb64"), "Secret team-a/badb64: key token is not valid base64"),
        (secret_header("newline"), "trailing whitespace"),
        ("line\r\nbreak", "control character"),
        ("caf\u00e9", "non-ASCII"),
    ],
)
def test_header_problems_are_clear_and_secret_free(header: Any, problem: str) -> None:
    target = webhook(headers={"X-Token": header})
    with pytest.raises(NotificationError) as caught:
        resolve_headers(target.headers, NAMESPACE, SECRETS)
    assert caught.value.permanent
    assert "'X-Token'" in caught.value.message
    assert problem in caught.value.message
    assert TOKEN not in caught.value.message


def test_invalid_header_name() -> None:
    with pytest.raises(NotificationError, match="not a valid HTTP header name"):
        resolve_headers({"Bad Name": "x"}, NAMESPACE, {})


def test_prepared_request_repr_hides_headers_and_body() -> None:
    target = webhook(includePassword=True, headers={"Authorization": secret_header("hook")})
    request = prepare_request(target, round_input())
    assert request.headers["Authorization"] == TOKEN
    assert TOKEN not in repr(request)
    assert PASSWORD not in repr(request)
    assert PASSWORD not in repr(round_input())


@pytest.mark.parametrize("url", ["not a url", "ftp://hooks.test/x", "http://"])
def test_bad_urls_fail_permanently(url: str) -> None:
    with pytest.raises(NotificationError) as caught:
        prepare_request(webhook(url=url), round_input())
    assert caught.value.permanent


def test_safe_url_drops_user_information() -> None:
    assert safe_url("https://user:pw@hooks.test/a?b=c") == "https://hooks.test/a?b=c"
    assert safe_url("http://hooks.test/a@b") == "http://hooks.test/a@b"


# -- naming targets without their secrets ---------------------------------------------------

SECRET_URL = "https://hookuser:USERINFO-PASS-999@Hooks.Example:8443/services/T0000/B0000/URL-PATH-TOKEN-555?sig=QUERY-SIG-777#FRAG-888"
SECRET_PARTS = (
    "hookuser",
    "USERINFO-PASS-999",
    "T0000",
    "URL-PATH-TOKEN-555",
    "QUERY-SIG-777",
    "FRAG-888",
    "services",
)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        (SECRET_URL, "https://hooks.example:8443"),
        ("http://hooks.test/a", "http://hooks.test"),
        ("http://u@[::1]:9/p", "http://[::1]:9"),
        ("http://a@b@hooks.test/p@q", "http://hooks.test"),
        ("not a url", "<invalid URL>"),
        ("http://", "<invalid URL>"),
    ],
)
def test_url_origin_keeps_only_scheme_host_and_port(url: str, origin: str) -> None:
    assert url_origin(url) == origin


def test_target_names_carry_no_secret_part_of_the_url() -> None:
    hook = webhook(url=SECRET_URL, method="PUT")
    gql = graphql("{}", url=SECRET_URL)
    for name in (hook.display_name, gql.display_name):
        for part in SECRET_PARTS:
            assert part not in name
    assert hook.display_name == f"PUT https://hooks.example:8443 #{url_fingerprint(SECRET_URL)}"
    assert gql.display_name.startswith("GraphQL https://hooks.example:8443 #")


def test_target_names_tell_targets_on_one_host_apart_and_are_stable() -> None:
    a = webhook(url="https://hooks.slack.test/services/T1/B1/aaaaaaaaaaaaaaaaaaaaaaaa")
    b = webhook(url="https://hooks.slack.test/services/T1/B1/bbbbbbbbbbbbbbbbbbbbbbbb")
    assert a.display_name != b.display_name
    assert a.display_name == webhook(url=a.url).display_name
    assert len(url_fingerprint(a.url)) == 8


def test_the_fingerprint_leaves_a_userinfo_password_out() -> None:
    # A 32-bit hash of a guessable password could be confirmed offline: it is not hashed.
    assert url_fingerprint("https://u:guess1@h.test/p") == url_fingerprint(
        "https://u:other@h.test/p"
    )
    assert url_fingerprint("https://u1:pw@h.test/p") != url_fingerprint("https://u2:pw@h.test/p")


def test_url_secrets_cover_every_secret_part() -> None:
    found = " ".join(url_secrets(SECRET_URL))
    for part in SECRET_PARTS:
        assert part in found


def test_bad_urls_are_not_quoted_back() -> None:
    bad = "hxxp://user:BAD-URL-PASS@hooks.test/BAD-URL-TOKEN"
    with pytest.raises(NotificationError) as caught:
        prepare_request(webhook(url=bad), round_input())
    assert "BAD-URL-PASS" not in caught.value.message
    assert "BAD-URL-TOKEN" not in caught.value.message
    assert "hxxp://hooks.test" in caught.value.message


def test_an_unavailable_header_secret_fails_with_its_reason() -> None:
    target = webhook(headers={"Authorization": secret_header("hook")})
    reason = "Secret team-a/hook is not labelled for pgro; label it"
    with pytest.raises(NotificationError) as caught:
        resolve_headers(target.headers, NAMESPACE, SECRETS, {(NAMESPACE, "hook"): reason})
    assert caught.value.permanent
    assert caught.value.message == f"header 'Authorization': {reason}"


def test_an_unavailable_secret_is_not_sent(metrics: Metrics) -> None:
    seen: list[dict[str, Any]] = []
    notifier = Notifier(metrics, clock=lambda: WHEN, delays=(0, 30), transport=_recorder(seen))
    target = {"target": "webhook", "url": "http://hooks.test/a"}
    try:
        notifier.notify(
            "team-a/analytics",
            analytics(notifications=[{**target, "headers": {"X-Token": secret_header("hook")}}]),
            "r",
            None,
            None,
            CONNECTION,
            None,
            SECRETS,
            {(NAMESPACE, "hook"): "Secret team-a/hook is refused: label it"},
        )
        [status] = _wait_status(notifier)
    finally:
        notifier.shutdown()
    assert seen == []
    assert status.success is False
    assert status.last_error == "header 'X-Token': Secret team-a/hook is refused: label it"


def test_transport_errors_that_quote_the_url_are_scrubbed(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ProxyError(f"proxy refused {request.url} (path {request.url.path})")

    caplog.set_level(logging.DEBUG)
    statuses, _ = run_round(metrics, [{"target": "webhook", "url": SECRET_URL}], respond)
    written = json.dumps([s.to_wire() for s in statuses]) + caplog.text
    assert "proxy refused ***" in written
    for part in SECRET_PARTS:
        assert part not in written


# -- the notifier, over MockTransport -------------------------------------------------------


def _recorder(
    seen: list[dict[str, Any]], respond: Callable[[httpx.Request], httpx.Response] | None = None
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            {
                "method": request.method,
                "url": str(request.url),
                "headers": dict(request.headers),
                "json": json.loads(request.content),
            }
        )
        return respond(request) if respond else httpx.Response(204)

    return httpx.MockTransport(handler)


def _wait_status(
    notifier: Notifier, key: str = "team-a/analytics", timeout: float = 10.0
) -> list[NotificationStatus]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = notifier.take_status(key)
        if statuses is not None:
            return statuses
        time.sleep(0.01)
    raise AssertionError(f"no notification status for {key} within {timeout}s")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def counter(metrics: Metrics, kind: str, name: str) -> float:
    value = metrics.registry.get_sample_value(
        f"postgres_restore_notifications_{kind}_total", {"name": name, "event": EVENT}
    )
    return value or 0.0


def run_round(
    metrics: Metrics,
    targets: list[dict[str, Any]],
    respond: Callable[[httpx.Request], httpx.Response] | None = None,
    delays: tuple[float, ...] = (0,),
    clock: Callable[[], datetime] = lambda: WHEN,
) -> tuple[list[NotificationStatus], list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    notifier = Notifier(metrics, clock=clock, delays=delays, transport=_recorder(seen, respond))
    try:
        notifier.notify(
            "team-a/analytics",
            analytics(notifications=list(targets)),
            "analytics-20260304050607",
            "k1a2b3c4",
            "16",
            CONNECTION,
            PASSWORD,
            SECRETS,
        )
        return _wait_status(notifier), seen
    finally:
        notifier.shutdown()


@pytest.mark.parametrize(
    ("method", "sent"),
    [
        ("PUT", "PUT"),
        ("put", "PUT"),
        (" Put ", "PUT"),
        ("POST", "POST"),
        ("GET", "POST"),
        ("PATCH", "POST"),
        ("DELETE", "POST"),
    ],
)
def test_webhook_method_selection(metrics: Metrics, method: str, sent: str) -> None:
    statuses, seen = run_round(
        metrics, [{"target": "webhook", "url": "http://hooks.test/a", "method": method}]
    )
    assert [s["method"] for s in seen] == [sent]
    # The method as written, like the reference; the URL reduced to its origin.
    assert statuses[0].name == target_name(method, "http://hooks.test/a")
    assert statuses[0].name.startswith(f"{method} http://hooks.test #")
    assert statuses[0].success


def test_graphql_is_posted_with_query_and_variables(metrics: Metrics) -> None:
    statuses, seen = run_round(
        metrics,
        [
            {
                "target": "graphql",
                "url": "http://api.test/graphql",
                "mutation": "mutation { x }",
                "variablesTemplate": '{"replica": "{{Replica}}"}',
                "headers": {"Authorization": secret_header("hook")},
            }
        ],
    )
    assert seen[0]["method"] == "POST"
    assert seen[0]["json"] == {"query": "mutation { x }", "variables": {"replica": "analytics"}}
    assert seen[0]["headers"]["authorization"] == TOKEN
    assert seen[0]["headers"]["content-type"] == "application/json"
    assert statuses == [
        NotificationStatus(
            name=target_name("GraphQL", "http://api.test/graphql"), last_sent_at=WHEN, success=True
        )
    ]


def test_statuses_in_spec_order_with_real_errors(metrics: Metrics) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(int(request.url.path.strip("/")))

    statuses, _ = run_round(
        metrics,
        [
            {"target": "webhook", "url": "http://hooks.test/500"},
            {"target": "webhook", "url": "http://hooks.test/201"},
            {"target": "webhook", "url": "http://hooks.test/302"},
            {"target": "webhook", "url": "http://u:pw@hooks.test/404"},
        ],
        respond,
    )
    assert [(s.name, s.success) for s in statuses] == [
        (target_name("POST", "http://hooks.test/500"), False),
        (target_name("POST", "http://hooks.test/201"), True),
        (target_name("POST", "http://hooks.test/302"), False),
        (target_name("POST", "http://u:pw@hooks.test/404"), False),
    ]
    # Errors name the origin only: the path or user information may be the secret.
    assert statuses[0].last_error == "HTTP 500 Internal Server Error from http://hooks.test"
    assert statuses[1].last_error is None
    assert statuses[2].last_error is not None
    assert "redirects are not followed" in statuses[2].last_error
    assert statuses[3].last_error == "HTTP 404 Not Found from http://hooks.test"


def test_transport_errors_become_the_last_error(metrics: Metrics) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    statuses, _ = run_round(metrics, [{"target": "webhook", "url": "http://hooks.test/a"}], respond)
    assert statuses[0].last_error == (
        "connection to http://hooks.test failed: [Errno 111] Connection refused"
    )


def test_timeouts_become_the_last_error(metrics: Metrics) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    statuses, _ = run_round(metrics, [{"target": "webhook", "url": "http://hooks.test/a"}], respond)
    assert statuses[0].last_error == "timed out sending POST to http://hooks.test"


def test_permanent_errors_do_not_retry(metrics: Metrics) -> None:
    target = {
        "target": "webhook",
        "url": "http://hooks.test/a",
        "headers": {"X-Token": secret_header("absent")},
    }
    statuses, seen = run_round(metrics, [target], delays=(0, 30, 30))
    assert seen == []  # nothing sent, and no 60 s of pointless retries
    assert statuses[0].success is False
    assert statuses[0].last_error is not None
    assert "Secret 'absent' is not in namespace 'team-a'" in statuses[0].last_error
    assert counter(metrics, "failed", target_name("POST", "http://hooks.test/a")) == 1
    assert counter(metrics, "sent", target_name("POST", "http://hooks.test/a")) == 0


def test_metrics_count_each_target_once(metrics: Metrics) -> None:
    attempts: dict[str, int] = {}

    def respond(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        attempts[path] = attempts.get(path, 0) + 1
        if path == "/flaky" and attempts[path] < 3:
            return httpx.Response(503)
        return httpx.Response(200 if path != "/down" else 500)

    statuses, _ = run_round(
        metrics,
        [
            {"target": "webhook", "url": "http://hooks.test/flaky"},
            {"target": "webhook", "url": "http://hooks.test/down"},
        ],
        respond,
        delays=(0, 0, 0),
    )
    assert [s.success for s in statuses] == [True, False]
    assert attempts == {"/flaky": 3, "/down": 3}
    assert counter(metrics, "sent", target_name("POST", "http://hooks.test/flaky")) == 1
    assert counter(metrics, "failed", target_name("POST", "http://hooks.test/flaky")) == 0
    assert counter(metrics, "sent", target_name("POST", "http://hooks.test/down")) == 0
    assert counter(metrics, "failed", target_name("POST", "http://hooks.test/down")) == 1


def test_last_sent_at_is_taken_before_the_first_attempt(metrics: Metrics) -> None:
    ticks = iter(range(1000))
    lock = threading.Lock()

    def clock() -> datetime:
        with lock:
            return WHEN + timedelta(minutes=next(ticks))

    at_request: list[datetime] = []

    def respond(request: httpx.Request) -> httpx.Response:
        at_request.append(clock())
        return httpx.Response(500)

    statuses, _ = run_round(
        metrics,
        [{"target": "webhook", "url": "http://hooks.test/a"}],
        respond,
        delays=(0, 0),
        clock=clock,
    )
    assert statuses[0].last_sent_at is not None
    assert WHEN < statuses[0].last_sent_at < at_request[0]


def test_secrets_stay_out_of_statuses_and_logs(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused while sending {TOKEN} and {PASSWORD}", request=request)

    caplog.set_level(logging.DEBUG)
    statuses, seen = run_round(
        metrics,
        [
            {
                "target": "webhook",
                "url": "http://hooks.test/a",
                "includePassword": True,
                "headers": {"Authorization": secret_header("hook")},
            },
            {
                "target": "graphQL",
                "url": "http://api.test/graphql",
                "mutation": "m",
                "includePassword": True,
                "variablesTemplate": '{"p": "{{ConnectionInfo.Password}}"',  # invalid JSON
            },
        ],
        respond,
    )
    assert seen[0]["headers"]["authorization"] == TOKEN
    assert seen[0]["json"]["connectionInfo"]["password"] == PASSWORD
    written = json.dumps([s.to_wire() for s in statuses]) + caplog.text
    assert "refused while sending ***" in written
    assert TOKEN not in written
    assert PASSWORD not in written


def test_no_targets_no_round(metrics: Metrics) -> None:
    notifier = Notifier(metrics, transport=_recorder([]))
    try:
        notifier.notify("team-a/analytics", analytics(), "r", None, None, CONNECTION, None, {})
        assert not notifier.running("team-a/analytics")
        assert notifier.take_status("team-a/analytics") is None
    finally:
        notifier.shutdown()


def test_take_status_hands_the_round_over_once(metrics: Metrics) -> None:
    notifier = Notifier(metrics, clock=lambda: WHEN, delays=(0,), transport=_recorder([]))
    try:
        notifier.notify(
            "team-a/analytics",
            analytics(notifications=[{"target": "webhook", "url": "http://hooks.test/a"}]),
            "r",
            None,
            None,
            ConnectionInfo.model_validate(CONNECTION),
            None,
            {},
        )
        assert len(_wait_status(notifier)) == 1
        assert notifier.take_status("team-a/analytics") is None
    finally:
        notifier.shutdown()


def test_a_newer_round_supersedes_the_one_in_flight(metrics: Metrics) -> None:
    release = threading.Event()
    first_arrived = threading.Event()

    def respond(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["restore"]["name"] == "old":
            first_arrived.set()
            release.wait(10)
            return httpx.Response(500)
        return httpx.Response(200)

    seen: list[dict[str, Any]] = []
    notifier = Notifier(metrics, delays=(0, 0), transport=_recorder(seen, respond))
    replica = analytics(notifications=[{"target": "webhook", "url": "http://hooks.test/a"}])
    try:
        notifier.notify("team-a/analytics", replica, "old", None, None, CONNECTION, None, {})
        assert first_arrived.wait(10)
        notifier.notify("team-a/analytics", replica, "new", None, None, CONNECTION, None, {})
        statuses = _wait_status(notifier)
        release.set()
        assert [s.success for s in statuses] == [True]
    finally:
        release.set()
        notifier.shutdown()  # joins the old round's thread: the counters below are final
    # The superseded round stops retrying and reports nothing.
    assert [s["json"]["restore"]["name"] for s in seen] == ["old", "new"]
    assert notifier.take_status("team-a/analytics") is None
    assert counter(metrics, "failed", target_name("POST", "http://hooks.test/a")) == 0
    assert counter(metrics, "sent", target_name("POST", "http://hooks.test/a")) == 1


def test_shutdown_interrupts_pending_retries(metrics: Metrics) -> None:
    seen: list[dict[str, Any]] = []
    notifier = Notifier(
        metrics, delays=(0, 3600), transport=_recorder(seen, lambda r: httpx.Response(500))
    )
    notifier.notify(
        "team-a/analytics",
        analytics(notifications=[{"target": "webhook", "url": "http://hooks.test/a"}]),
        "r",
        None,
        None,
        CONNECTION,
        None,
        {},
    )
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    notifier.shutdown(timeout=5)
    assert time.monotonic() - started < 5
    assert len(seen) == 1
    with pytest.raises(RuntimeError, match="shut down"):
        notifier.notify("team-a/analytics", analytics(), "r", None, None, CONNECTION, None, {})


@pytest.mark.parametrize("delays", [(), (0, -1)])
def test_delays_are_validated(delays: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="delays"):
        Notifier(Metrics(), delays=delays)


def test_incomplete_connection_info_is_refused(metrics: Metrics) -> None:
    notifier = Notifier(metrics, transport=_recorder([]))
    try:
        with pytest.raises(ValueError, match="connection_info is incomplete"):
            notifier.notify(
                "team-a/analytics",
                analytics(notifications=[{"target": "webhook", "url": "http://hooks.test/a"}]),
                "r",
                None,
                None,
                {"host": "h"},
                None,
                {},
            )
    finally:
        notifier.shutdown()


@pytest.fixture(autouse=True)
def _no_threads_left() -> Iterator[None]:
    before = {t for t in threading.enumerate() if t.name.startswith("notify-")}
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = {t for t in threading.enumerate() if t.name.startswith("notify-")} - before
        if not left:
            return
        time.sleep(0.01)
    raise AssertionError(f"notification threads left running: {left}")
