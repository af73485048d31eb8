"""`pgro run --migrator` below the end-to-end tests: the command's parsing, the migrator's
environment, what `LocalMigrator.observe` makes of its directory, and the runner (a real
process) recording exits and forwarding a stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgro.api.restore import PostgresPhysicalRestore
from pgro.core.app_migration import database_url, migrator_env
from pgro.core.observations import WorkState
from pgro.pipeline.migrator_command import MigratorCommand, MigratorCommandError
from pgro.postgres.account import resolve_run_account
from pgro.postgres.server import Endpoint
from pgro.runtimes.embedded import migrator as m

PASSWORD = "s3cret-Pass"


def _restore() -> PostgresPhysicalRestore:
    return PostgresPhysicalRestore.model_validate(
        {
            "metadata": {"name": "orders-1", "namespace": "default"},
            "spec": {
                "replica": {"name": "orders"},
                "snapshot": "k1",
                "snapshotSize": "1Mi",
                "storageSize": "2Mi",
                "migrateTo": {"version": "2.1.0", "versionId": "v-1"},
            },
        }
    )


def _migrator(tmp_path: Path) -> m.LocalMigrator:
    return m.LocalMigrator(
        MigratorCommand(("/bin/true",)),
        _restore(),
        tmp_path,
        Endpoint(tmp_path / "run", 5433),
        resolve_run_account(),
        "analytics",
        PASSWORD,
        m.Runners(),
    )


def test_the_command_is_split_like_a_shell_and_checked() -> None:
    assert MigratorCommand.parse("/bin/echo 'two words' migrate").argv == (
        "/bin/echo",
        "two words",
        "migrate",
    )
    with pytest.raises(MigratorCommandError, match="is empty"):
        MigratorCommand.parse("   ")
    with pytest.raises(MigratorCommandError, match="cannot be split"):
        MigratorCommand.parse("/bin/echo 'unclosed")
    with pytest.raises(MigratorCommandError, match="not an executable file"):
        MigratorCommand.parse("/nonexistent/migrate migrate").check(resolve_run_account())


def test_the_environment_names_the_restore_for_every_client() -> None:
    env = migrator_env(
        host="/run/x y",
        port=5433,
        database="my app",
        username="analytics",
        password="p@ss:/w",
        version="2.1.0",
        version_id="v-1",
    )
    assert env["CONFIG_SYNC_DB_HOST"] == env["PGHOST"] == "/run/x y"
    assert env["CONFIG_SYNC_DB_PORT"] == env["PGPORT"] == "5433"
    assert env["NODE_ENV"] == "production"
    assert env["PGRO_MIGRATE_VERSION"] == "2.1.0"
    assert env["PGRO_MIGRATE_VERSION_ID"] == "v-1"
    # The URL libpq reads back to the same place and credentials, whatever they contain.
    parsed = psycopg.conninfo.conninfo_to_dict(env["DATABASE_URL"])
    assert parsed == {
        "host": "/run/x y",
        "port": "5433",
        "dbname": "my app",
        "user": "analytics",
        "password": "p@ss:/w",
    }
    v6 = database_url(host="::1", port=5, database="d", username="u", password="p")
    assert psycopg.conninfo.conninfo_to_dict(v6)["host"] == "::1"


def test_observe_reads_the_directory(tmp_path: Path) -> None:
    migrator = _migrator(tmp_path)
    assert migrator.observe().state is WorkState.NOT_STARTED
    mdir = tmp_path / m.DIRECTORY
    mdir.mkdir()
    m.write_json(mdir / m.RUN_RECORD, {"command": ["/bin/true"]})
    (mdir / m.LOG).write_text(f"connecting with {PASSWORD}\nworking\n")
    # Started, but no runner and no exit code: lost, failed, said so, password masked.
    lost = migrator.observe()
    assert lost.state is WorkState.FAILED
    assert "lost the migrator's runner" in lost.log_tail
    assert PASSWORD not in lost.log_tail and "***" in lost.log_tail
    m.write_json(mdir / m.STATUS, {"returncode": 0, "stopped": False})
    assert migrator.observe().state is WorkState.SUCCEEDED
    m.write_json(mdir / m.STATUS, {"returncode": 0, "stopped": True})
    stopped = migrator.observe()
    assert stopped.state is WorkState.FAILED
    assert "stopped by pgro run" in stopped.log_tail
    m.write_json(mdir / m.STATUS, {"returncode": 3, "stopped": False})
    assert migrator.observe().state is WorkState.FAILED


def _runner(mdir: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", m.RUNNER_MODULE, str(mdir)],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"argv": argv, "env": {"X": "1"}, "grace": 2}).encode())
    proc.stdin.close()
    return proc


def test_the_runner_records_the_exit_code_and_the_output(tmp_path: Path) -> None:
    _runner(tmp_path, ["/bin/sh", "-c", 'echo "out $X"; echo err >&2; exit 4']).wait(30)
    assert json.loads((tmp_path / m.STATUS).read_text()) == {"returncode": 4, "stopped": False}
    assert (tmp_path / m.LOG).read_text().splitlines() == ["out 1", "err"]
    assert os.stat(tmp_path / m.LOG).st_mode & 0o077 == 0


def test_a_command_that_cannot_start_is_recorded(tmp_path: Path) -> None:
    _runner(tmp_path, [str(tmp_path / "missing")]).wait(30)
    assert json.loads((tmp_path / m.STATUS).read_text())["returncode"] == 127
    assert "cannot start the migrator" in (tmp_path / m.LOG).read_text()


def test_a_stopped_runner_stops_its_command_and_says_so(tmp_path: Path) -> None:
    # A command that ignores SIGTERM: killed after the grace period.
    proc = _runner(tmp_path, ["/bin/sh", "-c", "trap '' TERM; echo ready; sleep 60 & wait"])
    deadline = time.monotonic() + 30
    while "ready" not in (tmp_path / m.LOG).read_text() if (tmp_path / m.LOG).exists() else True:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    status = json.loads((tmp_path / m.STATUS).read_text())
    assert status["stopped"] is True
    assert status["returncode"] != 0


def test_a_runner_from_an_earlier_run_is_found_and_stopped(tmp_path: Path) -> None:
    """What deleting a restore (or stopping pgro run) does to a migrator it adopted."""
    mdir = tmp_path / m.DIRECTORY
    mdir.mkdir()
    proc = _runner(mdir, ["/bin/sh", "-c", "echo ready; exec sleep 60"])
    (mdir / m.PIDFILE).write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while not (mdir / m.LOG).exists() or "ready" not in (mdir / m.LOG).read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runners = m.Runners()  # this run did not start it
    assert m.runner_pid(mdir) == proc.pid
    runners.stop("default/orders-1", tmp_path)
    assert proc.wait(30) == 0
    assert json.loads((mdir / m.STATUS).read_text())["stopped"] is True
    assert m.runner_pid(mdir) is None
    # A pidfile naming some other process is never signalled.
    (mdir / m.PIDFILE).write_text(str(os.getpid()))
    assert m.runner_pid(mdir) is None
