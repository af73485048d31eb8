"""`pgro detect-version` on data volumes laid out as the restore Job leaves them (and as a
hostile snapshot could leave them): real files in a temp dir, the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgro.pipeline.detect_version import (
    FOUND_VIA_LINK,
    FOUND_VIA_VOLUME,
    PgdataInTheWay,
    detect_version,
    run,
)
from pgro.postgres.layout import NotPostgres


def cluster(path: Path, major: str = "15") -> Path:
    """A directory shaped like a cluster root (what locate looks for)."""
    (path / "global").mkdir(parents=True)
    (path / "base" / "1").mkdir(parents=True)
    (path / "PG_VERSION").write_text(f"{major}\n")
    (path / "base" / "1" / "PG_VERSION").write_text(f"{major}\n")
    return path


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A data volume after a restore of fs_repo's `clean` snapshot, minus the link: the
    Debian layout with the source host's `current` link (rewritten relative, as the
    restore's sanitising leaves it)."""
    root = tmp_path / "volume"
    cluster(root / "postgres" / "15" / "main")
    os.symlink("15/main", root / "postgres" / "current")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A cluster elsewhere on the host claiming another version: never to be reported."""
    return cluster(tmp_path / "elsewhere" / "main", "99")


def link_of(root: Path) -> str:
    return os.readlink(root / "pgdata")


def test_a_link_to_a_cluster_is_read(volume: Path) -> None:
    os.symlink("postgres/15/main", volume / "pgdata")
    found = detect_version(volume)
    assert (found.major, str(found.pgdata), found.found_via) == (
        "15",
        "postgres/15/main",
        FOUND_VIA_LINK,
    )
    assert link_of(volume) == "postgres/15/main"
    assert (volume / ".postgres-version").read_text() == "15\n"


def test_a_missing_link_is_recreated_as_the_restore_makes_it(volume: Path) -> None:
    found = detect_version(volume)
    assert (found.major, found.found_via) == ("15", "current-symlink")
    # Relative to the volume root, as `pgro restore-job` writes it.
    assert link_of(volume) == "postgres/15/main"
    assert (volume / "pgdata" / "PG_VERSION").read_text() == "15\n"
    assert (volume / ".postgres-version").read_text() == "15\n"


def test_a_nested_layout_picks_the_highest_major(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    cluster(root / "postgres" / "var" / "lib" / "postgresql" / "13" / "main", "13")
    cluster(root / "postgres" / "var" / "lib" / "postgresql" / "16" / "main", "16")
    found = detect_version(root)
    assert (found.major, found.found_via) == ("16", "search")
    assert link_of(root) == "postgres/var/lib/postgresql/16/main"
    assert (root / ".postgres-version").read_text() == "16\n"


def test_a_snapshot_that_is_pgdata_itself(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    cluster(root / "postgres", "9.6")
    assert detect_version(root).major == "9.6"
    assert link_of(root) == "postgres"


def test_a_link_to_something_else_is_replaced(volume: Path) -> None:
    # Points at a database directory (it has a PG_VERSION too, but no global/).
    os.symlink("postgres/15/main/base/1", volume / "pgdata")
    assert detect_version(volume).found_via == "current-symlink"
    assert link_of(volume) == "postgres/15/main"


def test_the_whole_volume_is_the_last_resort(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    cluster(root / "moved" / "14" / "main", "14")
    (root / "postgres").mkdir(parents=True)  # restored, but emptied
    found = detect_version(root)
    assert (found.major, found.found_via) == ("14", FOUND_VIA_VOLUME)
    assert link_of(root) == "moved/14/main"


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_a_link_out_of_the_volume_is_not_followed(volume: Path, outside: Path, form: str) -> None:
    target = str(outside) if form == "absolute" else os.path.relpath(outside, volume)
    os.symlink(target, volume / "pgdata")
    notes: list[str] = []
    found = detect_version(volume, notes)
    assert found.major == "15"
    assert link_of(volume) == "postgres/15/main"
    assert any("is not followed, it leads out of the data volume" in n for n in notes)
    # Nothing outside was written.
    assert (outside / "PG_VERSION").read_text() == "99\n"
    assert not (outside.parent / ".postgres-version").exists()


def test_a_link_out_with_nothing_inside_fails_without_reading_outside(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "volume"
    root.mkdir()
    os.symlink(str(outside), root / "pgdata")
    # `postgres` leading out too: locate must not walk it.
    os.symlink(str(outside.parent), root / "postgres")
    outcome = run(root)
    assert outcome.detected is None and outcome.exit_code == 1
    assert outcome.reason == "NotPostgres"
    assert "99" not in outcome.message
    assert link_of(root) == str(outside)  # left as it was: nothing to point it at
    assert not (root / ".postgres-version").exists()


def test_a_link_loop_is_not_followed(volume: Path) -> None:
    os.symlink("loop", volume / "pgdata")
    os.symlink("pgdata", volume / "loop")
    notes: list[str] = []
    assert detect_version(volume, notes).found_via == "current-symlink"
    assert link_of(volume) == "postgres/15/main"
    assert any("too many levels of symbolic links" in n for n in notes)


def test_a_pg_version_linking_out_is_not_read(volume: Path, outside: Path) -> None:
    main = volume / "postgres" / "15" / "main"
    (main / "PG_VERSION").unlink()
    os.symlink(str(outside / "PG_VERSION"), main / "PG_VERSION")
    os.symlink("postgres/15/main", volume / "pgdata")
    outcome = run(volume)
    assert outcome.detected is None
    assert "99" not in outcome.message
    assert "PG_VERSION" in outcome.error


@pytest.mark.parametrize(
    "content", ["15; DROP DATABASE x\n", "fifteen\n", "", "1" * 100, "15\n16\n"]
)
def test_a_bad_pg_version_fails(volume: Path, content: str) -> None:
    (volume / "postgres" / "15" / "main" / "PG_VERSION").write_text(content)
    os.symlink("postgres/15/main", volume / "pgdata")
    outcome = run(volume)
    assert outcome.detected is None and outcome.reason == "NotPostgres"
    assert outcome.message.startswith("error: NotPostgres: ")
    assert "postgres/15/main/PG_VERSION" in outcome.error
    assert not (volume / ".postgres-version").exists()


def test_a_directory_called_pgdata_that_is_no_cluster_is_not_removed(volume: Path) -> None:
    (volume / "pgdata").mkdir()
    (volume / "pgdata" / "keep").write_text("not pgro's\n")
    with pytest.raises(PgdataInTheWay, match="is a directory"):
        detect_version(volume)
    assert (volume / "pgdata" / "keep").exists()


def test_nothing_on_the_volume(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    (root / "postgres" / "random").mkdir(parents=True)
    with pytest.raises(NotPostgres, match="no PostgreSQL data directory on the data volume"):
        detect_version(root)


def _command(root: Path, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgro.cli.main", "detect-version", "--termination-log", str(log)],
        env={**os.environ, "PGRO_DATA_ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_writes_the_version_to_the_termination_message(
    volume: Path, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    proc = _command(volume, log)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == "15"
    assert "done: PostgreSQL 15" in proc.stdout
    assert link_of(volume) == "postgres/15/main"


def test_the_command_fails_with_exit_1_and_says_why(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    (root / "postgres").mkdir(parents=True)
    log = tmp_path / "termination-log"
    proc = _command(root, log)
    assert proc.returncode == 1
    assert log.read_text().startswith("error: NotPostgres: no PostgreSQL data directory")
    assert "error: NotPostgres" in proc.stderr
