"""SQL of the application migration (`migrateTo`, features §2.2) on the migrating restore,
as the bootstrap superuser.

Every session uses `pgro.postgres.session.connect`. Names from the catalog are hostile:
identifiers are quoted by psycopg.sql (or are PostgreSQL's own `regclass`/`regprocedure`
text), values are parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from pgro.core.app_migration import Batch
from pgro.postgres.schema_migration import Conninfo
from pgro.postgres.schema_migration import database_size as database_size

APPLICATION: Final = "pgro-app-migration"


def latest_batch_at(conninfo_for: Conninfo, dbname: str) -> str | None:
    """`max(logged_at)::text` of `logs.migrations`, or None when the table is absent or
    empty. Kept as text: it goes back to PostgreSQL unparsed."""
    raise NotImplementedError


def read_batch(conninfo_for: Conninfo, dbname: str, baseline: str | None) -> Batch | None:
    """The newest `direction = 'up'` batch logged after `baseline` (any, when None)."""
    raise NotImplementedError


def drop_schemas(conninfo_for: Conninfo, dbname: str, schemas: Sequence[str]) -> list[str]:
    """End the database's other sessions and drop those of `schemas` that exist, with
    everything in them; returns the dropped ones."""
    raise NotImplementedError


def hand_over(conninfo_for: Conninfo, dbname: str, role: str) -> int:
    """Make `role` the owner of the application's objects in `dbname` (schemas other than
    pg_* and information_schema, their tables, views, sequences, functions, types), so a
    migrator logging in as it can run DDL; returns how many objects changed owner."""
    raise NotImplementedError
