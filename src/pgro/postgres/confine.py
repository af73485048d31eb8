"""Keeping pgro inside a restored tree: a snapshot is untrusted input.

A snapshot can hold symlinks that name any path on this host (`pg_hba.conf -> /etc/shadow`,
`pg_wal -> /var/lib/postgresql/15/main/pg_wal`, `current -> ../../victim`) and set-uid
files. pgro often runs as root, so following such a link would let a backup read, write or
delete files anywhere, and a set-uid file would be a root shell for any local user.

Three tools, used by the restore step of both runtimes:

- `resolve_beneath` resolves a path under a root the way the kernel would, but refuses as
  soon as a `..` or a link would leave the root (an `openat2(RESOLVE_BENEATH)` in Python);
- `ConfinedTree` reads and writes files beneath a root through directory file descriptors,
  opened one component at a time with `O_NOFOLLOW`, and replaces a link instead of writing
  through it;
- `sanitise_tree`, run right after kopia's download and before anything looks inside,
  removes every link that leads out of the tree and strips set-uid, set-gid, sticky and
  world-write bits from every entry.
"""

from __future__ import annotations

import os
import re
import stat
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

# The kernel's own limit on links followed in one lookup (ELOOP).
MAX_LINK_HOPS = 40
# Bits no restored entry may keep: a set-uid/set-gid file owned by root (kopia restores
# the bits; `--skip-owners` makes root the owner) is a privilege escalation, and a
# world-writable entry lets any local user change the data before the server reads it.
UNSAFE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH
# The org convention: a `current` link at the top of the backup names the live cluster by
# its path on the source host (`/var/lib/postgresql/16/main`).
CURRENT_LINK = "current"
# Names shown in notes come from the snapshot: print them tame and short.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAME_LIMIT = 120
_NAMES_SHOWN = 20

# Paths given relative to a root, or absolute under it.
StrPath = str | PurePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class EscapesRoot(Exception):
    """A path beneath the root leads out of it (or through a link loop)."""


class NotARegularFile(Exception):
    """pgro expected a regular file and found a directory, device, FIFO or socket."""


def tame(name: str, limit: int = _NAME_LIMIT) -> str:
    """A snapshot-controlled name fit for a note: no control characters, bounded length."""
    clean = _CONTROL.sub("?", name)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def tame_list(names: list[str], limit: int = _NAMES_SHOWN) -> str:
    shown = ", ".join(tame(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _relative_parts(root: Path, path: StrPath) -> list[str]:
    """`path` as components below `root`; an absolute path must be lexically under it."""
    p = PurePosixPath(path)
    if not p.is_absolute():
        return list(p.parts)
    for base in (PurePosixPath(root), PurePosixPath(os.path.realpath(root))):
        if p.parts[: len(base.parts)] == base.parts:
            return list(p.parts[len(base.parts) :])
    raise EscapesRoot(f"{path} is not under {root}")


def resolve_beneath(root: Path, path: StrPath) -> Path:
    """The real path that `path` (relative to `root`, or absolute under it) names.

    Links are followed only while every step stays beneath `root`: a `..` above the root,
    an absolute link target outside it, a `..` after a missing component (which a later
    mkdir could make real) or more than `MAX_LINK_HOPS` links raise `EscapesRoot`. Nothing
    outside the root is ever looked at. The result has no links in it; its tail may not
    exist yet.
    """
    base = Path(os.path.realpath(root))
    pending = deque(_relative_parts(root, path))
    current: list[str] = []
    hops = 0
    missing = False
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if missing:
                raise EscapesRoot(f"{path}: '..' after a missing component")
            if not current:
                raise EscapesRoot(f"{path} leads above {root}")
            current.pop()
            continue
        if missing:
            current.append(part)
            continue
        here = base.joinpath(*current, part)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            missing = True
            current.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            current.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            raise EscapesRoot(f"{path}: too many levels of symbolic links")
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():
            # Only a literal path inside the (real) root stays inside.
            if target.parts[: len(base.parts)] != base.parts:
                raise EscapesRoot(f"{path} links outside {root}")
            current = []
            pending.extendleft(reversed(target.parts[len(base.parts) :]))
        else:
            pending.extendleft(reversed(target.parts))
    return base.joinpath(*current)


def reroot_source_path(target: str) -> PurePosixPath | None:
    """A source-host path (`/var/lib/postgresql/16/main`) re-rooted from its last numeric
    component on (`16/main`), as the `current` convention needs; None without one."""
    parts = PurePosixPath(target).parts[1:]
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numeric:
        return None
    return PurePosixPath(*parts[numeric[-1] :])


class ConfinedTree:
    """File operations beneath `root` that never follow a link out of it.

    Paths are relative to the root (or absolute under it). Reads follow links that stay
    inside; writes and deletions act on the name itself, never on what a link points at.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))

    def resolve(self, path: StrPath) -> Path:
        return resolve_beneath(self.root, path)

    def relative(self, path: StrPath) -> PurePosixPath:
        """`path` as a link-free path relative to the root."""
        return PurePosixPath(self.resolve(path).relative_to(self.root))

    @contextmanager
    def directory(self, path: StrPath) -> Iterator[int]:
        """A descriptor of the real directory `path`, opened component by component."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in self.relative(path).parts:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, path: StrPath) -> Iterator[tuple[int, str]]:
        """(descriptor of the directory holding `path`'s last name, that name)."""
        rel = PurePosixPath(*_relative_parts(self.root, path))
        if rel.name in ("", ".", ".."):
            raise EscapesRoot(f"{path} does not name an entry")
        with self.directory(rel.parent) as fd:
            yield fd, rel.name

    def lstat(self, path: StrPath) -> os.stat_result | None:
        """The entry itself (a link is not followed); None when missing."""
        with self.parent(path) as (fd, name):
            try:
                return os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                return None

    def exists(self, path: StrPath) -> bool:
        """Whether `path` names something, following links only inside the root."""
        try:
            return self.lstat(self.relative(path)) is not None
        except (EscapesRoot, FileNotFoundError, NotADirectoryError):
            return False

    def read_bytes(self, path: StrPath, limit: int) -> bytes | None:
        """A regular file's bytes (following links inside the root); None when missing."""
        real = self.relative(path)
        with self.parent(real) as (dfd, name):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except FileNotFoundError:
                return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotARegularFile(f"{real} is not a regular file")
            if st.st_size > limit:
                raise NotARegularFile(f"{real} is {st.st_size} bytes (at most {limit} expected)")
            return f.read(limit + 1)[:limit]

    def read_text(self, path: StrPath, limit: int = 16 * 2**20) -> str | None:
        data = self.read_bytes(path, limit)
        return None if data is None else data.decode("utf-8", errors="replace")

    def write_text(self, path: StrPath, text: str, mode: int = 0o600) -> None:
        """Write a regular file at `path`, replacing a link there instead of following it.

        Written to a temporary name and renamed over the old entry, so neither a link nor
        a hard-linked file is ever opened for writing.
        """
        with self.parent(path) as (dfd, name):
            existing = _lstat_or_none(name, dfd)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise NotARegularFile(f"{path} is a directory")
            tmp = f".{name}.pgro-new"
            if _lstat_or_none(tmp, dfd) is not None:
                os.unlink(tmp, dir_fd=dfd)
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dfd,
            )
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def unlink(self, path: StrPath) -> bool:
        """Remove the entry (a link itself, never its target). False when missing."""
        with self.parent(path) as (dfd, name):
            st = _lstat_or_none(name, dfd)
            if st is None:
                return False
            if stat.S_ISDIR(st.st_mode):
                raise NotARegularFile(f"{path} is a directory")
            os.unlink(name, dir_fd=dfd)
            return True

    def makedirs(self, path: StrPath, mode: int = 0o700) -> bool:
        """Create `path` and missing parents beneath the root. True if anything was made."""
        created = False
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in self.relative(path).parts:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, mode, dir_fd=fd)
                    created = True
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        finally:
            os.close(fd)
        return created

    def chmod_directory(self, path: StrPath, mode: int) -> bool:
        """Set a directory's mode (through its descriptor). True if it changed."""
        with self.directory(path) as fd:
            if stat.S_IMODE(os.fstat(fd).st_mode) == mode:
                return False
            os.fchmod(fd, mode)
            return True


def _lstat_or_none(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


@dataclass
class Sanitised:
    """What `sanitise_tree` changed, by path relative to the root."""

    removed_links: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)  # entries that lost UNSAFE_BITS


def _safe_current(base: Path, link: Path) -> PurePosixPath | None:
    """Where a top-level `current` link really leads inside the tree, or None."""
    target = os.readlink(link)
    if target.startswith("/"):
        rerooted = reroot_source_path(target)
        if rerooted is None:
            return None
        try:
            real = resolve_beneath(base, rerooted)
        except EscapesRoot:
            return None
    else:
        try:
            real = resolve_beneath(base, CURRENT_LINK)
        except EscapesRoot:
            return None
    return PurePosixPath(real.relative_to(base)) if real.is_dir() else None


def sanitise_tree(root: Path) -> Sanitised:
    """Make a freshly restored tree safe to look at, before anything else reads it.

    - The root becomes mode 0700: only the restoring user enters until the tree is handed
      over to the account that runs PostgreSQL.
    - A link whose target leaves the root (or dangles outside it, or loops) is removed;
      links that stay inside remain. A top-level `current` link is the one link pgro
      interprets (its target names the source host's cluster): it is rewritten to the
      relative path of the directory it means inside the tree, or removed if there is none.
    - Set-uid, set-gid, sticky and world-write bits are cleared on every entry.

    Links are never followed while walking, and the walk never leaves the root.
    """
    base = Path(os.path.realpath(root))
    result = Sanitised()
    if stat.S_IMODE(os.lstat(base).st_mode) != 0o700:
        os.chmod(base, 0o700)
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        for name in (*dirnames, *filenames):
            path = here / name
            rel = str(path.relative_to(base))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if _keep_link(base, path, rel):
                    continue
                os.unlink(path)
                result.removed_links.append(rel)
                if name in dirnames:
                    dirnames.remove(name)
                continue
            bad = st.st_mode & UNSAFE_BITS
            if bad:
                # lstat said this is no link, and nobody else can enter the tree (0700).
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~UNSAFE_BITS)
                result.stripped.append(rel)
    return result


def _keep_link(base: Path, path: Path, rel: str) -> bool:
    if rel == CURRENT_LINK:
        inside = _safe_current(base, path)
        if inside is None:
            return False
        if os.readlink(path) != str(inside):
            tmp = path.with_name(f".{CURRENT_LINK}.pgro-new")
            tmp.unlink(missing_ok=True)
            os.symlink(str(inside), tmp)
            os.replace(tmp, path)
        return True
    try:
        resolve_beneath(base, rel)
    except EscapesRoot:
        return False
    return True
