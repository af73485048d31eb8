"""`pgro run` keeps a webhook URL's secrets out of its log, its status and /metrics.

Slack, Teams, Discord and Google Chat webhook URLs carry their token in the path; others
put `user:password@` in the URL. Before issue 18, `pgro run` showed the whole URL as the
metric label `name`, in `status.notifications[].name`, and (through httpx, logging every
request at INFO) in its log. This runs the real process against a real local listener.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgro.api.notifications import target_name
from tests.fixtures.manifests import replica_doc, secret_doc, write_manifest
from tests.fixtures.run_harness import PASSWORD, Backups, StartRun
from tests.fixtures.webhook import webhook_receiver

HEADER_TOKEN = "HEADER-TOKEN-31337"
SECRET_PARTS = ("hookuser", "USERINFO-PASS-999", "T0000", "B0000", "URL-PATH-TOKEN-555")
HOOK_PATH = "/hooks/T0000/B0000/URL-PATH-TOKEN-555"


@pytest.fixture
def hook() -> Iterator[tuple[int, list[dict[str, str]]]]:
    with webhook_receiver() as hook:
        yield hook


def test_pgro_run_names_a_webhook_without_its_secrets(
    backups: Backups,
    scratch: Path,
    start_run: StartRun,
    hook: tuple[int, list[dict[str, str]]],
) -> None:
    port, received = hook
    url = f"http://hookuser:USERINFO-PASS-999@127.0.0.1:{port}{HOOK_PATH}"
    backups.snapshot("one")
    manifest = write_manifest(
        scratch / "m.yaml",
        secret_doc("kopia", {"filesystemPath": str(backups.path), "repositoryPassword": PASSWORD}),
        secret_doc("hook", {"token": HEADER_TOKEN}),
        replica_doc(
            "orders",
            ephemeral=False,
            scheduleJitter="0s",
            notifications=[
                {
                    "target": "webhook",
                    "url": url,
                    "headers": {"X-Token": {"secretKeyRef": {"name": "hook", "key": "token"}}},
                }
            ],
        ),
    )
    run = start_run(manifest)
    run.wait_for(
        "the notification status",
        lambda: run.replica("orders")["status"]["notifications"][0]["success"] is True,
        timeout=240,
    )
    # Delivered to the full URL, with the header from the manifest's Secret.
    assert [(r["path"], r["x-token"]) for r in received] == [(HOOK_PATH, HEADER_TOKEN)]

    status = run.replica("orders")["status"]
    name = target_name("POST", url)
    assert [n["name"] for n in status["notifications"]] == [name]
    with urllib.request.urlopen(f"http://127.0.0.1:{run.metrics}/metrics", timeout=5) as r:
        metrics_body = r.read().decode()
    assert f'name="{name}"' in metrics_body
    assert run.stop() == 0
    log = run.log.read_text(errors="replace")
    status_text = json.dumps(run.status())
    for where, text in (("/metrics", metrics_body), ("status", status_text), ("log", log)):
        for part in (*SECRET_PARTS, HEADER_TOKEN):
            assert part not in text, f"{part!r} leaked into pgro run's {where}"
    assert not any("HTTP Request" in line for line in log.splitlines())
