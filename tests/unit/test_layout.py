"""Locating PGDATA in restored trees (no server needed: the layout is files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgro.postgres.account import RunAccount
from pgro.postgres.image import OfficialImage
from pgro.postgres.layout import NotPostgres, UnsafeSnapshot, locate_data_directory
from pgro.postgres.repair import prepare_data_directory


def cluster(path: Path, major: str = "15", databases: int = 2) -> Path:
    (path / "global").mkdir(parents=True)
    (path / "PG_VERSION").write_text(f"{major}\n")
    for oid in range(1, databases + 1):
        # Every database directory has its own PG_VERSION: it must not count as a cluster.
        (path / "base" / str(oid)).mkdir(parents=True)
        (path / "base" / str(oid) / "PG_VERSION").write_text(f"{major}\n")
    return path


def test_debian_layout(tmp_path: Path) -> None:
    pgdata = cluster(tmp_path / "15" / "main")
    found = locate_data_directory(tmp_path)
    assert found.path == pgdata
    assert found.major == "15"
    assert found.found_via == "search"


def test_snapshot_of_pgdata_itself(tmp_path: Path) -> None:
    cluster(tmp_path)
    assert locate_data_directory(tmp_path).path == tmp_path


def test_per_database_pg_version_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "base" / "16384").mkdir(parents=True)
    (tmp_path / "base" / "16384" / "PG_VERSION").write_text("15\n")
    with pytest.raises(NotPostgres):
        locate_data_directory(tmp_path)


def test_highest_major_wins(tmp_path: Path) -> None:
    cluster(tmp_path / "9.6" / "main", "9.6")
    cluster(tmp_path / "13" / "main", "13")
    newest = cluster(tmp_path / "15" / "main", "15")
    cluster(tmp_path / "backup-2019" / "12" / "main", "12")
    assert locate_data_directory(tmp_path).path == newest


def test_numeric_not_lexical_major_order(tmp_path: Path) -> None:
    cluster(tmp_path / "9" / "main", "9.6")
    ten = cluster(tmp_path / "10" / "main", "10")
    assert locate_data_directory(tmp_path).path == ten


def test_equal_majors_prefer_the_shallowest_then_name(tmp_path: Path) -> None:
    deep = cluster(tmp_path / "old" / "15" / "main")
    shallow_b = cluster(tmp_path / "15" / "main")
    cluster(tmp_path / "15" / "other")
    del deep
    assert locate_data_directory(tmp_path).path == shallow_b


def test_current_symlink_with_source_host_path_is_rewritten(tmp_path: Path) -> None:
    cluster(tmp_path / "16" / "main", "16")
    wanted = cluster(tmp_path / "15" / "main", "15")
    # The org convention: `current` names an absolute path on the source host.
    os.symlink("/var/lib/postgresql/15/main", tmp_path / "current")
    found = locate_data_directory(tmp_path)
    assert found.path == wanted
    assert found.found_via == "current-symlink"


def test_relative_current_symlink(tmp_path: Path) -> None:
    wanted = cluster(tmp_path / "15" / "main")
    os.symlink("15/main", tmp_path / "current")
    assert locate_data_directory(tmp_path).path == wanted


def test_dangling_current_symlink_falls_back_to_search(tmp_path: Path) -> None:
    wanted = cluster(tmp_path / "15" / "main")
    os.symlink("/var/lib/postgresql/17/main", tmp_path / "current")
    found = locate_data_directory(tmp_path)
    assert found.path == wanted
    assert found.found_via == "search"


def test_not_postgres_names_what_was_there(tmp_path: Path) -> None:
    (tmp_path / "random-stuff").mkdir()
    (tmp_path / "random-stuff" / "notes.txt").write_text("x")
    with pytest.raises(NotPostgres) as err:
        locate_data_directory(tmp_path)
    assert "no PostgreSQL data directory" in str(err.value)
    assert "random-stuff" in str(err.value)


def test_garbage_pg_version(tmp_path: Path) -> None:
    (tmp_path / "global").mkdir()
    (tmp_path / "PG_VERSION").write_text("hello world\n")
    with pytest.raises(NotPostgres, match="not a PostgreSQL major version"):
        locate_data_directory(tmp_path)


@pytest.fixture
def victim(tmp_path: Path) -> tuple[Path, Path]:
    """(restore root, a live-looking cluster outside it that a snapshot must not reach)."""
    root = tmp_path / "work" / "restore" / "data"
    root.mkdir(parents=True)
    outside = cluster(tmp_path / "victimcluster")
    (outside / "postmaster.pid").write_text("4242\n")
    return root, outside


def test_relative_current_symlink_cannot_leave_the_restore(victim: tuple[Path, Path]) -> None:
    root, _ = victim
    wanted = cluster(root / "15" / "main")
    os.symlink("../../../victimcluster", root / "current")
    assert (root / "current" / "PG_VERSION").exists()  # the kernel would follow it out
    found = locate_data_directory(root)
    assert found.path == wanted
    assert found.found_via == "search"


def test_absolute_current_symlink_with_dotdot_cannot_leave_the_restore(
    victim: tuple[Path, Path],
) -> None:
    root, outside = victim
    # `..` after the last numeric component: re-rooted, it climbs out of the restore.
    os.symlink("/15/" + "../" * 40 + str(outside).lstrip("/"), root / "current")
    with pytest.raises(NotPostgres):  # the only cluster in reach is outside: none found
        locate_data_directory(root)
    wanted = cluster(root / "15" / "main")
    assert locate_data_directory(root).path == wanted


def test_current_symlink_through_an_inner_link_stays_inside(tmp_path: Path) -> None:
    wanted = cluster(tmp_path / "15" / "main")
    os.symlink("15", tmp_path / "latest")
    os.symlink("latest/main", tmp_path / "current")
    found = locate_data_directory(tmp_path)
    assert found.path == wanted
    assert found.found_via == "current-symlink"


def test_pg_version_link_out_of_the_tree_is_not_read(victim: tuple[Path, Path]) -> None:
    root, outside = victim
    (root / "global").mkdir()
    os.symlink(str(outside / "PG_VERSION"), root / "PG_VERSION")
    with pytest.raises(NotPostgres, match="not a PostgreSQL version file"):
        locate_data_directory(root)


def test_prepare_refuses_a_data_directory_outside_the_restore(victim: tuple[Path, Path]) -> None:
    root, outside = victim
    account = RunAccount("nobody-here", os.geteuid(), os.getegid())
    for pgdata in (outside, root / ".." / ".." / ".." / "victimcluster"):
        with pytest.raises(UnsafeSnapshot, match="outside"):
            prepare_data_directory(root, pgdata, OfficialImage("15"), account)
    os.symlink(str(outside), root / "escape")
    with pytest.raises(UnsafeSnapshot):
        prepare_data_directory(root, root / "escape", OfficialImage("15"), account)
    assert (outside / "postmaster.pid").read_text() == "4242\n"
    assert sorted(p.name for p in outside.iterdir()) == [
        "PG_VERSION",
        "base",
        "global",
        "postmaster.pid",
    ]
