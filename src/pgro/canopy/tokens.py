"""Per-restore bearer tokens for the credential broker.

A restore's `pgro canopy-proxy` proves who it is with a token the runtime issues when the
restore starts: it names what the restore may ask for, `(group, type, run id)`, and where
its callbacks go (`namespace/job`), and carries an HMAC-SHA256 of that under the broker's
key. The broker keeps no list of tokens: it checks the MAC (`hmac.compare_digest`) and
then that the request asks for exactly what the token names. Any instance holding the key
can check any token, so an operator's standby and a restarted `pgro run` (with the key
kept 0600 in its state directory) accept the tokens of restores already running.

The token never goes on a command line: the proxy reads it from stdin, a 0600 file or
(in Kubernetes) an environment variable taken from a Secret mounted into its Job only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

KEY_BYTES: Final = 32
_VERSION: Final = "v1"


@dataclass(frozen=True)
class TokenBinding:
    """What one token allows: broker credentials for `(group, type, run_id)` and the
    callbacks of `job` (`namespace/job`, the key in the callback URLs)."""

    group: str
    type: str
    run_id: str | None
    job: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class BrokerTokens:
    """Issue and check tokens under one key (`new_key()`, or a stored one)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the broker token key must be at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "BrokerTokens(<key>)"

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, binding: TokenBinding) -> str:
        doc = [_VERSION, binding.group, binding.type, binding.run_id or "", binding.job]
        payload = _b64(json.dumps(doc, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> TokenBinding | None:
        """The binding of a genuine token, None for anything else."""
        payload, dot, mac = token.strip().partition(".")
        if not dot or not payload or not mac:
            return None
        try:
            payload.encode("ascii")
        except UnicodeEncodeError:
            return None
        if not hmac.compare_digest(mac.encode("ascii", "replace"), self._mac(payload).encode()):
            return None
        try:
            doc = json.loads(_unb64(payload))
        except ValueError:
            return None
        if (
            not isinstance(doc, list)
            or len(doc) != 5
            or doc[0] != _VERSION
            or not all(isinstance(v, str) for v in doc)
        ):
            return None
        return TokenBinding(group=doc[1], type=doc[2], run_id=doc[3] or None, job=doc[4])


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def load_or_create_key(path: Path) -> bytes:
    """The key kept at `path` (0600, created with a fresh key if missing), so tokens stay
    valid across restarts of `pgro run`."""
    try:
        key = path.read_bytes()
        if len(key) >= KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = new_key()
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    os.replace(tmp, path)
    return key


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
