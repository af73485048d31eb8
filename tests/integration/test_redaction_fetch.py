"""Fetching the redaction manifest (pgro.pipeline.redaction_fetch) from a real loopback HTTP
server: the version in the URL, the 404 fallback to the base version, no redirect to another
host, the size cap, the timeouts, and messages that hide credentials."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from pgro.api.replica import Redaction
from pgro.pipeline.redaction_fetch import ManifestFetchFailed, fetch_manifest
from tests.fixtures.manifest_server import (
    FIXTURE_MANIFEST,
    ManifestServer,
    Redirect,
    Slow,
    manifest_server,
)

TEMPLATE = "/v{version}/manifest.json"


@pytest.fixture
def server() -> Iterator[ManifestServer]:
    with manifest_server() as s:
        yield s


def spec(server: ManifestServer, fallback: bool = False, path: str = TEMPLATE) -> Redaction:
    return Redaction(
        manifest_url=server.url(path),
        version_query="SELECT 1",
        version_fallback_to_base=fallback,
    )


def test_fetches_the_versioned_manifest(server: ManifestServer) -> None:
    server.put_json("/v1.0.0/manifest.json", FIXTURE_MANIFEST)
    fetched = fetch_manifest(spec(server), "1.0.0")
    assert fetched.version == "1.0.0"
    assert fetched.url == server.url("/v1.0.0/manifest.json")
    assert len(fetched.manifest.columns) == 6
    assert [t.table for t in fetched.manifest.tables] == ["sync_lookup"]


def test_a_static_url_needs_no_version(server: ManifestServer) -> None:
    server.put_json("/manifest.json", FIXTURE_MANIFEST)
    redaction = Redaction(manifest_url=server.url("/manifest.json"))
    fetched = fetch_manifest(redaction, None)
    assert fetched.version is None and len(fetched.manifest.columns) == 6


def test_404_without_fallback_fails(server: ManifestServer) -> None:
    server.put_json("/v1.2.0/manifest.json", FIXTURE_MANIFEST)
    with pytest.raises(ManifestFetchFailed, match="HTTP 404") as caught:
        fetch_manifest(spec(server), "1.2.3")
    assert "/v1.2.3/manifest.json" in str(caught.value)
    assert server.requested == ["/v1.2.3/manifest.json"]


def test_404_falls_back_to_the_base_version(server: ManifestServer) -> None:
    server.put_json("/v1.2.0/manifest.json", FIXTURE_MANIFEST)
    fetched = fetch_manifest(spec(server, fallback=True), "1.2.3")
    assert fetched.version == "1.2.0"
    assert fetched.url.endswith("/v1.2.0/manifest.json")
    assert server.requested == ["/v1.2.3/manifest.json", "/v1.2.0/manifest.json"]


def test_404_on_the_base_version_too_fails_naming_both(server: ManifestServer) -> None:
    with pytest.raises(ManifestFetchFailed) as caught:
        fetch_manifest(spec(server, fallback=True), "1.2.3")
    assert "/v1.2.3/manifest.json and " in str(caught.value)
    assert "/v1.2.0/manifest.json: HTTP 404" in str(caught.value)


def test_no_fallback_from_a_dot_zero_version(server: ManifestServer) -> None:
    with pytest.raises(ManifestFetchFailed, match="no base version to fall back to"):
        fetch_manifest(spec(server, fallback=True), "1.2.0")
    assert server.requested == ["/v1.2.0/manifest.json"]


def test_other_statuses_fail_without_fallback(server: ManifestServer) -> None:
    server.routes["/v1.2.3/manifest.json"] = 503
    server.put_json("/v1.2.0/manifest.json", FIXTURE_MANIFEST)
    with pytest.raises(ManifestFetchFailed, match="HTTP 503"):
        fetch_manifest(spec(server, fallback=True), "1.2.3")
    assert server.requested == ["/v1.2.3/manifest.json"]


def test_same_host_redirects_are_followed(server: ManifestServer) -> None:
    server.routes["/v1.0.0/manifest.json"] = Redirect("/store/1.0.0.json")
    server.put_json("/store/1.0.0.json", FIXTURE_MANIFEST)
    assert len(fetch_manifest(spec(server), "1.0.0").manifest.columns) == 6


def test_redirects_to_another_host_are_refused(server: ManifestServer) -> None:
    # Another host name for the same machine: still another host.
    server.routes["/v1.0.0/manifest.json"] = Redirect(server.url("/m.json", host="localhost"))
    server.put_json("/m.json", FIXTURE_MANIFEST)
    with pytest.raises(ManifestFetchFailed, match="redirects to another host"):
        fetch_manifest(spec(server), "1.0.0")
    assert server.requested == ["/v1.0.0/manifest.json"]


def test_redirect_loops_end(server: ManifestServer) -> None:
    server.routes["/v1.0.0/manifest.json"] = Redirect("/v1.0.0/manifest.json")
    with pytest.raises(ManifestFetchFailed, match="redirects more than"):
        fetch_manifest(spec(server), "1.0.0")


def test_size_cap(server: ManifestServer) -> None:
    server.routes["/v1.0.0/manifest.json"] = b"{" + b" " * 5000 + b"}"
    with pytest.raises(ManifestFetchFailed, match="larger than 1000 bytes"):
        fetch_manifest(spec(server), "1.0.0", max_bytes=1000)


def test_a_slow_server_times_out(server: ManifestServer) -> None:
    server.routes["/v1.0.0/manifest.json"] = Slow(b"{}" * 50, pieces=50, pause_s=0.2)
    with (
        httpx.Client(follow_redirects=False, timeout=0.05) as client,
        pytest.raises(ManifestFetchFailed, match="timed out"),
    ):
        fetch_manifest(spec(server), "1.0.0", client=client)


def test_a_dripping_server_hits_the_deadline(server: ManifestServer) -> None:
    server.routes["/v1.0.0/manifest.json"] = Slow(b"{" + b" " * 98 + b"}", pieces=100, pause_s=0.05)
    with pytest.raises(ManifestFetchFailed, match="took longer than"):
        fetch_manifest(spec(server), "1.0.0", deadline_s=0.3)


def test_an_invalid_document_fails_naming_the_url(server: ManifestServer) -> None:
    server.routes["/v1.0.0/manifest.json"] = b"<html>not json</html>"
    invalid = r"manifest\.json: the manifest is not valid JSON"
    with pytest.raises(ManifestFetchFailed, match=invalid):
        fetch_manifest(spec(server), "1.0.0")


def test_messages_hide_user_info_and_query(server: ManifestServer) -> None:
    redaction = Redaction(
        manifest_url=f"http://user:hunter2@127.0.0.1:{server.port}/m.json?token=s3cr3t"
    )
    with pytest.raises(ManifestFetchFailed) as caught:
        fetch_manifest(redaction, None)
    assert "hunter2" not in str(caught.value) and "s3cr3t" not in str(caught.value)
    assert f"127.0.0.1:{server.port}/m.json?…" in str(caught.value)


def test_a_refused_connection_fails_cleanly(server: ManifestServer) -> None:
    redaction = Redaction(manifest_url="http://127.0.0.1:1/m.json")
    with pytest.raises(ManifestFetchFailed, match="failed: ConnectError"):
        fetch_manifest(redaction, None)
