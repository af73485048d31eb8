"""`kubectl pgro ...`: pgro as a kubectl plugin.

kubectl runs an executable named `kubectl-pgro` found on $PATH with the arguments after
`pgro` (and its environment, $KUBECONFIG included). It is `pgro` itself, named `kubectl pgro`
in its help, with one difference: `status` reads the cluster of the current kubeconfig unless
`--state-dir` is given (`kubectl pgro status -n NAMESPACE`, `kubectl pgro status -A --json`).
"""

from __future__ import annotations

from typing import Final

PROG_NAME: Final = "kubectl pgro"


def main() -> None:
    from pgro.cli.main import main as pgro_main

    pgro_main(prog_name=PROG_NAME, default_map={"status": {"cluster": True}})


if __name__ == "__main__":
    main()
