"""libpq connection strings, checked against libpq's own parser."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgro.postgres.server import make_conninfo


@pytest.mark.parametrize(
    "value", ["plain", "/tmp/with space", "it's", "back\\slash", "both\\' mixed", "", "a=b c"]
)
def test_libpq_reads_back_what_was_written(value: str) -> None:
    conninfo = make_conninfo(host=value, user="postgres", port="5432")
    assert conninfo_to_dict(conninfo) == {"host": value, "user": "postgres", "port": "5432"}
