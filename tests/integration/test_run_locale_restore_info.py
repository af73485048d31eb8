"""Reference `locale_fix.rs::locale_rewrite_is_recorded_and_reindexed` through `pgro run`:
an `en_US.UTF-8` snapshot restored on a host without that locale is rewritten to C.UTF-8
and its text indexes rebuilt before it serves, and `_pgro.restore_info`, what clients read,
records it: `fixes` with `locale` and `reindex` true and `reset_wal` false, `stage`
`ready`, every database `C.UTF-8`, the rows kept. (The reference also checks that its
`needs-reindex` marker is gone; the operator's setup keeps its marker, and readiness
does not read it: docs/locale-and-collation.md.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from tests.fixtures.run_harness import PASSWORD, StartRun, connect
from tests.integration.test_locale_fix import ROWS, build_en_us_cluster
from tests.integration.test_locale_wiring import EN_US_SOURCE, _run_manifest, _serving


@pytest.fixture(scope="module")
def en_us_repository(
    scratch_root: Path, binaries: PostgresBinaries, account: RunAccount
) -> Iterator[Path]:
    """A kopia repository holding one snapshot of an en_US.UTF-8 cluster (databases
    `postgres` and `app`, 1000 rows each)."""
    base = scratch_root / "locale-restore-info"
    pgdata = build_en_us_cluster(base, binaries, account)
    creds = KopiaCredentials(FilesystemLocation(str(base / "repo")), PASSWORD)
    kopia = KopiaRepository(creds, base / "kopia-author")
    kopia.create()
    try:
        kopia.snapshot_create(pgdata.parent, override_source=EN_US_SOURCE)
        yield base / "repo"
    finally:
        kopia.close()


def test_the_restore_info_row_records_the_rewrite_and_the_reindex(
    en_us_repository: Path, scratch: Path, start_run: StartRun
) -> None:
    run = start_run(_run_manifest(scratch / "m.yaml", en_us_repository))
    entry, restore, _ = _serving(run)
    with connect(entry, dbname="postgres") as conn:
        row = conn.execute("SELECT snapshot_id, stage, fixes FROM _pgro.restore_info").fetchone()
        assert row is not None
        snapshot, stage, fixes = row
        assert snapshot == restore["spec"]["snapshot"]
        assert stage == "ready"
        assert isinstance(fixes, dict)
        assert fixes["locale"] is True
        assert fixes["reindex"] is True
        assert fixes["reset_wal"] is False
        collations = conn.execute("SELECT DISTINCT datcollate FROM pg_database").fetchall()
        assert collations == [("C.UTF-8",)]
    for db in ("postgres", "app"):
        with connect(entry, dbname=db) as conn:
            assert conn.execute("SELECT count(*) FROM words").fetchone() == (ROWS,)
    assert run.stop() == 0
