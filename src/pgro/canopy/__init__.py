"""Canopy, BES's fleet control plane: pgro is its restore consumer.

`wire` (request and response bodies), `naming` (namespace names and labels) and
`materialise` (worklist entry → replica spec, sync plan) are pure, like `pgro.api` and
`pgro.core`. `client` (HTTP over the tailnet or mTLS) and `device_cert` (the self-signed
mTLS device certificate) do I/O. The protocol is described in
`reference/canopy-protocol.md`.
"""
