"""`pgro crds`: the CustomResourceDefinitions as YAML, for installing them out of band."""

from __future__ import annotations

from pathlib import Path

import click

from pgro.api.crds import crds_yaml


@click.command("crds")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write the YAML to this file instead of standard output.",
)
def crds_command(output: Path | None) -> None:
    """Print pgro's two CustomResourceDefinitions as YAML.

    For installing them out of band, e.g. where the operator may not manage CRDs:

    \b
        pgro crds | kubectl apply --server-side -f -

    \b
    `pgro operator` applies them itself at startup
    unless started with --no-install-crds.
    """
    text = crds_yaml()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
