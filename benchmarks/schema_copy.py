"""What pgro's persistent-schema copy costs over the copy an expert types by hand.

Builds two real PostgreSQL clusters (the serving restore and the new one) and, in the
source's `app` database, a persistent schema of realistic shape: a large table with a primary
key and a secondary index, a second table, a view. Then times, alternately and in the same
run:

- baseline: `pg_dump --schema=reports --no-owner --no-privileges -d SRC | psql -q -d TGT`
  after `DROP SCHEMA reports CASCADE` on the target (the reference's pipeline, tools'
  defaults);
- pgro: what the migration step does (`postgres.schema_migration.prepare_target`, then the
  copy program of `pipeline.schema_transfer` run and supervised by `LocalCopy`, polled as
  `pgro run` polls it): `pg_dump --format=custom | pg_restore --role=<analytics>`.

Checks both targets hold the same rows, and prints the median wall time of each and their
ratio.

    .venv/bin/python -m benchmarks.schema_copy [--rows 3000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from pgro.core.observations import WorkState
from pgro.pipeline.schema_transfer import LocalCopy
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import init_cluster, newest_binaries
from pgro.postgres.schema_migration import prepare_target
from pgro.postgres.server import PostgresServer

SCHEMA = "reports"
OWNER = "analytics"


def start_cluster(
    base: Path, name: str, binaries: PostgresBinaries, account: RunAccount
) -> PostgresServer:
    pgdata = base / name / "data"
    init_cluster(binaries, pgdata, account)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=base / f"{name}-run", log_path=base / f"{name}.log"
    )
    server.start(120)
    with psycopg.connect(server.endpoint.conninfo("postgres", "postgres"), autocommit=True) as c:
        c.execute("CREATE DATABASE app")
        c.execute(f"CREATE ROLE {OWNER} LOGIN")
        # As pgro provisions a write-capable analytics user (persistent schemas need one).
        c.execute(f"GRANT CONNECT, CREATE, TEMPORARY ON DATABASE app TO {OWNER}")
    return server


def fill(source: PostgresServer, rows: int) -> int:
    print(f"writing {rows} rows into {SCHEMA} ...", file=sys.stderr)
    with psycopg.connect(source.endpoint.conninfo("app", "postgres"), autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {SCHEMA} AUTHORIZATION {OWNER}")
        c.execute(f"SET ROLE {OWNER}")
        c.execute(
            f"CREATE TABLE {SCHEMA}.facts AS SELECT g AS id, md5(g::text) AS note,"
            " timestamptz '2026-01-01' + g * interval '1 second' AS at,"
            " (g %% 1000) AS bucket FROM generate_series(1, %s) g",
            (rows,),
        )
        c.execute(f"ALTER TABLE {SCHEMA}.facts ADD PRIMARY KEY (id)")
        c.execute(f"CREATE INDEX ON {SCHEMA}.facts (bucket, at)")
        c.execute(
            f"CREATE TABLE {SCHEMA}.buckets AS SELECT bucket, count(*) AS n"
            f" FROM {SCHEMA}.facts GROUP BY bucket"
        )
        c.execute(f"CREATE VIEW {SCHEMA}.busy AS SELECT * FROM {SCHEMA}.buckets WHERE n > 0")
        row = c.execute("SELECT pg_database_size('app')").fetchone()
    assert row is not None
    return int(row[0])


def count(server: PostgresServer) -> tuple[int, int]:
    with psycopg.connect(server.endpoint.conninfo("app", "postgres")) as c:
        row = c.execute(
            f"SELECT (SELECT count(*) FROM {SCHEMA}.facts), (SELECT count(*) FROM {SCHEMA}.busy)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def baseline(source: PostgresServer, target: PostgresServer, binaries: PostgresBinaries) -> float:
    with psycopg.connect(target.endpoint.conninfo("app", "postgres"), autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    started = time.perf_counter()
    dump = subprocess.Popen(
        [
            binaries.tool("pg_dump"),
            f"--schema={SCHEMA}",
            "--no-owner",
            "--no-privileges",
            "-d",
            source.endpoint.conninfo("app", "postgres"),
        ],
        stdout=subprocess.PIPE,
    )
    restore = subprocess.run(
        [binaries.tool("psql"), "-q", "-d", target.endpoint.conninfo("app", "postgres")],
        stdin=dump.stdout,
        capture_output=True,
        check=True,
    )
    assert dump.stdout is not None
    dump.stdout.close()
    assert dump.wait() == 0 and b"ERROR" not in restore.stderr, restore.stderr
    return time.perf_counter() - started


def pgro(
    source: PostgresServer,
    target: PostgresServer,
    binaries: PostgresBinaries,
    account: RunAccount,
    work: Path,
) -> float:
    copy = LocalCopy(work / "schemas", account)
    started = time.perf_counter()
    prepare_target(lambda db: target.endpoint.conninfo(db, "postgres"), "app", [SCHEMA])
    copy.start(
        bindir=binaries.bindir,
        source=source.endpoint.conninfo("app", "postgres"),
        target=target.endpoint.conninfo("app", "postgres"),
        owner=OWNER,
        schemas=[SCHEMA],
        started_at=datetime.now(UTC),
    )
    while (transfer := copy.observe()).state is WorkState.RUNNING:
        time.sleep(0.05)  # pgro run looks every 2 s; a tighter loop does not favour pgro
    elapsed = time.perf_counter() - started
    assert transfer.result == "success", transfer
    copy.discard()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    binaries = newest_binaries()
    account = resolve_run_account()
    base = Path(tempfile.mkdtemp(prefix="pgro-bench-copy-"))
    base.chmod(0o755)
    servers: list[PostgresServer] = []
    try:
        source = start_cluster(base, "source", binaries, account)
        servers.append(source)
        baseline_target = start_cluster(base, "baseline", binaries, account)
        servers.append(baseline_target)
        pgro_target = start_cluster(base, "pgro", binaries, account)
        servers.append(pgro_target)
        size = fill(source, args.rows)
        times: dict[str, list[float]] = {"baseline": [], "pgro": []}
        for n in range(args.rounds):
            times["baseline"].append(baseline(source, baseline_target, binaries))
            times["pgro"].append(pgro(source, pgro_target, binaries, account, base))
            print(
                f"round {n + 1}: baseline {times['baseline'][-1]:.2f}s, "
                f"pgro {times['pgro'][-1]:.2f}s",
                file=sys.stderr,
            )
        expected = count(source)
        assert count(baseline_target) == expected and count(pgro_target) == expected
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "source_database_bytes": size,
                    "rounds": args.rounds,
                    "baseline_median_s": round(medians["baseline"], 3),
                    "pgro_median_s": round(medians["pgro"], 3),
                    "ratio": round(medians["pgro"] / medians["baseline"], 3),
                },
                indent=1,
            )
        )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
