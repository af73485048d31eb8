"""SigV4 signing: AWS's published examples, and agreement with botocore's signer."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from pgro.canopy.sigv4 import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    SigningCredentials,
    canonical_path,
    canonical_query,
    sign,
)

# The example key pair in AWS's S3 SigV4 documentation ("Signature Calculations for the
# Authorization Header: Transferring Payload in a Single Chunk").
S3_DOC_KEYS = SigningCredentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_DOC_TIME = datetime(2013, 5, 24, tzinfo=UTC)
S3_DOC_HOST = "examplebucket.s3.amazonaws.com"

# The key pair of AWS's generic SigV4 test suite (aws-sig-v4-test-suite).
SUITE_KEYS = SigningCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_TIME = datetime(2015, 8, 30, 12, 36, tzinfo=UTC)


def _signature(authorization: str) -> str:
    return authorization.rsplit("Signature=", 1)[1]


def _s3_doc(
    method: str, raw_path: str, raw_query: str, headers: dict[str, str], payload_hash: str
) -> str:
    signed = sign(
        method=method,
        path=canonical_path(raw_path),
        query=canonical_query(raw_query),
        headers={"host": S3_DOC_HOST, **headers},
        credentials=S3_DOC_KEYS,
        region="us-east-1",
        service="s3",
        when=S3_DOC_TIME,
        payload_hash=payload_hash,
    )
    return signed.headers["Authorization"]


def test_s3_doc_get_object_with_range() -> None:
    auth = _s3_doc("GET", "/test.txt", "", {"range": "bytes=0-9"}, EMPTY_SHA256)
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_s3_doc_put_object_encodes_the_dollar_in_the_key() -> None:
    body = b"Welcome to Amazon S3."
    auth = _s3_doc(
        "PUT",
        "/test$file.text",
        "",
        {"date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        hashlib.sha256(body).hexdigest(),
    )
    assert "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class" in auth
    assert _signature(auth) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_s3_doc_get_bucket_lifecycle_bare_query_parameter() -> None:
    auth = _s3_doc("GET", "/", "lifecycle", {}, EMPTY_SHA256)
    assert _signature(auth) == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"


def test_s3_doc_list_objects_sorted_query() -> None:
    auth = _s3_doc("GET", "/", "max-keys=2&prefix=J", {}, EMPTY_SHA256)
    assert _signature(auth) == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


@pytest.mark.parametrize(
    ("raw_query", "expected"),
    [
        ("", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),  # get-vanilla
        (  # get-vanilla-query-order-key-case: sorted by name
            "Param2=value2&Param1=value1",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
    ],
)
def test_generic_suite_vectors(raw_query: str, expected: str) -> None:
    signed = sign(
        method="GET",
        path=canonical_path("/"),
        query=canonical_query(raw_query),
        headers={"Host": "example.amazonaws.com"},
        credentials=SUITE_KEYS,
        region="us-east-1",
        service="service",
        when=SUITE_TIME,
        payload_hash=EMPTY_SHA256,
        content_sha256_header=False,
    )
    assert "SignedHeaders=host;x-amz-date," in signed.headers["Authorization"]
    assert _signature(signed.headers["Authorization"]) == expected
    assert "X-Amz-Content-SHA256" not in signed.headers


def test_canonical_path_encodes_once_and_does_not_normalise() -> None:
    assert canonical_path("") == "/"
    assert canonical_path("/bucket/a b+c") == "/bucket/a%20b%2Bc"
    assert canonical_path("/bucket/a%20b") == "/bucket/a%20b"  # already encoded: kept
    assert canonical_path("/bucket/dir//x/../y") == "/bucket/dir//x/../y"
    assert canonical_path("/bucket/caf%C3%A9~") == "/bucket/caf%C3%A9~"
    assert canonical_path("/bucket/café") == "/bucket/caf%C3%A9"


def test_canonical_query_sorts_encodes_and_completes_bare_names() -> None:
    assert canonical_query("prefix=a/b c&list-type=2&uploads") == (
        "list-type=2&prefix=a%2Fb%20c&uploads="
    )
    assert canonical_query("a=2&a=1&b=%7e") == "a=1&a=2&b=~"
    assert canonical_query("continuation-token=x%2By%3D") == "continuation-token=x%2By%3D"


# -- agreement with botocore ------------------------------------------------------------------

NOW = datetime(2026, 7, 1, 1, 2, 3, tzinfo=UTC)
TEMP = SigningCredentials("ASIATESTTEMPORARY", "temp/secret+key", "FQoGZXIvYXdzEXAMPLE//token==")


def _botocore(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    creds: SigningCredentials,
    *,
    unsigned: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> AWSRequest:
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: NOW.replace(tzinfo=None))
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    if unsigned:
        request.context["client_config"] = SimpleNamespace(s3={"payload_signing_enabled": False})
    auth = S3SigV4Auth(
        Credentials(creds.access_key_id, creds.secret_access_key, creds.session_token),
        "s3",
        "eu-west-2",
    )
    auth.add_auth(request)
    return request


CASES = [
    ("GET", "/bucket/p0123456789abcdef", "", {"Range": "bytes=100-4195"}, b""),
    ("HEAD", "/bucket/kopia.repository", "", {}, b""),
    ("GET", "/bucket/", "list-type=2&prefix=xn0_&continuation-token=a%2Bb%3D", {}, b""),
    ("DELETE", "/bucket/_log_20260701%20x", "", {}, b""),
    (
        "PUT",
        "/bucket/q-object",
        "",
        {
            "Content-Type": "application/x-kopia",
            "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
            "x-amz-meta-owner": "pgro  test",
            "x-amz-storage-class": "STANDARD",
        },
        b"some blob bytes",
    ),
]


@pytest.mark.parametrize(("method", "path", "query", "headers", "body"), CASES)
@pytest.mark.parametrize("creds", [TEMP, SigningCredentials("AKIALONGTERM", "long/term")])
def test_unsigned_payload_signature_matches_botocore(
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    creds: SigningCredentials,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = "s3.eu-west-2.amazonaws.com"
    cpath, cquery = canonical_path(path), canonical_query(query)
    to_sign = {"host": host, **{k.lower(): v for k, v in headers.items()}}
    ours = sign(
        method=method,
        path=cpath,
        query=cquery,
        headers=to_sign,
        credentials=creds,
        region="eu-west-2",
        service="s3",
        when=NOW,
        payload_hash=UNSIGNED_PAYLOAD,
    )
    url = f"https://{host}{cpath}" + (f"?{cquery}" if cquery else "")
    theirs = _botocore(
        method, url, {"Host": host, **headers}, body, creds, unsigned=True, monkeypatch=monkeypatch
    )
    assert theirs.headers["X-Amz-Content-SHA256"] == UNSIGNED_PAYLOAD
    assert ours.headers["Authorization"] == theirs.headers["Authorization"]
    assert ours.headers["X-Amz-Date"] == theirs.headers["X-Amz-Date"] == "20260701T010203Z"
    if creds.session_token:
        assert ours.headers["X-Amz-Security-Token"] == creds.session_token
        assert "x-amz-security-token" in ours.headers["Authorization"]
    else:
        assert "X-Amz-Security-Token" not in ours.headers


def test_signed_payload_matches_botocore_over_plain_http(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"x" * 1000
    host = "127.0.0.1:9000"
    ours = sign(
        method="PUT",
        path="/bucket/obj",
        query="",
        headers={"host": host, "content-type": "application/octet-stream"},
        credentials=TEMP,
        region="eu-west-2",
        service="s3",
        when=NOW,
        payload_hash=hashlib.sha256(body).hexdigest(),
    )
    theirs = _botocore(
        "PUT",
        f"http://{host}/bucket/obj",
        {"Host": host, "Content-Type": "application/octet-stream"},
        body,
        TEMP,
        unsigned=False,
        monkeypatch=monkeypatch,
    )
    assert theirs.headers["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    assert ours.headers["Authorization"] == theirs.headers["Authorization"]


def test_a_different_secret_gives_a_different_signature() -> None:
    kwargs = {
        "method": "GET",
        "path": "/b/k",
        "query": "",
        "headers": {"host": "h"},
        "region": "us-east-1",
        "service": "s3",
        "when": NOW,
        "payload_hash": UNSIGNED_PAYLOAD,
    }
    a = sign(credentials=SigningCredentials("AK", "one"), **kwargs)  # type: ignore[arg-type]
    b = sign(credentials=SigningCredentials("AK", "two"), **kwargs)  # type: ignore[arg-type]
    assert _signature(a.headers["Authorization"]) != _signature(b.headers["Authorization"])


def test_credentials_repr_hides_secrets() -> None:
    text = repr(TEMP)
    assert TEMP.secret_access_key not in text
    assert TEMP.access_key_id not in text
    assert str(TEMP.session_token) not in text
