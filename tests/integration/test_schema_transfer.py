"""The persistent-schema copy program (`pipeline.schema_transfer`) run for real by
`LocalCopy`, on the paths the end-to-end tests do not reach."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from pgro.core.observations import WorkState
from pgro.core.schema_migration import Transfer
from pgro.pipeline.schema_transfer import LocalCopy
from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.server import make_conninfo
from tests.fixtures.waiting import wait_for


def test_a_copy_whose_servers_are_unreachable_fails_naming_both_tools(
    scratch: Path, account: RunAccount, binaries: PostgresBinaries
) -> None:
    gone = str(scratch / "no-server-here")
    conninfo = make_conninfo(host=gone, port="5432", dbname="app", user="postgres")
    os.chmod(scratch, 0o711)
    copy = LocalCopy(scratch / "schemas", account)
    copy.start(
        bindir=binaries.bindir,
        source=conninfo,
        target=conninfo,
        owner="analytics",
        schemas=["reports"],
        started_at=datetime.now(UTC),
    )

    def ended() -> Transfer | None:
        found = copy.observe()
        return found if found.state is not WorkState.RUNNING else None

    try:
        transfer = wait_for("the copy to end", ended, timeout=60)
    finally:
        copy.discard()
    assert transfer.state is WorkState.FAILED
    failure = transfer.failure or ""
    # pg_dump could not connect; pg_restore, fed nothing, failed too: both are named.
    assert failure.startswith("pg_dump: ") and "no-server-here" in failure
    assert "; pg_restore: " in failure
    assert not (scratch / "schemas").exists()
