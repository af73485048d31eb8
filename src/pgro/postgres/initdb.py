"""Creating fresh clusters: for `pgro demo` and for the test fixtures that build backups."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries, find_binaries


class InitdbFailed(Exception):
    reason = "InitdbFailed"


def installed_majors() -> list[str]:
    """Majors with server binaries installed under /usr/lib/postgresql, highest first."""
    base = Path("/usr/lib/postgresql")
    majors = []
    if base.is_dir():
        for child in base.iterdir():
            if child.name.isdigit() and (child / "bin" / "postgres").exists():
                majors.append(child.name)
    return sorted(majors, key=int, reverse=True)


def newest_binaries() -> PostgresBinaries:
    majors = installed_majors()
    if not majors:
        return find_binaries("15")  # raises with the install hint
    return find_binaries(majors[0])


def _has_no_instructions(major: str) -> bool:
    """Whether this major's initdb takes `--no-instructions` (new in 14; 13's refuses it)."""
    head = major.split(".", 1)[0]
    return head.isdigit() and int(head) >= 14


def init_cluster(
    binaries: PostgresBinaries,
    pgdata: Path,
    account: RunAccount,
    *,
    superuser: str = "postgres",
    checksums: bool = False,
) -> None:
    """`initdb` a UTF-8, C-locale cluster owned by `account` at `pgdata` (with data
    checksums when asked)."""
    pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(pgdata, account.uid, account.gid)
    os.chmod(pgdata, 0o700)
    proc = subprocess.run(  # type: ignore[call-overload]
        [
            binaries.tool("initdb"),
            "-D",
            str(pgdata),
            "--no-locale",
            "--encoding=UTF8",
            "--auth=trust",
            f"--username={superuser}",
            *(["--no-instructions"] if _has_no_instructions(binaries.major) else []),
            *(["--data-checksums"] if checksums else []),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", **account.env()},
        cwd="/",
        **account.popen_kwargs(),
    )
    if proc.returncode != 0:
        raise InitdbFailed(f"initdb failed: {proc.stderr.strip() or proc.stdout.strip()}")
