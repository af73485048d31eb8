"""Hostile snapshots: links out of the restore, a `current` link to another cluster, set-uid.

Each snapshot is built here from the clean fixture cluster and snapshotted with the real
kopia; `pgro verify` (the real CLI, real PostgreSQL) restores it as root. Nothing outside
the restore may change, and nothing restored may stay set-uid or set-gid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.events import SilentObserver
from pgro.pipeline.restore import restore_snapshot
from pgro.pipeline.restore_job import parse_fixes
from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.layout import NotPostgres
from tests.conftest import REPO_PASSWORD, Repo
from tests.fixtures.manifests import fs_manifest

PGRO = str(Path(sys.executable).parent / "pgro")
SECRET = "VICTIM-SECRET-7f3a"  # in every victim file: must never reach a report
SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks target a root pgro")


@dataclass
class Hostile:
    base: Path
    repo: Repo
    victim: Path  # root-owned 0600 files and a WAL directory the links point at
    cluster: Path  # a cluster outside every restore, as a `current` link would reach it
    hosts: dict[str, str] = field(default_factory=dict)


def fingerprint(top: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under `top` (itself included): mode, owner, group, contents or target."""
    seen: dict[str, tuple[int, int, int, str]] = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            what = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        seen[str(path)] = (st.st_mode, st.st_uid, st.st_gid, what)
    return seen


def _root_file(path: Path, text: str) -> None:
    path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)


@pytest.fixture(scope="module")
def hostile(
    fs_repo: Repo, scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> Iterator[Hostile]:
    base = scratch_root / "hostile-tree"
    base.mkdir()
    os.chmod(base, 0o711)
    clean = scratch_root / "fixtures" / "clean"  # built by fs_repo
    major = binaries.major

    victim = base / "victim"
    victim.mkdir()
    for name in ("hba", "conf", "auto", "ident"):
        _root_file(victim / f"{name}.txt", f"{SECRET} = '{name}'\nroot:$6$hash:19000::::::\n")
    (victim / "wal-target").mkdir()
    _root_file(victim / "wal-target" / "keep.txt", SECRET)

    # A cluster next to the work directories, where `../../../victimcluster` leads from a
    # restore root (<work>/pgro-verify-*/data).
    cluster = base / "victimcluster"
    shutil.copytree(clean / major / "main", cluster, symlinks=True)
    (cluster / "postmaster.pid").write_text(f"4242\n{cluster}\n")
    (cluster / "postgresql.conf").write_text(f"# {SECRET}\nport = 5999\n")
    (cluster / "pg_hba.conf").write_text(f"# {SECRET}\nlocal all all peer\n")
    hand_over(cluster, account)

    repo = Repo(path=base / "repository", password=REPO_PASSWORD)
    kopia = KopiaRepository(repo.credentials, base / "kopia-state")
    kopia.create()
    h = Hostile(base=base, repo=repo, victim=victim, cluster=cluster)

    def snap(kind: str, tree: Path) -> None:
        host = f"hostile-{kind}"
        repo.snapshots[kind] = kopia.snapshot_create(
            tree, tags={"kind": kind}, override_source=f"postgres@{host}:/var/lib/postgresql"
        )
        h.hosts[kind] = host

    try:
        links = base / "src-links"
        shutil.copytree(clean, links, symlinks=True)
        pgdata = links / major / "main"
        shutil.rmtree(pgdata / "pg_wal")
        os.symlink(victim / "wal-target", pgdata / "pg_wal")
        (pgdata / "postgresql.auto.conf").unlink()
        os.symlink(victim / "hba.txt", pgdata / "pg_hba.conf")  # absolute
        # Relative, climbing from <work>/pgro-verify-*/data/15/main to the victim.
        os.symlink("../../../../../victim/conf.txt", pgdata / "postgresql.conf")
        os.symlink(victim / "auto.txt", pgdata / "postgresql.auto.conf")
        os.symlink(victim / "ident.txt", pgdata / "pg_ident.conf")
        snap("links", links)

        only_current = base / "src-current-rel"
        only_current.mkdir()
        os.symlink("../../../victimcluster", only_current / "current")
        snap("current-rel", only_current)

        current_abs = base / "src-current-abs"
        shutil.copytree(clean, current_abs, symlinks=True)
        (current_abs / "current").unlink()
        # `..` after the last numeric component: re-rooted, it climbs to / and down again.
        os.symlink(f"/{major}/" + "../" * 40 + str(cluster).lstrip("/"), current_abs / "current")
        snap("current-abs", current_abs)

        setuid = base / "src-setuid"
        shutil.copytree(clean, setuid, symlinks=True)
        _plant_setuid(setuid)
        _plant_setuid(setuid / major / "main")
        snap("setuid", setuid)

        setuid_notpg = base / "src-setuid-notpg"
        setuid_notpg.mkdir()
        _plant_setuid(setuid_notpg)
        snap("setuid-notpg", setuid_notpg)
    finally:
        kopia.close()
    yield h


def _plant_setuid(top: Path) -> None:
    """A root-owned set-uid `id`, a set-gid directory, sticky and world-writable entries."""
    shutil.copy(shutil.which("id") or "/usr/bin/id", top / "suid-id")
    os.chown(top / "suid-id", 0, 0)
    os.chmod(top / "suid-id", 0o4755)
    (top / "sgid-dir").mkdir()
    (top / "sgid-dir" / "inside").write_text("x")
    os.chmod(top / "sgid-dir" / "inside", 0o2666)
    os.chmod(top / "sgid-dir", 0o2777)
    (top / "sticky").mkdir()
    os.chmod(top / "sticky", 0o1777)


def verify(
    h: Hostile, kind: str, work: Path, scratch: Path, *args: str
) -> tuple[int, dict[str, Any], str]:
    os.chmod(work, 0o711)
    manifest = fs_manifest(
        scratch / "verify.yaml",
        h.repo.path,
        h.repo.password,
        snapshotFilter={"hostPattern": h.hosts[kind]},
    )
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--json", "--work-dir", str(work), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(proc.stdout)
    assert report["snapshot_id"] == h.repo.snapshots[kind], proc.stderr
    return proc.returncode, report, proc.stderr


def outside_state(h: Hostile) -> dict[str, tuple[int, int, int, str]]:
    """Everything a restore in `h.base/work-*` must leave alone."""
    state = {**fingerprint(h.victim), **fingerprint(h.cluster)}
    # No new entry next to the work directories either.
    state["listing"] = (0, 0, 0, " ".join(sorted(p.name for p in h.base.iterdir())))
    return state


def test_config_and_wal_links_out_of_the_restore_are_removed(
    hostile: Hostile, scratch: Path
) -> None:
    work = hostile.base / "work-links"
    work.mkdir()
    before = outside_state(hostile)
    code, report, stderr = verify(hostile, "links", work, scratch)
    assert outside_state(hostile) == before  # byte for byte, modes and owners too
    assert code == 0, json.dumps(report, indent=1) + stderr
    assert report["outcome"] == "success"
    fixes = report["health_details"]["fixes"]
    assert fixes["removed_unsafe_links"] is True
    assert fixes["recreated_pg_wal"] is True  # the link's place is now an empty pg_wal
    assert fixes["synthesized_config"] is True
    assert fixes["cleared_auto_conf"] is False  # the link's file was never read
    notes = " ".join(report["notes"])
    for name in ("pg_hba.conf", "postgresql.conf", "postgresql.auto.conf", "pg_ident.conf"):
        assert f"/main/{name}" in notes, notes
    assert "/main/pg_wal" in notes
    # Only names relative to the restore: no target paths, no file contents.
    assert SECRET not in json.dumps(report) + stderr
    assert str(hostile.victim) not in json.dumps(report)
    assert list(work.iterdir()) == []


def test_relative_current_link_to_another_cluster_is_ignored(
    hostile: Hostile, scratch: Path
) -> None:
    work = hostile.base / "work-current-rel"
    work.mkdir()
    assert (work / ".." / "victimcluster" / "PG_VERSION").exists()  # where `current` leads
    before = outside_state(hostile)
    code, report, stderr = verify(hostile, "current-rel", work, scratch)
    assert outside_state(hostile) == before
    assert (hostile.cluster / "postmaster.pid").read_text().startswith("4242\n")
    assert code == 1, json.dumps(report, indent=1) + stderr
    assert report["reason"] == "NotPostgres"  # the snapshot holds nothing else
    assert "removed symlinks that led outside the restored tree: current" in report["error"]
    assert SECRET not in json.dumps(report) + stderr


def test_absolute_current_link_climbing_out_falls_back_to_the_search(
    hostile: Hostile, scratch: Path
) -> None:
    work = hostile.base / "work-current-abs"
    work.mkdir()
    before = outside_state(hostile)
    code, report, stderr = verify(hostile, "current-abs", work, scratch)
    assert outside_state(hostile) == before
    assert code == 0, json.dumps(report, indent=1) + stderr
    assert report["outcome"] == "success"
    assert report["health_details"]["fixes"]["removed_unsafe_links"] is True
    assert "current" in " ".join(report["notes"])
    assert "found via search" in stderr
    assert "victimcluster" not in stderr


def _special_entries(top: Path) -> list[str]:
    bad = []
    for path in [top, *top.rglob("*")]:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (SPECIAL | stat.S_IWOTH):
            bad.append(f"{oct(st.st_mode)} {path}")
    return bad


def _kept(work: Path) -> Path:
    kept = [p for p in work.iterdir() if p.name.startswith("pgro-verify-")]
    assert len(kept) == 1, list(work.iterdir())
    return kept[0] / "data"


def test_setuid_and_setgid_bits_never_survive(
    hostile: Hostile, scratch: Path, account: RunAccount
) -> None:
    work = hostile.base / "work-setuid"
    work.mkdir()
    try:
        code, report, stderr = verify(hostile, "setuid", work, scratch, "--keep")
        assert code == 0, json.dumps(report, indent=1) + stderr
        data = _kept(work)
        assert (data / "suid-id").is_file()  # restored, but inert
        assert (data / "15" / "main" / "sgid-dir" / "inside").is_file()
        assert _special_entries(data) == []
        # Handed over whole: nothing restored is left to root where others could reach it.
        assert {os.lstat(p).st_uid for p in [data, *data.rglob("*")]} == {account.uid}
        assert stat.S_IMODE(os.lstat(data).st_mode) == 0o700
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_failed_restore_kept_for_inspection_is_inert(hostile: Hostile, scratch: Path) -> None:
    work = hostile.base / "work-setuid-notpg"
    work.mkdir()
    try:
        code, report, stderr = verify(hostile, "setuid-notpg", work, scratch, "--keep")
        assert code == 1, json.dumps(report, indent=1) + stderr
        assert report["reason"] == "NotPostgres"
        data = _kept(work)
        assert (data / "suid-id").is_file()
        assert _special_entries(data) == []
        # Never handed over: root's, and only root can enter it.
        st = os.lstat(data)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_pgro_run_keeps_a_failed_restore_inert(
    hostile: Hostile, scratch: Path, account: RunAccount
) -> None:
    """The restore step `pgro run`'s worker runs: a NotPostgres tree stays, and is inert."""
    target = scratch / "data"
    with KopiaRepository(hostile.repo.credentials, scratch / "kopia") as kopia:
        snap = next(
            s for s in kopia.list_snapshots() if s.id == hostile.repo.snapshots["setuid-notpg"]
        )
        with pytest.raises(NotPostgres):
            restore_snapshot(kopia, snap, target, account, SilentObserver())
    assert (target / "suid-id").is_file()
    assert _special_entries(target) == []
    st = os.lstat(target)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


@pytest.mark.parametrize("kind", ["links", "setuid"])
def test_the_kubernetes_restore_job_is_confined_too(
    hostile: Hostile, scratch: Path, kind: str
) -> None:
    """`pgro restore-job` (the restore pod's entry point) runs the same shared steps."""
    volume = scratch / "pgdata-volume"
    volume.mkdir()
    before = outside_state(hostile)
    proc = subprocess.run(
        [sys.executable, "-m", "pgro.cli.main", "restore-job"],
        env={
            "PATH": os.environ["PATH"],
            # The same pgro as this test process (which PYTHONPATH may point elsewhere).
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
            "PGRO_DATA_ROOT": str(volume),
            "PGRO_KOPIA_DIR": str(scratch / "kopia-cache"),
            "PGRO_TERMINATION_LOG": str(scratch / "termination-log"),
            "SNAPSHOT_ID": hostile.repo.snapshots[kind],
            "KOPIA_FILESYSTEM_PATH": str(hostile.repo.path),
            "KOPIA_PASSWORD": hostile.repo.password,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert outside_state(hostile) == before
    assert SECRET not in output
    assert _special_entries(volume / "postgres") == []
    assert os.readlink(volume / "pgdata") == "postgres/15/main"
    fixes = parse_fixes((scratch / "termination-log").read_text())
    assert fixes is not None
    assert fixes["removed_unsafe_links"] is (kind == "links")
