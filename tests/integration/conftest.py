"""Fixtures of the end-to-end tests of `pgro run`, for every module here."""

from tests.fixtures.run_harness import backups, start_run, webhook  # noqa: F401
