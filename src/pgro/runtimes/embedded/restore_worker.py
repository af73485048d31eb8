"""The restore step as a child process of `pgro run`: one process per restore.

The job arrives as JSON on stdin (so credentials never appear on a command line); the
outcome is written to `result.json` in the restore's directory, atomically, and the exit
code says the same. A restore directory with a `result.json` is finished, whatever
happened to the parent meanwhile; one with neither a result nor a live worker is started
again from scratch (kopia cannot resume a partial restore).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pgro.api.secret import FilesystemLocation, KopiaCredentials, S3Location
from pgro.canopy.proxy import new_client_credentials
from pgro.canopy.sigv4 import SigningCredentials
from pgro.core.secrets import scrub
from pgro.core.snapshot import Snapshot, SnapshotSource
from pgro.kopia.errors import KopiaError
from pgro.kopia.repository import KopiaRepository
from pgro.pipeline.events import SilentObserver
from pgro.pipeline.restore import restore_snapshot
from pgro.postgres.account import resolve_run_account
from pgro.postgres.binaries import BinariesMissing
from pgro.postgres.layout import NotPostgres
from pgro.postgres.repair import default_settings
from pgro.processes import spawn

RESULT = "result.json"
PIDFILE = "work.pid"
LOG = "work.log"
DATA = "data"


@dataclass(frozen=True)
class WorkResult:
    ok: bool
    postgres_version: str | None = None
    pgdata: str | None = None
    reason: str = ""
    error: str = ""
    fixes: dict[str, bool] | None = None
    notes: list[str] | None = None


def credentials_to_json(creds: KopiaCredentials) -> dict[str, Any]:
    loc = creds.location
    out: dict[str, Any] = {"repositoryPassword": creds.repository_password}
    if isinstance(loc, FilesystemLocation):
        out["filesystemPath"] = loc.path
    else:
        out.update(
            bucket=loc.bucket,
            region=loc.region,
            endpoint=loc.endpoint,
            disableTls=loc.disable_tls,
            prefix=loc.prefix,
            accessKeyId=creds.access_key_id,
            secretAccessKey=creds.secret_access_key,
        )
    return out


def credentials_from_json(doc: dict[str, Any]) -> KopiaCredentials:
    if "filesystemPath" in doc:
        return KopiaCredentials(
            location=FilesystemLocation(doc["filesystemPath"]),
            repository_password=doc["repositoryPassword"],
        )
    return KopiaCredentials(
        location=S3Location(
            bucket=doc["bucket"],
            region=doc["region"],
            endpoint=doc.get("endpoint"),
            disable_tls=bool(doc.get("disableTls")),
            prefix=doc.get("prefix") or "",
        ),
        repository_password=doc["repositoryPassword"],
        access_key_id=doc.get("accessKeyId"),
        secret_access_key=doc.get("secretAccessKey"),
    )


def read_result(restore_dir: Path) -> WorkResult | None:
    try:
        doc = json.loads((restore_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None
    return WorkResult(**doc)


def _write_result(restore_dir: Path, result: WorkResult) -> None:
    tmp = restore_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, restore_dir / RESULT)


PROXY_PORT_FILE = "proxy-port"
PROXY_START_TIMEOUT_S = 30.0
PROXY_STOP_TIMEOUT_S = 15.0


def _start_proxy(
    proxy: dict[str, Any], restore_dir: Path, client: SigningCredentials
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `pgro canopy-proxy` for this restore and wait for its port (the reference's
    native sidecar, here a child of the worker). Only the proxy holds S3 credentials.

    Its secrets go on its stdin, never its command line: the restore's broker token and
    `client`, the random key pair kopia signs with (the proxy refuses anything else)."""
    port_file = restore_dir / PROXY_PORT_FILE
    port_file.unlink(missing_ok=True)
    args = [
        proxy.get("python") or sys.executable,
        "-m",
        "pgro",
        "canopy-proxy",
        f"--broker-url={proxy['brokerUrl']}",
        f"--group={proxy['group']}",
        f"--type={proxy['type']}",
        f"--region={proxy['region']}",
        "--listen-host=127.0.0.1",
        f"--port-file={port_file}",
        f"--progress-interval={proxy.get('progressInterval') or 30}",
    ]
    for flag, key in (
        ("--s3-endpoint", "s3Endpoint"),
        ("--run-id", "runId"),
        ("--progress-callback-url", "progressUrl"),
        ("--stats-callback-url", "statsUrl"),
    ):
        if proxy.get(key):
            args.append(f"{flag}={proxy[key]}")
    # The proxy's log lines go to the worker's log (work.log), next to kopia's.
    args.append("--secrets-from=-")
    # SIGKILL when the worker dies (even kill -9): the proxy serves this worker's kopia only.
    proc = spawn(
        args,
        death_signal=signal.SIGKILL,
        stdin=subprocess.PIPE,
        stdout=sys.stdout,
        stderr=sys.stdout,
    )
    secrets_doc = {
        "brokerToken": proxy.get("brokerToken") or "",
        "accessKeyId": client.access_key_id,
        "secretAccessKey": client.secret_access_key,
    }
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(secrets_doc).encode())
        proc.stdin.close()
    except OSError:
        pass  # it exited already: the wait below reports its exit code
    deadline = time.monotonic() + PROXY_START_TIMEOUT_S
    while True:
        try:
            return proc, int(port_file.read_text().strip())
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise ProxyFailed(f"canopy-proxy exited with code {proc.returncode} before listening")
        if time.monotonic() > deadline:
            _stop_proxy(proc)
            raise ProxyFailed(
                f"canopy-proxy did not write its port file within {PROXY_START_TIMEOUT_S:.0f}s"
            )
        time.sleep(0.05)


def _stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the proxy posts its final traffic totals, then exits."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(PROXY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ProxyFailed(RuntimeError):
    reason = "CanopyProxyFailed"


def run(job: dict[str, Any]) -> WorkResult:
    restore_dir = Path(job["restoreDir"])
    target = restore_dir / DATA
    if target.exists():
        shutil.rmtree(target)  # a previous attempt died midway: start over
    snapshot = Snapshot(
        id=job["snapshot"],
        description="",
        source=SnapshotSource(host="", user_name="", path=""),
        tags=MappingProxyType({}),
        start_time=job.get("snapshotTime") or "",
        size_bytes=int(job.get("snapshotSize") or 0),
    )
    settings = default_settings()
    if job.get("readOnly"):
        settings["default_transaction_read_only"] = "on"
    creds = credentials_from_json(job["credentials"])
    proxy: subprocess.Popen[bytes] | None = None
    try:
        if job.get("canopyProxy"):
            client = new_client_credentials()
            proxy, port = _start_proxy(job["canopyProxy"], restore_dir, client)
            loc = creds.location
            assert isinstance(loc, S3Location)
            creds = replace(
                creds,
                location=replace(loc, endpoint=f"127.0.0.1:{port}", disable_tls=True),
                access_key_id=client.access_key_id,
                secret_access_key=client.secret_access_key,
            )
        account = resolve_run_account()
        with KopiaRepository(creds, restore_dir / "kopia") as repo:
            restored = restore_snapshot(
                repo, snapshot, target, account, SilentObserver(), settings=settings
            )
    except (KopiaError, NotPostgres, BinariesMissing, ProxyFailed) as exc:
        return WorkResult(ok=False, reason=exc.reason, error=scrub(str(exc), creds.secret_values()))
    except Exception as exc:
        # The result lands in status: whatever the error says, secrets stay out of it.
        error = scrub(f"{type(exc).__name__}: {exc}", creds.secret_values())
        return WorkResult(ok=False, reason="UnexpectedError", error=error)
    finally:
        if proxy is not None:
            _stop_proxy(proxy)
    return WorkResult(
        ok=True,
        postgres_version=restored.data.major,
        pgdata=str(restored.data.path),
        fixes=dict(restored.repairs.fixes),
        notes=list(restored.repairs.notes),
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # `pgro run` stops work with SIGTERM: unwind so kopia (in its own session) is stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    job = json.loads(sys.stdin.read())
    restore_dir = Path(job["restoreDir"])
    result = run(job)
    _write_result(restore_dir, result)
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "notes"}))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
