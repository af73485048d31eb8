"""What pgro's native masking engine costs over the UPDATE an expert types by hand (issue 15).

Builds one real PostgreSQL cluster whose `app` database holds `--rows` people (default
1,000,000) with 6 masked columns (email, name, date of birth, phone, heart rate in 50-100,
city) and an unmasked one, then times, alternately and in the same run, on a fresh copy of
the table each time (CREATE TABLE AS, primary key, VACUUM ANALYZE, CHECKPOINT; not timed):

- baseline: one hand-typed `UPDATE people SET email = …, full_name = …, …` of the same
  expressions, run by `psql` (the text is what pgro.core.masks prints for these columns,
  so both do the same work per row);
- pgro: `apply_manifest(conninfo, manifest)` with the manifest of those 6 columns (its
  session setup, the catalog lookup, the trigger check, one transaction and one UPDATE).

Checks that both leave no original email and every heart rate in 50..100, and prints the
median wall time of each and their ratio (the issue asks for <= 1.2).

    .venv/bin/python -m benchmarks.redaction [--rows 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from pgro.core.masks import ColumnInfo, assignment
from pgro.core.redaction_manifest import parse_manifest
from pgro.postgres.account import resolve_run_account
from pgro.postgres.initdb import init_cluster, newest_binaries
from pgro.postgres.redaction import apply_manifest
from pgro.postgres.server import PostgresServer

APP = "app"
MASKS = {
    "email": "email",
    "full_name": "name",
    "dob": "date",
    "phone": "phone",
    "heart_rate": {"kind": "integer", "range": "50-100"},
    "city": "place",
}
TEXT = ColumnInfo("text", "S", "text", nullable=True, has_default=False)
INFOS = {
    "email": ColumnInfo("text", "S", "text", nullable=False, has_default=False),
    "full_name": TEXT,
    "dob": ColumnInfo("date", "D", "date", nullable=True, has_default=False),
    "phone": TEXT,
    "heart_rate": ColumnInfo("int4", "N", "integer", nullable=True, has_default=False),
    "city": TEXT,
}
SOURCE = """
CREATE TABLE source_people AS
SELECT g AS id,
       'person' || g || '@example.com' AS email,
       CASE WHEN g % 5 = 0 THEN 'Single' || g ELSE 'First' || g || ' Last' || g END AS full_name,
       DATE '1950-01-01' + (g % 20000) AS dob,
       '+61 4' || lpad((g % 100000000)::text, 8, '0') AS phone,
       (40 + g % 150)::int AS heart_rate,
       'Town' || (g % 500) AS city,
       'kept ' || g AS notes
FROM generate_series(1, %(rows)s) g
"""
COPY = """
DROP TABLE IF EXISTS people;
CREATE TABLE people AS SELECT * FROM source_people;
ALTER TABLE people ALTER COLUMN email SET NOT NULL, ADD PRIMARY KEY (id);
"""
LEFT_BEHIND = (
    "SELECT count(*) FILTER (WHERE email LIKE '%@example.com'),"
    " count(*) FILTER (WHERE heart_rate NOT BETWEEN 50 AND 100),"
    " count(*) FILTER (WHERE notes NOT LIKE 'kept %')"
    " FROM people"
)


def manifest_text() -> str:
    columns = {c: {"config": {"meta": {"masking": m}}} for c, m in MASKS.items()}
    return json.dumps(
        {"sources": {"p": {"schema": "public", "name": "people", "columns": columns}}}
    )


def hand_update() -> str:
    """The baseline's statement: the same expressions, as one UPDATE typed into psql."""
    manifest = parse_manifest(manifest_text())
    parts = [assignment(mask, INFOS[mask.column]) for mask in manifest.columns]
    statement = sql.SQL("UPDATE people SET {}").format(sql.SQL(", ").join(parts))
    return statement.as_string(None) + ";"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    account = resolve_run_account()
    binaries = newest_binaries()
    base = Path(tempfile.mkdtemp(prefix="pgro-bench-redaction-"))
    base.chmod(0o711)
    pgdata = base / "data"
    init_cluster(binaries, pgdata, account)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=base / "run", log_path=base / "pg.log"
    )
    server.start(120)
    try:
        admin = server.endpoint.conninfo("postgres", "postgres")
        app_db = server.endpoint.conninfo(APP, "postgres")
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {APP}")
        with psycopg.connect(app_db, autocommit=True) as c:
            c.execute(SOURCE.replace("%(rows)s", str(int(args.rows))).encode())

        manifest = parse_manifest(manifest_text())
        update = hand_update()
        psql = binaries.tool("psql")

        def fresh() -> None:
            with psycopg.connect(app_db, autocommit=True) as c:
                c.execute(COPY)
                c.execute("VACUUM ANALYZE people")
                c.execute("CHECKPOINT")

        def baseline() -> None:
            subprocess.run(
                [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", update, app_db],
                check=True,
                capture_output=True,
            )

        def pgro() -> None:
            result = apply_manifest(app_db, manifest)
            assert not result.partial, result.summary()

        times: dict[str, list[float]] = {"baseline": [], "pgro": []}
        for _ in range(args.rounds):
            for name, run in (("baseline", baseline), ("pgro", pgro)):
                fresh()
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
                with psycopg.connect(app_db) as c:
                    row = c.execute(LEFT_BEHIND).fetchone()
                assert row == (0, 0, 0), f"{name} left {row} (emails, heart rates, kept notes)"
        result = {
            "rows": args.rows,
            "masked_columns": len(MASKS),
            "rounds": args.rounds,
            "baseline_s": statistics.median(times["baseline"]),
            "pgro_s": statistics.median(times["pgro"]),
        }
        result["ratio"] = result["pgro_s"] / result["baseline_s"]
        print(
            f"{args.rows} rows, {len(MASKS)} masked columns, median of {args.rounds}: "
            f"baseline (one hand-typed UPDATE in psql) {result['baseline_s']:.2f} s, "
            f"pgro apply_manifest {result['pgro_s']:.2f} s, ratio {result['ratio']:.2f}"
        )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
