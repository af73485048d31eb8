"""Reading the manifests a user would apply to Kubernetes: Secrets and replicas from YAML.

A manifest is input, not code: every way it can be malformed (not UTF-8, not YAML, YAML
aliases, a wrong shape) ends in a `ManifestError` that names the file and the place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from pgro.api.replica import PostgresPhysicalReplica
from pgro.api.secret import KopiaCredentials, SecretInvalid, decode_secret_data, parse_kopia_secret
from pgro.core import reasons
from pgro.core.schedule import InvalidSchedule, parse_schedule, schedule_seed

REPLICA_KIND = "PostgresPhysicalReplica"


class ManifestError(Exception):
    """The manifest cannot be used; the message names the file, the object and the fix."""

    def __init__(self, message: str, reason: str = "InvalidManifest") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Manifest:
    replicas: list[PostgresPhysicalReplica] = field(default_factory=list)
    # (namespace, name) → raw `data`/`stringData` document, decoded lazily so one bad
    # Secret only affects the replicas that use it.
    secrets: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    def replica(self, name: str | None) -> PostgresPhysicalReplica:
        if name is not None:
            for r in self.replicas:
                if r.metadata.name == name:
                    return r
            known = ", ".join(r.metadata.name for r in self.replicas) or "none"
            raise ManifestError(f"no PostgresPhysicalReplica named {name!r} (found: {known})")
        if not self.replicas:
            raise ManifestError(
                "the manifest holds no PostgresPhysicalReplica (apiVersion pgro.bes.au/v1alpha1)"
            )
        if len(self.replicas) > 1:
            names = ", ".join(r.metadata.name for r in self.replicas)
            raise ManifestError(
                f"the manifest holds several replicas ({names}): choose one with --replica"
            )
        return self.replicas[0]


def _format_validation(exc: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])


class _NoAliasLoader(yaml.SafeLoader):
    """`SafeLoader` that refuses aliases (`*name`).

    An alias shares a node, and nested aliases multiply: a few hundred bytes expand to
    gigabytes once anything walks or stringifies the result (the "billion laughs"). A
    Kubernetes manifest never needs them, so none are accepted.
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None,
                None,
                f"found the alias *{event.anchor}: YAML aliases are not accepted in "
                "manifests (they can expand without bound); write the value out instead",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ManifestError(
            f"{path}:{line}:{column}: byte 0x{raw[exc.start]:02x} at offset {exc.start} is not "
            "UTF-8: manifests must be UTF-8 text (re-save the file as UTF-8)"
        ) from None


def _documents(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    text = _decode(path, raw)
    try:
        yield from enumerate(yaml.load_all(text, Loader=_NoAliasLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ManifestError(f"{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: invalid YAML: {exc}") from None


def load_manifests(paths: Iterable[Path]) -> Manifest:
    manifest = Manifest()
    for path in paths:
        for index, doc in _documents(path):
            if doc is None:
                continue
            where = f"{path} (document {index + 1})"
            if not isinstance(doc, dict):
                raise ManifestError(f"{where}: expected a mapping, got {type(doc).__name__}")
            kind = doc.get("kind")
            meta = doc.get("metadata") or {}
            name = meta.get("name") if isinstance(meta, dict) else None
            if kind == "Secret":
                if not name:
                    raise ManifestError(f"{where}: Secret without metadata.name")
                ns = str(meta.get("namespace") or "default")
                manifest.secrets[(ns, str(name))] = doc
            elif kind == REPLICA_KIND:
                try:
                    replica = PostgresPhysicalReplica.model_validate(doc)
                except pydantic.ValidationError as exc:
                    raise ManifestError(
                        f"{where}: PostgresPhysicalReplica {name or '(unnamed)'!s} is invalid: "
                        f"{_format_validation(exc)}"
                    ) from None
                except ValueError as exc:
                    raise ManifestError(f"{where}: {exc}") from None
                manifest.replicas.append(replica)
    return manifest


def check_schedule(replica: PostgresPhysicalReplica) -> None:
    """Raise `ManifestError` (reason InvalidSchedule) for a schedule `pgro run` would report
    as ScheduleValid=False; the same parse, with the same per-replica seed for `H`."""
    seed = schedule_seed(replica.metadata.uid, replica.namespace, replica.name)
    try:
        parse_schedule(replica.spec.schedule, seed)
    except InvalidSchedule as exc:
        raise ManifestError(
            f"replica {replica.metadata.name}: spec.schedule: {exc} "
            "(pgro run reports this as ScheduleValid=False): fix spec.schedule",
            reasons.INVALID_SCHEDULE,
        ) from None


def kopia_credentials(manifest: Manifest, replica: PostgresPhysicalReplica) -> KopiaCredentials:
    """The replica's credentials, with the reference's condition reasons on failure."""
    problem = replica.credential_source_problem()
    if problem is not None:
        reason, message = problem
        raise ManifestError(message, reason)
    if replica.spec.kopia_secret_ref is None:
        raise ManifestError(
            f"replica {replica.metadata.name} uses canopySource: it needs canopy "
            "(`pgro run --canopy-url` or the operator), not a kopia Secret",
            "CanopySourced",
        )
    ns = replica.metadata.namespace or "default"
    secret_name = replica.spec.kopia_secret_ref.name
    doc = manifest.secrets.get((ns, secret_name))
    if doc is None:
        raise ManifestError(
            f"replica {replica.metadata.name} references Secret {secret_name!r} in namespace "
            f"{ns!r}, which is not in the manifest: add a `kind: Secret` document with the "
            "kopia keys",
            "SecretNotFound",
        )
    try:
        return parse_kopia_secret(decode_secret_data(doc))
    except SecretInvalid as exc:
        raise ManifestError(f"Secret {ns}/{secret_name}: {exc}", exc.reason) from None
