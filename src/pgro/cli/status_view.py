"""What `pgro status` prints, whatever the replicas were read from.

`pgro status --state-dir` reads `pgro run`'s SQLite store and credential files; `pgro status
--cluster` (and `kubectl pgro status`) reads the CRs through a kubeconfig. Both build the same
entries here, from replica and restore documents in wire form (the CRD's field names), and
print them with the same renderer, human or JSON.

An entry:

    {"name", "namespace",
     "status":      the replica's status as stored,
     "endpoint":    {"host", "port"} from status.connectionInfo,
     "restores":    [{"name", "spec", "status"}],
     "events":      [{"at", "replica_key", "type", "reason", "note", "related"}],
     "credentials": [{"username", "file" | "secret", "password"?, "missing"?}]}

A credential names where its password lives: `file` for `pgro run` (a file only its owner
reads), `secret` (`<namespace>/<name>`) for a cluster. `password` is there only when the user
asked for it (`--show-credentials`); `missing` marks a cluster user whose Secret does not
exist (yet).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click
from rich.console import Console

from pgro.cli.output import literal

# Conditions whose True status is bad news.
_TRUE_IS_BAD = ("RestoreCreationBlocked", "LastRestoreFailed", "RestoreSchedulingSuspended")


def replica_entry(
    replica: Mapping[str, Any],
    restores: Iterable[Mapping[str, Any]],
    *,
    events: Sequence[Mapping[str, Any]] = (),
    credentials: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The entry of one replica from its document and its restores' documents (wire form)."""
    meta = replica.get("metadata") or {}
    status_doc: dict[str, Any] = dict(replica.get("status") or {})
    conn = status_doc.get("connectionInfo") or {}
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "status": status_doc,
        "endpoint": {"host": conn.get("host"), "port": conn.get("port")},
        "restores": [
            {
                "name": (r.get("metadata") or {}).get("name"),
                "spec": dict(r.get("spec") or {}),
                "status": dict(r.get("status") or {}),
            }
            for r in restores
        ],
        "events": [dict(e) for e in events],
        "credentials": [dict(c) for c in credentials],
    }


def emit(
    entries: Sequence[Mapping[str, Any]], *, as_json: bool, console: Console | None = None
) -> None:
    """Print `entries` as `pgro status` does: JSON (a list, indented) or one block per replica."""
    if as_json:
        click.echo(json.dumps(list(entries), indent=2))
        return
    render(console or Console(), entries)


def render(console: Console, entries: Sequence[Mapping[str, Any]]) -> None:
    if not entries:
        console.print("no replicas")
    for entry in entries:
        print_replica(console, entry)


def print_replica(console: Console, entry: Mapping[str, Any]) -> None:
    """One replica's state. Everything but pgro's labels may come from a manifest, canopy, a
    snapshot or a server message, so it is printed literally (no markup, no escapes)."""

    def say(text: str) -> None:
        console.print(literal(text), highlight=False)

    st = entry["status"]
    phase = st.get("phase", "Pending")
    console.print(literal(f"{entry['namespace']}/{entry['name']}", style="bold"), end="")
    say(f"  phase {phase}")
    endpoint = entry["endpoint"]
    rows = [
        ("serving", st.get("currentRestore")),
        ("verified snapshot", st.get("verifiedSnapshotId")),
        ("next restore", st.get("nextScheduledRestore")),
        ("endpoint", f"{endpoint['host']}:{endpoint['port']}" if endpoint["port"] else None),
    ]
    for label, value in rows:
        if value:
            say(f"  {label:18} {value}")
    for cond in st.get("conditions", []):
        good = (cond.get("status") == "True") != cond["type"].startswith(_TRUE_IS_BAD)
        line = (
            f"{cond['type']}={cond['status']} {cond.get('reason', '')}: {cond.get('message', '')}"
        )
        say(f"  [{'ok' if good else '!!'}] {line}")
    for r in entry["restores"]:
        phase = r["status"].get("phase", "Pending")
        say(f"  restore {r['name']}  {phase}  snapshot {r['spec'].get('snapshot')}")
        checks = r["status"].get("dataChecks")
        if checks:
            say(f"    data checks ({checks.get('depth')}): {checks.get('verdict')}")
            for check in checks.get("checks", []):
                say(f"      {check.get('name')}: {check.get('status')}: {check.get('detail', '')}")
    for c in entry["credentials"]:
        say(f"  user {c['username']} {_password_text(c)}")


def _password_text(cred: Mapping[str, Any]) -> str:
    if "password" in cred:
        return f"password {cred['password']}"
    if "file" in cred:
        return f"(password in {cred['file']})"
    if cred.get("missing"):
        return f"(Secret {cred['secret']} does not exist yet)"
    return f"(password in Secret {cred['secret']})"
