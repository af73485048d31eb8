"""pgro.cli."""
