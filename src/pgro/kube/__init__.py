"""Adapters over the Kubernetes API: the lightkube client on dicts, watch caches, Lease."""
