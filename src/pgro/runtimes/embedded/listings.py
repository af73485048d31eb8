"""Moved to pgro.reconciler.listing (both runtimes use it)."""

from pgro.reconciler.listing import ReplicaListings

__all__ = ["ReplicaListings"]
