"""The unprivileged account PostgreSQL runs as, and handing files over to it.

PostgreSQL refuses to run as root, and a restored tree keeps the source host's owners. When
pgro runs as root the server runs as the `postgres` system user (or `$PGRO_RUN_AS`);
otherwise as the invoking user.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SYSTEM_USER = "postgres"


class AccountMissing(Exception):
    reason = "RunAccountMissing"


@dataclass(frozen=True)
class RunAccount:
    name: str
    uid: int
    gid: int

    @property
    def is_current_user(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict[str, object]:
        """Arguments for subprocess.Popen that run the child as this account."""
        if self.is_current_user:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        return {"USER": self.name, "LOGNAME": self.name, "HOME": pwd.getpwuid(self.uid).pw_dir}


def may_search(st: os.stat_result, account: RunAccount) -> bool:
    """Whether `account` has the execute (for a directory: enter) bit on a file with `st`,
    as the kernel checks it: its own primary group only (the processes pgro starts as it get
    no supplementary groups)."""
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == account.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def unreachable(path: Path, account: RunAccount, leaf: str = "execute") -> str | None:
    """Why `account` cannot `leaf` ("execute" or "enter") `path`, or enter a directory
    above it; None if it can."""
    for where, verb in [(path, leaf), *((parent, "enter") for parent in path.parents)]:
        try:
            st = where.stat()
        except OSError as exc:
            return f"{where} cannot be read ({exc.strerror or exc})"
        if not may_search(st, account):
            return f"{account.name} cannot {verb} {where} (mode {stat.filemode(st.st_mode)})"
    return None


def resolve_run_account() -> RunAccount:
    wanted = os.environ.get("PGRO_RUN_AS")
    if os.geteuid() != 0 and not wanted:
        entry = pwd.getpwuid(os.geteuid())
        return RunAccount(entry.pw_name, entry.pw_uid, entry.pw_gid)
    name = wanted or DEFAULT_SYSTEM_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise AccountMissing(
            f"pgro runs PostgreSQL as the system user {name!r} when started as root, but "
            f"there is no such user: install the PostgreSQL packages (they create it), set "
            "PGRO_RUN_AS to another unprivileged user, or run pgro as a non-root user"
        ) from None
    if entry.pw_uid == 0:
        raise AccountMissing(f"PGRO_RUN_AS={name} is root; PostgreSQL refuses to run as root")
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise AccountMissing(
            f"PGRO_RUN_AS={name} needs pgro to run as root (it runs as uid {os.geteuid()})"
        )
    return RunAccount(entry.pw_name, entry.pw_uid, entry.pw_gid)


def hand_over(tree: Path, account: RunAccount) -> int:
    """Make `tree` and everything under it owned by `account`. Returns entries changed.

    Links are changed themselves, never followed. Set-uid, set-gid, sticky and
    world-write bits are cleared on the way (the restore step has already stripped them
    from restored entries; this covers anything created since). A no-op for the invoking
    user (it cannot chown and already owns what it restored).
    """
    if os.geteuid() != 0:
        return 0
    changed = 0
    for name in _entries(tree):
        st = os.lstat(name)
        if st.st_uid != account.uid or st.st_gid != account.gid:
            os.lchown(name, account.uid, account.gid)
            changed += 1
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & _UNSAFE_BITS:
            # lstat said no link; the tree is private to root until this hand-over.
            os.chmod(name, stat.S_IMODE(st.st_mode) & ~_UNSAFE_BITS)
    return changed


# Never on a file handed to the run account: see postgres/confine.py (UNSAFE_BITS).
_UNSAFE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH


def _entries(tree: Path) -> Iterator[str]:
    yield str(tree)
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in (*dirnames, *filenames):
            yield os.path.join(dirpath, n)
