"""pgro.postgres."""
