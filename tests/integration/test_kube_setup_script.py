"""The postgres pod's `setup` init script, run for real on PostgreSQL data directories.

The script reads every path from the environment, so here it runs on a local cluster
exactly as it would in the pod, as the unprivileged account PostgreSQL runs as. Success is
checked the way the operator will rely on it: a SCRAM password on the `postgres` role that
logs in over TCP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.initdb import init_cluster
from pgro.postgres.server import free_port, socket_dir_for
from pgro.runtimes.kubernetes.scripts import setup_script

PASSWORD = "Adm1nPassw0rdForTests"

SCRAM_HBA = """\
local   all  all                 trust
host    all  all  127.0.0.1/32   scram-sha-256
"""


@dataclass
class Run:
    returncode: int
    output: str


def run_setup(
    binaries: PostgresBinaries,
    account: RunAccount,
    pgdata: Path,
    root: Path,
    *,
    password: str = PASSWORD,
    path_prefix: Path | None = None,
) -> Run:
    path = f"{binaries.bindir}:/usr/bin:/bin"
    if path_prefix is not None:
        path = f"{path_prefix}:{path}"
    proc = subprocess.run(  # type: ignore[call-overload]
        ["/bin/sh", "-c", setup_script()],
        env={
            **account.env(),
            "PATH": path,
            "LC_ALL": "C",
            "PGDATA": str(pgdata),
            "PGRO_DATA_ROOT": str(root),
            "PGRO_ADMIN_PASSWORD": password,
        },
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        timeout=120,
        **account.popen_kwargs(),
    )
    return Run(proc.returncode, f"{proc.stdout}\n{proc.stderr}")


def as_account(account: RunAccount, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        list(cmd),
        env={**account.env(), "PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        timeout=120,
        **account.popen_kwargs(),
    )


def new_cluster(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path, superuser: str = "postgres"
) -> tuple[Path, Path]:
    """(PGDATA, volume root): the layout the restore Job leaves, PGDATA below the root."""
    root = scratch / "volume"
    root.mkdir()
    os.chmod(root, 0o711)
    if os.geteuid() == 0:
        os.chown(root, account.uid, account.gid)
    pgdata = root / "data"
    init_cluster(binaries, pgdata, account, superuser=superuser)
    (pgdata / "pg_hba.conf").write_text(SCRAM_HBA)
    # The kubelet's fsGroup handling leaves group bits the server would refuse.
    os.chmod(pgdata, 0o770)
    return pgdata, root


@dataclass
class Server:
    port: int
    socket_dir: Path

    def local(self, user: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=user, dbname="postgres"
        )

    def tcp(self, user: str, password: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=user, password=password, dbname="postgres"
        )


@contextmanager
def started(
    binaries: PostgresBinaries, account: RunAccount, pgdata: Path, scratch: Path
) -> Iterator[Server]:
    socket_dir = socket_dir_for(scratch / "sock")
    if os.geteuid() == 0:
        os.chown(socket_dir, account.uid, account.gid)
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={socket_dir}"
    )
    log = scratch / "server.log"
    if os.geteuid() == 0:
        log.touch()
        os.chown(log, account.uid, account.gid)
    start = as_account(
        account,
        binaries.tool("pg_ctl"),
        "-D",
        str(pgdata),
        "-o",
        options,
        "-l",
        str(log),
        "-w",
        "-t",
        "60",
        "start",
    )
    assert start.returncode == 0, f"{start.stdout}{start.stderr}{log.read_text()}"
    try:
        yield Server(port, socket_dir)
    finally:
        as_account(account, binaries.tool("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop")
        if socket_dir != scratch / "sock":
            shutil.rmtree(socket_dir, ignore_errors=True)


def assert_admin_login(server: Server, *, superuser: str = "postgres") -> None:
    with server.local(superuser) as conn:
        row = conn.execute(
            "SELECT rolpassword, rolsuper, rolcanlogin FROM pg_authid WHERE rolname = 'postgres'"
        ).fetchone()
    assert row is not None
    rolpassword, rolsuper, rolcanlogin = row
    assert isinstance(rolpassword, str)
    assert rolpassword.startswith("SCRAM-SHA-256$")
    assert rolsuper is True
    assert rolcanlogin is True
    with server.tcp("postgres", PASSWORD) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        server.tcp("postgres", PASSWORD + "x").close()


@pytest.mark.slow
def test_sets_scram_password_on_a_clean_cluster(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata, root = new_cluster(binaries, account, scratch)
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    assert "set the postgres password" in run.output
    assert PASSWORD not in run.output
    assert pgdata.stat().st_mode & 0o777 == 0o700
    assert not (root / "fix-reset-wal").exists()
    with started(binaries, account, pgdata, scratch) as server:
        assert_admin_login(server)


@pytest.mark.slow
def test_rerun_is_idempotent(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    """A replaced pod runs the init container again on the same volume."""
    pgdata, root = new_cluster(binaries, account, scratch)
    assert run_setup(binaries, account, pgdata, root).returncode == 0
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    with started(binaries, account, pgdata, scratch) as server:
        assert_admin_login(server)


@pytest.mark.slow
def test_works_on_a_read_only_replica(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    """The restore Job writes `default_transaction_read_only = on` for read-only replicas;
    the password must still be settable (found by the operator's end-to-end test)."""
    pgdata, root = new_cluster(binaries, account, scratch)
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\ndefault_transaction_read_only = on\n")
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    with started(binaries, account, pgdata, scratch) as server:
        assert_admin_login(server)


@pytest.mark.slow
def test_creates_postgres_role_when_the_source_superuser_has_another_name(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata, root = new_cluster(binaries, account, scratch, superuser="dbadmin")
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    with started(binaries, account, pgdata, scratch) as server:
        assert_admin_login(server, superuser="dbadmin")


@pytest.mark.slow
def test_runs_no_procedural_language_from_the_snapshot(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    """The snapshot's catalog names the PL/pgSQL handler library, so the script must not
    need it: here the language is gone, and with it any DO block."""
    pgdata, root = new_cluster(binaries, account, scratch)
    os.chmod(pgdata, 0o700)
    with started(binaries, account, pgdata, scratch) as server:
        for db in ("postgres", "template1"):
            with psycopg.connect(
                host=str(server.socket_dir), port=server.port, user="postgres", dbname=db
            ) as conn:
                conn.execute("DROP EXTENSION plpgsql")
    os.chmod(pgdata, 0o770)
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    with started(binaries, account, pgdata, scratch) as server:
        assert_admin_login(server)


@pytest.mark.slow
def test_missing_wal_is_reset_and_flagged(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata, root = new_cluster(binaries, account, scratch)
    for segment in (pgdata / "pg_wal").iterdir():
        if segment.is_file():
            segment.unlink()
    # PostgreSQL then logs "LOG:  skipping missing configuration file": said on the way,
    # it is no configuration error that would forbid the reset.
    (pgdata / "postgresql.auto.conf").unlink(missing_ok=True)
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 0, run.output
    assert "skipping missing configuration file" in run.output
    assert "could not locate a valid checkpoint record" in run.output
    assert "pg_resetwal" in run.output
    assert "after pg_resetwal" in run.output
    assert PASSWORD not in run.output
    assert (root / "fix-reset-wal").exists()
    with started(binaries, account, pgdata, scratch) as server:
        assert_admin_login(server)


def test_other_startup_failure_exits_without_reset(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata, root = new_cluster(binaries, account, scratch)
    (pgdata / "PG_VERSION").write_text("9\n")  # not this server's major
    run = run_setup(binaries, account, pgdata, root)
    assert run.returncode == 1
    assert "could not set the postgres password" in run.output
    assert "incompatible" in run.output
    assert "pg_resetwal" not in run.output
    assert not (root / "fix-reset-wal").exists()
    assert PASSWORD not in run.output


def test_sql_error_with_exit_zero_is_a_failure_and_is_redacted(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    """Single-user mode exits 0 when a statement fails; errors may quote the statement."""
    fake_bin = scratch / "bin"
    fake_bin.mkdir()
    os.chmod(fake_bin, 0o755)
    fake = fake_bin / "postgres"
    # The locale probe (the first session) answers as PostgreSQL would; the role's fails.
    fake.write_text(
        "#!/bin/sh\n"
        'sql=$(cat)\ncase "$sql" in *pgro_locale_mismatch*)\n'
        "  echo '\t 1: pgro_locale_mismatch = \"0\"'; exit 0 ;;\nesac\n"
        'echo "ERROR:  something went wrong"\n'
        'echo "CONTEXT:  SQL statement \\"$sql\\""\nexit 0\n'
    )
    os.chmod(fake, 0o755)
    pgdata, root = new_cluster(binaries, account, scratch)
    run = run_setup(binaries, account, pgdata, root, path_prefix=fake_bin)
    assert run.returncode == 1
    assert "something went wrong" in run.output
    assert "[redacted]" in run.output
    assert PASSWORD not in run.output


@pytest.mark.parametrize("password", ["", "has space", "quote'injection", "semi;colon"])
def test_refuses_a_password_that_is_not_alphanumeric(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path, password: str
) -> None:
    root = scratch / "volume"
    root.mkdir()
    run = run_setup(binaries, account, root / "data", root, password=password)
    assert run.returncode == 1
    assert "letters and digits" in run.output
    if password:
        assert password not in run.output
