"""The kopia Secret: reference keys, the filesystemPath extension, and keeping values secret."""

from __future__ import annotations

import base64

import pytest

from pgro.api.secret import (
    FilesystemLocation,
    S3Location,
    SecretInvalid,
    decode_secret_data,
    parse_kopia_secret,
)
from pgro.core.secrets import MASK, scrub

S3 = {
    "bucket": b"backups",
    "region": b"ap-southeast-2",
    "accessKeyId": b"AKIAEXAMPLE",
    "secretAccessKey": b"s3cr3t/key",
    "repositoryPassword": b"repo-pass",
}


def test_s3_secret_with_reference_keys() -> None:
    creds = parse_kopia_secret({**S3, "endpoint": b"minio.minio.svc:9000", "disableTls": b"true"})
    assert creds.location == S3Location(
        bucket="backups", region="ap-southeast-2", endpoint="minio.minio.svc:9000", disable_tls=True
    )
    assert creds.access_key_id == "AKIAEXAMPLE"
    assert creds.secret_access_key == "s3cr3t/key"
    assert creds.repository_password == "repo-pass"


@pytest.mark.parametrize("value", [b"false", b"TRUE", b"yes", b""])
def test_disable_tls_only_for_the_exact_string_true(value: bytes) -> None:
    creds = parse_kopia_secret({**S3, "endpoint": b"e:9000", "disableTls": value})
    assert isinstance(creds.location, S3Location)
    assert creds.location.disable_tls is False


def test_empty_endpoint_means_aws() -> None:
    creds = parse_kopia_secret({**S3, "endpoint": b"  "})
    assert isinstance(creds.location, S3Location)
    assert creds.location.endpoint is None
    assert "AWS S3" in creds.describe()


@pytest.mark.parametrize("missing", list(S3))
def test_each_required_key(missing: str) -> None:
    data = {k: v for k, v in S3.items() if k != missing}
    with pytest.raises(SecretInvalid) as err:
        parse_kopia_secret(data)
    assert str(err.value) == f"missing key: {missing}"
    assert err.value.reason == "SecretInvalid"


def test_empty_value_counts_as_missing() -> None:
    with pytest.raises(SecretInvalid, match="missing key: bucket"):
        parse_kopia_secret({**S3, "bucket": b""})


def test_no_data() -> None:
    with pytest.raises(SecretInvalid, match=r"^secret has no data$"):
        parse_kopia_secret({})


def test_not_utf8() -> None:
    with pytest.raises(SecretInvalid, match=r"^key region is not valid UTF-8$"):
        parse_kopia_secret({**S3, "region": b"\xff\xfe"})


def test_filesystem_path_needs_only_the_password() -> None:
    creds = parse_kopia_secret({"filesystemPath": b"/srv/kopia", "repositoryPassword": b"pw"})
    assert creds.location == FilesystemLocation("/srv/kopia")
    assert creds.access_key_id is None
    assert creds.describe() == "filesystem repository at /srv/kopia"
    with pytest.raises(SecretInvalid, match="missing key: repositoryPassword"):
        parse_kopia_secret({"filesystemPath": b"/srv/kopia"})
    with pytest.raises(SecretInvalid, match="must be an absolute path"):
        parse_kopia_secret({"filesystemPath": b"srv/kopia", "repositoryPassword": b"pw"})


def test_filesystem_path_wins_over_s3_keys() -> None:
    creds = parse_kopia_secret({**S3, "filesystemPath": b"/srv/kopia"})
    assert isinstance(creds.location, FilesystemLocation)


def test_repr_and_describe_never_show_secrets() -> None:
    creds = parse_kopia_secret(S3)
    shown = repr(creds) + creds.describe()
    for secret in ("repo-pass", "AKIAEXAMPLE", "s3cr3t/key"):
        assert secret not in shown
    assert sorted(creds.secret_values()) == sorted(["repo-pass", "AKIAEXAMPLE", "s3cr3t/key"])


def test_decode_merges_data_and_string_data() -> None:
    doc = {
        "data": {"bucket": base64.b64encode(b"from-data").decode(), "region": "ZXU="},
        "stringData": {"bucket": "from-stringData"},
    }
    assert decode_secret_data(doc) == {"bucket": b"from-stringData", "region": b"eu"}


def test_decode_rejects_bad_base64() -> None:
    with pytest.raises(SecretInvalid, match="key bucket is not valid base64"):
        decode_secret_data({"data": {"bucket": "not base64!!"}})


def test_scrub_masks_every_secret_longest_first() -> None:
    text = "password=abcdef and key abc and abcdefgh"
    assert scrub(text, ["abc", "abcdefgh", ""]) == f"password={MASK}def and key {MASK} and {MASK}"
