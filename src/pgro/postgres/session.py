"""pgro's own sessions on a restored server, which must not run code the snapshot names.

A restored catalog is untrusted: `ALTER ROLE … SET session_preload_libraries`, per-database
settings and a source's `search_path` would otherwise apply to pgro's superuser sessions.
Settings sent in the startup packet (source "client") take precedence over every per-role
and per-database setting, so they are applied before any stored setting can load a library.
`catalog_guard` then removes those stored settings for everyone else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

# Empty preload lists and no JIT: nothing named by the restore is loaded into our backend.
# `search_path=pg_catalog` keeps a snapshot's functions and operators in other schemas
# from shadowing the built-ins pgro's queries call.
SAFE_SESSION_SETTINGS: dict[str, str] = {
    "session_preload_libraries": "",
    "local_preload_libraries": "",
    # A per-database path would let a bare library name resolve inside the restored tree.
    "dynamic_library_path": "$libdir",
    "jit": "off",
    "search_path": "pg_catalog",
}
# Only a superuser may set these at connection start; a non-superuser cannot be given
# them by a stored setting either (ALTER ROLE … SET needs superuser for them).
SUPERUSER_ONLY = frozenset({"session_preload_libraries", "dynamic_library_path"})


def safe_options(*, superuser: bool = True) -> str:
    """The libpq `options` value that applies SAFE_SESSION_SETTINGS at connection start.

    A non-superuser session asking for a superuser-only setting would be refused, so
    `superuser=False` leaves those out.
    """
    # libpq splits `options` on unescaped spaces; an empty value is written as `name=`.
    return " ".join(
        f"-c {key}={value}"
        for key, value in SAFE_SESSION_SETTINGS.items()
        if superuser or key not in SUPERUSER_ONLY
    )


def connect(
    conninfo: str,
    *,
    application_name: str,
    connect_timeout: int = 10,
    autocommit: bool = True,
    superuser: bool = True,
) -> psycopg.Connection[tuple[object, ...]]:
    """A session on a restored server with the safe settings in force from its start."""
    import psycopg

    return psycopg.connect(
        conninfo,
        connect_timeout=connect_timeout,
        autocommit=autocommit,
        application_name=application_name,
        options=safe_options(superuser=superuser),
    )
