"""`pgro detect-version`: the operator's version-detect Job (set up by the operator)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("detect-version")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    envvar="PGRO_DATA_ROOT",
    default="/pgdata",
    show_default=True,
    help="The restore's data volume (where the restore Job left `pgdata` and `postgres/`).",
)
@click.option(
    "--termination-log",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="PGRO_TERMINATION_LOG",
    default="/dev/termination-log",
    show_default=True,
    help="Where the result goes (the pod's terminationMessagePath).",
)
def detect_version(root: Path, termination_log: Path) -> None:
    """Find the PostgreSQL major version on a restore's data volume.

    Reads PG_VERSION where the volume's `pgdata` link leads; without a usable link, locates
    the data directory as the restore does and re-creates the link and `.postgres-version`.
    Writes the major version (or `error: <reason>: <detail>`) to the termination message.
    Links are never followed out of the volume.

    \b
    Exit codes:
      0  found (the version is on stdout and in the termination message)
      1  no PostgreSQL data directory, or an unusable one, on the volume
    """
    from pgro.pipeline.detect_version import main

    main(root, termination_log)
