"""Repairing a restored data directory so PostgreSQL starts on this machine.

Each repair is recorded under a stable name (the reference's "fixes", extended), so a
verification report says exactly what had to be changed to bring the backup up.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pgro.postgres.account import RunAccount, hand_over
from pgro.postgres.binaries import ServerInstall
from pgro.postgres.config import MINIMAL_CONFIG, meaningful_lines, rewrite_config
from pgro.postgres.confine import (
    ConfinedTree,
    EscapesRoot,
    NotARegularFile,
    resolve_beneath,
    tame,
    tame_list,
)
from pgro.postgres.layout import UnsafeSnapshot

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
    "removed_unsafe_links",
    # Collation versions refreshed after rebuilding their indexes (issue 13, §2.4).
    "collation_refresh",
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

AUTO_CONF_CLEARED = "# Cleared by pgro: the source's ALTER SYSTEM settings do not apply.\n"


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


# A setting name as postgresql.conf's lexer accepts it (ASCII; one optional qualifier).
_SETTING_NAME = re.compile(
    r"^\s*([A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?)\s*(?:=|\s|$)"
)
# Configuration files are small; a huge one is an attack on the restore, not a config.
_CONFIG_LIMIT = 16 * 2**20


def _include_allowed(pgdata: Path, target: str) -> bool:
    """Keep an include only if it resolves inside the data directory and exists.

    An absolute include names the source host's /etc; on this machine that path is either
    missing (startup fails) or someone else's configuration. Links are followed only while
    they stay inside the data directory.
    """
    try:
        path = resolve_beneath(pgdata, target)
    except EscapesRoot:
        return False
    return path.exists()


def _setting_names(lines: list[str]) -> tuple[list[str], int]:
    """The setting names in `lines` (never their values), and how many lines had none."""
    names: set[str] = set()
    other = 0
    for line in lines:
        m = _SETTING_NAME.match(line)
        if m and len(m.group(1)) <= 63:
            names.add(m.group(1))
        else:
            other += 1
    return sorted(names), other


def _unsafe(message: str) -> UnsafeSnapshot:
    return UnsafeSnapshot(
        f"{message}. pgro changes nothing outside the restored tree; check the snapshot was "
        "taken from a PostgreSQL data directory and not tampered with."
    )


def prepare_data_directory(
    restore_root: Path,
    pgdata: Path,
    binaries: ServerInstall,
    account: RunAccount,
    *,
    settings: Mapping[str, str] | None = None,
    hba: str = DEFAULT_HBA,
    removed_links: Sequence[str] = (),
) -> Repairs:
    """Make `pgdata` (inside `restore_root`) startable by `account`. Idempotent.

    `binaries` is the PostgreSQL that will serve the data: the local install, or the
    server image a Kubernetes Deployment will run (which this process cannot execute).
    `removed_links` are the links `confine.sanitise_tree` took out of the tree (recorded
    here so the report says so).

    Every file is read and written beneath `restore_root` through directory descriptors
    without following links out of it (`ConfinedTree`); a data directory outside the
    restored tree is refused with `UnsafeSnapshot`.
    """
    repairs = Repairs()
    if removed_links:
        repairs.record(
            "removed_unsafe_links",
            f"removed {len(removed_links)} symlink(s) that led outside the restored tree: "
            f"{tame_list(list(removed_links))}",
        )
    tree = ConfinedTree(restore_root)
    try:
        pg = tree.relative(pgdata)
    except EscapesRoot:
        raise _unsafe(f"the data directory {tame(str(pgdata))} is outside {restore_root}") from None
    try:
        _repair(tree, pg, binaries, settings, hba, repairs)
    except (EscapesRoot, NotARegularFile) as exc:
        raise _unsafe(f"the restored tree is unsafe to repair: {tame(str(exc))}") from None

    changed = hand_over(restore_root, account)
    mode_changed = tree.chmod_directory(pg, 0o700)
    if changed or mode_changed:
        # Not a "fix": a restored tree never has this machine's owners.
        repairs.notes.append(
            f"gave the restored files to {account.name} ({changed} entries) and set the data "
            "directory to mode 0700",
        )
    return repairs


def _repair(
    tree: ConfinedTree,
    pg: PurePosixPath,
    binaries: ServerInstall,
    settings: Mapping[str, str] | None,
    hba: str,
    repairs: Repairs,
) -> None:
    if tree.unlink(pg / "postmaster.pid"):
        repairs.record("removed_stale_pid", "removed postmaster.pid copied from the running source")
    for signal_file, name in (
        ("standby.signal", "removed_standby_signal"),
        ("recovery.signal", "removed_recovery_signal"),
    ):
        if tree.unlink(pg / signal_file):
            repairs.record(
                name, f"removed {signal_file} so the restore starts as a primary, not a standby"
            )
    # PostgreSQL <= 11 keeps recovery settings in recovery.conf, where no command-line
    # setting reaches: its restore_command would run a program the snapshot names, and its
    # standby_mode would keep the restore a standby. PostgreSQL 12+ refuses to start with one.
    if tree.unlink(pg / "recovery.conf"):
        repairs.record(
            "removed_recovery_signal",
            "removed recovery.conf (its restore_command and standby settings come from the "
            "source host) so the restore starts as a primary and runs no recovery command",
        )

    wal_dir = "pg_xlog" if binaries.major.startswith("9.") else "pg_wal"
    wal = pg / wal_dir
    wal_entry = tree.lstat(wal)
    if wal_entry is not None and stat.S_ISLNK(wal_entry.st_mode) and not tree.exists(wal):
        tree.unlink(wal)  # WAL lived on another volume of the source host
    if not tree.exists(wal):
        tree.makedirs(wal / "archive_status")
        repairs.record("recreated_pg_wal", f"created the missing {wal_dir} directory")
    else:
        tree.makedirs(wal / "archive_status")
    missing = [d for d in EMPTY_DIRS if not tree.exists(pg / d)]
    for d in missing:
        tree.makedirs(pg / d)
    if missing:
        repairs.notes.append(f"created empty directories the snapshot lacked: {', '.join(missing)}")

    conf = pg / "postgresql.conf"
    synthesized = []
    text = tree.read_text(conf, _CONFIG_LIMIT)
    if text is None:
        text = MINIMAL_CONFIG
        synthesized.append("postgresql.conf")
    if not tree.exists(pg / "pg_ident.conf"):
        tree.write_text(pg / "pg_ident.conf", "")
        synthesized.append("pg_ident.conf")
    if not tree.exists(pg / "pg_hba.conf"):
        synthesized.append("pg_hba.conf")
    tree.write_text(pg / "pg_hba.conf", hba)
    if synthesized:
        repairs.record(
            "synthesized_config",
            f"wrote {', '.join(synthesized)}, missing from the snapshot (Debian-style layout)",
        )

    pgdata_real = tree.resolve(pg)
    rewrite = rewrite_config(
        text,
        dict(settings if settings is not None else default_settings()),
        library_exists=binaries.has_library,
        include_allowed=lambda target: _include_allowed(pgdata_real, target),
    )
    tree.write_text(conf, rewrite.text)
    if rewrite.disabled:
        repairs.record(
            "neutralised_settings",
            "disabled source-host settings in postgresql.conf: "
            + ", ".join(tame(d) for d in rewrite.disabled),
        )

    auto = pg / "postgresql.auto.conf"
    auto_text = tree.read_text(auto, _CONFIG_LIMIT)
    if auto_text is not None:
        kept = meaningful_lines(auto_text)
        if kept:
            names, other = _setting_names(kept)
            what = tame_list(names) if names else "none named"
            if other:
                what += f"; {other} line(s) that are not settings"
            repairs.record(
                "cleared_auto_conf",
                f"cleared the source's ALTER SYSTEM settings ({what})",
            )
        tree.write_text(auto, AUTO_CONF_CLEARED)
