"""Pipelines built from the adapters: the restore step and verification, shared by runtimes."""
