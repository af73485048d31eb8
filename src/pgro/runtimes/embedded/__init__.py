"""pgro.runtimes.embedded."""
