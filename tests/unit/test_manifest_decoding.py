"""Manifests are untrusted input: every malformed one is a clean `ManifestError` (issue 18,
item 18): bytes that are not UTF-8, YAML aliases, non-scalar Secret values, a bad schedule."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgro.api.secret import SecretInvalid, decode_secret_data
from pgro.runtimes.embedded.manifest import ManifestError, check_schedule, load_manifests
from tests.fixtures.manifests import replica_doc, secret_doc

# The review's 384-byte bomb: seven alias levels, nine-fold each, 355 MB once stringified.
ALIAS_BOMB = """\
apiVersion: v1
kind: Secret
metadata: {name: kopia}
stringData:
  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  repositoryPassword: *g
"""


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "m.yaml"
    path.write_bytes(data)
    return path


def replica_yaml(**spec: Any) -> bytes:
    return yaml.safe_dump(replica_doc("r", **spec)).encode()


def test_a_byte_that_is_not_utf8_names_the_file_line_and_offset(tmp_path: Path) -> None:
    good = yaml.safe_dump(secret_doc("kopia", {"repositoryPassword": "x"})).encode()
    data = good + b"# caf\xe9\n" + b"---\n" + replica_yaml()
    path = write(tmp_path, data)
    with pytest.raises(ManifestError) as caught:
        load_manifests([path])
    message = str(caught.value)
    line, offset = good.count(b"\n") + 1, data.index(b"\xe9")
    assert message.startswith(f"{path}:{line}:6: byte 0xe9 at offset {offset}")
    assert "UTF-8" in message
    assert caught.value.reason == "InvalidManifest"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf" + replica_yaml())
    assert [r.metadata.name for r in load_manifests([path]).replicas] == ["r"]


def test_the_alias_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    path = write(tmp_path, ALIAS_BOMB.encode() + b"---\n" + replica_yaml())
    assert len(ALIAS_BOMB) < 400
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ManifestError) as caught:
        load_manifests([path])
    assert time.monotonic() - started < 1.0  # took 9.4 s and 766 MB before
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    message = str(caught.value)
    assert message.startswith(f"{path}:6:")  # the first alias
    assert "alias *a" in message and "not accepted" in message


def test_any_alias_is_refused_even_a_harmless_one(tmp_path: Path) -> None:
    doc = b"kind: Secret\nmetadata: {name: &n kopia}\nstringData: {repositoryPassword: *n}\n"
    with pytest.raises(ManifestError, match="alias \\*n"):
        load_manifests([write(tmp_path, doc)])


@pytest.mark.parametrize(
    ("section", "value", "kind"),
    [
        ("stringData", ["a", "b"], "a list"),
        ("stringData", {"nested": "x"}, "a dict"),
        ("stringData", None, "empty"),
        ("data", ["YQ=="], "a list"),
    ],
)
def test_secret_values_must_be_scalars(section: str, value: object, kind: str) -> None:
    with pytest.raises(SecretInvalid, match=f"key password in `{section}` must be a string"):
        decode_secret_data({section: {"password": value}})
    with pytest.raises(SecretInvalid, match=kind):
        decode_secret_data({section: {"password": value}})


def test_scalar_secret_values_keep_working() -> None:
    decoded = decode_secret_data(
        {"stringData": {"s": "text", "n": 5432, "t": True}, "data": {"b": "YQ=="}}
    )
    assert decoded == {"s": b"text", "n": b"5432", "t": b"true", "b": b"a"}


@pytest.mark.parametrize("schedule", ["not a cron", "61 * * * *", "0 3 * * * Mars/Olympus"])
def test_check_schedule_refuses_what_run_reports_as_invalid(tmp_path: Path, schedule: str) -> None:
    manifest = load_manifests([write(tmp_path, replica_yaml(schedule=schedule))])
    with pytest.raises(ManifestError) as caught:
        check_schedule(manifest.replica(None))
    assert caught.value.reason == "InvalidSchedule"
    assert repr(schedule) in str(caught.value) and "ScheduleValid=False" in str(caught.value)


def test_check_schedule_accepts_valid_schedules(tmp_path: Path) -> None:
    for schedule in ("H 3 * * *", "*/15 * * * *", "0 3 * * * Pacific/Auckland"):
        manifest = load_manifests([write(tmp_path, replica_yaml(schedule=schedule))])
        check_schedule(manifest.replica(None))
