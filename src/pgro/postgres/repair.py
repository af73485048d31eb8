"""Repairing a restored data directory so PostgreSQL starts on this machine.

Each repair is recorded under a stable name (the reference's "fixes", extended), so a
verification report says exactly what had to be changed to bring the backup up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import ServerInstall
from pgro.postgres.config import MINIMAL_CONFIG, meaningful_lines, rewrite_config

# The reference's four keys first; pgro's additional repairs after.
FIX_NAMES = (
    "locale",
    "reindex",
    "reset_wal",
    "recreated_pg_wal",
    "removed_stale_pid",
    "removed_standby_signal",
    "removed_recovery_signal",
    "synthesized_config",
    "cleared_auto_conf",
    "neutralised_settings",
)

# Directories PostgreSQL expects that can legitimately be empty, so backup tools and
# filesystem snapshots sometimes drop them.
EMPTY_DIRS = (
    "pg_notify",
    "pg_tblspc",
    "pg_replslot",
    "pg_twophase",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_logical",
    "pg_logical/snapshots",
    "pg_logical/mappings",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_serial",
    "pg_subtrans",
)

# Local connections only through the private socket directory (mode 0700), so `trust` on
# the socket is safe; TCP always needs a password.
DEFAULT_HBA = """\
# Written by pgro. The socket directory is private to the server's account.
local   all  all                 trust
host    all  all  127.0.0.1/32   scram-sha-256
host    all  all  ::1/128        scram-sha-256
"""


@dataclass
class Repairs:
    fixes: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(FIX_NAMES, False))
    notes: list[str] = field(default_factory=list)

    def record(self, name: str, note: str) -> None:
        assert name in self.fixes, name
        self.fixes[name] = True
        self.notes.append(note)


def default_settings(shared_buffers_mb: int = 128) -> dict[str, str]:
    """Settings every restored server gets, whatever the source had."""
    return {
        "logging_collector": "off",
        "log_destination": "stderr",
        "dynamic_shared_memory_type": "posix",
        "shared_buffers": f"{shared_buffers_mb}MB",
        "archive_mode": "off",
        "ssl": "off",
        "password_encryption": "scram-sha-256",
        "lc_messages": "C",
        "lc_monetary": "C",
        "lc_numeric": "C",
        "lc_time": "C",
    }


def _include_allowed(pgdata: Path, target: str) -> bool:
    """Keep an include only if it resolves inside the data directory and exists.

    An absolute include names the source host's /etc; on this machine that path is either
    missing (startup fails) or someone else's configuration.
    """
    path = (pgdata / target).resolve()
    return path.is_relative_to(pgdata.resolve()) and path.exists()


def prepare_data_directory(
    restore_root: Path,
    pgdata: Path,
    binaries: ServerInstall,
    account: RunAccount,
    *,
    settings: Mapping[str, str] | None = None,
    hba: str = DEFAULT_HBA,
) -> Repairs:
    """Make `pgdata` (inside `restore_root`) startable by `account`. Idempotent.

    `binaries` is the PostgreSQL that will serve the data: the local install, or the
    server image a Kubernetes Deployment will run (which this process cannot execute).
    """
    repairs = Repairs()

    pid = pgdata / "postmaster.pid"
    if pid.exists():
        pid.unlink()
        repairs.record("removed_stale_pid", "removed postmaster.pid copied from the running source")
    for signal_file, name in (
        ("standby.signal", "removed_standby_signal"),
        ("recovery.signal", "removed_recovery_signal"),
    ):
        if (pgdata / signal_file).exists():
            (pgdata / signal_file).unlink()
            repairs.record(
                name, f"removed {signal_file} so the restore starts as a primary, not a standby"
            )

    wal_dir = "pg_xlog" if binaries.major.startswith("9.") else "pg_wal"
    wal = pgdata / wal_dir
    if wal.is_symlink() and not wal.exists():
        wal.unlink()  # WAL lived on another volume of the source host
    if not wal.exists():
        (wal / "archive_status").mkdir(parents=True)
        repairs.record("recreated_pg_wal", f"created the missing {wal_dir} directory")
    else:
        (wal / "archive_status").mkdir(exist_ok=True)
    missing = [d for d in EMPTY_DIRS if not (pgdata / d).exists()]
    for d in missing:
        (pgdata / d).mkdir(parents=True)
    if missing:
        repairs.notes.append(f"created empty directories the snapshot lacked: {', '.join(missing)}")

    conf = pgdata / "postgresql.conf"
    synthesized = []
    if not conf.exists():
        conf.write_text(MINIMAL_CONFIG)
        synthesized.append("postgresql.conf")
    if not (pgdata / "pg_ident.conf").exists():
        (pgdata / "pg_ident.conf").write_text("")
        synthesized.append("pg_ident.conf")
    if not (pgdata / "pg_hba.conf").exists():
        synthesized.append("pg_hba.conf")
    (pgdata / "pg_hba.conf").write_text(hba)
    if synthesized:
        repairs.record(
            "synthesized_config",
            f"wrote {', '.join(synthesized)}, missing from the snapshot (Debian-style layout)",
        )

    rewrite = rewrite_config(
        conf.read_text(errors="replace"),
        dict(settings if settings is not None else default_settings()),
        library_exists=binaries.has_library,
        include_allowed=lambda target: _include_allowed(pgdata, target),
    )
    conf.write_text(rewrite.text)
    if rewrite.disabled:
        repairs.record(
            "neutralised_settings",
            "disabled source-host settings in postgresql.conf: " + ", ".join(rewrite.disabled),
        )

    auto = pgdata / "postgresql.auto.conf"
    if auto.exists():
        kept = meaningful_lines(auto.read_text(errors="replace"))
        if kept:
            keys = sorted({ln.split("=")[0].strip() for ln in kept})
            repairs.record(
                "cleared_auto_conf",
                f"cleared the source's ALTER SYSTEM settings ({', '.join(keys)})",
            )
        auto.write_text("# Cleared by pgro: the source's ALTER SYSTEM settings do not apply.\n")

    changed = hand_over(restore_root, account)
    mode = pgdata.stat().st_mode & 0o777
    if mode != 0o700:
        os.chmod(pgdata, 0o700)
    if changed or mode != 0o700:
        # Not a "fix": a restored tree never has this machine's owners.
        repairs.notes.append(
            f"gave the restored files to {account.name} ({changed} entries) and set the data "
            "directory to mode 0700",
        )
    return repairs
