"""Finding the PostgreSQL data directory inside a restored snapshot tree."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pgro.postgres.confine import (
    CURRENT_LINK,
    ConfinedTree,
    EscapesRoot,
    NotARegularFile,
    reroot_source_path,
    resolve_beneath,
    tame_list,
)

# A cluster root holds PG_VERSION *and* global/; every base/<oid>/ also holds a PG_VERSION.
_MAJOR = re.compile(r"^(\d+)(?:\.(\d+))?$")
# Directories inside a cluster that never contain another cluster: skip walking them.
_CLUSTER_INTERNALS = frozenset({"base", "global", "pg_wal", "pg_xlog", "pg_multixact", "pg_xact"})


class NotPostgres(Exception):
    """The restored tree holds no PostgreSQL data directory."""

    reason = "NotPostgres"


class UnsafeSnapshot(NotPostgres):
    """The restored tree would make pgro act outside it (a link or path that leaves it).

    A kind of NotPostgres so every caller that refuses a snapshot refuses this one too,
    with its own reason.
    """

    reason = "UnsafeSnapshot"


@dataclass(frozen=True)
class DataDirectory:
    path: Path
    major: str
    found_via: str  # "current-symlink" or "search"


def parse_major(text: str, where: Path) -> str:
    """The major version from PG_VERSION contents: `15` for 15, `9.6` for 9.6."""
    value = text.strip()
    m = _MAJOR.match(value)
    if not m:
        raise NotPostgres(f"{where} holds {value[:40]!r}, which is not a PostgreSQL major version")
    return value


def _major_key(major: str) -> tuple[int, int]:
    m = _MAJOR.match(major)
    assert m is not None
    return int(m.group(1)), int(m.group(2) or 0)


def _read_version(root: Path, cluster: Path) -> str:
    """PG_VERSION's major, read without following a link out of the restored tree."""
    where = cluster / "PG_VERSION"
    try:
        text = ConfinedTree(root).read_text(where, limit=64)
    except (EscapesRoot, NotARegularFile) as exc:
        raise NotPostgres(f"{where} is not a PostgreSQL version file ({exc})") from None
    if text is None:
        raise NotPostgres(f"{where} is missing")
    return parse_major(text, where)


def _is_cluster_root(path: Path) -> bool:
    return (path / "PG_VERSION").is_file() and (path / "global").is_dir()


def _from_current_symlink(root: Path) -> Path | None:
    """Follow the org convention of a `current` symlink whose target is a source-host path.

    The target (e.g. `/var/lib/postgresql/16/main`) names a path on the machine the
    snapshot came from; keep it from the last `/<digits>/` component on and re-root it
    under the restore (`<root>/16/main`). A relative target is taken from the root. Either
    way the candidate must resolve inside the restored tree (links followed only while
    they stay in it); a link that leads anywhere else is ignored and the search decides.
    """
    link = root / CURRENT_LINK
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    relative = reroot_source_path(target) if target.startswith("/") else PurePosixPath(target)
    if relative is None:
        return None
    try:
        real = resolve_beneath(root, relative)
    except EscapesRoot:
        return None
    candidate = root / real.relative_to(os.path.realpath(root))
    return candidate if _is_cluster_root(candidate) else None


def find_cluster_roots(root: Path) -> list[Path]:
    """Every directory under `root` (itself included) that is a cluster root."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "PG_VERSION" in filenames and "global" in dirnames:
            found.append(here)
            dirnames[:] = []  # a data directory never nests another cluster
            continue
        dirnames[:] = [d for d in dirnames if d not in _CLUSTER_INTERNALS]
    return found


def locate_data_directory(root: Path, removed_links: Sequence[str] = ()) -> DataDirectory:
    """Find PGDATA in a restored tree (see restore-pipeline.md §3.2 step 7).

    With several clusters (e.g. `13/main` and `15/main` left over from an upgrade) the
    highest major wins; equal majors prefer the shallowest path, then the name.
    `removed_links` (what `confine.sanitise_tree` took out) are named when nothing is found.
    """
    via_link = _from_current_symlink(root)
    if via_link is not None:
        major = _read_version(root, via_link)
        return DataDirectory(path=via_link, major=major, found_via="current-symlink")

    candidates: list[tuple[tuple[int, int], int, str, Path, str]] = []
    for cluster in find_cluster_roots(root):
        major = _read_version(root, cluster)
        depth = len(cluster.relative_to(root).parts)
        candidates.append((_major_key(major), -depth, str(cluster), cluster, major))
    if not candidates:
        top = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
        raise NotPostgres(
            "the snapshot holds no PostgreSQL data directory: no PG_VERSION file next to a "
            f"global/ directory anywhere under the restored tree (top level: {top or 'empty'}). "
            "Check the snapshot filter selects a backup of a PGDATA tree."
            + (
                f" pgro removed symlinks that led outside the restored tree: "
                f"{tame_list(list(removed_links))}."
                if removed_links
                else ""
            )
        )
    # Highest major first; then shallowest (largest -depth); then by name, reversed so the
    # lexically smallest wins after the descending sort.
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    best = [c for c in candidates if (c[0], c[1]) == (candidates[0][0], candidates[0][1])]
    best.sort(key=lambda c: c[2])
    chosen = best[0]
    return DataDirectory(path=chosen[3], major=chosen[4], found_via="search")
