"""The restore step as the runtimes hand it out: one job description, one outcome, one
classification of what went wrong.

Both `pgro restore-job` (in the Kubernetes restore Job's pod; the job is its environment,
the outcome its termination message) and `pgro run`'s restore worker (a child process; the
job is JSON on its stdin, the outcome a JSON result file) run `restore_snapshot` on a
`RestoreJob` and report a `RestoreOutcome`. Credentials travel as the kopia Secret's keys
(`bucket`, `repositoryPassword`, ...), so both codecs validate them with
`parse_kopia_secret`, the way a Secret is validated.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from pgro.api.data_checks import DataChecks
from pgro.api.quantity import parse_quantity
from pgro.api.secret import FilesystemLocation, KopiaCredentials, S3Location, parse_kopia_secret
from pgro.canopy.sigv4 import SigningCredentials
from pgro.core.extra_config import parse_extra_config
from pgro.core.observations import RestoreWork, WorkState
from pgro.core.secrets import scrub
from pgro.core.snapshot import Snapshot, SnapshotSource
from pgro.kopia.errors import KopiaError
from pgro.pipeline.restore import RestoredDataDirectory
from pgro.postgres.repair import default_settings
from pgro.postgres.server import StartupFailed

# Environment variable → kopia Secret key (reference restore-pipeline §2.1, plus pgro's
# filesystem repositories): what the Job sets by `secretKeyRef`.
SECRET_ENV: Final = MappingProxyType(
    {
        "KOPIA_BUCKET": "bucket",
        "KOPIA_REGION": "region",
        "AWS_ACCESS_KEY_ID": "accessKeyId",
        "AWS_SECRET_ACCESS_KEY": "secretAccessKey",
        "KOPIA_PASSWORD": "repositoryPassword",
        "KOPIA_ENDPOINT": "endpoint",
        "KOPIA_DISABLE_TLS": "disableTls",
        "KOPIA_FILESYSTEM_PATH": "filesystemPath",
        "KOPIA_PREFIX": "prefix",
    }
)
# The Secret keys a canopy restore ignores: kopia's endpoint is the proxy.
CANOPY_IGNORED_KEYS: Final = frozenset({"endpoint", "disableTls", "filesystemPath"})
DEFAULT_PROXY_HOST: Final = "127.0.0.1"

EXIT_RETRY: Final = 1
EXIT_PERMANENT: Final = 2
# Failures a new attempt may get past; the Job's pod failure policy fails the rest at once.
RETRYABLE: Final = frozenset(
    {
        "EndpointUnreachable",
        "RestoreFailed",
        "CanopyCredentialsUnavailable",
        "CanopyProxyNotReady",
        "UnexpectedError",
    }
)
# What the canopy proxy answers kopia when the broker gives it no credentials.
_NO_CREDENTIALS: Final = "no S3 credentials"


class InvalidJob(ValueError):
    reason = "InvalidJob"


class ProxyNotReady(RuntimeError):
    """The canopy proxy never listened (a sidecar or the worker's own child)."""

    reason = "CanopyProxyNotReady"


def credentials_to_json(creds: KopiaCredentials) -> dict[str, str]:
    """The credentials as the kopia Secret's keys (the inverse of `parse_kopia_secret`)."""
    loc = creds.location
    out = {"repositoryPassword": creds.repository_password}
    if isinstance(loc, FilesystemLocation):
        return out | {"filesystemPath": loc.path}
    out |= {"bucket": loc.bucket, "region": loc.region, "endpoint": loc.endpoint or ""}
    out |= {"disableTls": "true" if loc.disable_tls else "false", "prefix": loc.prefix}
    return out | {
        "accessKeyId": creds.access_key_id or "",
        "secretAccessKey": creds.secret_access_key or "",
    }


def credentials_from_json(doc: Mapping[str, str]) -> KopiaCredentials:
    return parse_kopia_secret({k: v.encode() for k, v in doc.items() if v})


def _size(value: str | int | None) -> int:
    with contextlib.suppress(ValueError):
        return parse_quantity(value or 0)
    return 0


@dataclass(frozen=True)
class CanopyProxy:
    """kopia reaches the repository through `pgro canopy-proxy` on loopback, which re-signs
    each request with canopy's credentials. A Job's sidecar writes `port_file`; the worker
    starts the proxy itself from `launch` (its settings, with the restore's broker token)."""

    port_file: Path
    host: str = DEFAULT_PROXY_HOST
    launch: Mapping[str, Any] | None = field(default=None, repr=False)

    def route(
        self, creds: KopiaCredentials, port: int, client: SigningCredentials | None = None
    ) -> KopiaCredentials:
        """The same repository through the proxy; signed with `client` when given."""
        loc = creds.location
        assert isinstance(loc, S3Location), "canopy repositories are S3"
        host = f"[{self.host}]" if ":" in self.host else self.host
        routed = replace(creds, location=replace(loc, endpoint=f"{host}:{port}", disable_tls=True))
        if client is None:
            return routed
        return replace(
            routed,
            access_key_id=client.access_key_id,
            secret_access_key=client.secret_access_key,
        )


@dataclass(frozen=True)
class RestoreJob:
    """One restore: which snapshot, from where, into `target` (kopia's state in
    `kopia_dir`), and how the restored server is to be configured. `target` is
    `postgres` on a Job's data volume (whose root gets the `pgdata` link), `data` in a
    worker's restore directory."""

    snapshot_id: str
    credentials: KopiaCredentials
    target: Path
    kopia_dir: Path
    snapshot_size: int = 0
    snapshot_time: str = ""
    read_only: bool = False
    parallel: int | None = None
    # The replica's `postgresExtraConfig`: postgresql.conf lines, applied after pgro's
    # own settings except for the keys pgro keeps (`core.extra_config`).
    extra_config: str = ""
    proxy: CanopyProxy | None = None
    # How deep the first start checks the data (`pgro.core.verify_depth`; the worker's).
    verify_depth: str = "quick"
    # A kept kopia cache of the repository (`pgro.kopia.cache`; pgro run's), else none.
    kopia_cache: Path | None = None
    # The operator's restore Job: where the kept caches are on its kopia-cache volume
    # (`PGRO_KOPIA_CACHE_ROOT`); `pgro restore-job` evicts them under pressure and keeps
    # the repository's in `pgro.kopia.cache.repository_cache_dir(kopia_cache_root, ...)`.
    kopia_cache_root: Path | None = None

    @property
    def snapshot(self) -> Snapshot:
        return Snapshot(
            id=self.snapshot_id,
            description="",
            source=SnapshotSource(host="", user_name="", path=""),
            tags=MappingProxyType({}),
            start_time=self.snapshot_time,
            size_bytes=self.snapshot_size,
        )

    def settings(self) -> dict[str, str]:
        settings = default_settings()
        if self.read_only:
            settings["default_transaction_read_only"] = "on"
        # Only what `parse_extra_config` accepts; the replica's decision already emitted
        # `ExtraConfigIgnored` for the rest when it created the restore.
        settings.update(parse_extra_config(self.extra_config).settings)
        return settings

    def secret_values(self) -> list[str]:
        token = (self.proxy.launch or {}).get("brokerToken") if self.proxy else None
        return [*self.credentials.secret_values(), *([token] if token else [])]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RestoreJob:
        """What `pgro restore-job` reads (the Job's environment). SecretInvalid/InvalidJob."""
        port_file = env.get("PGRO_CANOPY_PROXY_PORT_FILE", "")
        secret = {
            key: env[var]
            for var, key in SECRET_ENV.items()
            if env.get(var) and not (port_file and key in CANOPY_IGNORED_KEYS)
        }
        creds = credentials_from_json(secret)
        if not env.get("SNAPSHOT_ID"):
            raise InvalidJob("SNAPSHOT_ID is not set")
        root = Path(env.get("PGRO_DATA_ROOT", "/pgdata"))
        parallel = env.get("KOPIA_PARALLEL", "")
        host = env.get("PGRO_CANOPY_PROXY_HOST", "").strip("[]") or DEFAULT_PROXY_HOST
        cache_root = env.get("PGRO_KOPIA_CACHE_ROOT", "")
        return cls(
            snapshot_id=env["SNAPSHOT_ID"],
            credentials=creds,
            target=root / "postgres",
            kopia_dir=Path(env.get("PGRO_KOPIA_DIR", "/tmp/kopia")) / "restore",  # noqa: S108 - the cache volume
            snapshot_size=_size(env.get("SNAPSHOT_SIZE")),
            snapshot_time=env.get("SNAPSHOT_TIME", ""),
            read_only=env.get("PGRO_READ_ONLY") == "true",
            parallel=int(parallel) if parallel.isdigit() else None,
            extra_config=env.get("PGRO_EXTRA_CONFIG", ""),
            proxy=CanopyProxy(Path(port_file), host) if port_file else None,
            verify_depth=env.get("PGRO_VERIFY_DEPTH") or "quick",
            kopia_cache_root=Path(cache_root) if cache_root else None,
        )

    def to_env(self) -> dict[str, str]:
        """The environment `from_env` reads, secrets included (a Job sets those by
        `secretKeyRef` instead, so its pod spec holds none)."""
        secret = credentials_to_json(self.credentials)
        env = {var: secret[key] for var, key in SECRET_ENV.items() if secret.get(key)}
        env |= {
            "SNAPSHOT_ID": self.snapshot_id,
            "SNAPSHOT_SIZE": str(self.snapshot_size),
            "SNAPSHOT_TIME": self.snapshot_time,
            "PGRO_DATA_ROOT": str(self.target.parent),
            "PGRO_KOPIA_DIR": str(self.kopia_dir.parent),
            "PGRO_READ_ONLY": "true" if self.read_only else "false",
            "KOPIA_PARALLEL": str(self.parallel or ""),
            "PGRO_EXTRA_CONFIG": self.extra_config,
        }
        if self.verify_depth != "quick":
            env["PGRO_VERIFY_DEPTH"] = self.verify_depth
        if self.kopia_cache_root is not None:
            env["PGRO_KOPIA_CACHE_ROOT"] = str(self.kopia_cache_root)
        if self.proxy is not None:
            env["PGRO_CANOPY_PROXY_PORT_FILE"] = str(self.proxy.port_file)
            env["PGRO_CANOPY_PROXY_HOST"] = self.proxy.host
        return env

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RestoreJob:
        """What the restore worker reads on stdin."""
        restore_dir = Path(doc["restoreDir"])
        launch = doc.get("canopyProxy")
        return cls(
            snapshot_id=doc["snapshot"],
            credentials=credentials_from_json(doc["credentials"]),
            target=restore_dir / "data",
            kopia_dir=restore_dir / "kopia",
            snapshot_size=_size(doc.get("snapshotSize")),
            snapshot_time=doc.get("snapshotTime") or "",
            read_only=bool(doc.get("readOnly")),
            parallel=doc.get("parallel"),
            extra_config=doc.get("extraConfig") or "",
            proxy=CanopyProxy(restore_dir / "proxy-port", launch=launch) if launch else None,
            verify_depth=doc.get("verifyDepth") or "quick",
            kopia_cache=Path(doc["kopiaCache"]) if doc.get("kopiaCache") else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "restoreDir": str(self.target.parent),
            "snapshot": self.snapshot_id,
            "snapshotSize": self.snapshot_size,
            "snapshotTime": self.snapshot_time,
            "readOnly": self.read_only,
            "parallel": self.parallel,
            "extraConfig": self.extra_config,
            "credentials": credentials_to_json(self.credentials),
            "canopyProxy": dict(self.proxy.launch or {}) if self.proxy else None,
            "verifyDepth": self.verify_depth,
            "kopiaCache": str(self.kopia_cache) if self.kopia_cache else None,
        }


def classify(exc: BaseException, secrets: Iterable[str | None] = ()) -> tuple[str, str]:
    """(reason, message) for what stopped a restore or a verification: the error's own
    `reason` (pgro's errors all carry one), else `UnexpectedError`; secrets scrubbed."""
    reason, message = getattr(exc, "reason", None), str(exc)
    # Not another library's `reason` (UnicodeDecodeError and ssl.SSLError have one).
    if not (isinstance(reason, str) and type(exc).__module__.startswith("pgro.")):
        reason = "UnexpectedError"
        message = (
            f"{type(exc).__name__}: {exc} (this is a pgro bug or an unclassified environment "
            "problem; please report it with this message)"
        )
    elif isinstance(exc, KopiaError) and _NO_CREDENTIALS in message:
        # The broker (or canopy behind it) gave the proxy nothing: canopy may be down or
        # the group not ready yet.
        reason = "CanopyCredentialsUnavailable"
    elif isinstance(exc, StartupFailed) and exc.log_tail:
        message = f"{message}. Server log:\n{exc.log_tail}"
    return reason, scrub(message, secrets)


@dataclass(frozen=True)
class RestoreOutcome:
    """How a restore ended. Its JSON (`to_json`) is the worker's result file; `message` is
    the Job's termination message: the major version on the first line (what the
    reference writes) and the repairs as JSON on the second, or `error: <reason>: <error>`."""

    ok: bool
    postgres_version: str | None = None
    pgdata: str | None = None
    reason: str = ""
    error: str = ""
    fixes: dict[str, bool] | None = None
    notes: list[str] | None = None
    # What the data checks found (`api.data_checks.DataChecks` in its wire form), when the
    # worker ran them: pgro run's restore worker does, at a replica's depth.
    data_checks: dict[str, Any] | None = None
    # How full (percent) the restore Job found its kopia-cache volume when it evicted the
    # cache under pressure (features.md §2.12), for the operator to grow the volume.
    cache_pressure: int | None = None

    @classmethod
    def restored(
        cls, restored: RestoredDataDirectory, checks: DataChecks | None = None
    ) -> RestoreOutcome:
        return cls(
            ok=True,
            postgres_version=restored.data.major,
            pgdata=str(restored.data.path),
            fixes=dict(restored.repairs.fixes),
            notes=list(restored.repairs.notes),
            data_checks=checks.to_wire() if checks is not None else None,
        )

    @classmethod
    def failed(cls, exc: BaseException, secrets: Iterable[str | None] = ()) -> RestoreOutcome:
        reason, error = classify(exc, secrets)
        checks: DataChecks | None = getattr(exc, "data_checks", None)
        return cls(
            ok=False,
            reason=reason,
            error=error,
            data_checks=checks.to_wire() if checks is not None else None,
        )

    @property
    def checks(self) -> DataChecks | None:
        """`data_checks` as the model, None when absent or unreadable (a result file
        from an older pgro)."""
        if not self.data_checks:
            return None
        try:
            return DataChecks.model_validate(self.data_checks)
        except ValueError:
            return None

    @property
    def failure(self) -> str:
        """`<reason>: <error>`, what a restore's status says."""
        return ": ".join(part for part in (self.reason, self.error) if part)

    def work(self, name: str | None = None, completed_at: datetime | None = None) -> RestoreWork:
        """The finished work as the restore's state machine observes it."""
        if not self.ok:
            return RestoreWork(WorkState.FAILED, name, reason=self.failure, data_checks=self.checks)
        return RestoreWork(
            WorkState.SUCCEEDED,
            name,
            self.postgres_version,
            "",
            completed_at,
            self.fixes,
            data_checks=self.checks,
        )

    @property
    def exit_code(self) -> int:
        """0, or 1 when another attempt may succeed and 2 when it cannot."""
        if self.ok:
            return 0
        return EXIT_RETRY if self.reason in RETRYABLE else EXIT_PERMANENT

    @property
    def message(self) -> str:
        if not self.ok:
            return f"error: {self.failure}"
        doc: dict[str, Any] = {"fixes": self.fixes or {}}
        if self.cache_pressure is not None:
            doc["cachePressure"] = self.cache_pressure
        return f"{self.postgres_version}\n{json.dumps(doc)}"

    @classmethod
    def from_message(cls, message: str) -> RestoreOutcome:
        text = message.strip()
        if text.startswith("error: "):
            reason, _, error = text.removeprefix("error: ").partition(": ")
            return cls(ok=False, reason=reason, error=error)
        first, _, rest = text.partition("\n")
        first = first.strip()
        if not (first and all(part.isdigit() for part in first.split("."))):
            return cls(ok=False, error=text)
        doc: Any = None
        with contextlib.suppress(ValueError):
            doc = json.loads(rest)
        found = doc.get("fixes") if isinstance(doc, dict) else None
        pressure = doc.get("cachePressure") if isinstance(doc, dict) else None
        if not (isinstance(pressure, int) and not isinstance(pressure, bool)):
            pressure = None
        if not isinstance(found, dict):
            return cls(ok=True, postgres_version=first, cache_pressure=pressure)
        fixes = {str(k): v for k, v in found.items() if isinstance(v, bool)}
        return cls(ok=True, postgres_version=first, fixes=fixes, cache_pressure=pressure)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RestoreOutcome:
        return cls(**json.loads(text))
