"""pgro.runtimes."""
