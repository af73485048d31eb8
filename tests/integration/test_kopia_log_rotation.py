"""kopia's CLI logs are rotated as the reference rotates them (`--log-dir-max-files=20`,
`--log-dir-max-age=24h`), on the real kopia binary: the listing (reference
`snapshot_list_job_rotates_kopia_logs`; pgro lists in-process, no Job) and the restore
(`restore_job_passes_cache_caps_and_log_rotation`; `pgro restore-job` restores through the
same adapter). Without the flags kopia keeps 1000 files for 30 days, so a long-lived state
directory would fill with them.

The state directory's `logs/cli-logs` is seeded with 30 logs an hour old and 5 three days
old; after one kopia command at most 20 remain, none of the old ones, and kopia's own log
of that command is among them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pgro.kopia.repository import GLOBAL_FLAGS, KopiaRepository
from tests.conftest import Repo

RECENT = 30
STALE = 5
HOUR = 3600


def _seed(state: Path) -> set[str]:
    """Old logs in kopia's naming (`kopia-<time>-<pid>-<command>.log`); the stale names."""
    logs = state / "logs" / "cli-logs"
    logs.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stale = set()
    for n in range(RECENT + STALE):
        old = n >= RECENT
        name = f"kopia-2026010{1 if old else 2}-0000{n:02d}-1-snapshot-list.log"
        path = logs / name
        path.write_text("an earlier command's log\n")
        age = 3 * 24 * HOUR if old else HOUR
        os.utime(path, (now - age, now - age))
        if old:
            stale.add(name)
    return stale


def _kopia_logs(state: Path) -> set[str]:
    return {
        p.name
        for p in (state / "logs" / "cli-logs").iterdir()
        if p.name.startswith("kopia-") and p.name.endswith(".log")
    }


def test_the_flags_are_the_references() -> None:
    assert "--log-dir-max-files=20" in GLOBAL_FLAGS
    assert "--log-dir-max-age=24h" in GLOBAL_FLAGS


def test_the_listing_rotates_kopias_logs(fs_repo: Repo, scratch: Path) -> None:
    state = scratch / "k"
    with KopiaRepository(fs_repo.credentials, state) as repo:
        stale = _seed(state)
        seeded = _kopia_logs(state)
        assert len(seeded) >= RECENT + STALE
        assert repo.list_snapshots()
        kept = _kopia_logs(state)
    assert len(kept) <= 20, sorted(kept)
    assert not kept & stale
    assert any("snapshot-list" in name and name not in seeded for name in kept)


def test_the_restore_rotates_kopias_logs(fs_repo: Repo, scratch: Path) -> None:
    state = scratch / "k"
    with KopiaRepository(fs_repo.credentials, state) as repo:
        stale = _seed(state)
        seeded = _kopia_logs(state)
        repo.restore(fs_repo.snapshots["notpg"], scratch / "out", parallel=1)
        kept = _kopia_logs(state)
    assert (scratch / "out" / "random-stuff" / "notes.txt").exists()
    assert len(kept) <= 20, sorted(kept)
    assert not kept & stale
    assert any("snapshot-restore" in name and name not in seeded for name in kept)
