"""Each restore's local machinery in `pgro run`: its directory (`RUN/restores/<ns>/<name>/`,
docs/run.md), its worker (`pgro.pipeline.worker`) and its server (`ServerHandle`)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pgro.api.quantity import parse_quantity
from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.restore import PostgresPhysicalRestore
from pgro.api.secret import KopiaCredentials
from pgro.core import full_reindex, redaction
from pgro.core.access import analytics_owned_schemas, effective_read_only
from pgro.core.observations import RestoreWork, Server, WorkState
from pgro.kopia.cache import repository_cache_dir
from pgro.pipeline import worker
from pgro.pipeline.data_checks import replica_depth
from pgro.pipeline.job import CanopyProxy, RestoreJob, RestoreOutcome
from pgro.pipeline.schema_transfer import LocalCopy
from pgro.pipeline.switchover_users import persistent_passwords_to_keep
from pgro.postgres import restore_info
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, find_binaries
from pgro.postgres.login_hold import set_login
from pgro.postgres.server import Endpoint, free_port, socket_dir_for
from pgro.postgres.users import RoleCredentials, provision_users
from pgro.processes import stop, stop_pid
from pgro.runtimes.embedded.migrator import Runners
from pgro.runtimes.embedded.servers import ServerHandle, running_postmaster, stop_postmaster
from pgro.runtimes.embedded.state_dir import TRAVERSE, ensure_dirs
from pgro.runtimes.embedded.store import Store

log = logging.getLogger("pgro.run")

# A restore needs its `storageSize` free (the core already sizes it at 1.1x the snapshot,
# the reference's PVC sizing, which leaves room for WAL and temp files).
DISK_HEADROOM: Final = 1.0
WORKER_STOP_S: Final = 30.0
# A restore's persistent-schema copy works in this subdirectory (runtimes/embedded/schema_copy).
SCHEMA_COPY_DIRECTORY: Final = "schemas"
# A server pgro started is checked for an exit every pass (a wait() on our child); one
# adopted from an earlier run only through /proc, so less often.
ADOPTED_CHECK_S: Final = 10.0


def restore_key(restore: PostgresPhysicalRestore) -> str:
    return f"{restore.namespace}/{restore.name}"


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    exit_seen: bool = False


class Restores:
    """The directories, worker processes and servers of every restore of this run."""

    def __init__(
        self,
        store: Store,
        run_root: Path,
        account: RunAccount,
        *,
        kopia_cache: Path | None = None,
    ) -> None:
        self.store = store
        self.run_root = run_root
        self.account = account
        # Where kopia keeps a metadata cache per repository (`pgro.kopia.cache`), if at all.
        self.kopia_cache = kopia_cache
        self.workers: dict[str, _Worker] = {}
        self.servers: dict[str, ServerHandle] = {}
        self.runners = Runners()
        self._adopted_checked = 0.0

    # -- directories ----------------------------------------------------------------------
    def directory(self, restore: PostgresPhysicalRestore) -> Path:
        return self.run_root / "restores" / restore.namespace / restore.name

    def _make_directory(self, restore: PostgresPhysicalRestore) -> Path:
        # The server's account must traverse into it but not list or alter the rest.
        return ensure_dirs(self.run_root, ("restores", restore.namespace, restore.name), TRAVERSE)

    # -- observing ------------------------------------------------------------------------
    def observe(self, restore: PostgresPhysicalRestore) -> RestoreWork:
        rdir = self.directory(restore)
        result = worker.read_result(rdir)
        if result is not None:
            if result.ok:
                return RestoreWork.succeeded(
                    result.postgres_version, fixes=result.fixes, data_checks=result.checks
                )
            return RestoreWork.failed(result.failure, result.checks)
        w = self.workers.get(restore_key(restore))
        if w is not None:
            rc = w.process.poll()
            if rc is None:
                return RestoreWork.running()
            tail = _tail(rdir / worker.LOG)
            return RestoreWork.failed(f"the restore process exited with code {rc}: {tail}")
        if worker.leftover(rdir) is not None:
            return RestoreWork.running()  # started by a pgro run that was killed
        return RestoreWork.not_started()

    def server(self, restore: PostgresPhysicalRestore) -> Server:
        handle = self.servers.get(restore_key(restore))
        return handle.observe() if handle is not None else Server()

    def server_endpoint(self, key: str) -> Endpoint | None:
        handle = self.servers.get(key)
        return handle.endpoint if handle is not None else None

    def binaries(self, key: str) -> PostgresBinaries:
        handle = self.servers.get(key)
        if handle is None:
            raise RuntimeError(f"restore {key} has no running server")
        return handle.binaries

    def changed(self) -> list[str]:
        """Restores whose worker exited, or whose server stopped or became ready, since
        the last look: what their next pass must see now, not at its requeue time."""
        found = self.runners.exited()
        for key, w in self.workers.items():
            if not w.exit_seen and w.process.poll() is not None:
                w.exit_seen = True
                found.append(key)
        now = time.monotonic()
        adopted = now - self._adopted_checked >= ADOPTED_CHECK_S
        if adopted:
            self._adopted_checked = now
        for key, handle in self.servers.items():
            if handle.failure:
                continue
            if handle.child is not None:
                stopped = not handle.child.running()
            else:
                stopped = adopted and handle.adopted_pid is not None and not handle.alive()
            # Until its first pass as ready (which provisions its roles), a starting
            # server's postmaster.pid is read for the "ready" line.
            ready = not handle.provisioned and handle.ready()
            if stopped or ready:
                found.append(key)
        return found

    # -- the steps ------------------------------------------------------------------------
    def prepare_storage(self, restore: PostgresPhysicalRestore) -> None:
        rdir = self._make_directory(restore)
        if worker.read_result(rdir) is not None:
            return
        needed = int(parse_quantity(str(restore.spec.storage_size)) * DISK_HEADROOM)
        free = shutil.disk_usage(rdir).free
        if needed > free:
            refused = RestoreOutcome(
                ok=False,
                reason="InsufficientDisk",
                error=f"the restore needs {needed // 2**20} MiB (storageSize) but "
                f"{rdir.parent} has {free // 2**20} MiB free",
            )
            worker.write_result(rdir, refused)

    def start(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        creds: KopiaCredentials,
        proxy: Mapping[str, Any] | None,
    ) -> None:
        """Start the restore's worker, unless it runs or has finished."""
        if self.observe(restore).state is not WorkState.NOT_STARTED:
            return
        rdir = self._make_directory(restore)
        depth = replica_depth(replica)
        if depth.warning is not None:
            log.warning("%s: %s", replica.key, depth.warning)
        job = RestoreJob(
            snapshot_id=restore.spec.snapshot,
            credentials=creds,
            target=rdir / "data",
            kopia_dir=rdir / "kopia",
            snapshot_size=parse_quantity(restore.spec.snapshot_size),
            snapshot_time=restore.spec.snapshot_time or "",
            read_only=effective_read_only(replica, restore),
            extra_config=replica.spec.postgres_extra_config or "",
            proxy=CanopyProxy(rdir / "proxy-port", launch=proxy) if proxy is not None else None,
            verify_depth=depth.depth,
            kopia_cache=(
                repository_cache_dir(self.kopia_cache, creds.location)
                if self.kopia_cache is not None
                else None
            ),
        )
        self.workers[restore_key(restore)] = _Worker(worker.launch(job, rdir))
        log.info("restore %s: downloading snapshot %s", restore.name, restore.spec.snapshot)

    def cleanup(self, restore: PostgresPhysicalRestore) -> None:
        shutil.rmtree(self.directory(restore) / "kopia", ignore_errors=True)
        self.workers.pop(restore_key(restore), None)

    def ensure_server(
        self,
        replica: PostgresPhysicalReplica,
        restore: PostgresPhysicalRestore,
        users: Mapping[str, RoleCredentials],
    ) -> bool:
        """Run (or adopt) the restore's PostgreSQL. True when this run took it on just now."""
        rkey = restore_key(restore)
        handle = self.servers.get(rkey)
        new = handle is None
        if handle is None:
            rdir = self.directory(restore)
            result = worker.read_result(rdir)
            if result is None or not result.ok or not result.pgdata:
                raise RuntimeError(f"restore {restore.name} has no restored data yet")
            handle = ServerHandle(
                pgdata=Path(result.pgdata),
                socket_dir=self._socket_dir(rkey, rdir),
                port=self._port(rkey),
                log_path=rdir / "postgres.log",
                binaries=find_binaries(result.postgres_version or ""),
                account=self.account,
                provision=_provisioner(replica, restore, users, self.store),
            )
            self.servers[rkey] = handle
        handle.ensure()
        if new and handle.provisioned and self.store.setting(_provisioned(rkey)) is None:
            # Adopted ready from an earlier run that stopped before provisioning it.
            handle.provisioned = False
        return new

    def _port(self, rkey: str) -> int:
        setting = f"server-port/{rkey}"
        stored = self.store.setting(setting)
        if stored:
            return int(stored)
        port = free_port()
        self.store.set_setting(setting, str(port))
        return port

    def _socket_dir(self, rkey: str, rdir: Path) -> Path:
        """Chosen once and remembered: an adopted server is reached (and its directory
        removed) by pgro's record, never by its postmaster.pid."""
        setting = f"server-socket/{rkey}"
        stored = self.store.setting(setting)
        if stored:
            path = Path(stored)
            if path == rdir / "run" or _our_tmp_socket_dir(path, self.account.uid):
                return path
        path = socket_dir_for(rdir / "run")
        self.store.set_setting(setting, str(path))
        return path

    # -- deleting -------------------------------------------------------------------------
    def delete(self, restore: PostgresPhysicalRestore) -> None:
        """Stop the restore's worker and server, remove its files, settings and object."""
        rkey = restore_key(restore)
        rdir = self.directory(restore)
        w = self.workers.pop(rkey, None)
        if w is not None:
            stop(w.process, WORKER_STOP_S)
        pid = worker.leftover(rdir)
        if pid is not None:
            stop_pid(pid, WORKER_STOP_S)
        # Its migrator stops before its server (it records that it was stopped).
        self.runners.stop(rkey, rdir)
        # A persistent-schema copy into this restore stops first (its processes would
        # outlive the directory).
        LocalCopy(rdir / SCHEMA_COPY_DIRECTORY, self.account).discard()
        handle = self.servers.pop(rkey, None)
        remembered = self.store.setting(f"server-socket/{rkey}")
        if handle is None:
            # Possibly left running by an earlier pgro run: adopt it only to stop it (if
            # /proc shows it is that server, whatever postmaster.pid claims).
            result = worker.read_result(rdir)
            if result is not None and result.pgdata:
                pgdata = Path(result.pgdata)
                found = running_postmaster(pgdata, self.account)
                if found is not None:
                    stop_postmaster(found.pid, pgdata, self.account)
        else:
            handle.stop()
        if remembered:
            _remove_outside(Path(remembered), rdir)
        shutil.rmtree(rdir, ignore_errors=True)
        self.store.delete_setting(f"server-port/{rkey}")
        self.store.delete_setting(_provisioned(rkey))
        self.store.delete_setting(f"server-socket/{rkey}")
        self.store.delete_restore(rkey)
        log.info("restore %s deleted", rkey)

    def shutdown(self, keep_serving: bool) -> None:
        """Workers always stop (a restore restarts on the next run); servers unless kept."""
        for key, w in self.workers.items():
            if w.process.poll() is None:
                log.info("stopping restore work %s (it restarts on the next run)", key)
                w.process.terminate()  # all at once; each is waited for below
        for w in self.workers.values():
            stop(w.process, WORKER_STOP_S)
        if keep_serving:
            return  # a running migrator too: the next run adopts it
        # Before the servers they talk to (also those adopted from an earlier run); each
        # records that it was stopped.
        self.runners.stop_all()
        for key in self.servers:
            namespace, name = key.split("/", 1)
            self.runners.stop(key, self.run_root / "restores" / namespace / name)
        for key, handle in self.servers.items():
            log.info("stopping PostgreSQL of %s", key)
            handle.stop()
            _remove_outside(handle.socket_dir, self.run_root)


def _provisioned(rkey: str) -> str:
    """The setting recording that a restore's server was provisioned once (its roles reset)."""
    return f"server-provisioned/{rkey}"


def _provisioner(
    replica: PostgresPhysicalReplica,
    restore: PostgresPhysicalRestore,
    users: Mapping[str, RoleCredentials],
    store: Store,
) -> Callable[[Endpoint], None]:
    analytics = users[replica.spec.analytics_username]
    extras = [(u, users[u.name]) for u in replica.spec.extra_users if u.name in users]
    read_only = effective_read_only(replica, restore)
    owned_schemas = analytics_owned_schemas(replica, restore)

    setting = _provisioned(restore_key(restore))

    def provision(endpoint: Endpoint) -> None:
        # Again (after a PostgreSQL restart): what analytics owns by now it made itself or
        # the persistent-schema copy made as it; only the first run hands a restored
        # analytics role's objects to the superuser.
        again = store.setting(setting) is not None
        report = provision_users(
            lambda db: endpoint.conninfo(db, "postgres"),
            analytics=analytics,
            extra_users=extras,
            read_only=read_only,
            persistent_schemas=owned_schemas,
            # Their passwords are set at the switchover and must survive a restart.
            other_managed_roles=persistent_passwords_to_keep(
                replica, store.restore(restore_key(restore)) or restore
            ),
            keep_analytics_ownership=again,
        )
        if redaction.holds_logins(replica, restore):
            # Reachable on its own port before the switchover: no user reads it unredacted.
            set_login(
                lambda db: endpoint.conninfo(db, "postgres"),
                redaction.held_roles(replica),
                login=False,
            )
        # Before the server counts as ready: clients can tell which restore they reach.
        notes = restore_info.record_restore(
            endpoint.conninfo(restore_info.DATABASE, "postgres"),
            restore_info.RestoreInfo.of(restore, reindex_pending=full_reindex.pending(restore)),
            analytics=analytics.username,
            analytics_may_write=not read_only,
        )
        for note in [*report.catalog_notes, *notes]:
            log.warning("restore %s: %s", restore.name, note)
        if not again:
            store.set_setting(setting, "1")

    return provision


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _our_tmp_socket_dir(path: Path, run_uid: int) -> bool:
    """A remembered /tmp socket directory that is still the one pgro made (not replaced by
    a link or someone else's directory; /tmp is everybody's)."""
    if path.parent != Path("/tmp") or not path.name.startswith("pgro-sock-"):  # noqa: S108
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (os.geteuid(), run_uid)


def _remove_outside(socket_dir: Path, restore_dir: Path) -> None:
    """Remove a socket directory pgro made (and remembered) in /tmp for a too-long path."""
    if not socket_dir.is_relative_to(restore_dir) and socket_dir.name.startswith("pgro-sock-"):
        shutil.rmtree(socket_dir, ignore_errors=True)
