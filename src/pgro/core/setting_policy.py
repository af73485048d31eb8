"""Which postgresql.conf settings pgro keeps for itself.

A restored server runs on this machine, for pgro's clients: settings that name the source
host (its paths, addresses, archive and replication commands, log collector, locales), that
decide who may connect, or that load or run code are pgro's. Neither the snapshot's
configuration (`postgres.config` comments them out) nor a replica's `postgresExtraConfig`
(`core.extra_config` rejects them) may set them.
"""

from __future__ import annotations

from typing import Final

# Exact keys that point at the source host or would stop startup here.
NEUTRALISED_KEYS: Final = frozenset(
    {
        "data_directory",
        "hba_file",
        "ident_file",
        "external_pid_file",
        "config_file",
        "listen_addresses",
        "port",
        "unix_socket_directories",
        "unix_socket_directory",
        "unix_socket_group",
        "unix_socket_permissions",
        "dynamic_shared_memory_type",
        "shared_buffers",
        "huge_pages",
        "log_destination",
        "logging_collector",
        "log_directory",
        "log_filename",
        "log_file_mode",
        "log_rotation_age",
        "log_rotation_size",
        "log_truncate_on_rotation",
        "archive_mode",
        "archive_command",
        "archive_library",
        "restore_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "primary_conninfo",
        "primary_slot_name",
        "promote_trigger_file",
        "stats_temp_directory",
        "default_transaction_read_only",
        "password_encryption",
        "krb_server_keyfile",
        # Load code: a JIT provider or library search path can name a library the snapshot
        # ships inside PGDATA (`'../../../proc/self/cwd/lib/evil'` needs no path knowledge).
        "jit_provider",
        "dynamic_library_path",
    }
)
# Procedural-language settings that run snapshot-supplied code when the language loads.
CODE_RUNNING_PL_KEYS: Final = frozenset(
    {
        "plperl.on_init",
        "plperl.on_plperl_init",
        "plperl.on_plperlu_init",
        "pltcl.start_proc",
        "pltclu.start_proc",
        "plv8.start_proc",
    }
)
NEUTRALISED_PREFIXES: Final = ("lc_", "ssl", "recovery_target")
PRELOAD_KEYS: Final = frozenset(
    {"shared_preload_libraries", "session_preload_libraries", "local_preload_libraries"}
)
INCLUDE_KEYS: Final = frozenset({"include", "include_dir", "include_if_exists"})


def is_neutralised(key: str) -> bool:
    """`key` (lower case) is pgro's: never taken from the snapshot or the replica's spec."""
    return (
        key in NEUTRALISED_KEYS
        or key in CODE_RUNNING_PL_KEYS
        or key.startswith(NEUTRALISED_PREFIXES)
    )
