"""The official `postgres:<major>` container image, as a place restored data will run.

The Kubernetes restore Job prepares PGDATA in pgro's own image, which has no PostgreSQL
server; the data then runs in the official image. Repairs that depend on the server's
installed libraries (dropping `shared_preload_libraries` entries that would stop startup)
are judged against what that image ships: the core server plus its contrib modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Loadable modules of the official image (Debian packages: server + contrib). Only the
# ones that make sense in shared_preload_libraries matter; the rest are listed so a
# source that preloads them keeps them.
OFFICIAL_IMAGE_LIBRARIES: Final = frozenset(
    {
        "amcheck",
        "auth_delay",
        "auto_explain",
        "basebackup_to_shell",
        "basic_archive",
        "btree_gin",
        "btree_gist",
        "citext",
        "dblink",
        "file_fdw",
        "hstore",
        "passwordcheck",
        "pg_buffercache",
        "pg_prewarm",
        "pg_stat_statements",
        "pg_trgm",
        "pg_visibility",
        "pg_walinspect",
        "pgcrypto",
        "pgrowlocks",
        "pgstattuple",
        "plpgsql",
        "postgres_fdw",
        "test_decoding",
        "tsm_system_rows",
        "tsm_system_time",
        "uuid-ossp",
    }
)


@dataclass(frozen=True)
class OfficialImage:
    major: str

    @property
    def image(self) -> str:
        return f"postgres:{self.major}"

    def has_library(self, name: str) -> bool:
        return name in OFFICIAL_IMAGE_LIBRARIES
