"""The checks that read the data (issue 16), against real clusters with real damage.

A heap page overwritten with checksums on fails the offline checksum check and, read
online, the heap and full-read checks, naming `orders` and the block; a btree leaf page
replaced by another leaf of the same index (checksums off) fails `bt_index_check` naming
`orders_pkey` and `orders`; the sound twin passes every depth; what a sound backup holds
that amcheck cannot or must not check is "not checked", never "failed".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from pgro.core.verify_depth import BTREE, FULL_READ, HEAP, NOT_CHECKED, CheckVerdict
from pgro.postgres import checksums, integrity
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, find_binaries
from tests.fixtures.clusters import make_server
from tests.fixtures.damage import (
    DAMAGED_BLOCK,
    HOSTILE_SCHEMA,
    OrdersCluster,
    false_alarm_cluster,
    orders_cluster,
    overwrite_heap_page,
    replace_btree_leaf,
)

CACHE = Path.home() / ".cache" / "pgro" / "postgres"
OTHER_MAJORS = ("13", "14", "16", "17")


def _reachable_by_others(path: Path) -> bool:
    """Whether the server's account (not root) can reach and run `path`."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _cached(major: str) -> PostgresBinaries | None:
    bindir = CACHE / major / "bin"
    if all(os.access(bindir / tool, os.X_OK) for tool in ("postgres", "initdb")):
        return PostgresBinaries(major=major, bindir=bindir)
    return None


MAJORS = [
    pytest.param("15", id="15"),
    *(
        pytest.param(
            m,
            id=m,
            marks=pytest.mark.skipif(
                _cached(m) is None, reason=f"PostgreSQL {m} is not installed in {CACHE}/{m}"
            ),
        )
        for m in OTHER_MAJORS
    ),
]


def _binaries(major: str, module_dir: Path) -> PostgresBinaries:
    """The major's binaries, copied where the server's account can run them when the
    cache is under a home directory it cannot enter (root's, mode 0700)."""
    if major == "15":
        return find_binaries("15")
    cached = _cached(major)
    assert cached is not None
    if os.geteuid() != 0 or _reachable_by_others(cached.bindir / "postgres"):
        return cached
    copy = module_dir / f"postgres-{major}"
    if not copy.exists():
        shutil.copytree(cached.bindir.parent, copy, symlinks=True)
    return PostgresBinaries(major=major, bindir=copy / "bin")


@pytest.fixture(scope="module")
def module_dir(scratch_root: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="integrity-", dir=scratch_root))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _dir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    os.chmod(path, 0o711)
    return path


@contextmanager
def running(
    pgdata: Path, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> Iterator[Callable[[str], str]]:
    """The cluster started; yields `conninfo_for(dbname)` for its superuser."""
    server = make_server(pgdata, binaries, account, scratch)
    server.start(60)
    try:
        endpoint = server.endpoint
        yield lambda dbname: endpoint.conninfo(dbname, "postgres")
    finally:
        server.stop()


def _verdict(report: integrity.IntegrityReport, name: str) -> CheckVerdict:
    found = [v for v in report.verdicts if v.name == name]
    assert found, f"no {name} verdict in {[v.name for v in report.verdicts]}"
    return found[0]


def _schemas_left(conninfo_for: Callable[[str], str], dbname: str) -> list[str]:
    with psycopg.connect(conninfo_for(dbname), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'pgro_amcheck%'"
        ).fetchall()
    return [str(r[0]) for r in rows]


# ---- (a) a heap page overwritten, checksums on ----------------------------------------


@pytest.fixture(scope="module")
def heap_damaged(
    module_dir: Path, binaries: PostgresBinaries, account: RunAccount
) -> OrdersCluster:
    base = _dir(module_dir, "heap")
    cluster = orders_cluster(base / "data", binaries, account, base, checksums=True)
    return overwrite_heap_page(cluster)


def test_heap_damage_fails_the_checksum_check_naming_orders_and_the_block(
    heap_damaged: OrdersCluster, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    result = checksums.check(binaries.bindir, heap_damaged.pgdata, 120, account=account)
    assert result.enabled and not result.healthy
    assert [(f.file, f.block) for f in result.findings] == [(heap_damaged.heap_file, DAMAGED_BLOCK)]
    assert result.bad_checksums == 1 and result.blocks_scanned > 1000
    with running(heap_damaged.pgdata, binaries, account, scratch) as conninfo_for:
        named = checksums.name_findings(conninfo_for, result.findings)
    assert (named[0].database, named[0].relation, named[0].block) == (
        "shop",
        "public.orders",
        DAMAGED_BLOCK,
    )
    assert "shop.public.orders" in named[0].describe()


def test_heap_damage_fails_the_heap_and_full_read_checks_naming_orders_and_the_block(
    heap_damaged: OrdersCluster, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    with running(heap_damaged.pgdata, binaries, account, scratch) as conninfo_for:
        report = integrity.check(conninfo_for, "full", workers=2)
        # The indexes alone are sound: at standard depth, the checksums catch this damage.
        standard = integrity.check(conninfo_for, "standard", workers=2)
        assert _schemas_left(conninfo_for, "shop") == []
    assert not report.healthy and report.complete
    for name in (HEAP, FULL_READ):
        verdict = _verdict(report, name)
        assert verdict.status == "fail", verdict
        orders = [f for f in verdict.findings if f.relation == "public.orders"]
        assert orders and orders[0].database == "shop", verdict
        assert orders[0].block == DAMAGED_BLOCK, verdict
        assert f"shop.public.orders block {DAMAGED_BLOCK}" in verdict.detail
    assert standard.healthy and _verdict(standard, BTREE).status == "pass"


# ---- (b) a btree leaf page replaced by another leaf, checksums off --------------------


@pytest.mark.parametrize("major", MAJORS)
def test_replaced_leaf_fails_bt_index_check_naming_the_index_and_orders(
    major: str, module_dir: Path, account: RunAccount, scratch: Path
) -> None:
    binaries = _binaries(major, module_dir)
    base = _dir(module_dir, f"leaf-{major}")
    cluster = replace_btree_leaf(
        orders_cluster(base / "data", binaries, account, base, checksums=False)
    )
    result = checksums.check(binaries.bindir, cluster.pgdata, 120, account=account)
    assert not result.enabled  # nothing to check: the index damage is amcheck's to find
    with running(cluster.pgdata, binaries, account, scratch) as conninfo_for:
        report = integrity.check(conninfo_for, "standard", workers=2)
    verdict = _verdict(report, BTREE)
    assert verdict.status == "fail", verdict
    assert [(f.database, f.relation, f.table) for f in verdict.findings] == [
        ("shop", "public.orders_pkey", "public.orders")
    ]
    assert "orders_pkey (of public.orders)" in verdict.detail
    assert not report.healthy


# ---- (c) the sound twin ---------------------------------------------------------------


@pytest.mark.parametrize("major", MAJORS)
def test_the_sound_twin_passes_every_depth(
    major: str, module_dir: Path, account: RunAccount, scratch: Path
) -> None:
    binaries = _binaries(major, module_dir)
    base = _dir(module_dir, f"sound-{major}")
    cluster = orders_cluster(base / "data", binaries, account, base, checksums=True)
    result = checksums.check(binaries.bindir, cluster.pgdata, 120, account=account)
    if (binaries.bindir / "pg_checksums").exists():
        assert result.healthy and result.blocks_scanned > 1000, result
    else:
        assert result.error == "pg_checksums is not installed"
    with running(cluster.pgdata, binaries, account, scratch) as conninfo_for:
        reports = {
            d: integrity.check(conninfo_for, d, workers=2) for d in ("quick", "standard", "full")
        }
        assert _schemas_left(conninfo_for, "shop") == []
    assert reports["quick"].verdicts == []
    for depth in ("standard", "full"):
        report = reports[depth]
        assert report.healthy and report.complete, report.verdicts
        assert _verdict(report, BTREE).status == "pass"
    full = reports["full"]
    assert _verdict(full, FULL_READ).status == "pass"
    heap = _verdict(full, HEAP)
    if int(major) >= 14:
        assert heap.status == "pass", heap
    else:
        assert heap.status == "not_checked" and "14" in heap.detail
    # orders, its TOAST table and the catalogs were all read.
    assert full.relations_total > 100


# ---- what a sound backup holds that must not be called damage --------------------------


@pytest.fixture(scope="module")
def alarms(module_dir: Path, binaries: PostgresBinaries, account: RunAccount) -> Path:
    base = _dir(module_dir, "alarms")
    return false_alarm_cluster(base / "data", binaries, account, base)


def test_no_false_alarms_only_not_checked_entries_with_their_reason(
    alarms: Path, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    with running(alarms, binaries, account, scratch) as conninfo_for:
        report = integrity.check(conninfo_for, "full", workers=2)
        assert _schemas_left(conninfo_for, "alarms") == []
    assert report.healthy and report.complete, [v.detail for v in report.verdicts]
    assert {v.name: v.status for v in report.verdicts} == {
        BTREE: "pass",
        HEAP: "pass",
        FULL_READ: "pass",
        NOT_CHECKED: "not_checked",
    }
    detail = _verdict(report, NOT_CHECKED).detail
    # Indexes of the table with the hostile name, named as SQL would need them written.
    hostile = "alarms." + '"' + HOSTILE_SCHEMA.replace('"', '""') + '"'
    for expected in (
        "unlogged",
        "alarms.public.scratch_cache",
        "invalid index",
        f"{hostile}.failed_unique",
        f"{hostile}.by_gin",
        "hash index",
        "gist index",
        "gin index",
        "brin index",
        "spgist index",
        "never populated: alarms.public.never_filled",
    ):
        assert expected in detail, detail


def test_a_deadline_already_past_gives_incomplete(
    alarms: Path, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    with running(alarms, binaries, account, scratch) as conninfo_for:
        report = integrity.check(conninfo_for, "standard", workers=2, deadline=0.0)
        assert _schemas_left(conninfo_for, "alarms") == []
    assert not report.complete and report.relations_done == 0
    verdict = _verdict(report, "integrity_complete")
    assert verdict.status == "incomplete"
    assert f"incomplete after 0 of {report.relations_total} relations" in verdict.detail
    assert report.relations_total > 0


def test_the_checksum_check_of_a_cluster_without_checksums_reads_nothing(
    alarms: Path, binaries: PostgresBinaries, account: RunAccount
) -> None:
    result = checksums.check(binaries.bindir, alarms, 60, account=account)
    assert not result.enabled and result.findings == [] and result.blocks_scanned == 0


def test_a_snapshots_own_amcheck_that_is_not_the_installed_library_is_never_called(
    alarms: Path, binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    """A superuser's SQL function named bt_index_check would run as pgro's superuser."""
    with running(alarms, binaries, account, scratch) as conninfo_for:
        with psycopg.connect(conninfo_for("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE fake_amcheck")
        try:
            with psycopg.connect(conninfo_for("fake_amcheck"), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION amcheck")
                conn.execute("CREATE TABLE planted (n int)")
                conn.execute(
                    "CREATE OR REPLACE FUNCTION bt_index_check(index regclass) RETURNS void "
                    "LANGUAGE sql AS 'INSERT INTO public.planted VALUES (1)'"
                )
            report = integrity.check(conninfo_for, "standard", workers=2)
            with psycopg.connect(conninfo_for("fake_amcheck"), autocommit=True) as conn:
                planted = conn.execute("SELECT count(*) FROM planted").fetchone()
        finally:
            with psycopg.connect(conninfo_for("postgres"), autocommit=True) as conn:
                conn.execute("DROP DATABASE fake_amcheck")
    assert planted == (0,)
    assert report.healthy and _verdict(report, BTREE).status == "pass"
    detail = _verdict(report, NOT_CHECKED).detail
    assert (
        "amcheck: the database's own amcheck extension is not the installed C library: "
        "fake_amcheck.(its indexes and tables)"
    ) in detail, detail
