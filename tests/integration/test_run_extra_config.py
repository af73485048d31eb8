"""`postgresExtraConfig` in `pgro run`: applied to the restored server, except what pgro keeps."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.run_harness import Backups, StartRun, connect, manifest_for

EXTRA_CONFIG = "\n".join(
    [
        "# tuning for the analysts",
        "work_mem = '64MB'",
        "listen_addresses = '*'",
        "lc_messages = 'de_DE.UTF-8'",
        # A quote and a backslash reach postgresql.conf escaped, and read back as written.
        r"pgro_test.quoted = 'it''s a \\ backslash'",
        # An escaped newline would start a second setting if written through: not applied.
        r"application_name = 'x\nport = 1'",
        "shared_preload_libraries = 'pgro_not_installed'",
        "",
    ]
)


def test_extra_config_is_applied_and_pgros_keys_are_ignored_with_an_event(
    backups: Backups, scratch: Path, start_run: StartRun
) -> None:
    backups.snapshot("only")
    manifest = manifest_for(scratch / "m.yaml", backups, postgresExtraConfig=EXTRA_CONFIG)
    run = start_run(manifest)
    run.wait_for(
        "the restore to serve",
        lambda: run.replica("orders")["status"].get("phase") == "Ready",
    )
    entry = run.replica("orders")
    with connect(entry) as conn:

        def show(name: str) -> str:
            row = conn.execute(f"SHOW {name}").fetchone()
            assert row is not None
            return str(row[0])

        assert show("work_mem") == "64MB"
        assert show("pgro_test.quoted") == "it's a \\ backslash"
        # pgro's settings hold: no listener on every address, untranslated messages; and
        # the library the host lacks was left out (the server would not start with it).
        assert show("listen_addresses") != "*"
        assert show("lc_messages") == "C"
        assert show("port") != "1"

    [ignored] = [e for e in entry["events"] if e["reason"] == "ExtraConfigIgnored"]
    assert ignored["type"] == "Warning"
    assert ignored["related"] == entry["status"]["currentRestore"]
    assert "listen_addresses, lc_messages" in ignored["note"]
    assert "line 6 " in ignored["note"]
