"""`pgro demo`: a real backup of a real cluster in a local Kopia repository, then verify it.

The demo builds what a user's backup job would have produced: a Debian-layout cluster
(`15/main`, configuration kept in /etc and so absent from the snapshot, a `current`
symlink naming the source host's path) with an application database, snapshotted by kopia
as if from host `demo-db`. It keeps only the repository and a manifest; re-running reuses
them, so the second run shows verification alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pgro.api.secret import FilesystemLocation, KopiaCredentials
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.events import Observer
from pgro.postgres.account import RunAccount, resolve_run_account
from pgro.postgres.initdb import init_cluster, newest_binaries
from pgro.postgres.server import PostgresServer

DEMO_REPLICA = "demo-verify"
DEMO_SECRET = "demo-kopia"  # noqa: S105 - the Secret's name, not a password
DEMO_HOST = "demo-db"

SAMPLE_SQL = [
    "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, country text)",
    "INSERT INTO customers (name, country) "
    "SELECT 'customer ' || g, (ARRAY['NZ','AU','FJ','WS','TO'])[1 + g % 5] "
    "FROM generate_series(1, 1000) g",
    "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers(id), "
    "amount numeric(10,2), placed_at timestamptz)",
    "INSERT INTO orders (customer_id, amount, placed_at) "
    "SELECT 1 + g % 1000, (g % 997) * 1.25, "
    "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 minute' "
    "FROM generate_series(1, 20000) g",
    "CREATE INDEX orders_customer ON orders (customer_id)",
]


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgro" / "demo"


@dataclass
class DemoPaths:
    root: Path

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    @property
    def manifest(self) -> Path:
        return self.root / "verify.yaml"

    def exists(self) -> bool:
        return self.manifest.is_file() and (self.repository / "kopia.repository.f").exists()


def _password() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def write_manifest(paths: DemoPaths, password: str) -> None:
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": DEMO_SECRET, "namespace": "default"},
            "type": "Opaque",
            "stringData": {
                "filesystemPath": str(paths.repository),
                "repositoryPassword": password,
            },
        },
        {
            "apiVersion": "pgro.bes.au/v1alpha1",
            "kind": "PostgresPhysicalReplica",
            "metadata": {"name": DEMO_REPLICA, "namespace": "default"},
            "spec": {
                "kopiaSecretRef": {"name": DEMO_SECRET},
                "schedule": "H 3 * * *",
                "ephemeral": True,
                "snapshotFilter": {"hostPattern": DEMO_HOST, "tags": {"app": "myapp"}},
            },
        },
    ]
    paths.manifest.write_text(
        "# Written by `pgro demo`. Verify again with: pgro verify -f "
        + str(paths.manifest)
        + "\n"
        + yaml.safe_dump_all(docs, sort_keys=False)
    )
    os.chmod(paths.manifest, 0o600)  # it holds the repository password


def _build_source_cluster(tmp: Path, account: RunAccount, observer: Observer) -> Path:
    import psycopg  # only the demo's source cluster needs it; keep `pgro` start-up light

    binaries = newest_binaries()
    root = tmp / "var-lib-postgresql"
    pgdata = root / binaries.major / "main"
    observer.step("demo-initdb", f"creating a PostgreSQL {binaries.major} cluster with sample data")
    init_cluster(binaries, pgdata, account)
    server = PostgresServer(
        pgdata, binaries, account, socket_dir=tmp / "run", log_path=tmp / "source.log"
    )
    server.start(120)
    try:
        endpoint = server.endpoint
        with psycopg.connect(endpoint.conninfo("postgres", "postgres"), autocommit=True) as c:
            c.execute("CREATE DATABASE myapp")
        with psycopg.connect(endpoint.conninfo("myapp", "postgres"), autocommit=True) as c:
            for stmt in SAMPLE_SQL:
                c.execute(stmt.encode())
    finally:
        server.stop()
    # Debian keeps the configuration in /etc/postgresql/<major>/main, outside the backup.
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postmaster.opts"):
        (pgdata / name).unlink(missing_ok=True)
    os.symlink(f"/var/lib/postgresql/{binaries.major}/main", root / "current")
    return root


def prepare_demo(paths: DemoPaths, observer: Observer, *, fresh: bool = False) -> bool:
    """Create the demo repository and manifest unless they exist. Returns True if created."""
    if paths.exists() and not fresh:
        observer.note(f"reusing the demo repository in {paths.root} (--fresh rebuilds it)")
        return False
    if paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True)
    os.chmod(paths.root, 0o700)
    account = resolve_run_account()
    password = _password()
    creds = KopiaCredentials(
        location=FilesystemLocation(str(paths.repository)), repository_password=password
    )
    tmp = Path(tempfile.mkdtemp(prefix="pgro-demo-source-"))
    os.chmod(tmp, 0o711)
    try:
        source = _build_source_cluster(tmp, account, observer)
        observer.step("demo-backup", f"backing it up into a Kopia repository at {paths.repository}")
        repo = KopiaRepository(creds, tmp / "kopia")
        try:
            repo.create()
            snapshot_id = repo.snapshot_create(
                source,
                tags={"app": "myapp"},
                description="pgro demo: nightly physical backup",
                override_source=f"postgres@{DEMO_HOST}:/var/lib/postgresql",
            )
        finally:
            repo.close()
        observer.note(f"created snapshot {snapshot_id}")
        write_manifest(paths, password)
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
