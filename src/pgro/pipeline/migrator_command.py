"""The application's migrate command as the user gives it (`pgro run --migrator CMD`,
`pgro verify --migrator CMD`): split like a shell would split it, run without one, as the
account PostgreSQL runs as, with the environment that points it at one restore.

The command is the operator's own choice, never anything a snapshot names; it is checked
before anything is restored, so a typo costs seconds, not a restore.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pgro.core.app_migration import migrator_env
from pgro.postgres.account import RunAccount, unreachable
from pgro.postgres.server import Endpoint

# What the command inherits from pgro's own environment; everything else it gets is named.
PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")


class MigratorCommandError(ValueError):
    """`--migrator` cannot be used as given; the message says why and what to give."""


@dataclass(frozen=True)
class MigratorCommand:
    argv: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> MigratorCommand:
        """A relative program path is made absolute against the current directory: the
        command runs in `/`."""
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise MigratorCommandError(f"--migrator {text!r} cannot be split: {exc}") from None
        if not argv:
            raise MigratorCommandError("--migrator is empty: give the migrator's command line")
        if "/" in argv[0] and not os.path.isabs(argv[0]):
            argv[0] = os.path.abspath(argv[0])
        return cls(tuple(argv))

    @property
    def program(self) -> str:
        return self.argv[0]

    def __str__(self) -> str:
        return shlex.join(self.argv)

    def check(self, account: RunAccount) -> Path:
        """The program the command runs: it exists and `account` may execute it."""
        found = shutil.which(self.program) if "/" not in self.program else self.program
        path = Path(found) if found else None
        if path is None or not path.is_file():
            raise MigratorCommandError(
                f"--migrator: {self.program!r} is not an executable file (nor found on "
                "PATH); give the program's absolute path"
            )
        if account.is_current_user:
            if not os.access(path, os.X_OK):
                raise MigratorCommandError(f"--migrator: {path} is not executable")
            return path
        why = unreachable(path, account)
        if why is not None:
            raise MigratorCommandError(
                f"--migrator: the migrator runs as {account.name} (the account PostgreSQL "
                f"runs as), but {why}: install it where that account can run it"
            )
        return path


def command_environment(
    account: RunAccount,
    endpoint: Endpoint,
    *,
    database: str,
    username: str,
    password: str,
    version: str,
    version_id: str,
) -> dict[str, str]:
    """Only what the command needs: a few of pgro's variables, the account's own, and
    `migrator_env` naming the restore's socket directory (never the stable endpoint)."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    env.update(account.env())
    env.update(
        migrator_env(
            host=str(endpoint.socket_dir),
            port=endpoint.port,
            database=database,
            username=username,
            password=password,
            version=version,
            version_id=version_id,
        )
    )
    return env
