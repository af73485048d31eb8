"""Finding the PostgreSQL server binaries for a given major version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Where distributions install each major side by side. `PGRO_POSTGRES_BINDIRS` (a
# colon-separated list of patterns with `{major}`) is searched first.
DEFAULT_BINDIR_PATTERNS = (
    "/usr/lib/postgresql/{major}/bin",  # Debian, Ubuntu
    "/usr/pgsql-{major}/bin",  # PGDG RPMs
    "/opt/homebrew/opt/postgresql@{major}/bin",
    "/usr/local/opt/postgresql@{major}/bin",
)


class BinariesMissing(Exception):
    reason = "PostgresBinariesMissing"


class ServerInstall(Protocol):
    """The PostgreSQL that will run a data directory: its major and its libraries."""

    @property
    def major(self) -> str: ...

    def has_library(self, name: str) -> bool: ...


@dataclass(frozen=True)
class PostgresBinaries:
    major: str
    bindir: Path

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    @property
    def libdir(self) -> Path:
        return self.bindir.parent / "lib"

    def has_library(self, name: str) -> bool:
        return (self.libdir / f"{name}.so").exists()


def bindir_patterns() -> list[str]:
    extra = [p for p in os.environ.get("PGRO_POSTGRES_BINDIRS", "").split(":") if p]
    return [*extra, *DEFAULT_BINDIR_PATTERNS]


def find_binaries(major: str) -> PostgresBinaries:
    """The binaries of exactly this major: a data directory only starts with its own."""
    tried = []
    for pattern in bindir_patterns():
        bindir = Path(pattern.format(major=major))
        tried.append(str(bindir))
        if os.access(bindir / "postgres", os.X_OK) and os.access(bindir / "initdb", os.X_OK):
            return PostgresBinaries(major=major, bindir=bindir)
    raise BinariesMissing(
        f"the snapshot is a PostgreSQL {major} cluster but PostgreSQL {major} server binaries "
        f"are not installed (looked in {', '.join(tried)}). Install them (on Debian: "
        f"`apt-get install postgresql-{major}`, from the PGDG repository for old majors) or "
        "point PGRO_POSTGRES_BINDIRS at them."
    )
