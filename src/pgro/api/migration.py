"""The `migrateTo` target and what a migration did (`status.migrationResult`)."""

from __future__ import annotations

from pydantic import Field

from pgro.api.base import ApiModel


class MigrateTo(ApiModel):
    """The application version whose migrations each restore applies."""

    version: str
    version_id: str


class MigrationTiming(ApiModel):
    name: str
    elapsed_seconds: int


class MigrationResult(ApiModel):
    total_elapsed_seconds: int
    # Its absence is what makes the result a pass.
    failed_migration: str | None = None
    error: str | None = None
    data_bytes_before: int
    data_bytes_after: int
    timings: list[MigrationTiming] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failed_migration is None


class SchemaBuildResult(ApiModel):
    built: bool
    error: str | None = None
    total_elapsed_seconds: int
    schema_bytes: int | None = None
