"""`pgro run`'s files and the processes it acts on: what other users and the run account
(which runs restored, untrusted content) can and cannot make pgro do."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.runtimes.embedded.credentials import CredentialStore
from pgro.runtimes.embedded.manifest import ManifestError, load_manifests
from pgro.runtimes.embedded.servers import running_postmaster, stop_postmaster
from pgro.runtimes.embedded.state_dir import StateDirError, blocked_at, prepare_state_dir
from pgro.runtimes.embedded.store import Store
from tests.fixtures.manifests import replica

EVIL = "../../../../outside/evil"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- role names (item 12) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"extraUsers": [EVIL]},
        {"extraUsers": [{"name": EVIL, "schemas": ["public"]}]},
        {"analyticsUsername": EVIL},
        {"analyticsUsername": ""},
        {"analyticsUsername": "x" * 64},
        {"extraUsers": ["nul\0byte"]},
        {"extraUsers": ["line\nbreak"]},
        {"persistentUsers": [{"name": "a/b"}]},
    ],
)
def test_role_names_that_are_not_postgresql_role_names_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"role name|valid"):
        replica(**spec)


def test_usual_role_names_are_accepted() -> None:
    accepted = replica(
        analyticsUsername="Analytics Team", extraUsers=["report_writer", "é" * 31, ""]
    )
    assert [u.name for u in accepted.spec.extra_users] == ["report_writer", "é" * 31]


def test_a_manifest_with_a_path_as_user_name_is_refused_with_the_name(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "apiVersion: pgro.bes.au/v1alpha1\nkind: PostgresPhysicalReplica\n"
        "metadata: {name: r}\nspec:\n  schedule: H 3 * * *\n  kopiaSecretRef: {name: k}\n"
        f"  extraUsers: ['{EVIL}']\n"
    )
    with pytest.raises(ManifestError, match=r"extraUsers.*must not contain '/'"):
        load_manifests([manifest])


def test_credential_files_stay_in_the_replica_folder_whatever_the_name(tmp_path: Path) -> None:
    # The review's layout: the state directory two levels below directories that are not
    # pgro's; before, `../..` names wrote outside and chmodded those parents to 0700.
    base = tmp_path / "a" / "b"
    base.mkdir(parents=True)
    for d in (tmp_path / "a", base):
        os.chmod(d, 0o755)
    state = base / "state"
    state.mkdir()
    store = CredentialStore(state / "credentials")
    creds = store.ensure("default/r", EVIL)
    assert creds.username == EVIL
    assert not (tmp_path / "a" / "outside").exists()
    assert not (tmp_path / "outside").exists()
    assert mode(tmp_path / "a") == 0o755 and mode(base) == 0o755
    files = [p for p in (state / "credentials").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert files[0].parent == state / "credentials" / "default" / "r"
    assert mode(files[0]) == 0o600
    assert store.ensure("default/r", EVIL) == creds  # found again, not regenerated
    assert store.read("default/r") == {EVIL: creds}
    # Names that slug alike still get their own files.
    assert store.ensure("default/r", "a.b").password != store.ensure("default/r", "a_b").password


def test_credentials_of_an_older_pgro_keep_their_password(tmp_path: Path) -> None:
    folder = tmp_path / "credentials" / "default" / "r"
    folder.mkdir(parents=True)
    (folder / "analytics.json").write_text('{"username": "analytics", "password": "old-pw"}')
    store = CredentialStore(tmp_path / "credentials")
    assert store.ensure("default/r", "analytics").password == "old-pw"
    assert not (folder / "analytics.json").exists()
    assert store.ensure("default/r", "analytics").password == "old-pw"


# -- the state directory (item 11) ----------------------------------------------------------


def test_the_state_database_and_its_wal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "state.db")
        store.set_setting("k", "v")
        assert mode(tmp_path / "state.db") == 0o600
        assert mode(tmp_path / "state.db-wal") == 0o600
        assert mode(tmp_path / "state.db-shm") == 0o600
        store.close()
        # One left by an older pgro is tightened when opened.
        os.chmod(tmp_path / "state.db", 0o644)
        Store(tmp_path / "state.db").close()
        assert mode(tmp_path / "state.db") == 0o600
    finally:
        os.umask(old)


def test_a_new_state_dir_is_created_traversable_not_listable(tmp_path: Path) -> None:
    made = prepare_state_dir(tmp_path / "new" / "state")
    assert made == tmp_path / "new" / "state"
    assert mode(made) == 0o711
    assert mode(tmp_path / "new") == 0o711


def test_an_existing_directory_is_never_chmodded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o750)
    (home / ".bashrc").write_text("")
    with pytest.raises(StateDirError, match=r"not empty and holds no state\.db"):
        prepare_state_dir(home)
    assert mode(home) == 0o750

    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    with pytest.raises(StateDirError, match="writable by other users"):
        prepare_state_dir(sticky)
    assert mode(sticky) == 0o1777

    empty = tmp_path / "empty"
    empty.mkdir()
    os.chmod(empty, 0o755)
    assert prepare_state_dir(empty) == empty
    assert mode(empty) == 0o755  # used as it is

    used = tmp_path / "used"
    used.mkdir()
    Store(used / "state.db").close()
    (used / "restores").mkdir()
    assert prepare_state_dir(used) == used


# -- postmaster.pid is the run account's file (item 13) -------------------------------------


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def forge_pidfile(pgdata: Path, pid: int, socket_dir: Path) -> None:
    pgdata.mkdir(parents=True, exist_ok=True)
    (pgdata / "postmaster.pid").write_text(
        f"{pid}\n{pgdata}\n1700000000\n5432\n{socket_dir}\n127.0.0.1\n  1  2\nready   \n"
    )


def test_a_forged_postmaster_pid_is_neither_adopted_nor_signalled(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    account = resolve_run_account()
    pgdata = tmp_path / "data"
    forge_pidfile(pgdata, victim.pid, Path("/tmp/pgro-sock-victim"))
    assert running_postmaster(pgdata, account) is None
    assert stop_postmaster(victim.pid, pgdata, account, timeout=1) is False
    assert victim.poll() is None  # still running
    # Not even a real postgres argv passes when its -D is another directory.
    other = RunAccount(account.name, os.geteuid(), os.getegid())
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "-D", str(pgdata)],
    )
    try:
        forge_pidfile(pgdata, fake.pid, tmp_path)
        assert running_postmaster(pgdata, other) is None  # argv[0] is not postgres
    finally:
        fake.kill()
        fake.wait()


def test_the_first_directory_the_run_account_cannot_enter_is_named() -> None:
    account = resolve_run_account()
    if account.is_current_user:
        pytest.skip("the run account is this user: nothing to traverse")
    base = Path(tempfile.mkdtemp(prefix="pgro-h6-"))
    try:
        os.chmod(base, 0o711)
        private = base / "private"
        (private / "state").mkdir(parents=True)
        assert blocked_at(private / "state", account) is None
        os.chmod(private, 0o700)
        assert blocked_at(private / "state", account) == private
    finally:
        shutil.rmtree(base)
