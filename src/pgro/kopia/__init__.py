"""pgro.kopia."""
