"""`pgro run` end to end: the real process, real kopia, PostgreSQL and PgBouncer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgro.runtimes.embedded.store import Store
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import (
    PASSWORD,
    PGRO,
    Backups,
    StartRun,
    connect,
    manifest_for,
    marker,
    phases,
)


def test_analytics_replica_switches_over_to_a_newer_snapshot(
    backups: Backups,
    scratch: Path,
    start_run: StartRun,
    webhook: tuple[str, list[dict[str, Any]]],
) -> None:
    first = backups.snapshot("old")
    url, received = webhook
    manifest = manifest_for(
        scratch / "m.yaml",
        backups,
        schedule="* * * * *",
        switchoverGracePeriod="5s",
        notifications=[{"target": "webhook", "url": url}],
    )
    run = start_run(manifest)
    run.wait_for(
        "the first restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
    )
    entry = run.replica("orders")
    serving = entry["status"]["currentRestore"]
    assert phases(entry) == {serving: "Active"}
    address = entry["endpoint"]
    assert marker(entry) == "old"
    # The analytics user is read-only.
    with connect(entry) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("INSERT INTO marker VALUES ('write')")

    # The switchover was announced to the webhook, and its delivery recorded in status.
    run.wait_for(
        "the notification status",
        lambda: run.replica("orders")["status"]["notifications"][0]["success"] is True,
    )
    assert received[0]["replica"] == {"name": "orders", "namespace": "default"}
    assert received[0]["restore"]["name"] == serving
    assert received[0]["connectionInfo"]["port"] == address["port"]
    assert "password" not in received[0]["connectionInfo"]  # includePassword is false

    held = connect(entry)  # a client that stays connected across the switchover
    assert held.execute("SELECT v FROM marker").fetchone() == ("old",)
    second = backups.snapshot("new")
    assert second != first
    run.wait_for(
        "the switchover to the new snapshot",
        lambda: run.replica("orders")["status"].get("currentRestore") not in (None, serving),
        timeout=180,
    )
    entry = run.replica("orders")
    assert entry["endpoint"] == address  # clients keep one address
    assert marker(entry) == "new"
    # The old restore serves its existing clients until the grace period ends, then goes.
    run.wait_for(
        "the sweep of the old restore", lambda: serving not in phases(run.replica("orders"))
    )
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT v FROM marker")
    held.close()
    assert marker(run.replica("orders")) == "new"
    assert run.metric("postgres_restore_switchovers_total") == 2
    assert run.metric("postgres_restore_started_total") == 2
    assert not (run.state / "restores" / "default" / serving).exists()
    assert run.stop() == 0


def test_ephemeral_replica_verifies_once_per_snapshot(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("v1")
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc("kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        replica_doc("verify", ephemeral=True, schedule="* * * * *", scheduleJitter="0s"),
    )
    run = start_run(manifest)
    run.wait_for(
        "the verification", lambda: bool(run.replica("verify")["status"].get("verifiedSnapshotId"))
    )
    entry = run.replica("verify")
    verified = entry["status"]["verifiedSnapshotId"]
    run.wait_for("the teardown", lambda: run.replica("verify")["restores"] == [])
    assert "currentRestore" not in run.replica("verify")["status"]
    assert run.metric("postgres_restore_started_total") == 1
    # Several schedule fires later, the same snapshot is not restored again.
    fires = run.replica("verify")["status"]["nextScheduledRestore"]
    run.wait_for(
        "two schedule fires",
        lambda: run.replica("verify")["status"]["nextScheduledRestore"] > fires,
        timeout=150,
    )
    assert run.metric("postgres_restore_started_total") == 1
    assert run.replica("verify")["restores"] == []
    # A newer snapshot: exactly one more verification.
    second = backups.snapshot("v2")
    run.wait_for(
        "the second verification",
        lambda: run.replica("verify")["status"].get("verifiedSnapshotId") == second,
        timeout=150,
    )
    assert verified != second
    assert run.metric("postgres_restore_started_total") == 2
    assert run.stop() == 0
    leftovers = run.state / "restores" / "default"
    assert not leftovers.exists() or os.listdir(leftovers) == []


def postmasters_under(path: Path) -> list[int]:
    """Live postmasters whose data directory is under `path`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/postgres") and b"-D" in args:
            data = args[args.index(b"-D") + 1].decode()
            if data.startswith(str(path)):
                found.append(int(pid))
    return found


def test_kill_9_during_restore_and_after_verification_converges(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("only")
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc("kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        replica_doc("orders", ephemeral=False, scheduleJitter="0s"),
        replica_doc("verify", ephemeral=True, scheduleJitter="0s"),
    )
    run = start_run(manifest)
    run.wait_for(
        "a restore in progress",
        lambda: any(p in ("Pending", "Restoring") for p in phases(run.replica("orders")).values()),
    )
    run.proc.kill()  # kill -9: no cleanup at all
    run.proc.wait()

    again = start_run(manifest)
    again.wait_for(
        "orders to serve", lambda: again.replica("orders")["status"].get("phase") == "Ready"
    )
    again.wait_for(
        "verify to verify",
        lambda: bool(again.replica("verify")["status"].get("verifiedSnapshotId")),
    )
    again.wait_for("verify's teardown", lambda: again.replica("verify")["restores"] == [])
    orders = again.replica("orders")
    assert len(orders["restores"]) == 1  # no duplicate restore of the same snapshot
    assert list(phases(orders).values()) == ["Active"]
    assert marker(orders) == "only"
    # One server: the serving restore's. The verification's server is gone with it.
    assert len(postmasters_under(again.state)) == 1

    again.proc.kill()  # right after verification
    again.proc.wait()
    third = start_run(manifest)
    third.wait_for("orders to serve", lambda: marker(third.replica("orders")) == "only")
    time.sleep(3)  # several passes: a re-restore would have started by now
    assert third.replica("verify")["restores"] == []
    assert third.metric("postgres_restore_started_total") == 0
    assert len(postmasters_under(third.state)) == 1
    assert third.stop() == 0
    assert postmasters_under(third.state) == []


def test_bad_input_keeps_the_process_and_other_replicas_running(
    fs_repo: Any, backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("good")
    repo = {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc("kopia", repo),
        secret_doc("wrong", {**repo, "repositoryPassword": "not-the-password"}),
        secret_doc(
            "fixtures",
            {"filesystemPath": str(fs_repo.path), "repositoryPassword": fs_repo.password},
        ),
        replica_doc("good", ephemeral=False),
        replica_doc("badcron", schedule="61 * * * *"),
        replica_doc("nosecret", secret="absent"),
        replica_doc("wrongpw", secret="wrong"),
        replica_doc("notpg", secret="fixtures", snapshotFilter={"hostPattern": "files-host"}),
    )
    run = start_run(manifest)
    run.wait_for("good to serve", lambda: run.replica("good")["status"].get("phase") == "Ready")

    def condition(name: str, type_: str) -> dict[str, Any]:
        conds = run.replica(name)["status"].get("conditions", [])
        return next(c for c in conds if c["type"] == type_)

    run.wait_for(
        "the cron condition", lambda: condition("badcron", "ScheduleValid")["status"] == "False"
    )
    assert "61 * * * *" in condition("badcron", "ScheduleValid")["message"]
    run.wait_for(
        "the secret condition",
        lambda: condition("nosecret", "KopiaSecretValid")["reason"] == "SecretNotFound",
    )
    run.wait_for(
        "the listing failure",
        lambda: condition("wrongpw", "SnapshotAvailable")["status"] == "False",
    )
    assert "repository password is wrong" in condition("wrongpw", "SnapshotAvailable")["message"]
    assert "not-the-password" not in json.dumps(run.status())
    run.wait_for(
        "the failed restore of a non-PostgreSQL snapshot",
        lambda: "NotPostgres" in json.dumps(run.replica("notpg")["status"]),
        timeout=120,
    )
    assert run.proc.poll() is None
    assert marker(run.replica("good")) == "good"
    assert run.replica("badcron")["restores"] == []
    assert run.stop() == 0


def store_phases(state: Path) -> dict[str, str]:
    """Restore phases read straight from the state database (fast enough to catch a switch)."""
    from pgro.runtimes.embedded.store import Store

    db = state / "state.db"
    if not db.exists():
        return {}
    store = Store(db)
    try:
        return {r.name: str(r.effective_phase) for r in store.restores()}
    finally:
        store.close()


def test_kill_9_during_switchover_converges(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("old")
    manifest = manifest_for(
        scratch / "m.yaml", backups, schedule="* * * * *", switchoverGracePeriod="3s"
    )
    run = start_run(manifest)
    run.wait_for(
        "the first restore", lambda: run.replica("orders")["status"].get("phase") == "Ready"
    )
    first = run.replica("orders")["status"]["currentRestore"]
    backups.snapshot("new")
    seen = ""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        others = {n: p for n, p in store_phases(run.state).items() if n != first}
        seen = next(iter(others.values()), "")
        if seen in ("Switching", "Active"):
            break
        time.sleep(0.02)
    assert seen in ("Switching", "Active"), store_phases(run.state)
    run.proc.kill()  # in the middle of the switchover (or right after it)
    run.proc.wait()

    again = start_run(manifest)
    again.wait_for(
        "the new restore to serve",
        lambda: again.replica("orders")["status"].get("currentRestore") not in (None, first),
    )
    again.wait_for(
        "the sweep of the old restore", lambda: first not in phases(again.replica("orders"))
    )
    entry = again.replica("orders")
    assert list(phases(entry).values()) == ["Active"]
    assert marker(entry) == "new"
    assert len(postmasters_under(again.state)) == 1
    assert again.stop() == 0


WRITABLE = "-c default_transaction_read_only=off"


def test_keep_serving_leaves_the_endpoint_up_and_the_next_run_adopts_it(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("kept")
    manifest = manifest_for(scratch / "m.yaml", backups)
    run = start_run(manifest, "--keep-serving")
    state = run.state
    run.wait_for("serving", lambda: run.replica("orders")["status"].get("phase") == "Ready")
    entry = run.replica("orders")
    assert run.stop() == 0
    # Still serving with pgro stopped.
    assert marker(entry) == "kept"
    servers = postmasters_under(state)
    assert len(servers) == 1
    # As a kill -9 between the server's start and its first provisioning leaves it: ready,
    # without its login roles, and no record of a provisioning.
    serving = entry["status"]["currentRestore"]
    store = Store(state / "state.db")
    store.delete_setting(f"server-provisioned/default/{serving}")
    socket_dir = store.setting(f"server-socket/default/{serving}")
    port = store.setting(f"server-port/default/{serving}")
    assert socket_dir and port
    for dbname in ("myapp", "postgres"):
        with psycopg.connect(
            host=socket_dir,
            port=port,
            user="postgres",
            dbname=dbname,
            autocommit=True,
            options=WRITABLE,
        ) as conn:
            conn.execute("DROP OWNED BY analytics")
    with psycopg.connect(
        host=socket_dir,
        port=port,
        user="postgres",
        dbname="postgres",
        autocommit=True,
        options=WRITABLE,
    ) as conn:
        # PgBouncer's pooled sessions of the role go too.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'analytics'"
        )
        conn.execute("DROP ROLE analytics")

    again = start_run(manifest)
    again.wait_for(
        "a pass over the adopted restore",
        lambda: again.replica("orders")["status"].get("phase") == "Ready",
    )
    time.sleep(2)
    assert postmasters_under(state) == servers  # adopted, not started twice
    assert again.metric("postgres_restore_started_total") == 0
    assert marker(again.replica("orders")) == "kept"
    assert again.stop() == 0
    assert postmasters_under(state) == []


def test_manifest_changes_are_picked_up_and_bad_edits_do_not_disturb(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("m")
    secret = secret_doc(
        "kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}
    )
    manifest = write_manifest(scratch / "m.yaml", secret, replica_doc("one", ephemeral=False))
    run = start_run(manifest)
    run.wait_for("one to serve", lambda: run.replica("one")["status"].get("phase") == "Ready")

    # A broken edit is reported and ignored: "one" keeps serving.
    manifest.write_text("kind: [unclosed\n")
    run.wait_for("the error in the log", lambda: "manifest not reloaded" in run.log.read_text())
    assert marker(run.replica("one")) == "m"
    # Reported once per change, not every pass (before: every pass, as the file's time was
    # recorded only by a load that worked).
    time.sleep(3)
    assert run.log.read_text().count("manifest not reloaded") == 1
    # Bytes that are not UTF-8 (before: a traceback that ended pgro run, orphaning workers).
    manifest.write_bytes(b"kind: Secret\nmetadata: {name: \xff\xfe}\n")
    run.wait_for(
        "the second error", lambda: run.log.read_text().count("manifest not reloaded") == 2
    )
    time.sleep(2)
    assert run.proc.poll() is None
    assert run.log.read_text().count("manifest not reloaded") == 2
    assert marker(run.replica("one")) == "m"

    # A second replica added; SIGHUP forces the re-read even without a new mtime.
    write_manifest(
        manifest, secret, replica_doc("one", ephemeral=False), replica_doc("two", ephemeral=False)
    )
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for("two to serve", lambda: run.replica("two")["status"].get("phase") == "Ready")
    assert marker(run.replica("one")) == "m"

    # A replica removed from the manifests is torn down with its restores.
    write_manifest(manifest, secret, replica_doc("two", ephemeral=False))
    run.wait_for("one to be gone", lambda: [r["name"] for r in run.status()] == ["two"])
    assert len(postmasters_under(run.state)) == 1
    assert run.stop() == 0


def test_a_restore_that_does_not_fit_on_the_disk_fails_clearly(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    backups.snapshot("big")
    small = scratch / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0711", "tmpfs", str(small)], check=True
    )
    try:
        manifest = manifest_for(scratch / "m.yaml", backups)
        run = start_run(manifest, state=small / "state")
        try:
            run.wait_for(
                "the restore to fail",
                lambda: "InsufficientDisk" in json.dumps(run.replica("orders")["status"]),
            )
            text = json.dumps(run.replica("orders")["status"])
            assert "storageSize" in text and "MiB free" in text
            assert run.metric("postgres_restore_failed_total") == 1
        finally:
            run.stop()
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- issue 18: the state directory, untrusted files, failing steps -------------------------


def test_an_unusable_manifest_or_state_dir_at_start_exits_2(scratch: Path) -> None:
    """Before: an invalid manifest left a process that logged the error every second, a
    non-UTF-8 one a traceback (exit 1), and any --state-dir was chmodded to 0711."""

    def start(manifest: Path, state: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PGRO, "run", "-f", str(manifest), "--state-dir", str(state), "--tick", "0.3"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    invalid = scratch / "invalid.yaml"
    invalid.write_text("kind: [unclosed\n")
    done = start(invalid, scratch / "s1")
    assert done.returncode == 2, done.stderr
    assert "invalid YAML" in done.stderr and "Traceback" not in done.stderr
    assert not (scratch / "s1").exists(), "a refused start created its state directory"

    binary = scratch / "nonutf8.yaml"
    binary.write_bytes(b"apiVersion: v1\nkind: Secret\nmetadata: {name: k\xff\xfe}\n")
    done = start(binary, scratch / "s2")
    assert done.returncode == 2, done.stderr
    assert "UTF-8" in done.stderr and "Traceback" not in done.stderr
    assert not (scratch / "s2").exists()

    # Someone's home (or /tmp): refused, its mode untouched, nothing added.
    home = scratch / "home"
    home.mkdir()
    (home / ".profile").write_text("")
    os.chmod(home, 0o750)
    good = write_manifest(scratch / "good.yaml", replica_doc("r", secret=None))
    done = start(good, home)
    assert done.returncode == 2, done.stderr
    assert str(home) in done.stderr and "--state-dir" in done.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o750
    assert sorted(p.name for p in home.iterdir()) == [".profile"]


def _readable_by_others(root: Path, skip: Path) -> list[str]:
    """Entries under `root` that users other than the owner can read or list."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            path = here / name
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode) or path == skip:
                continue
            if st.st_mode & 0o044:
                found.append(f"{stat.filemode(st.st_mode)} {path.relative_to(root)}")
    return found


def test_state_files_are_private_and_a_forged_postmaster_pid_is_not_trusted(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("private")
    manifest = manifest_for(scratch / "m.yaml", backups, extraUsers=["reporter"])
    run = start_run(manifest, "--keep-serving")
    run.wait_for("serving", lambda: run.replica("orders")["status"].get("phase") == "Ready")
    entry = run.replica("orders")
    serving = entry["status"]["currentRestore"]
    rdir = run.state / "restores" / "default" / serving
    assert (rdir / "result.json").exists() and (rdir / "postgres.log").exists()

    # Item 11: nothing in the state directory is readable or listable by other users (the
    # restored tree itself is the snapshot's, below a 0711 directory; not pgro's files).
    assert _readable_by_others(run.state, skip=rdir / "data") == []
    assert stat.S_IMODE(run.state.stat().st_mode) == 0o711
    for private in ("credentials", "kopia"):
        assert stat.S_IMODE((run.state / private).stat().st_mode) == 0o700
    if os.geteuid() == 0:
        for path, verb in (
            (run.state / "state.db", "cat"),
            (run.state / "state.db-wal", "cat"),
            (rdir / "postgres.log", "cat"),
            (rdir / "work.log", "cat"),
            (rdir / "result.json", "cat"),
            (run.state / "restores", "ls"),
            (run.state / "endpoints", "ls"),
        ):
            other = subprocess.run(
                ["runuser", "-u", "nobody", "--", verb, str(path)], capture_output=True
            )
            assert other.returncode != 0, f"nobody could {verb} {path}"
    assert run.stop() == 0

    # Item 13: the server is gone; its postmaster.pid (the run account's file) now names an
    # unrelated process and a directory elsewhere. The next run deletes the restore (the
    # replica left the manifest) and must neither signal that process nor remove that path.
    pgdata = Path(json.loads((rdir / "result.json").read_text())["pgdata"])
    (server_pid,) = postmasters_under(run.state)
    os.kill(server_pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while postmasters_under(run.state) and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = subprocess.Popen(["sleep", "300"])
    victim_dir = Path(tempfile.mkdtemp(prefix="pgro-sock-", dir="/tmp"))
    (victim_dir / "keep").write_text("not pgro's")
    try:
        (pgdata / "postmaster.pid").write_text(
            f"{victim.pid}\n{pgdata}\n1700000000\n5432\n{victim_dir}\n\n  1  2\nready   \n"
        )
        write_manifest(
            manifest,
            secret_doc(
                "kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}
            ),
        )
        again = start_run(manifest)
        again.wait_for("the replica's removal", lambda: again.status() == [])
        assert not rdir.exists()
        time.sleep(1)
        assert victim.poll() is None, "root signalled a pid read from postmaster.pid"
        assert (victim_dir / "keep").exists(), "root removed a path read from postmaster.pid"
        assert again.stop() == 0
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(victim_dir, ignore_errors=True)


def test_a_failing_step_backs_off_and_is_logged_once(scratch: Path, start_run: StartRun) -> None:
    """Item 20: PgBouncer cannot start. Before: an ERROR line every pass (every 0.3 s here)
    and nothing in `pgro status`."""
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc(
            "kopia", {"filesystemPath": str(scratch / "no-repo"), "repositoryPassword": "x"}
        ),
        replica_doc("orders", ephemeral=False),
    )
    run = start_run(manifest, env={"PGRO_PGBOUNCER": "/bin/false"})

    def failures() -> list[str]:
        return [
            line
            for line in run.log.read_text().splitlines()
            if "EnsureReplicaResources" in line and '"level": "error"' in line
        ]

    run.wait_for("the failure", lambda: len(failures()) > 0)
    time.sleep(8)  # about 26 passes; the retries come after 1, 2 and 4 s
    assert run.proc.poll() is None
    assert len(failures()) == 1, failures()
    conds = run.replica("orders")["status"]["conditions"]
    steps = next(c for c in conds if c["type"] == "StepsSucceeding")
    assert steps["status"] == "False" and steps["reason"] == "StepFailing"
    assert "EnsureReplicaResources" in steps["message"]
    text = subprocess.run(
        [PGRO, "status", "--state-dir", str(run.state)], capture_output=True, text=True, check=True
    ).stdout
    assert "StepsSucceeding=False StepFailing" in text
    events = [e["reason"] for e in run.replica("orders")["events"]]
    assert events.count("StepFailed") == 1
    assert run.stop() == 0


def test_a_state_dir_under_a_private_parent_works(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    """Item 19: `--state-dir /root/pgro` as root. Before: PostgreSQL and PgBouncer (run as
    postgres) could not reach their files, and the error repeated every second."""
    if os.geteuid() != 0:
        pytest.skip("the run account differs from this user only as root")
    from pgro.runtimes.embedded.state_dir import fallback_run_root

    backups.snapshot("pp")
    private = scratch / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    state = private / "state"
    fallback = fallback_run_root(state)
    try:
        run = start_run(manifest_for(scratch / "m.yaml", backups), state=state)
        run.wait_for("serving", lambda: run.replica("orders")["status"].get("phase") == "Ready")
        assert marker(run.replica("orders")) == "pp"
        assert stat.S_IMODE(private.stat().st_mode) == 0o700  # not opened up
        assert (fallback / "restores" / "default").is_dir()
        assert not (state / "restores").exists()
        assert stat.S_IMODE(fallback.stat().st_mode) == 0o711
        assert run.stop() == 0
        assert postmasters_under(fallback) == []
    finally:
        shutil.rmtree(fallback, ignore_errors=True)


def test_an_idle_replica_writes_nothing_and_is_not_reconciled_every_tick(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    """Issue 11: objects are reconciled when due or changed. Before: every replica and
    restore on every tick (0.3 s here), ~40 passes in the window below."""
    backups.snapshot("idle")
    manifest = manifest_for(scratch / "m.yaml", backups, schedule="0 0 1 1 *")
    run = start_run(manifest)
    run.wait_for("serving", lambda: run.replica("orders")["status"].get("phase") == "Ready")
    db = [run.state / "state.db", run.state / "state.db-wal"]

    def passes() -> float:
        return sum(
            run.metric(f'postgres_restore_reconciliations_total{{controller="{kind}"}}')
            for kind in ("replica", "restore")
        )

    def files() -> list[tuple[int, int]]:
        return [(p.stat().st_mtime_ns, p.stat().st_size) for p in db]

    time.sleep(3)  # the passes that follow the switchover settle
    before, written = passes(), files()
    time.sleep(6)  # 20 ticks
    assert files() == written, "pgro run wrote to its database in the steady state"
    assert passes() - before < 5
    # A reload makes every replica due: its pass finds nothing to change, and writes nothing.
    before = passes()
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for("a pass after the reload", lambda: passes() > before)
    time.sleep(1)
    assert files() == written, "a pass over an idle replica wrote to the database"
    assert marker(run.replica("orders")) == "idle"
    assert run.stop() == 0
