"""The restore step: download a snapshot, find PGDATA in it, make it startable.

This is the work the reference does in its restore Job and `setup-auth` init container.
The embedded runtime runs it in a local worker process, the Kubernetes runtime inside the
restore pod (`pgro.pipeline.job` describes the job both hand out), verification in-process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pgro.core.snapshot import Snapshot
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.events import Observer
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, ServerInstall, find_binaries
from pgro.postgres.confine import sanitise_tree
from pgro.postgres.layout import DataDirectory, locate_data_directory
from pgro.postgres.repair import DEFAULT_HBA, Repairs, prepare_data_directory


@dataclass
class RestoredDataDirectory:
    root: Path
    data: DataDirectory
    # What will serve it: this machine's install, or the image a Kubernetes pod runs.
    server: ServerInstall
    repairs: Repairs
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def binaries(self) -> PostgresBinaries:
        """This machine's install, to start the server here (verification, `pgro run`)."""
        assert isinstance(self.server, PostgresBinaries), "prepared for a server image"
        return self.server


def restore_snapshot(
    repo: KopiaRepository,
    snapshot: Snapshot,
    target: Path,
    account: RunAccount,
    observer: Observer,
    *,
    parallel: int | None = None,
    cancel: threading.Event | None = None,
    settings: Mapping[str, str] | None = None,
    install: Callable[[str], ServerInstall] = find_binaries,
    hba: str = DEFAULT_HBA,
) -> RestoredDataDirectory:
    """Restore `snapshot` into `target` and prepare its PGDATA for `account` and the
    server `install` returns for its major version."""
    observer.step(
        "restore",
        f"restoring snapshot {snapshot.id} ({snapshot.size_bytes} bytes) "
        f"from the {repo.description}",
    )
    started = time.monotonic()
    try:
        repo.restore(
            snapshot.id,
            target,
            parallel=parallel,
            on_progress=observer.restore_progress,
            cancel=cancel,
        )
    except BaseException:
        # A partial download may be kept for inspection: it must be as inert as a full one
        # (kopia restores no permission bits, so this is the second line of defence).
        with contextlib.suppress(OSError):
            sanitise_tree(target)
        raise
    # Before anything looks inside: the snapshot is untrusted.
    sanitised = sanitise_tree(target)
    downloaded = time.monotonic()
    observer.step("locate", "locating the PostgreSQL data directory")
    data = locate_data_directory(target, sanitised.removed_links)
    observer.note(
        f"PGDATA is {data.path.relative_to(target) or '.'} (PostgreSQL {data.major}, "
        f"found via {data.found_via})"
    )
    server = install(data.major)
    observer.step("repair", f"preparing the data directory for PostgreSQL {data.major}")
    repairs = prepare_data_directory(
        target,
        data.path,
        server,
        account,
        settings=settings,
        hba=hba,
        removed_links=sanitised.removed_links,
    )
    for note in repairs.notes:
        observer.note(note)
    timings = {"download": downloaded - started, "prepare": time.monotonic() - downloaded}
    return RestoredDataDirectory(
        root=target, data=data, server=server, repairs=repairs, timings=timings
    )
