"""Finding the PostgreSQL server binaries for a given major version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pgro.postgres.account import AccountMissing, RunAccount, resolve_run_account, unreachable

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


class BinariesNotExecutable(BinariesMissing):
    """Installed, but the account PostgreSQL runs as cannot run them (as root: a directory
    on the way that only root may enter, such as /root)."""


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
        """The server's `$libdir` (pg_config's pkglibdir): `lib/postgresql` where the build
        keeps its own modules there (a prefix not naming postgres, e.g. the relocatable
        builds, Homebrew), else `lib` (Debian, PGDG RPMs). Exactly one: a library found in
        the other one would be accepted but not load."""
        lib = self.bindir.parent / "lib"
        nested = lib / "postgresql"
        return nested if (nested / "plpgsql.so").is_file() else lib

    def has_library(self, name: str) -> bool:
        if not name or "/" in name or name in (".", ".."):
            return False
        return (self.libdir / f"{name}.so").is_file()


def bindir_patterns() -> list[str]:
    extra = [p for p in os.environ.get("PGRO_POSTGRES_BINDIRS", "").split(":") if p]
    return [*extra, *DEFAULT_BINDIR_PATTERNS]


def _server_account() -> RunAccount | None:
    """The account the server runs as when that is not the invoking user (pgro as root)."""
    if os.geteuid() != 0:
        return None  # the invoking user: os.access already answered for it
    try:
        return resolve_run_account()
    except AccountMissing:
        return None  # reported where the account is needed


def find_binaries(major: str, account: RunAccount | None = None) -> PostgresBinaries:
    """The binaries of exactly this major: a data directory only starts with its own. They
    must be executable by `account`, the one the server runs as (by default the one
    `resolve_run_account` gives as root): raises BinariesNotExecutable naming the directory
    when every install found is out of its reach, BinariesMissing when there is none."""
    if account is None:
        account = _server_account()
    tried = []
    refused = []
    for pattern in bindir_patterns():
        bindir = Path(pattern.format(major=major))
        tried.append(str(bindir))
        if os.access(bindir / "postgres", os.X_OK) and os.access(bindir / "initdb", os.X_OK):
            if account is None or account.is_current_user or account.uid == 0:
                return PostgresBinaries(major=major, bindir=bindir)
            why = unreachable(bindir / "postgres", account) or unreachable(
                bindir / "initdb", account
            )
            if why is None:
                return PostgresBinaries(major=major, bindir=bindir)
            refused.append((bindir, why))
    if refused:
        bindir, why = refused[0]
        name = account.name if account is not None else "the server's account"
        raise BinariesNotExecutable(
            f"PostgreSQL {major} server binaries are installed in {bindir}, but PostgreSQL "
            f"runs as {name} and {why}. Install them where {name} can enter and run them "
            "(a copy outside /root, e.g. under /opt, pointed at by PGRO_POSTGRES_BINDIRS), "
            f"or set PGRO_RUN_AS to an account that can."
        )
    raise BinariesMissing(
        f"the snapshot is a PostgreSQL {major} cluster but PostgreSQL {major} server binaries "
        f"are not installed (looked in {', '.join(tried)}). Install them (on Debian: "
        f"`apt-get install postgresql-{major}`, from the PGDG repository for old majors) or "
        "point PGRO_POSTGRES_BINDIRS at them."
    )
