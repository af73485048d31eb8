"""pgro.core."""
