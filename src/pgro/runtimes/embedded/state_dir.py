"""Where `pgro run` keeps its files, and who may read them: the state directory (private)
and the run root, the part the run account traverses to (docs/run.md, "The state
directory")."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from pathlib import Path

from pgro.postgres.account import RunAccount, may_search

DB_NAME = "state.db"
PGRO_ENTRIES = frozenset(
    {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", "canopy-device"}
    | {"credentials", "restores", "endpoints", "kopia"}
)
# The parent of every relocated run root; created by pgro, owned by root, mode 0711.
FALLBACK_RUN_BASE = Path("/var/lib/pgro-run")
# Directories on the run account's path: it may enter them, nobody may list them.
TRAVERSE = 0o711
PRIVATE = 0o700


class StateDirError(Exception):
    """The state directory cannot be used; the message names it and the fix."""

    reason = "StateDirUnusable"


def prepare_state_dir(path: Path) -> Path:
    """The absolute state directory, created (mode 0711) if missing, checked if not."""
    path = Path(os.path.abspath(path))
    if not os.path.lexists(path):
        _make_missing_parents(path.parent)
        try:
            path.mkdir(mode=TRAVERSE)
        except FileExistsError:
            pass  # a concurrent creator: checked below like any existing directory
        else:
            os.chmod(path, TRAVERSE)  # mkdir's mode is cut by the umask
            return path
    try:
        st = path.stat()
    except OSError as exc:
        raise StateDirError(f"--state-dir {path} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"--state-dir {path} is not a directory")
    _check_ours(path, st)
    if (path / DB_NAME).exists():
        return path
    # Only what pgro itself puts here (a start that stopped before creating the database,
    # or the canopy device key made just before it).
    if any(entry.name not in PGRO_ENTRIES for entry in path.iterdir()):
        raise StateDirError(
            f"--state-dir {path} is not empty and holds no {DB_NAME}, so it is not a pgro "
            "state directory; pgro keeps its state in a directory of its own and will not "
            f"change the mode of, or add files to, this one. Give a new directory (pgro "
            f"creates it), for example --state-dir {path / 'pgro'}"
        )
    return path


def _make_missing_parents(parent: Path) -> None:
    """`mkdir -p` for the parents pgro creates: 0711, so the run account can pass."""
    for directory in reversed([d for d in (parent, *parent.parents) if not os.path.lexists(d)]):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=TRAVERSE)
            os.chmod(directory, TRAVERSE)  # mkdir's mode is cut by the umask


def _check_ours(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise StateDirError(
            f"--state-dir {path} belongs to uid {st.st_uid}, not to the user running pgro: "
            "another user could change what pgro reads and writes there. Use a directory "
            "of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            f"--state-dir {path} is writable by other users (mode {stat.filemode(st.st_mode)}): "
            f"they could plant files pgro then trusts. Use a directory of your own, for "
            f"example {path / 'pgro'}"
        )


def ensure_dir(path: Path, mode: int) -> Path:
    """A directory pgro owns at `path` with exactly `mode`: created, or checked and set
    (a symlink or another user's directory is refused). Never for a parent named by input."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise StateDirError(
                f"{path} exists but is not a directory owned by this user (a symlink, or "
                "made by someone else): remove it"
            ) from None
        if stat.S_IMODE(st.st_mode) == mode:
            return path
    os.chmod(path, mode)
    return path


def ensure_dirs(base: Path, parts: tuple[str, ...], mode: int) -> Path:
    """`base/parts[0]/parts[1]/…`, each created or set to `mode` by `ensure_dir`."""
    path = base
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\0" in part:
            raise ValueError(f"{part!r} is not a path component")
        path = ensure_dir(path / part, mode)
    return path


def blocked_at(path: Path, account: RunAccount) -> Path | None:
    """The first directory on `path` (itself included) the run account cannot enter."""
    if account.is_current_user:
        return None
    for directory in reversed([path, *path.parents]):
        try:
            st = directory.stat()
        except OSError:
            return directory
        if not may_search(st, account):
            return directory
    return None


def fallback_run_root(state_dir: Path) -> Path:
    """The run root for a state directory the run account cannot reach: stable per path."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", state_dir.name)[:32] or "state"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return FALLBACK_RUN_BASE / f"{slug}-{digest}"


def choose_run_root(state_dir: Path, account: RunAccount, stored: str | None) -> Path:
    """Where restores and endpoints live: the state directory if the run account can
    traverse to it, else `fallback_run_root`. A location used before (`stored`) is kept
    while it still works, so a restart finds its restores where it left them."""
    if stored is not None:
        previous = Path(stored)
        if previous == state_dir and blocked_at(state_dir, account) is None:
            return state_dir
        if previous != state_dir and previous.parent == FALLBACK_RUN_BASE:
            return _fallback(previous, state_dir, account)
    blocked = blocked_at(state_dir, account)
    if blocked is None:
        return state_dir
    return _fallback(fallback_run_root(state_dir), state_dir, account, blocked)


def _fallback(
    root: Path, state_dir: Path, account: RunAccount, blocked: Path | None = None
) -> Path:
    why = (
        f"{account.name} (the account PostgreSQL and PgBouncer run as) cannot enter "
        f"{blocked or state_dir}"
    )
    if os.geteuid() != 0:
        raise StateDirError(
            f"{why}: choose a --state-dir it can traverse, such as /var/lib/pgro, or allow "
            f"it to pass with `chmod o+x {blocked or state_dir}`"
        )
    base_parent = blocked_at(FALLBACK_RUN_BASE.parent, account)
    if base_parent is not None:
        raise StateDirError(
            f"{why}, and neither can it enter {base_parent} to use {FALLBACK_RUN_BASE} "
            f"instead: choose a --state-dir it can traverse, or allow it to pass with "
            f"`chmod o+x {blocked or state_dir}`"
        )
    try:
        ensure_dir(FALLBACK_RUN_BASE, TRAVERSE)
        ensure_dir(root, TRAVERSE)
    except OSError as exc:
        raise StateDirError(f"{why}, and {root} cannot be created instead: {exc}") from None
    return root
