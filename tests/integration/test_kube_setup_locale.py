"""The postgres pod's `setup` script and the locale rewrite (issue 13, features.md §2.3), run
for real: clusters made with locales this host lacks (generated into a private LOCPATH, as
`test_locale_fix.py` does), handed to the script WITHOUT that directory, as the pod's
image would see a Linux source's `en_US.UTF-8` it lacks or a Windows source's
"English_United States.1252".

Checked: the databases are rewritten in single-user mode (C.UTF-8; C for WIN1252), the
sticky markers `needs-reindex` and `fix-locale` are written, the termination message
(`SetupReport`) says so, private locales are built only when a database needs them (into
`$PGRO_LOCALES`, never the host's), and with them disabled the script fails with a clear
`LocaleUnavailable` and resets no WAL.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.locale_aliases import build_locale_aliases
from pgro.runtimes.kubernetes.scripts import (
    FIX_LOCALE_FLAG,
    FIX_RESET_WAL_FLAG,
    NEEDS_REINDEX_MARKER,
    SetupReport,
    setup_script,
)
from tests.integration.test_kube_setup_script import PASSWORD, Run, started
from tests.integration.test_locale_fix import _fill, _initdb, _server, build_en_us_cluster

pytestmark = pytest.mark.slow


def _volume(pgdata: Path, account: RunAccount) -> Path:
    """The restore Job's layout: PGDATA below the volume root (here its parent)."""
    root = pgdata.parent
    os.chmod(root, 0o711)
    hand_over(root, account)  # the volume root: fsGroup-writable in the pod
    # The kubelet's fsGroup handling leaves group bits the server would refuse.
    os.chmod(pgdata, 0o770)
    return root


def _locales_dir(scratch: Path, account: RunAccount) -> Path:
    """The pod's `locales` emptyDir: empty, writable by the server's account."""
    path = scratch / "pod-locales"
    path.mkdir()
    hand_over(path, account)
    return path


def run_setup(
    binaries: PostgresBinaries,
    account: RunAccount,
    pgdata: Path,
    root: Path,
    locales: Path,
    termination: Path,
    **extra: str,
) -> Run:
    termination.touch()
    if os.geteuid() == 0:
        os.chown(termination, account.uid, account.gid)
    proc = subprocess.run(  # type: ignore[call-overload]
        ["/bin/sh", "-c", setup_script()],
        env={
            **account.env(),
            "PATH": f"{binaries.bindir}:/usr/bin:/bin",
            "LC_ALL": "C",
            "PGDATA": str(pgdata),
            "PGRO_DATA_ROOT": str(root),
            "PGRO_ADMIN_PASSWORD": PASSWORD,
            "PGRO_LOCALES": str(locales),
            "PGRO_TERMINATION_LOG": str(termination),
            **extra,
        },
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        timeout=600,
        **account.popen_kwargs(),
    )
    return Run(proc.returncode, f"{proc.stdout}\n{proc.stderr}")


def _report(termination: Path) -> SetupReport:
    text = termination.read_text()
    assert text.strip(), "the setup wrote no termination message"
    json.loads(text)  # one JSON line
    report = SetupReport.parse(text)
    assert report is not None, text
    return report


def _locales(
    binaries: PostgresBinaries, account: RunAccount, pgdata: Path, scratch: Path
) -> set[tuple[str, str, str]]:
    with started(binaries, account, pgdata, scratch) as server, server.local("postgres") as conn:
        rows = conn.execute(
            "SELECT datname, datcollate, datctype FROM pg_database ORDER BY datname"
        ).fetchall()
    return {(str(a), str(b), str(c)) for a, b, c in rows}


def test_an_en_us_cluster_is_rewritten_and_marked(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata = build_en_us_cluster(scratch, binaries, account)
    root = _volume(pgdata, account)
    locales = _locales_dir(scratch, account)
    termination = scratch / "termination-log"
    run = run_setup(binaries, account, pgdata, root, locales, termination)
    assert run.returncode == 0, run.output
    assert "building private locales" in run.output
    # postgres, app, template0 and template1.
    assert "rewrote the locale of 4 database(s) in single-user mode" in run.output
    assert PASSWORD not in run.output
    assert (root / NEEDS_REINDEX_MARKER).read_text().strip() == "4"
    assert (root / FIX_LOCALE_FLAG).exists()
    assert not (root / FIX_RESET_WAL_FLAG).exists()
    assert _report(termination) == SetupReport(locale=True, reset_wal=False, needs_reindex=4)
    # Built into the emptyDir only: the image's own locale and the aliases.
    assert (locales / "en_US.UTF-8" / "LC_CTYPE").is_file()
    assert (locales / "gconv" / "gconv-modules").is_file()
    assert {(c, t) for _, c, t in _locales(binaries, account, pgdata, scratch)} == {
        ("C.UTF-8", "C.UTF-8")
    }

    # A later pod on the same volume: nothing left to rewrite, nothing built, and the sticky
    # markers still tell the operator (which records the quick reindex in the status).
    (scratch / "again").mkdir()
    again = _locales_dir(scratch / "again", account)
    rerun = run_setup(binaries, account, pgdata, root, again, termination)
    assert rerun.returncode == 0, rerun.output
    assert "building private locales" not in rerun.output
    assert "rewrote the locale" not in rerun.output
    assert list(again.iterdir()) == []
    assert _report(termination) == SetupReport(locale=True, reset_wal=False, needs_reindex=4)


def test_a_windows_cluster_opens_through_the_setups_own_aliases(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    """WIN1252 "English_United States.1252": only the aliases the script builds open it, and
    it is rewritten to C (PostgreSQL refuses C.UTF-8 with WIN1252)."""
    name = "English_United States.1252"
    source = build_locale_aliases(scratch / "source-aliases")
    pgdata = scratch / "windows" / "data"
    _initdb(binaries, account, pgdata, source.env(), "-E", "WIN1252", f"--locale={name}")
    server = _server(binaries, account, pgdata, source.env())
    server.start(60)
    try:
        _fill(server, "postgres")
    finally:
        server.stop()
    root = _volume(pgdata, account)
    locales = _locales_dir(scratch, account)
    termination = scratch / "termination-log"
    run = run_setup(binaries, account, pgdata, root, locales, termination)
    assert run.returncode == 0, run.output
    assert (locales / name / "LC_CTYPE").is_file()
    assert "rewrote the locale of 3 database(s)" in run.output
    assert _report(termination).needs_reindex == 3
    assert {(c, t) for _, c, t in _locales(binaries, account, pgdata, scratch)} == {("C", "C")}


def test_with_the_aliases_disabled_a_missing_locale_fails_clearly(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    pgdata = build_en_us_cluster(scratch, binaries, account, app=False)
    root = _volume(pgdata, account)
    locales = _locales_dir(scratch, account)
    termination = scratch / "termination-log"
    run = run_setup(
        binaries, account, pgdata, root, locales, termination, PGRO_LOCALE_ALIASES="off"
    )
    assert run.returncode == 1, run.output
    assert "LocaleUnavailable" in run.output
    assert "en_US.UTF-8" in run.output
    assert "PGRO_LOCALE_ALIASES" in run.output
    # Not a WAL problem: nothing reset, nothing rewritten, nothing built.
    assert "pg_resetwal" not in run.output
    assert not (root / FIX_RESET_WAL_FLAG).exists()
    assert not (root / NEEDS_REINDEX_MARKER).exists()
    assert list(locales.iterdir()) == []
    report = _report(termination)
    assert report.locale is False
    assert "LocaleUnavailable" in report.failure and "en_US.UTF-8" in report.failure


def test_a_sound_cluster_gets_no_rewrite_and_no_locales(
    binaries: PostgresBinaries, account: RunAccount, scratch: Path
) -> None:
    from tests.integration.test_kube_setup_script import new_cluster

    pgdata, root = new_cluster(binaries, account, scratch)
    locales = _locales_dir(scratch, account)
    termination = scratch / "termination-log"
    os.chmod(pgdata, 0o700)
    with started(binaries, account, pgdata, scratch) as server, server.local("postgres") as c:
        before = c.execute("SELECT datname, datcollate FROM pg_database").fetchall()
    os.chmod(pgdata, 0o770)
    run = run_setup(binaries, account, pgdata, root, locales, termination)
    assert run.returncode == 0, run.output
    assert "rewrote the locale" not in run.output
    assert not (root / NEEDS_REINDEX_MARKER).exists()
    assert not (root / FIX_LOCALE_FLAG).exists()
    assert list(locales.iterdir()) == []
    assert _report(termination) == SetupReport()
    with started(binaries, account, pgdata, scratch) as server, server.local("postgres") as c:
        assert c.execute("SELECT datname, datcollate FROM pg_database").fetchall() == before
