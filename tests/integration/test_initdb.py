"""`init_cluster` (pgro demo's and the fixtures' initdb) with every installed major: 13's
initdb refuses `--no-instructions` (new in 14), so it is passed from 14 on only."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, find_binaries
from pgro.postgres.initdb import init_cluster
from tests.fixtures.majors import (
    CACHED_MAJORS,
    DEBIAN_MAJOR,
    SUPPORTED_MAJORS,
    installed_in_cache,
    server_readable_cache,
)


def _binaries(major: str, scratch_root: Path) -> PostgresBinaries:
    if major == DEBIAN_MAJOR:
        return find_binaries(major)
    if not installed_in_cache(major):
        pytest.skip(f"PostgreSQL {major} is not in the cache (scripts/setup.sh test installs it)")
    assert major in CACHED_MAJORS
    # A copy the server's account can enter (as root it cannot enter /root).
    return PostgresBinaries(major, server_readable_cache(scratch_root, (major,)) / major / "bin")


@pytest.mark.parametrize("major", SUPPORTED_MAJORS)
def test_init_cluster_with_each_major(
    major: str, scratch_root: Path, scratch: Path, account: RunAccount
) -> None:
    binaries = _binaries(major, scratch_root)
    pgdata = scratch / "data"
    init_cluster(binaries, pgdata, account)
    assert (pgdata / "PG_VERSION").read_text().strip() == major
    assert (pgdata / "global" / "pg_control").is_file()
