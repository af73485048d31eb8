"""Confinement beneath a restored tree, against hostile link shapes (real files, no mocks)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pgro.postgres.confine import (
    ConfinedTree,
    EscapesRoot,
    NotARegularFile,
    reroot_source_path,
    resolve_beneath,
    sanitise_tree,
    tame,
)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): a restore root and a sibling directory with a secret in it."""
    root = tmp_path / "restore" / "data"
    (root / "15" / "main" / "global").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    return root, outside


def snapshot_of(directory: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under `directory` with its mode and contents (or link target)."""
    seen: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(directory.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            seen[str(path)] = (st.st_mode, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            seen[str(path)] = (st.st_mode, path.read_bytes())
        else:
            seen[str(path)] = (st.st_mode, b"")
    return seen


@pytest.mark.parametrize(
    "target",
    [
        "/etc/passwd",  # absolute
        "../../outside/secret.txt",  # relative ..
        "../../../../../../../../../../etc",  # .. far above /
        "15/../../x",  # .. that leaves via a real directory
        "missing/../../../outside",  # .. after a missing component
    ],
)
def test_links_leaving_the_root_are_refused(layout: tuple[Path, Path], target: str) -> None:
    root, _ = layout
    os.symlink(target, root / "link")
    with pytest.raises(EscapesRoot):
        resolve_beneath(root, "link")
    with pytest.raises(EscapesRoot):
        resolve_beneath(root, "link/anything")


def test_a_chain_that_ends_outside_is_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    os.symlink("b", root / "a")
    os.symlink("15/c", root / "b")
    os.symlink(str(outside), root / "15" / "c")
    with pytest.raises(EscapesRoot):
        resolve_beneath(root, "a")


def test_a_chain_inside_resolves(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    os.symlink("b", root / "a")
    os.symlink("15/main", root / "b")
    os.symlink("../15", root / "15" / "up")  # .. that stays inside
    assert resolve_beneath(root, "a") == root / "15" / "main"
    assert resolve_beneath(root, "a/global") == root / "15" / "main" / "global"
    assert resolve_beneath(root, "15/up/main") == root / "15" / "main"
    # An absolute target that literally names a path inside the root stays inside.
    os.symlink(str(root / "15" / "main"), root / "abs")
    assert resolve_beneath(root, "abs") == root / "15" / "main"
    # Missing tails are fine as long as they stay below.
    assert resolve_beneath(root, "a/new/dir") == root / "15" / "main" / "new" / "dir"


@pytest.mark.parametrize("shape", ["self", "pair", "deep"])
def test_loops_are_refused(layout: tuple[Path, Path], shape: str) -> None:
    root, _ = layout
    if shape == "self":
        os.symlink("loop", root / "loop")
    elif shape == "pair":
        os.symlink("b", root / "loop")
        os.symlink("loop", root / "b")
    else:
        os.symlink(".", root / "dot")
        os.symlink("dot/dot/dot/loop", root / "loop")
    with pytest.raises(EscapesRoot):
        resolve_beneath(root, "loop")


def test_absolute_paths_must_be_under_the_root(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    assert resolve_beneath(root, root / "15") == root / "15"
    with pytest.raises(EscapesRoot):
        resolve_beneath(root, outside)


def test_reroot_source_path() -> None:
    assert str(reroot_source_path("/var/lib/postgresql/16/main")) == "16/main"
    assert str(reroot_source_path("/15/../../../../etc")) == "15/../../../../etc"
    assert reroot_source_path("/srv/pgdata") is None


def test_writes_replace_links_and_never_follow_them(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    pgdata = root / "15" / "main"
    before = snapshot_of(outside)
    # A link that dodged the walk (or appeared later) is replaced, not written through.
    os.symlink(str(outside / "secret.txt"), pgdata / "pg_hba.conf")
    os.symlink(str(outside / "new.txt"), pgdata / "dangling.conf")
    tree = ConfinedTree(root)
    tree.write_text("15/main/pg_hba.conf", "local all all trust\n")
    tree.write_text("15/main/dangling.conf", "x\n")
    assert not (pgdata / "pg_hba.conf").is_symlink()
    assert (pgdata / "pg_hba.conf").read_text() == "local all all trust\n"
    assert stat.S_IMODE((pgdata / "pg_hba.conf").stat().st_mode) == 0o600
    assert not (pgdata / "dangling.conf").is_symlink()
    # Reads and deletions do not leave the root either.
    os.symlink(str(outside / "secret.txt"), pgdata / "postgresql.auto.conf")
    with pytest.raises(EscapesRoot):
        tree.read_text("15/main/postgresql.auto.conf")
    assert tree.unlink("15/main/postgresql.auto.conf") is True
    os.symlink(str(outside), pgdata / "pg_wal")
    assert tree.exists("15/main/pg_wal") is False
    with pytest.raises(EscapesRoot):
        tree.makedirs("15/main/pg_wal/archive_status")
    assert snapshot_of(outside) == before


def test_reads_refuse_fifos_and_oversized_files(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    os.mkfifo(root / "fifo")
    (root / "big").write_bytes(b"x" * 100)
    tree = ConfinedTree(root)
    with pytest.raises(NotARegularFile):
        tree.read_bytes("fifo", 10)
    with pytest.raises(NotARegularFile):
        tree.read_bytes("big", 10)
    assert tree.read_bytes("nothing", 10) is None


def test_sanitise_removes_escaping_links_and_strips_bits(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    before = snapshot_of(outside)
    pgdata = root / "15" / "main"
    os.symlink(str(outside / "secret.txt"), pgdata / "pg_hba.conf")
    os.symlink("../../../outside/secret.txt", pgdata / "postgresql.conf")
    os.symlink(str(outside), pgdata / "pg_wal")
    os.symlink("pg_wal/x", pgdata / "through")  # escapes via another link
    os.symlink("loop", pgdata / "loop")
    os.symlink("global", pgdata / "inside")  # stays
    (pgdata / "suid").write_text("#!/bin/sh\n")
    os.chmod(pgdata / "suid", 0o4755)
    (pgdata / "sgid").mkdir()
    os.chmod(pgdata / "sgid", 0o2777)
    os.chmod(root / "15", 0o1777)
    os.chmod(root, 0o755)

    result = sanitise_tree(root)

    assert {
        "15/main/loop",
        "15/main/pg_hba.conf",
        "15/main/pg_wal",
        "15/main/postgresql.conf",
    } <= set(result.removed_links)
    assert os.readlink(pgdata / "inside") == "global"
    # `through` goes with pg_wal, or stays harmless once pg_wal is gone: every link left
    # resolves beneath the root.
    for path in root.rglob("*"):
        if path.is_symlink():
            resolve_beneath(root, path)
    assert sorted(result.stripped) == ["15", "15/main/sgid", "15/main/suid"]
    assert stat.S_IMODE(os.lstat(pgdata / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(pgdata / "sgid").st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(root / "15").st_mode) == 0o777 & ~0o002
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    for path in root.rglob("*"):
        assert not os.lstat(path).st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert snapshot_of(outside) == before


@pytest.mark.parametrize(
    ("target", "kept"),
    [
        ("/var/lib/postgresql/15/main", "15/main"),  # the convention: re-rooted, made relative
        ("15/main", "15/main"),
        ("/15/../../../../../outside", None),  # `..` after the numeric component
        ("../../outside", None),
        ("/srv/no-number", None),
        ("/var/lib/postgresql/16/main", None),  # nothing there in this tree
    ],
)
def test_sanitise_confines_the_current_link(
    layout: tuple[Path, Path], target: str, kept: str | None
) -> None:
    root, _ = layout
    os.symlink(target, root / "current")
    result = sanitise_tree(root)
    if kept is None:
        assert result.removed_links == ["current"]
        assert not os.path.lexists(root / "current")
    else:
        assert result.removed_links == []
        assert os.readlink(root / "current") == kept


def test_tame_strips_control_characters_and_bounds_length() -> None:
    assert tame("a\x1b[31mb\nc") == "a?[31mb?c"
    assert len(tame("x" * 1000)) == 120
