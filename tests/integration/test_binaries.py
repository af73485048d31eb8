"""Finding a major's server binaries (`pgro.postgres.binaries`) on real installs: Debian's
15 and the relocatable 13 build of `scripts/install-postgres-major.sh`.

As root, PostgreSQL runs as `postgres`, which cannot enter `/root` (mode 0700): binaries
installed there used to be "found" and then fail to start with a bare PermissionError. They
are refused up front, by a `PostgresBinariesMissing` error naming the directory and the fix.
`$libdir` is the build's own: `lib/postgresql` for the relocatable builds (their contrib is
there), `lib` for Debian's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import (
    BinariesMissing,
    BinariesNotExecutable,
    PostgresBinaries,
    find_binaries,
)
from tests.fixtures.majors import cache_root, installed_in_cache, server_readable_cache

MAJOR = "13"
NOT_INSTALLED = f"PostgreSQL {MAJOR} is not in the cache (scripts/setup.sh test installs it)"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the server's account differs only as root")


def _version(bindir: Path, account: RunAccount) -> str:
    done = subprocess.run(
        [str(bindir / "postgres"), "--version"],
        capture_output=True,
        check=True,
        timeout=30,
        cwd="/",
        user=account.uid,  # as the server runs (root only: see as_root)
        group=account.gid,
        extra_groups=[],
    )
    return done.stdout.decode()


@as_root
def test_binaries_the_servers_account_cannot_enter_are_refused_naming_the_directory(
    scratch: Path, account: RunAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not installed_in_cache(MAJOR):
        pytest.skip(NOT_INSTALLED)
    private = scratch / "private"
    private.mkdir()
    bindir = server_readable_cache(private, (MAJOR,)) / MAJOR / "bin"
    os.chmod(private, 0o700)  # as /root is
    monkeypatch.setenv("PGRO_POSTGRES_BINDIRS", str(private / "postgres-cache/{major}/bin"))

    # What starting them would have done.
    with pytest.raises(PermissionError):
        _version(bindir, account)

    with pytest.raises(BinariesNotExecutable) as err:
        find_binaries(MAJOR)
    assert isinstance(err.value, BinariesMissing)
    assert err.value.reason == "PostgresBinariesMissing"
    message = str(err.value)
    assert str(bindir) in message
    assert f"{account.name} cannot enter {private} (mode drwx------)" in message
    assert "PGRO_POSTGRES_BINDIRS" in message and "PGRO_RUN_AS" in message

    # Once the account can enter, they are found, and they run as it.
    os.chmod(private, 0o711)
    found = find_binaries(MAJOR)
    assert found.bindir == bindir
    assert f"(PostgreSQL) {MAJOR}." in _version(found.bindir, account)


@as_root
def test_the_cache_under_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The case as it happened: `PGRO_POSTGRES_BINDIRS` at `~/.cache/pgro/postgres` as root."""
    if not installed_in_cache(MAJOR):
        pytest.skip(NOT_INSTALLED)
    if not cache_root().is_relative_to("/root"):
        pytest.skip("the cache is not under /root")
    monkeypatch.setenv("PGRO_POSTGRES_BINDIRS", str(cache_root() / "{major}" / "bin"))
    with pytest.raises(BinariesNotExecutable, match="cannot enter /root "):
        find_binaries(MAJOR)


def test_the_invoking_user_as_the_account_skips_the_check(
    account: RunAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the account explicitly: the invoking user's own access is what counts."""
    if not installed_in_cache(MAJOR):
        pytest.skip(NOT_INSTALLED)
    monkeypatch.setenv("PGRO_POSTGRES_BINDIRS", str(cache_root() / "{major}" / "bin"))
    me = RunAccount("me", os.geteuid(), os.getegid())
    assert find_binaries(MAJOR, me).bindir == cache_root() / MAJOR / "bin"


def test_a_relocatable_builds_libdir_is_lib_postgresql() -> None:
    if not installed_in_cache(MAJOR):
        pytest.skip(NOT_INSTALLED)
    build = PostgresBinaries(MAJOR, cache_root() / MAJOR / "bin")
    assert build.libdir == cache_root() / MAJOR / "lib" / "postgresql"
    assert build.has_library("amcheck")
    assert build.has_library("pg_stat_statements")
    # lib/ holds the build's shared libraries, which $libdir does not: not loadable by name.
    assert (cache_root() / MAJOR / "lib" / "libecpg.so").exists()
    assert not build.has_library("libecpg")
    assert not build.has_library("no_such_module")
    assert not build.has_library("../postgresql/amcheck")


def test_debians_libdir_is_lib() -> None:
    debian = find_binaries("15")
    assert debian.libdir == Path("/usr/lib/postgresql/15/lib")
    assert debian.has_library("amcheck")
    assert not debian.has_library("no_such_module")
