"""Backup content is printed literally: Rich markup and terminal escapes in a snapshot must
neither crash `pgro verify` nor reach the terminal (issue 18, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from tests.conftest import REPO_PASSWORD, Repo
from tests.fixtures.clusters import build_debian_cluster, make_server
from tests.fixtures.manifests import fs_manifest

PGRO = str(Path(sys.executable).parent / "pgro")

# `[/]` closes a tag that was never opened: Rich raised MarkupError on it.
MARKUP = "evil[/][/]"
MARKUP_DATABASE = "db[/][bold red]x[/]"
# ESC [ 2 J clears the screen; ESC ] 0 ; … BEL retitles the terminal.
ANSI = "ansi\x1b[2Jcleared"
ANSI_DATABASE = "term\x1b]0;owned\x07title"


@pytest.fixture
def hostile_repo(
    scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> tuple[Repo, str]:
    """A repository holding one cluster whose content is full of markup and escapes: in the
    path to PGDATA (printed as "PGDATA is …"), in postgresql.auto.conf and in database names."""
    source = scratch / "source"
    root = source / MARKUP / ANSI
    root.mkdir(parents=True)
    os.chmod(source / MARKUP, 0o755)
    os.chmod(root, 0o755)
    pgdata = build_debian_cluster(root, binaries, account, scratch, keep_config=True)
    server = make_server(pgdata, binaries, account, scratch)
    server.start(60)
    try:
        with psycopg.connect(
            server.endpoint.conninfo("postgres", "postgres"), autocommit=True
        ) as c:
            for name in (MARKUP_DATABASE, ANSI_DATABASE):
                quoted = '"' + name.replace('"', '""') + '"'
                c.execute(f"CREATE DATABASE {quoted}".encode())
    finally:
        server.stop()
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        (pgdata / name).unlink()
    # What ALTER SYSTEM would have left, plus what a hostile source could write there.
    with (pgdata / "postgresql.auto.conf").open("a") as auto:
        auto.write(f"{MARKUP} = 1\n{ANSI} = 'x'\nwork_mem = '[red]8MB[/red]'\n")
    repo = Repo(path=scratch / "repository", password=REPO_PASSWORD)
    kopia = KopiaRepository(repo.credentials, scratch / "kopia-state")
    kopia.create()
    try:
        snap = kopia.snapshot_create(
            source,
            tags={"kind": "hostile"},
            description="markup and escapes",
            override_source="postgres@db-hostile:/var/lib/postgresql",
        )
    finally:
        kopia.close()
    return repo, snap


def test_markup_and_escapes_in_the_backup_are_printed_literally(
    hostile_repo: tuple[Repo, str], scratch: Path
) -> None:
    repo, snap = hostile_repo
    manifest = fs_manifest(scratch / "m.yaml", repo.path, repo.password)
    work = scratch / "work"
    work.mkdir()
    os.chmod(work, 0o711)
    proc = subprocess.run(
        [PGRO, "verify", "-f", str(manifest), "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = proc.stdout + proc.stderr
    # A healthy backup verifies: the markup crashed the run, which then said FAILED.
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "MarkupError" not in output
    assert "VERIFIED" in proc.stdout and snap in proc.stdout
    # Where PGDATA was found, as named in the snapshot; the escape sequence removed.
    assert f"PGDATA is {MARKUP}/ansicleared/15/main" in proc.stderr
    assert "cleared the source's ALTER SYSTEM settings" in proc.stderr
    # Databases are listed under their names: markup shown as text, escapes removed.
    assert MARKUP_DATABASE in proc.stdout
    assert "termtitle" in proc.stdout
    # Not a terminal, so Rich adds no styling: any ESC or BEL would come from the backup.
    assert "\x1b" not in output and "\x07" not in output
