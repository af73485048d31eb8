"""The log tail a failed migration Job leaves (`KubeMigrator._log_tail`): the end of the
`migrate` container's output in the Job's newest pod, with the analytics password masked,
and "" when there is nothing to read. And `KubeApi.pod_log` itself, with the real lightkube
client against an HTTP server that answers the pod log endpoint as the API server does."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from lightkube import ApiError, Client, KubeConfig

from pgro.core.app_migration import LOG_TAIL_LINES, MASK
from pgro.core.observations import WorkState
from pgro.kube.client import KubeApi
from pgro.runtimes.kubernetes.config import Placement
from pgro.runtimes.kubernetes.migration_job import CONTAINER, KubeMigrator
from pgro.runtimes.kubernetes.operator import Operator, OperatorOptions
from tests.fixtures.kube_api import Clock, MemoryApi, b64
from tests.fixtures.manifests import replica, restore

NS = "team-a"
REPLICA = "rehearse"
RESTORE = f"{REPLICA}-20260304050607"
JOB = f"{RESTORE}-migrate"
ANALYTICS_PASSWORD = "An4lytics-S3cret/pw"
MIGRATE_TO = {"version": "2.31.0", "versionId": "77777777-7777-7777-7777-777777777777"}


def _job(uid: str = "job-1") -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": JOB, "namespace": NS, "uid": uid, "labels": {}},
        "status": {"conditions": [{"type": "Failed", "status": "True"}]},
    }


def _pod(name: str, created: str, job_uid: str = "job-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "creationTimestamp": created,
            "labels": {"job-name": JOB},
            "ownerReferences": [{"kind": "Job", "name": JOB, "uid": job_uid}],
        },
    }


@pytest.fixture
def world() -> Iterator[tuple[KubeMigrator, MemoryApi]]:
    api = MemoryApi()
    api.objects[("Secret", NS, f"{REPLICA}-creds")] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{REPLICA}-creds", "namespace": NS},
        "data": {"username": b64("analytics"), "password": b64(ANALYTICS_PASSWORD)},
    }
    api.objects[("Job", NS, JOB)] = _job()
    op = Operator(
        cast(KubeApi, api),
        OperatorOptions(namespace="pgro-system", identity="t", default_image="pgro:test"),
        clock=Clock(),
    )
    migrator = KubeMigrator(
        cast(KubeApi, api),
        op.observer,
        replica(REPLICA, namespace=NS, ephemeral=None),
        restore(RESTORE, REPLICA, namespace=NS, migrateTo=MIGRATE_TO),
        Placement(),
    )
    try:
        yield migrator, api
    finally:
        op.notifier.shutdown()
        op.listing.shutdown()


def test_the_failed_runs_tail_is_read_from_its_newest_pod_with_the_password_masked(
    world: tuple[KubeMigrator, MemoryApi],
) -> None:
    migrator, api = world
    older, newer = f"{JOB}-aaaaa", f"{JOB}-bbbbb"
    api.objects[("Pod", NS, older)] = _pod(older, "2026-03-04T05:10:00Z")
    api.objects[("Pod", NS, newer)] = _pod(newer, "2026-03-04T05:12:00Z")
    # Another Job's pod of the same name label (an earlier Job of that name) is not read.
    api.objects[("Pod", NS, "stale")] = _pod("stale", "2026-03-04T05:20:00Z", job_uid="job-0")
    api.logs[(NS, older, CONTAINER)] = "the first attempt\n"
    api.logs[(NS, "stale", CONTAINER)] = "not this one\n"
    early = [f"line {i}" for i in range(500)]
    api.logs[(NS, newer, CONTAINER)] = "\n".join(
        [
            *early,
            f"connecting to postgres://analytics:{ANALYTICS_PASSWORD}@{RESTORE}:5432/app",
            f"password={quote(ANALYTICS_PASSWORD, safe='')} from DATABASE_URL",
            f"error: password {ANALYTICS_PASSWORD} rejected",
        ]
    )

    run = migrator.observe()

    assert run.state is WorkState.FAILED
    assert ANALYTICS_PASSWORD not in run.log_tail
    assert quote(ANALYTICS_PASSWORD, safe="") not in run.log_tail
    assert f"password={MASK} from DATABASE_URL" in run.log_tail
    assert run.log_tail.endswith(f"error: password {MASK} rejected\n")
    assert f"analytics:{MASK}@{RESTORE}" in run.log_tail
    assert "the first attempt" not in run.log_tail
    lines = run.log_tail.splitlines()
    assert len(lines) == LOG_TAIL_LINES
    assert lines[0] == f"line {500 - LOG_TAIL_LINES + 3}"
    assert f"LOG Pod {newer} {CONTAINER}" in api.calls


def test_an_unreadable_log_is_empty(world: tuple[KubeMigrator, MemoryApi]) -> None:
    migrator, api = world
    name = f"{JOB}-ccccc"
    api.objects[("Pod", NS, name)] = _pod(name, "2026-03-04T05:10:00Z")  # no log to read
    run = migrator.observe()
    assert run.state is WorkState.FAILED
    assert run.log_tail == ""
    assert f"LOG Pod {name} {CONTAINER}" in api.calls


def test_a_job_without_pods_has_an_empty_tail(world: tuple[KubeMigrator, MemoryApi]) -> None:
    migrator, api = world
    assert migrator.observe().log_tail == ""
    assert not [c for c in api.calls if c.startswith("LOG ")]


# -- KubeApi.pod_log over HTTP -------------------------------------------------------------


class _LogServer(http.server.ThreadingHTTPServer):
    logs: dict[str, str]
    queries: list[tuple[str, dict[str, list[str]]]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _LogServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        self.server.queries.append((url.path, query))
        log = self.server.logs.get(url.path)
        if log is None:
            body = (
                b'{"kind":"Status","apiVersion":"v1","status":"Failure",'
                b'"message":"pods not found","reason":"NotFound","code":404}'
            )
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
        else:
            tail = int(query["tailLines"][0])
            body = "".join(f"{line}\n" for line in log.splitlines()[-tail:]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def log_server() -> Iterator[_LogServer]:
    server = _LogServer(("127.0.0.1", 0), _Handler)
    server.logs, server.queries = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_pod_log_asks_for_the_containers_tail(log_server: _LogServer) -> None:
    host, port = log_server.server_address[:2]
    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )
    api = KubeApi(Client(config, namespace=NS, trust_env=False))
    path = f"/api/v1/namespaces/{NS}/pods/{JOB}-aaaaa/log"
    log_server.logs[path] = "one\ntwo\nthree\nfour\n"

    assert api.pod_log(f"{JOB}-aaaaa", NS, CONTAINER, 2) == "three\nfour\n"
    [(asked, query)] = log_server.queries
    assert asked == path
    assert query["container"] == [CONTAINER]
    assert query["tailLines"] == ["2"]

    with pytest.raises(ApiError):
        api.pod_log("gone", NS, CONTAINER, 2)
