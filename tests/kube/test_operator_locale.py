"""The locale rewrite and the quick reindex through the operator (issue 13, features.md §2.3)
on the fake node, from an S3 repository of their own:

- `db-en`: a cluster made with `en_US.UTF-8` from a private LOCPATH (this host lacks that
  locale, as a bare image would lack a source's): the pod's `setup` builds private locales
  into its `locales` emptyDir, rewrites the databases to C.UTF-8 in single-user mode and
  marks the volume; the operator's provisioning rebuilds the text index before the restore
  is READY, and the restore's `status.fixes` says `locale` and `reindex`;
- `db-win`: a WIN1252 cluster named "English_United States.1252", which opens only through
  the Windows aliases the setup builds, and is rewritten to C;
- `db-icu`: a C cluster with an ICU collation whose `collversion` was forged to 0.0, its
  pg_wal left out of the snapshot: the setup resets the WAL, and the operator refreshes the
  collation after rebuilding its index before READY (`reset_wal`, `collation_refresh`); the
  full reindex after the reset runs once the restore serves (`status.fullReindex` →
  `complete`, `fixes.reindex`), as the reference does.

The postgres pods' env carries no LOCPATH: the fake node maps the `locales` mount like any
other (tests/kube/node.py), and the host's own /usr/lib/locale is never written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.api.secret import KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.kube.client import KubeApi
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.locale_aliases import build_locale_aliases
from tests.conftest import s3_credentials
from tests.integration.test_locale_fix import (
    ROWS,
    _fill,
    _initdb,
    _query,
    _server,
    build_en_us_cluster,
)
from tests.kube.node import FakeNode
from tests.kube.operator_proc import OperatorProcess, wait_for
from tests.kube.test_operator import (
    _active,
    _diagnostics,
    _pod_ip,
    _replica,
    _s3_secret,
    _secret_value,
)

pytestmark = pytest.mark.timeout(900)

BUCKET = "pgro-locale-bucket"
WINDOWS = "English_United States.1252"


@dataclass(frozen=True)
class LocaleBucket:
    creds: KopiaCredentials
    en_index: int  # words_w in db-en's postgres
    icu_indexes: dict[str, int]  # named_name and named_pkey in db-icu's postgres


def _relfilenode(server: Any, dbname: str, index: str) -> int:
    rows = _query(server, dbname, f"SELECT relfilenode FROM pg_class WHERE relname = '{index}'")
    return int(str(rows[0][0]))


@pytest.fixture(scope="module")
def locale_s3(
    moto_s3: str, scratch_root: Path, account: RunAccount, binaries: PostgresBinaries
) -> LocaleBucket:
    """The bucket with the three snapshots, and their indexes' relfilenodes at the source."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=f"http://{moto_s3}",
        region_name="us-east-1",
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
    ).create_bucket(Bucket=BUCKET)
    creds = s3_credentials(moto_s3, BUCKET)
    base = scratch_root / "kube-locale"
    base.mkdir()
    os.chmod(base, 0o711)

    en = build_en_us_cluster(base / "db-en", binaries, account, app=False)
    source_env = {"LOCPATH": str(base / "db-en" / "source-locales")}
    server = _server(binaries, account, en, source_env)
    server.start(60)
    try:
        en_index = _relfilenode(server, "postgres", "words_w")
    finally:
        server.stop()

    aliases = build_locale_aliases(base / "source-aliases")
    win = base / "db-win" / "data"
    _initdb(binaries, account, win, aliases.env(), "-E", "WIN1252", f"--locale={WINDOWS}")
    server = _server(binaries, account, win, aliases.env())
    server.start(60)
    try:
        _fill(server, "postgres")
    finally:
        server.stop()

    icu = base / "db-icu" / "data"
    _initdb(binaries, account, icu, {}, "-E", "UTF8", "--locale=C.UTF-8")
    server = _server(binaries, account, icu)
    server.start(60)
    try:
        _query(
            server,
            "postgres",
            "CREATE COLLATION en_icu (provider = icu, locale = 'en-US')",
            "CREATE TABLE named (id int PRIMARY KEY, name text COLLATE en_icu)",
            f"INSERT INTO named SELECT g, 'name ' || g FROM generate_series(1, {ROWS}) g",
            "CREATE INDEX named_name ON named (name)",
            "UPDATE pg_collation SET collversion = '0.0' WHERE collname = 'en_icu'",
        )
        icu_indexes = {i: _relfilenode(server, "postgres", i) for i in ("named_name", "named_pkey")}
    finally:
        server.stop()
    shutil.rmtree(icu / "pg_wal")  # kept on another volume by the source: a WAL reset

    kopia = KopiaRepository(creds, base / "kopia-state")
    kopia.create()
    try:
        for host, pgdata in (("db-en", en), ("db-win", win), ("db-icu", icu)):
            kopia.snapshot_create(pgdata, override_source=f"postgres@{host}:/var/lib/postgresql")
    finally:
        kopia.close()
    return LocaleBucket(creds, en_index, icu_indexes)


def _admin(api: KubeApi, ns: str, replica: str, restore: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=_pod_ip(api, ns, restore),
        port=5432,
        user="postgres",
        password=_secret_value(api, ns, f"{replica}-admin-creds", "password"),
        dbname="postgres",
        connect_timeout=5,
    )


def test_locales_are_rewritten_and_the_text_index_rebuilt_before_ready(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    locale_s3: LocaleBucket,
) -> None:
    ns = kube_namespace
    creds, en_index = locale_s3.creds, locale_s3.en_index
    admin.create(_s3_secret(ns, "kopia", creds))
    admin.create(_replica(ns, "en", "kopia", snapshotFilter={"hostPattern": "db-en"}))
    admin.create(_replica(ns, "win", "kopia", snapshotFilter={"hostPattern": "db-win"}))

    replicas: dict[str, dict[str, Any]] = {}

    def both_active() -> bool:
        for name in ("en", "win"):
            if name not in replicas and (found := _active(admin, ns, name)):
                replicas[name] = found
        return len(replicas) == 2

    wait_for(
        "both locale restores to become Active",
        both_active,
        600,
        context=lambda: _diagnostics(operator, fake_node),
    )

    # en_US.UTF-8: rewritten in the pod's single-user session, reindexed by the operator.
    restore = replicas["en"]["status"]["currentRestore"]
    status = (admin.get("PostgresPhysicalRestore", ns, restore) or {})["status"]
    fixes = status["fixes"]
    assert fixes["locale"] is True, status
    assert fixes["reindex"] is True, status
    assert fixes["reset_wal"] is False, status
    assert fixes["collation_refresh"] is False, status
    with _admin(admin, ns, "en", restore) as conn:
        locales = conn.execute("SELECT DISTINCT datcollate, datctype FROM pg_database").fetchall()
        assert locales == [("C.UTF-8", "C.UTF-8")]
        row = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 'words_w'")
        assert row.fetchone() != (en_index,)  # rebuilt in the C.UTF-8 order
        assert conn.execute("SELECT count(*) FROM words").fetchone() == (ROWS,)
        # An index scan returns the C order (byte order): en_US's would mix 'B…' and 'b…'.
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        conn.execute("SET enable_sort = off")
        words = [str(r[0]) for r in conn.execute("SELECT w FROM words ORDER BY w").fetchall()]
        assert words == sorted(words, key=str.encode)
    deployment = admin.get("Deployment", ns, restore) or {}
    pod_spec = deployment["spec"]["template"]["spec"]
    assert {"name": "locales", "emptyDir": {"sizeLimit": "128Mi"}} in pod_spec["volumes"]

    # WIN1252: opened through the setup's own aliases, rewritten to C.
    restore = replicas["win"]["status"]["currentRestore"]
    status = (admin.get("PostgresPhysicalRestore", ns, restore) or {})["status"]
    assert status["fixes"]["locale"] is True, status
    assert status["fixes"]["reindex"] is True, status
    with _admin(admin, ns, "win", restore) as conn:
        locales = conn.execute("SELECT DISTINCT datcollate, datctype FROM pg_database").fetchall()
        assert locales == [("C", "C")]
        assert conn.execute("SELECT count(*) FROM words").fetchone() == (ROWS,)

    log = operator.log_tail(10_000)
    assert "quick reindex of the indexes on the default collation: rebuilt 1" in log
    # Before the users (and so before READY): the reindex precedes the provisioning.
    key = f"restore {ns}/{replicas['en']['status']['currentRestore']}"
    lines = [line for line in log.splitlines() if key in line]
    reindexed = next(i for i, line in enumerate(lines) if "quick reindex" in line)
    provisioned = next(i for i, line in enumerate(lines) if "users provisioned" in line)
    assert reindexed < provisioned, lines
    # The setup's own account never wrote the host's locales.
    assert not any(Path("/usr/lib/locale").glob("English_United*"))


def test_a_wal_reset_and_a_drifted_collation_are_repaired_before_ready(
    admin: KubeApi,
    operator: OperatorProcess,
    fake_node: FakeNode,
    kube_namespace: str,
    locale_s3: LocaleBucket,
) -> None:
    ns = kube_namespace
    admin.create(_s3_secret(ns, "kopia", locale_s3.creds))
    admin.create(_replica(ns, "icu", "kopia", snapshotFilter={"hostPattern": "db-icu"}))
    replica = wait_for(
        "the db-icu restore to become Active",
        lambda: _active(admin, ns, "icu"),
        420,
        context=lambda: _diagnostics(operator, fake_node),
    )
    restore = replica["status"]["currentRestore"]

    def reindexed() -> dict[str, Any] | None:
        found = (admin.get("PostgresPhysicalRestore", ns, restore) or {}).get("status", {})
        return found if found.get("fullReindex") == "complete" else None

    # The full reindex after pg_resetwal: on the serving restore, after it went Active.
    status = wait_for(
        "the full reindex after the WAL reset",
        reindexed,
        180,
        context=lambda: _diagnostics(operator, fake_node),
    )
    fixes = status["fixes"]
    assert fixes["reset_wal"] is True, status
    assert fixes["reindex"] is True, status
    assert fixes["collation_refresh"] is True, status
    assert fixes["locale"] is False, status  # a C cluster
    with _admin(admin, ns, "icu", restore) as conn:
        row = conn.execute(
            "SELECT collversion = pg_collation_actual_version(oid) FROM pg_collation "
            "WHERE collname = 'en_icu'"
        ).fetchone()
        assert row == (True,)
        for index, before in locale_s3.icu_indexes.items():
            found = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = %s", (index,))
            assert found.fetchone() != (before,), index
        assert conn.execute("SELECT count(*) FROM named").fetchone() == (ROWS,)
    log = operator.log_tail(10_000)
    assert "refreshed 1 collation version(s)" in log
    assert "full reindex after pg_resetwal (databases): rebuilt" in log
    # Not gating: it started only after the pod was provisioned (and so counted READY).
    lines = log.splitlines()
    provisioned = next(i for i, line in enumerate(lines) if f"{restore}: users provisioned" in line)
    started = next(
        i for i, line in enumerate(lines) if "full reindex after pg_resetwal: started" in line
    )
    assert provisioned < started, lines
