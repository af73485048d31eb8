"""deploy/, Containerfile and .containerignore: loadable, least privilege, hardened, consistent.

Built-in kinds are decoded with lightkube and encoded again: a misspelled or misplaced field is
silently dropped by the decoder, so the round trip differs from the file. pgro's own kinds are
checked by the `pgro.api` models (same round-trip idea) and, once `deploy/crds.yaml` exists, by
the CRD's schema: lightkube's generic resources accept any field, so they would prove nothing.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import codecs

from pgro.api import PostgresPhysicalReplica, load_object
from pgro.api.names import GROUP, REPLICA_PLURAL, RESTORE_PLURAL
from pgro.api.secret import decode_secret_data, parse_kopia_secret

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = DEPLOY / "crds.yaml"
CONTAINERFILE = ROOT / "Containerfile"
CONTAINERIGNORE = ROOT / ".containerignore"
SETUP_SH = ROOT / "scripts" / "setup.sh"

NAMESPACE = "pgro-system"
SERVICE_ACCOUNT = "postgres-restore-operator"
CONFIGMAP = "postgres-restore-operator-config"
LEASE = "pgro-operator-leader"
IMAGE_REPOSITORY = "ghcr.io/beyondessential/pgro"
CRD_NAMES = (f"{REPLICA_PLURAL}.{GROUP}", f"{RESTORE_PLURAL}.{GROUP}")

Doc = dict[str, Any]


# --- loading ------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/ that holds Kubernetes objects (all but kustomization)."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def all_docs() -> list[tuple[Path, Doc]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def find(kind: str, name: str, path: Path | None = None) -> Doc:
    found = [
        d
        for p, d in all_docs()
        if (path is None or p == path) and d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected exactly one {kind} {name}, found {len(found)}"
    return found[0]


def is_pgro_kind(doc: Mapping[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith(f"{GROUP}/")


def doc_id(item: tuple[Path, Doc]) -> str:
    path, doc = item
    return f"{path.relative_to(DEPLOY)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- checkers (each tested below against a broken input, so they can fail) ---------------


def differences(want: Any, got: Any, path: str = "") -> list[str]:
    """Where `got` lost, added or changed something that `want` has."""
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        out = []
        for k in sorted(set(want) | set(got), key=str):
            if k not in got:
                out.append(f"{path}.{k}: dropped (unknown or misplaced field?)")
            elif k not in want:
                out.append(f"{path}.{k}: added")
            else:
                out += differences(want[k], got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(want)} items became {len(got)}"]
        return [
            e
            for i, (w, g) in enumerate(zip(want, got, strict=True))
            for e in differences(w, g, f"{path}[{i}]")
        ]
    return [] if want == got else [f"{path}: {want!r} became {got!r}"]


def lightkube_problems(doc: Doc) -> list[str]:
    """Problems lightkube finds: a decode error, or fields the typed model does not keep."""
    try:
        obj = codecs.from_dict(doc)
    except Exception as exc:  # the decoder raises several types; the message is what matters
        return [f"does not load: {exc}"]
    encoded: Any = obj.to_dict()  # type: ignore[no-untyped-call]
    return differences(doc, encoded)


def keys_dropped(want: Any, got: Any, path: str = "") -> list[str]:
    """Keys of `want` missing from `got`; values may be normalised (`10m`, quantities)."""
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            return [f"{path}: became {type(got).__name__}"]
        out = []
        for k, v in want.items():
            if k not in got:
                out.append(f"{path}.{k}: dropped (unknown or misplaced field?)")
            else:
                out += keys_dropped(v, got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [
            e
            for i, (w, g) in enumerate(zip(want, got, strict=True))
            for e in keys_dropped(w, g, f"{path}[{i}]")
        ]
    return []


def pgro_model_problems(doc: Doc) -> list[str]:
    try:
        obj = load_object(doc)
    except ValueError as exc:
        return [f"does not validate: {exc}"]
    return keys_dropped(doc, obj.to_wire())


_SCHEMA_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def schema_problems(value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
    """Unknown fields, missing required fields and wrong types against a structural schema."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer or a string, got {value!r}"]
    want = schema.get("type")
    if isinstance(want, str) and want in _SCHEMA_TYPES:
        ok = isinstance(value, _SCHEMA_TYPES[want])
        if want in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok and not (value is None and schema.get("nullable")):
            return [f"{path}: expected {want}, got {value!r}"]
    out: list[str] = []
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if isinstance(props, Mapping):
            for k, v in value.items():
                if k in props:
                    out += schema_problems(v, props[k], f"{path}.{k}")
                else:
                    out.append(f"{path}.{k}: not in the CRD schema")
            out += [f"{path}.{r}: required" for r in schema.get("required", []) if r not in value]
        elif isinstance(extra, Mapping):
            for k, v in value.items():
                out += schema_problems(v, extra, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            out += schema_problems(item, schema["items"], f"{path}[{i}]")
    return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "a continued line has no end"
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker/Buildah .containerignore semantics for the patterns used here: the last pattern
    matching the path or one of its parent directories decides; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            result = not negate
    return result


def containerignore_patterns() -> list[str]:
    lines = (line.strip() for line in CONTAINERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ldflags(text: str) -> str:
    m = re.search(r'-ldflags "([^"]+)"', text)
    assert m, 'no -ldflags "..." found'
    return m.group(1)


def pyproject_version() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = data["project"]["version"]
    assert isinstance(version, str)
    return version


# --- the checkers can fail ------------------------------------------------------------------


def test_lightkube_check_catches_a_misspelled_field() -> None:
    doc: Doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}}
    assert lightkube_problems(doc) == [".dta: dropped (unknown or misplaced field?)"]


def test_lightkube_check_catches_a_misplaced_field_and_a_wrong_type() -> None:
    misplaced: Doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"spec": {"containers": [{"name": "a", "readOnlyRootFilesystem": True}]}},
        },
    }
    assert lightkube_problems(misplaced) == [
        ".spec.template.spec.containers[0].readOnlyRootFilesystem: dropped "
        "(unknown or misplaced field?)"
    ]
    wrong_type: Doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "two"},
    }
    assert lightkube_problems(wrong_type)[0].startswith("does not load")


def test_pgro_model_check_catches_a_misspelled_field() -> None:
    doc: Doc = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "PostgresPhysicalReplica",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"schedule": "0 3 * * *", "kopiaSecretRef": {"name": "k"}, "ephemerl": True},
    }
    assert pgro_model_problems(doc) == [".spec.ephemerl: dropped (unknown or misplaced field?)"]


def test_schema_check_catches_unknown_missing_and_mistyped_fields() -> None:
    schema = {
        "type": "object",
        "required": ["schedule"],
        "properties": {
            "schedule": {"type": "string"},
            "ephemeral": {"type": "boolean"},
            "size": {"x-kubernetes-int-or-string": True},
        },
    }
    assert schema_problems({"schedule": "x", "ephemeral": True, "size": "2Ti"}, schema, "") == []
    assert schema_problems({"ephemerl": True, "size": True}, schema, "") == [
        ".ephemerl: not in the CRD schema",
        ".size: expected an integer or a string, got True",
        ".schedule: required",
    ]


def test_containerignore_matcher_follows_last_match_and_parents() -> None:
    patterns = ["*", "!src", "src/**/__pycache__"]
    assert ignored("tests/unit/x.py", patterns)
    assert not ignored("src/pgro/cli/main.py", patterns)
    assert ignored("src/pgro/cli/__pycache__/main.cpython-311.pyc", patterns)


# --- every manifest ----------------------------------------------------------------------


def test_deploy_holds_the_expected_files() -> None:
    names = {str(p.relative_to(DEPLOY)) for p in manifest_files()}
    assert {"namespace.yaml", "rbac.yaml", "operator.yaml", "examples/replica.yaml"} <= names


@pytest.mark.parametrize("item", all_docs(), ids=doc_id)
def test_object_loads_without_losing_fields(item: tuple[Path, Doc]) -> None:
    _, doc = item
    assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str)
    assert doc.get("metadata", {}).get("name"), "every object is named"
    problems = pgro_model_problems(doc) if is_pgro_kind(doc) else lightkube_problems(doc)
    assert problems == []


def test_installed_objects_live_in_the_operator_namespace() -> None:
    for path, doc in all_docs():
        if path.parent != DEPLOY or path == CRDS:
            continue
        kind = doc["kind"]
        if kind in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in doc["metadata"], f"{kind} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{kind} {doc['metadata']}"


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    ns = find("Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- RBAC ----------------------------------------------------------------------------------

# (apiGroup, resource, resourceNames or None) -> verbs. Exactly what the operator uses.
CLUSTER_RULES: dict[tuple[str, str, tuple[str, ...] | None], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", None): {"create"},
    ("apiextensions.k8s.io", "customresourcedefinitions", CRD_NAMES): {"get", "patch"},
    (GROUP, "postgresphysicalreplicas", None): {"get", "list", "watch"},
    (GROUP, "postgresphysicalreplicas/status", None): {"get", "patch"},
    (GROUP, "postgresphysicalrestores", None): {"get", "list", "watch", "create", "delete"},
    (GROUP, "postgresphysicalrestores/status", None): {"get", "patch"},
    # list/delete: persistent-user Secrets of users removed from a replica (features.md §2.5).
    ("", "secrets", None): {"get", "create", "list", "delete"},
    ("", "services", None): {"get", "create", "patch"},
    ("", "persistentvolumeclaims", None): {"get", "create", "patch"},
    ("", "pods", None): {"get", "list", "watch", "patch", "delete"},
    # The migration Job's log tail (migrateTo).
    ("", "pods/log", None): {"get"},
    ("batch", "jobs", None): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "deployments", None): {"get", "list", "watch", "create", "patch"},
    ("events.k8s.io", "events", None): {"create", "patch"},
}

ROLE_RULES: dict[tuple[str, str, tuple[str, ...] | None], set[str]] = {
    ("", "configmaps", (CONFIGMAP,)): {"get", "list", "watch"},
    ("coordination.k8s.io", "leases", (LEASE,)): {"get", "update"},
    # Unscoped: RBAC cannot restrict create by name.
    ("coordination.k8s.io", "leases", None): {"create"},
}


def flatten_rules(role: Doc) -> dict[tuple[str, str, tuple[str, ...] | None], set[str]]:
    """Verbs per (group, resource, resourceNames); rules repeating a key are merged."""
    out: dict[tuple[str, str, tuple[str, ...] | None], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "resourceNames", "verbs"}, rule
        names = rule.get("resourceNames")
        key_names = tuple(sorted(names)) if names else None
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource, key_names), set()).update(rule["verbs"])
    return out


def normalise(
    rules: dict[tuple[str, str, tuple[str, ...] | None], set[str]],
) -> dict[tuple[str, str, tuple[str, ...] | None], set[str]]:
    return {(g, r, tuple(sorted(n)) if n else None): v for (g, r, n), v in rules.items()}


def test_cluster_role_grants_exactly_the_operators_use() -> None:
    role = find("ClusterRole", "pgro-operator")
    assert flatten_rules(role) == normalise(CLUSTER_RULES)


def test_role_grants_exactly_the_operators_use_in_its_namespace() -> None:
    role = find("Role", "pgro-operator")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert flatten_rules(role) == normalise(ROLE_RULES)


def test_no_rule_uses_a_wildcard_or_a_leftover_of_the_reference() -> None:
    words = [
        word
        for doc in load_docs(DEPLOY / "rbac.yaml")
        for rule in doc.get("rules", [])
        for field in ("apiGroups", "resources", "verbs")
        for word in rule[field]
    ]
    assert "*" not in words
    for leftover in ("namespaces", "portforward", "cnpg", "escalate", "bind", "impersonate"):
        assert not [w for w in words if leftover in w], leftover


def test_a_broadened_rule_fails_the_comparison() -> None:
    role = find("ClusterRole", "pgro-operator")
    broadened = {
        **role,
        "rules": [
            *role["rules"],
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["watch"]},
        ],
    }
    assert flatten_rules(broadened) != normalise(CLUSTER_RULES)


def test_crd_rule_names_the_crds_in_crds_yaml_when_present() -> None:
    if not CRDS.exists():
        pytest.skip("deploy/crds.yaml is not generated yet")
    names = {
        d["metadata"]["name"] for d in load_docs(CRDS) if d["kind"] == "CustomResourceDefinition"
    }
    assert names == set(CRD_NAMES)


def test_crds_yaml_is_what_pgro_crds_prints() -> None:
    if not CRDS.exists():
        pytest.skip("deploy/crds.yaml is not generated yet")
    from pgro.api.crds import crds_yaml

    assert CRDS.read_text() == crds_yaml(), "regenerate: pgro crds -o deploy/crds.yaml"


@pytest.mark.parametrize(
    ("kind", "role_kind"), [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")]
)
def test_bindings_bind_the_operator_service_account(kind: str, role_kind: str) -> None:
    binding = find(kind, "pgro-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role_kind,
        "name": "pgro-operator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    ]
    sa = find("ServiceAccount", SERVICE_ACCOUNT)
    assert sa["metadata"]["namespace"] == NAMESPACE


# --- the operator Deployment, Service and ConfigMap ----------------------------------------


def deployment() -> Doc:
    return find("Deployment", "postgres-restore-operator", DEPLOY / "operator.yaml")


def operator_container() -> Doc:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container = containers[0]
    assert isinstance(container, dict)
    return container


def test_deployment_runs_as_non_root_on_a_read_only_root_filesystem() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    sc = operator_container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == sc["runAsGroup"] == 65534
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 65534
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_deployment_gives_kopia_a_writable_tmp() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in operator_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert set(mounts) == {"/tmp"}, "the rest of the filesystem stays read-only"


def test_deployment_runs_pgro_operator_with_leader_election() -> None:
    dep = deployment()
    pod = dep["spec"]["template"]["spec"]
    c = operator_container()
    image = c["image"]
    assert image == f"{IMAGE_REPOSITORY}:{pyproject_version()}"
    assert c["args"] == ["operator"] and "command" not in c, "ENTRYPOINT is pgro"
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    assert pod["terminationGracePeriodSeconds"] == 30
    env = {e["name"]: e for e in c["env"]}
    assert set(env) == {
        "OPERATOR_NAMESPACE",
        "POD_NAME",
        "PGRO_IMAGE",
        "METRICS_ADDR",
        "DEPLOYMENT_READY_TIMEOUT_SECS",
    }
    assert env["OPERATOR_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["PGRO_IMAGE"]["value"] == image
    assert env["METRICS_ADDR"]["value"] == "[::]:8080"
    assert env["DEPLOYMENT_READY_TIMEOUT_SECS"]["value"] == "1800"
    assert c["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }


def test_deployment_probes_and_port() -> None:
    c = operator_container()
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["httpGet"] == {"path": "/readyz", "port": "http"}
    assert (ready["initialDelaySeconds"], ready["periodSeconds"]) == (5, 10)
    assert live["httpGet"] == {"path": "/livez", "port": "http"}
    assert (live["initialDelaySeconds"], live["periodSeconds"]) == (15, 20)


def test_operator_pods_carry_the_scrape_annotations() -> None:
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(operator_container()["ports"][0]["containerPort"]),
        "prometheus.io/path": "/metrics",
    }


def test_pods_prefer_different_nodes() -> None:
    dep = deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    terms = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert len(terms) == 1
    term = terms[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_service_exposes_the_metrics_port_of_the_operator_pods() -> None:
    svc = find("Service", "postgres-restore-operator")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    annotations = svc["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_configmap_sets_the_queue_size_and_documents_the_other_keys() -> None:
    cm = find("ConfigMap", CONFIGMAP)
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["data"] == {"maxConcurrentRestores": "2"}
    # The other keys are commented-out examples; uncommented they must be valid data values.
    sections = (DEPLOY / "operator.yaml").read_text().split("\n---\n")
    text = next(s for s in sections if re.search(r"^kind: ConfigMap$", s, flags=re.MULTILINE))
    commented = re.findall(r"^  # ([A-Za-z]+: .+)$", text, flags=re.MULTILINE)
    examples = yaml.safe_load("\n".join(commented))
    assert set(examples) == {
        "kopiaImage",
        "usePortForward",
        "nodeSelector",
        "podAnnotations",
        "tolerations",
    }
    assert all(isinstance(v, str) for v in examples.values()), "ConfigMap data are strings"
    assert examples["kopiaImage"] == operator_container()["image"]
    for pair in examples["nodeSelector"].split(",") + examples["podAnnotations"].split(","):
        assert re.fullmatch(r"[^=,]+=[^,]*", pair), pair
    for toleration in examples["tolerations"].split(","):
        assert re.fullmatch(
            r"[^=:,]+(=[^:,]*)?:(NoSchedule|PreferNoSchedule|NoExecute)", toleration
        )


# --- examples ------------------------------------------------------------------------------

EXAMPLE = DEPLOY / "examples" / "replica.yaml"


def test_example_secret_holds_usable_kopia_credentials() -> None:
    docs = load_docs(EXAMPLE)
    replicas = [d for d in docs if d["kind"] == "PostgresPhysicalReplica"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert replicas
    for replica in replicas:
        secret = secrets[replica["spec"]["kopiaSecretRef"]["name"]]
        creds = parse_kopia_secret(decode_secret_data(secret))
        assert creds.repository_password


def test_examples_have_an_analytics_replica_and_an_ephemeral_verify_replica() -> None:
    docs = [d for d in load_docs(EXAMPLE) if d["kind"] == "PostgresPhysicalReplica"]
    # No namespace: the examples go into whichever namespace they are applied to.
    assert all("namespace" not in d["metadata"] for d in docs)
    replicas = [r for r in map(load_object, docs) if isinstance(r, PostgresPhysicalReplica)]
    assert len(replicas) == len(docs)
    assert sorted(r.spec.ephemeral for r in replicas) == [False, True]
    for r in replicas:
        assert r.credential_source_problem() is None


def crd_schemas() -> Iterator[tuple[str, Mapping[str, Any]]]:
    for crd in load_docs(CRDS):
        if crd["kind"] != "CustomResourceDefinition":
            continue
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            yield (
                f"{api_version}/{crd['spec']['names']['kind']}",
                version["schema"]["openAPIV3Schema"],
            )


def test_example_replicas_match_the_crd_schema() -> None:
    if not CRDS.exists():
        pytest.skip("deploy/crds.yaml is not generated yet")
    schemas = dict(crd_schemas())
    checked = 0
    for _, doc in all_docs():
        if not is_pgro_kind(doc):
            continue
        schema = schemas[f"{doc['apiVersion']}/{doc['kind']}"]
        assert schema_problems(doc["spec"], schema["properties"]["spec"], ".spec") == []
        checked += 1
    assert checked >= 2


# --- kustomization -------------------------------------------------------------------------


def kustomization_resources() -> list[str]:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    resources = kust["resources"]
    assert isinstance(resources, list)
    return [str(r) for r in resources]


def test_kustomization_lists_every_manifest_and_the_crds() -> None:
    resources = kustomization_resources()
    on_disk = {p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert len(resources) == len(set(resources))
    assert set(resources) == on_disk | {"crds.yaml"}, "examples are not installed"
    # The Namespace must come before what lives in it, the CRDs before anything else.
    assert resources[:2] == ["namespace.yaml", "crds.yaml"]


def test_kustomization_resources_exist() -> None:
    missing = [r for r in kustomization_resources() if not (DEPLOY / r).exists()]
    assert missing == [], "deploy/crds.yaml is generated by `pgro crds`"


# --- Containerfile -------------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(CONTAINERFILE.read_text())


def test_containerfile_copy_sources_exist_and_reach_the_build_context() -> None:
    patterns = containerignore_patterns()
    copies = [args for keyword, args in containerfile() if keyword == "COPY"]
    local = [shlex.split(a) for a in copies if not a.startswith("--from")]
    assert local, "the source tree is copied in"
    checked = 0
    for words in local:
        assert not any(w.startswith("--") for w in words), words
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY source {source} does not exist"
            # The files the package is built from; build leftovers (egg-info, bytecode) may
            # well be ignored.
            files = (
                [path]
                if path.is_file()
                else [f for f in path.rglob("*") if f.suffix in (".py", ".typed")]
            )
            for f in files:
                assert not ignored(str(f.relative_to(ROOT)), patterns), f"{f} is ignored"
                checked += 1
    assert checked > 10


def test_containerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = containerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "tests/unit/test_layout.py",
        ".hypothesis/examples/x",
        "src/pgro/__pycache__/x.pyc",
    ):
        assert ignored(path, patterns), path


def test_containerfile_builds_kopia_as_setup_sh_does() -> None:
    setup = SETUP_SH.read_text()
    text = CONTAINERFILE.read_text()
    m = re.search(r'^KOPIA_VERSION="([0-9.]+)"$', setup, flags=re.MULTILINE)
    assert m
    args = [a for k, a in containerfile() if k == "ARG"]
    assert f"KOPIA_VERSION={m.group(1)}" in args
    assert ldflags(text) == ldflags(setup)
    assert "-trimpath" in text and "-trimpath" in setup
    assert 'go mod download "github.com/kopia/kopia@v$KOPIA_VERSION"' in text


def test_containerfile_stages_user_and_entrypoint() -> None:
    instructions = containerfile()
    froms = [a for k, a in instructions if k == "FROM"]
    assert froms == [
        "docker.io/library/golang:1.26-bookworm AS kopia",
        "docker.io/library/python:3.11-slim-bookworm",
    ]
    final = instructions[[k for k, _ in instructions].index("FROM", 1) :]
    assert ("COPY", "--from=kopia /out/kopia /usr/local/bin/kopia") in final
    assert [a for k, a in final if k == "USER"] == ["65534:65534"]
    assert [a for k, a in final if k == "ENTRYPOINT"] == ['["pgro"]']
    assert [a for k, a in final if k == "CMD"] == ['["operator"]']
    runs = " ".join(a for k, a in final if k == "RUN")
    assert "pip install" in runs and "[dev]" not in runs
    labels = " ".join(a for k, a in final if k == "LABEL")
    assert "org.opencontainers.image.source=" in labels
    assert f'org.opencontainers.image.version="{pyproject_version()}"' in labels


# --- canopy (deploy/canopy/) -------------------------------------------------------------

CANOPY_RULES: dict[tuple[str, str, tuple[str, ...] | None], set[str]] = {
    ("", "namespaces", None): {"list", "create", "delete"},
    (GROUP, "postgresphysicalreplicas", None): {"create", "patch"},
    ("", "secrets", None): {"patch"},
}


def test_canopy_role_grants_exactly_the_syncers_use() -> None:
    docs = load_docs(DEPLOY / "canopy" / "rbac.yaml")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert flatten_rules(role) == normalise(CANOPY_RULES)
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "postgres-restore-operator", "namespace": NAMESPACE}
    ]


def kustomize_build(root: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k root` would apply, built by the kustomize setup installs."""
    binary = shutil.which("kustomize")
    if binary is None:
        pytest.fail("kustomize is not on PATH: run scripts/setup.sh (it builds it once)")
    built = subprocess.run([binary, "build", str(root)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def with_components(tmp_path: Path, deploy: list[str], canopy: list[str]) -> Path:
    """A copy of deploy/ with the commented components enabled, as a user would."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    for path, names in (
        (copy / "kustomization.yaml", deploy),
        (copy / "canopy" / "kustomization.yaml", canopy),
    ):
        doc = yaml.safe_load(path.read_text())
        if names:
            doc["components"] = names
        path.write_text(yaml.safe_dump(doc))
    return copy


def test_deploy_builds_as_kubectl_apply_k_would() -> None:
    kinds = sorted({d["kind"] for d in kustomize_build(DEPLOY)})
    assert "Deployment" in kinds and "CustomResourceDefinition" in kinds
    assert "NetworkPolicy" not in kinds  # canopy is off by default


def test_canopy_component_builds_on_the_base_and_opens_the_broker_port(tmp_path: Path) -> None:
    """Before, deploy/canopy/ was an overlay naming its own parent, which kustomize refuses
    ("cycle detected"): `kubectl apply -k deploy/canopy/` never worked."""
    [kustomization] = load_docs(DEPLOY / "canopy" / "kustomization.yaml")
    assert kustomization["kind"] == "Component"
    assert kustomization["resources"] == ["rbac.yaml", "networkpolicy.yaml"]
    built = kustomize_build(with_components(tmp_path, ["canopy"], []))
    [deployment] = [d for d in built if d["kind"] == "Deployment"]
    [operator] = deployment["spec"]["template"]["spec"]["containers"]
    assert "CANOPY_BASE_URL" in {e["name"] for e in operator["env"]}
    assert {"name": "broker", "containerPort": 9091, "protocol": "TCP"} in operator["ports"]
    [service] = [d for d in built if d["kind"] == "Service"]
    assert 9091 in {p["port"] for p in service["spec"]["ports"]}
    assert [d["metadata"]["name"] for d in built if d["kind"] == "NetworkPolicy"]
    assert "tailscale" not in {
        c["name"] for c in deployment["spec"]["template"]["spec"].get("initContainers", [])
    }


def test_the_tailscale_component_nests_in_the_canopy_component(tmp_path: Path) -> None:
    built = kustomize_build(with_components(tmp_path, ["canopy"], ["tailscale"]))
    [deployment] = [d for d in built if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["tailscale"]
    assert "CANOPY_BASE_URL" in {e["name"] for e in spec["containers"][0]["env"]}


def test_canopy_network_policy_admits_the_broker_port_only_from_proxy_sidecars() -> None:
    """Issue 18 item 9: without it any pod in the cluster could call the broker."""
    from pgro.api.names import LABEL_PROXY_SIDECAR
    from pgro.canopy.settings import DEFAULT_BROKER_PORT

    [policy] = load_docs(DEPLOY / "canopy" / "networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["namespace"] == NAMESPACE
    operator_pods = find("Deployment", "postgres-restore-operator")["spec"]["template"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= operator_pods["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    by_port = {p["port"]: rule for rule in rules for p in rule["ports"]}
    assert set(by_port) == {8080, DEFAULT_BROKER_PORT}
    assert "from" not in by_port[8080]  # metrics and probes, as without canopy
    assert by_port[DEFAULT_BROKER_PORT]["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {LABEL_PROXY_SIDECAR: "true"}}}
    ]
