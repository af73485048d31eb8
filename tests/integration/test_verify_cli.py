"""`pgro verify` end to end: the real CLI process, real kopia, real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Repo
from tests.fixtures.manifests import fs_manifest, replica_doc, secret_doc, write_manifest

PGRO = str(Path(sys.executable).parent / "pgro")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def filtered(scratch: Path, fs_repo: Repo, **snapshot_filter: Any) -> Path:
    """A manifest for the fixture repository whose replica selects with `snapshot_filter`."""
    return fs_manifest(
        scratch / "m.yaml", fs_repo.path, fs_repo.password, snapshotFilter=snapshot_filter
    )


def run_verify(manifest: Path, work: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    work.mkdir(exist_ok=True)
    os.chmod(work, 0o711)
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--json", "--work-dir", str(work), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.stdout.count("\n") == 1, (
        f"stdout must be one JSON line:\n{proc.stdout}\n{proc.stderr}"
    )
    report = json.loads(proc.stdout)
    # Whatever happened, nothing is left behind.
    assert list(work.iterdir()) == [], proc.stderr
    assert processes_mentioning(str(work)) == []
    return proc.returncode, report, proc.stderr


def test_clean_debian_cluster_verifies(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-clean")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 0, json.dumps(report, indent=1)
    assert report["outcome"] == "success"
    assert report["replica_healthy"] is True
    assert report["error"] is None
    assert report["snapshot_id"] == fs_repo.snapshots["clean"]
    assert report["postgres_version"] == "15"
    details = report["health_details"]
    assert isinstance(details["restore_duration_sec"], int)
    assert set(details["sizes"]) == {"postgres", "myapp"}
    assert details["sizes"]["myapp"] > 1_000_000
    fixes = details["fixes"]
    assert {"locale", "reindex", "reset_wal", "recreated_pg_wal"} <= set(fixes)
    assert fixes["synthesized_config"] is True  # Debian layout: config lived in /etc
    assert fixes["removed_stale_pid"] is False
    assert fixes["reset_wal"] is False
    checks = {c["name"]: c for c in details["checks"]}
    assert checks["select_1:myapp"]["status"] == "pass"
    assert "1 user tables" in checks["select_1:myapp"]["detail"]
    assert checks["application_database"]["status"] == "pass"
    assert checks["primary"]["status"] == "pass"
    # The default depth (standard): a cluster without data checksums has them "not checked".
    assert all(c["status"] in ("pass", "not_checked") for c in details["checks"])
    assert checks["btree"]["status"] == "pass"


def test_crash_consistent_copy_recovers(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, tags={"kind": "crash"})
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 0, json.dumps(report, indent=1)
    assert report["snapshot_id"] == fs_repo.snapshots["crash"]
    assert report["health_details"]["fixes"]["removed_stale_pid"] is True
    assert report["health_details"]["fixes"]["reset_wal"] is False  # replay, not reset


def test_poisoned_config_is_repaired(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-poisoned")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 0, json.dumps(report, indent=1)
    fixes = report["health_details"]["fixes"]
    assert fixes["neutralised_settings"] is True
    assert fixes["cleared_auto_conf"] is True
    assert fixes["removed_standby_signal"] is True
    assert fixes["removed_stale_pid"] is True
    notes = " ".join(report["notes"])
    # The snapshot has its postgresql.conf (poisoned) but, Debian-style, no pg_hba.conf.
    assert "wrote pg_ident.conf, pg_hba.conf, missing from the snapshot" in notes
    for key in (
        "listen_addresses",
        "archive_command",
        "data_directory",
        "timescaledb",
        "include_dir",
    ):
        assert key in notes
    assert "primary_conninfo" in notes


def test_missing_pg_wal_is_recreated_and_reset(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-nowal")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 0, json.dumps(report, indent=1)
    fixes = report["health_details"]["fixes"]
    assert fixes["recreated_pg_wal"] is True
    assert fixes["reset_wal"] is True


def test_not_postgres_fails_verification(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="files-host")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 1
    assert report["outcome"] == "failure"
    assert report["replica_healthy"] is False
    assert report["reason"] == "NotPostgres"
    assert report["error"].startswith("the snapshot holds no PostgreSQL data directory")
    assert report["snapshot_id"] == fs_repo.snapshots["notpg"]


def test_system_databases_only(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-empty")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 1
    assert report["reason"] == "NoApplicationDatabase"
    assert "only system databases" in report["error"]
    assert set(report["health_details"]["sizes"]) == {"postgres"}


def test_major_without_binaries(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-old")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 2
    assert report["reason"] == "PostgresBinariesMissing"
    assert "PostgreSQL 11 server binaries are not installed" in report["error"]
    assert "apt-get install postgresql-11" in report["error"]
    assert report["postgres_version"] is None


def test_wrong_password_is_a_configuration_error(fs_repo: Repo, scratch: Path) -> None:
    manifest = fs_manifest(scratch / "m.yaml", fs_repo.path, "hunter2-wrong")
    code, report, stderr = run_verify(manifest, scratch / "work")
    assert code == 2
    assert report["reason"] == "WrongPassword"
    assert "repository password is wrong" in report["error"]
    assert "hunter2-wrong" not in json.dumps(report) + stderr


def test_no_matching_snapshot(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="nope-*")
    code, report, _ = run_verify(manifest, scratch / "work")
    assert code == 2
    assert report["reason"] == "NoMatchingSnapshots"
    assert "no snapshot matches the snapshotFilter of verify-me" in report["error"]
    assert "db-clean" in report["error"]  # it lists the hosts that do exist


def test_explicit_snapshot_overrides_the_filter(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-clean")
    code, report, _ = run_verify(
        manifest, scratch / "work", "--snapshot", fs_repo.snapshots["notpg"]
    )
    assert code == 1
    assert report["snapshot_id"] == fs_repo.snapshots["notpg"]
    code, report, _ = run_verify(manifest, scratch / "work", "--snapshot", "0123456789abcdef")
    assert code == 2
    assert report["reason"] == "SnapshotNotFound"


@pytest.mark.parametrize(
    ("docs", "reason", "message"),
    [
        (
            [replica_doc("r", secret="absent")],
            "SecretNotFound",
            "references Secret 'absent' in namespace 'default', which is not in the manifest",
        ),
        (
            [secret_doc("kopia", {"bucket": "b", "region": "r"}), replica_doc("r")],
            "SecretInvalid",
            "Secret default/kopia: missing key: accessKeyId",
        ),
        (
            [
                secret_doc("kopia", {"repositoryPassword": "x", "filesystemPath": "relative/x"}),
                replica_doc("r"),
            ],
            "SecretInvalid",
            "key filesystemPath must be an absolute path",
        ),
        (
            [replica_doc("r", secret=None)],
            "NoCredentialSource",
            "",
        ),
        (
            [
                secret_doc("kopia", {"repositoryPassword": "x"}),
                {**replica_doc("r"), "spec": {"kopiaSecretRef": {"name": "kopia"}}},
            ],
            "InvalidManifest",
            "spec.schedule",
        ),
        ([], "InvalidManifest", "the manifest holds no PostgresPhysicalReplica"),
        # What `pgro run` reports as ScheduleValid=False must not verify (it did, exit 0).
        (
            [secret_doc("kopia", {"repositoryPassword": "x"}), replica_doc("r", schedule="x y")],
            "InvalidSchedule",
            "replica r: spec.schedule: invalid schedule 'x y'",
        ),
        (
            [
                secret_doc("kopia", {"repositoryPassword": "x"}),
                replica_doc("r", schedule="61 * * * *"),
            ],
            "InvalidSchedule",
            "invalid schedule '61 * * * *'",
        ),
    ],
)
def test_bad_manifests(
    scratch: Path, docs: list[dict[str, Any]], reason: str, message: str
) -> None:
    manifest = write_manifest(scratch / "m.yaml", *docs)
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--json"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["reason"] == reason
    assert message in report["error"]
    assert message in proc.stderr


def test_invalid_yaml_points_at_the_line(scratch: Path) -> None:
    bad = scratch / "bad.yaml"
    bad.write_text("kind: Secret\nmetadata:\n  name: [unclosed\n")
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert f"{bad}:" in proc.stderr
    assert "invalid YAML" in proc.stderr


def test_bytes_that_are_not_utf8_are_a_manifest_error(scratch: Path) -> None:
    manifest = write_manifest(
        scratch / "m.yaml", secret_doc("kopia", {"repositoryPassword": "x"}), replica_doc("r")
    )
    data = manifest.read_bytes() + b"# \xff\xfe\n"
    manifest.write_bytes(data)
    for json_flag in ([], ["--json"]):
        proc = subprocess.run(
            [PGRO, "verify", "-f", str(manifest), *json_flag],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr  # was 1 ("failed verification")
        assert "Traceback" not in proc.stderr
        assert f"byte 0xff at offset {data.index(b'#') + 2} is not UTF-8" in proc.stderr
        assert str(manifest) in proc.stderr
    assert json.loads(proc.stdout)["reason"] == "InvalidManifest"


def test_a_yaml_alias_bomb_is_refused_at_once(scratch: Path) -> None:
    levels = ['  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"  {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = "kind: Secret\nmetadata: {name: kopia}\nstringData:\n" + "\n".join(levels)
    bomb += "\n  repositoryPassword: *g\n---\n"
    manifest = scratch / "bomb.yaml"
    manifest.write_text(bomb + yaml.safe_dump(replica_doc("r")))
    assert len(bomb) < 400
    started = time.monotonic()
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest)], capture_output=True, text=True, check=False
    )
    assert time.monotonic() - started < 15  # 355 MB of strings took 9.4 s before
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{manifest}:5:" in proc.stderr and "YAML aliases are not accepted" in proc.stderr


def test_human_report(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-clean")
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--work-dir", str(scratch)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "VERIFIED" in proc.stdout
    assert "select_1:myapp" in proc.stdout
    assert "restoring snapshot" in proc.stderr  # progress goes to stderr
    assert "starting PostgreSQL 15 on private port" in proc.stderr


def with_ctrl_c() -> None:
    """A `preexec_fn`: Ctrl-C as a terminal user has it. A suite started in the background
    inherits SIGINT ignored, and a program started so keeps ignoring it (as it should)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_once(manifest: Path, work: Path, sig: signal.Signals, when: str) -> tuple[int, str]:
    proc = subprocess.Popen(
        [PGRO, "verify", "-f", str(manifest), "--work-dir", str(work), "--parallel", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=with_ctrl_c,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if when in line:
            proc.send_signal(sig)
            break
    else:
        pytest.fail("never reached " + when + ":\n" + "".join(seen))
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["restoring snapshot", "starting PostgreSQL"])
def test_interrupt_cleans_up(fs_repo: Repo, scratch: Path, sig: signal.Signals, when: str) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-clean")
    work = scratch / "work"
    work.mkdir()
    os.chmod(work, 0o711)
    # The signal races the step it targets; a run that finished first proves nothing, so
    # try again (a few times at most) until one is really interrupted.
    for _ in range(3):
        code, output = _interrupt_once(manifest, work, sig, when)
        assert list(work.iterdir()) == [], (output, sorted(str(p) for p in work.rglob("*"))[:20])
        deadline = time.monotonic() + 10
        while processes_mentioning(str(work)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(work)) == []
        if code != 0:
            break
    assert code == 130, output
    assert "interrupted" in output


def test_too_little_disk_is_refused_before_restoring(fs_repo: Repo, scratch: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = scratch / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0711", "tmpfs", str(small)], check=True
    )
    try:
        manifest = filtered(scratch, fs_repo, hostPattern="db-clean")
        code, report, _ = run_verify(manifest, small / "work")
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert code == 2
    assert report["reason"] == "InsufficientDisk"
    assert "restore elsewhere with --work-dir" in report["error"]


def test_demo_builds_verifies_reuses_and_cleans(scratch: Path) -> None:
    demo_dir = scratch / "demo"
    first = subprocess.run(
        [PGRO, "demo", "--dir", str(demo_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["outcome"] == "success"
    assert report["health_details"]["sizes"]["myapp"] > 0
    assert report["health_details"]["fixes"]["synthesized_config"] is True
    assert f"{PGRO} verify -f {demo_dir / 'verify.yaml'}" in first.stderr
    assert f"{PGRO} demo --clean --dir {demo_dir}" in first.stderr
    manifest = demo_dir / "verify.yaml"
    assert manifest.stat().st_mode & 0o777 == 0o600  # it holds the repository password

    again = subprocess.run(
        [PGRO, "demo", "--dir", str(demo_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "reusing the demo repository" in again.stderr
    assert json.loads(again.stdout)["snapshot_id"] == report["snapshot_id"]

    # The manifest it leaves is a working input for `pgro verify`.
    code, verified, _ = run_verify(manifest, scratch / "work")
    assert code == 0
    assert verified["snapshot_id"] == report["snapshot_id"]

    clean = subprocess.run(
        [PGRO, "demo", "--dir", str(demo_dir), "--clean"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert clean.returncode == 0
    assert not demo_dir.exists()


def test_keep_leaves_the_restored_files_and_no_server(fs_repo: Repo, scratch: Path) -> None:
    manifest = filtered(scratch, fs_repo, hostPattern="db-clean")
    work = scratch / "work"
    work.mkdir()
    os.chmod(work, 0o711)
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--json", "--keep", "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (kept,) = list(work.iterdir())
    assert "kept the restored files in" in proc.stderr
    assert (kept / "data" / "15" / "main" / "PG_VERSION").exists()
    assert not (kept / "data" / "15" / "main" / "postmaster.pid").exists()
    assert processes_mentioning(str(work)) == []
    assert not (kept / "kopia").exists()  # kopia's state (config, cache) never outlives a run
