"""`python -m pgro`: the same CLI as the `pgro` command."""

from pgro.cli.main import main

main()
