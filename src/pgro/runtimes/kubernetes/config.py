"""Operator-wide configuration: the ConfigMap, the environment, the placement defaults.
Forgiving like the reference's: a bad value falls back to its default with a warning.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

DEFAULT_MAX_CONCURRENT_RESTORES: Final = 2
# The reference's `usePortForward: "true"` reached restore databases through API-server
# port-forwards (an operator run outside the cluster). pgro does not: it says so once per
# change, in the log and as an event on the ConfigMap, and connects by pod IP as always.
EVENT_USE_PORT_FORWARD_UNSUPPORTED: Final = "UsePortForwardUnsupported"
USE_PORT_FORWARD_UNSUPPORTED: Final = (
    "usePortForward: 'true' is not supported and is ignored: the operator connects to "
    "restore pods by pod IP on port 5432, so it must run inside the cluster or have a route "
    "to the pod network; remove the key to silence this warning"
)
DEFAULT_READY_TIMEOUT_SECS: Final = 1800

# What `log_min_messages` accepts, most to least verbose (the same in PostgreSQL 13-18).
POSTGRES_LOG_LEVELS: Final = (
    "debug5",
    "debug4",
    "debug3",
    "debug2",
    "debug1",
    "info",
    "notice",
    "warning",
    "error",
    "log",
    "fatal",
    "panic",
)
TOLERATION_EFFECTS: Final = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: Literal["Equal", "Exists"]
    effect: str
    value: str | None = None

    def to_wire(self) -> dict[str, str]:
        wire = {"key": self.key, "operator": self.operator}
        if self.operator == "Equal":
            wire["value"] = self.value or ""
        wire["effect"] = self.effect
        return wire


@dataclass(frozen=True)
class Placement:
    """Operator-wide scheduling defaults (reference restore-pipeline.md §8.6)."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.node_selector or self.pod_annotations or self.tolerations)


@dataclass(frozen=True)
class OperatorConfig:
    max_concurrent_restores: int
    # The ConfigMap key is still `kopiaImage` for compatibility, but pgro's restore Job
    # runs pgro itself (which drives kopia), so the default is the pgro image.
    restore_image: str
    use_port_forward: bool = False
    placement: Placement = field(default_factory=Placement)
    # `PGRO_LOG_LEVEL` (the operator's environment, not the ConfigMap): passed to every
    # restored server as `-c log_min_messages=<level>`; None leaves the server's own.
    postgres_log_level: str | None = None


def with_placement(pod_template: Mapping[str, Any], placement: Placement) -> dict[str, Any]:
    """A copy of `pod_template` ({metadata, spec}) with the operator-wide placement added.

    Keys already on the template win: a replica's own `podAnnotations` or a deliberate
    node selector is never overwritten. Tolerations are appended unless an identical one
    is already there. An empty placement returns an identical copy.
    """
    template = copy.deepcopy(dict(pod_template))
    if placement.is_empty:
        return template
    if placement.pod_annotations:
        meta = template.setdefault("metadata", {})
        meta["annotations"] = {**placement.pod_annotations, **(meta.get("annotations") or {})}
    spec = template.setdefault("spec", {})
    if placement.node_selector:
        spec["nodeSelector"] = {**placement.node_selector, **(spec.get("nodeSelector") or {})}
    if placement.tolerations:
        tolerations = list(spec.get("tolerations") or [])
        for toleration in placement.tolerations:
            wire = toleration.to_wire()
            if wire not in tolerations:
                tolerations.append(wire)
        spec["tolerations"] = tolerations
    return template


_LABEL_NAME: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_DNS_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


def qualified_name_ok(key: str) -> bool:
    """A label/annotation key: `[prefix/]name`, as the API server validates it."""
    prefix, sep, name = key.rpartition("/")
    if sep and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return bool(_LABEL_NAME.fullmatch(name))


def label_value_ok(value: str) -> bool:
    return value == "" or bool(_LABEL_NAME.fullmatch(value))


def _valid_pairs(
    pairs: Mapping[str, str], what: str, warnings: list[str], *, label_values: bool
) -> dict[str, str]:
    """Drop what the API server would reject, so one bad entry cannot stop every pod."""
    kept: dict[str, str] = {}
    for key, value in pairs.items():
        if not qualified_name_ok(key):
            warnings.append(f"{what}: skipping {key!r}: not a valid key ([prefix/]name)")
        elif label_values and not label_value_ok(value):
            warnings.append(
                f"{what}: skipping {key}={value!r}: a label value is at most 63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit"
            )
        else:
            kept[key] = value
    return kept


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_pairs(raw: str, what: str, warnings: list[str]) -> dict[str, str]:
    """`k=v,k=v`; only the first `=` splits, so a value may contain `=`."""
    pairs: dict[str, str] = {}
    for item in _items(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            warnings.append(f"{what}: skipping malformed entry {item!r} (expected key=value)")
            continue
        pairs[key.strip()] = value.strip()
    return pairs


def parse_tolerations(raw: str, warnings: list[str]) -> tuple[Toleration, ...]:
    """`key=value:Effect` (operator Equal) or `key:Effect` (Exists), comma-separated."""
    parsed: list[Toleration] = []
    for item in _items(raw):
        head, sep, effect = item.rpartition(":")
        effect = effect.strip()
        key, eq, value = head.partition("=")
        key = key.strip()
        if not sep or not key or effect not in TOLERATION_EFFECTS:
            warnings.append(
                f"tolerations: skipping malformed entry {item!r} (expected key=value:Effect or "
                f"key:Effect, Effect one of {', '.join(sorted(TOLERATION_EFFECTS))})"
            )
            continue
        toleration = (
            Toleration(key=key, operator="Equal", value=value.strip(), effect=effect)
            if eq
            else Toleration(key=key, operator="Exists", effect=effect)
        )
        if toleration not in parsed:
            parsed.append(toleration)
    return tuple(parsed)


def _positive_int(raw: str | None, name: str, default: int, warnings: list[str]) -> int:
    if raw is None or not raw.strip():
        return default
    text = raw.strip()
    # Zero is refused too: no restore could ever start, which is never what was meant.
    if text.isdigit() and int(text) > 0:
        return int(text)
    warnings.append(f"{name}: invalid value {raw!r} (expected a positive integer); using {default}")
    return default


def plain_kopia_image(image: str) -> bool:
    """Whether `image` is a kopia image (the reference's `kopiaImage`, e.g.
    `kopia/kopia:0.22.3`): its repository's last path component is `kopia`."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[0] == "kopia"


def _restore_image(raw: str | None, default_image: str, warnings: list[str]) -> str:
    """`kopiaImage`: the image of the restore Jobs, which run pgro's restore step (pgro
    drives kopia itself), so a pgro image. The reference's meaning, a plain kopia image such
    as its documented `kopia/kopia:0.22.3`, cannot run that step: it is ignored with a
    warning and the operator's own image used, so a ConfigMap carried over from the
    reference keeps working."""
    image = (raw or "").strip()
    if not image:
        return default_image
    if plain_kopia_image(image):
        warnings.append(
            f"kopiaImage: {image!r} is a kopia image (the reference's meaning); pgro's restore "
            f"Jobs run pgro, which brings kopia, so the operator's image {default_image!r} is "
            "used. Remove kopiaImage, or set it to a pgro image"
        )
        return default_image
    return image


def parse_postgres_log_level(raw: str | None) -> tuple[str | None, list[str]]:
    """`PGRO_LOG_LEVEL` as a PostgreSQL `log_min_messages` level (lower case), or None when
    unset, blank or not a level PostgreSQL knows (with a warning: an unknown level would
    stop every restored server from starting)."""
    if raw is None or not raw.strip():
        return None, []
    level = raw.strip().lower()
    if level in POSTGRES_LOG_LEVELS:
        return level, []
    return None, [
        f"PGRO_LOG_LEVEL: {raw!r} is not a PostgreSQL log_min_messages level "
        f"({', '.join(POSTGRES_LOG_LEVELS)}); ignored, restored servers keep their own"
    ]


def parse_operator_config(
    data: Mapping[str, str] | None,
    *,
    default_image: str,
    postgres_log_level: str | None = None,
) -> tuple[OperatorConfig, list[str]]:
    """The config from the ConfigMap's `data` (None when it does not exist), and warnings
    for every value that was ignored."""
    data = data or {}
    warnings: list[str] = []
    max_restores = _positive_int(
        data.get("maxConcurrentRestores"),
        "maxConcurrentRestores",
        DEFAULT_MAX_CONCURRENT_RESTORES,
        warnings,
    )
    image = _restore_image(data.get("kopiaImage"), default_image, warnings)
    node_selector = parse_pairs(data.get("nodeSelector") or "", "nodeSelector", warnings)
    annotations = parse_pairs(data.get("podAnnotations") or "", "podAnnotations", warnings)
    tolerations = tuple(
        t
        for t in parse_tolerations(data.get("tolerations") or "", warnings)
        if _valid_pairs({t.key: t.value or ""}, "tolerations", warnings, label_values=True)
    )
    placement = Placement(
        node_selector=_valid_pairs(node_selector, "nodeSelector", warnings, label_values=True),
        pod_annotations=_valid_pairs(annotations, "podAnnotations", warnings, label_values=False),
        tolerations=tolerations,
    )
    use_port_forward = data.get("usePortForward") == "true"
    if use_port_forward:
        warnings.append(USE_PORT_FORWARD_UNSUPPORTED)
    config = OperatorConfig(
        max_concurrent_restores=max_restores,
        restore_image=image,
        use_port_forward=use_port_forward,
        placement=placement,
        postgres_log_level=postgres_log_level,
    )
    return config, warnings
