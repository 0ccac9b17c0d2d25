"""Backends decide where workers run and how partitions reach them; the engine does the work."""

from cai_bench.backends.base import Backend, BackendRun, available_backends, get_backend

__all__ = ["Backend", "BackendRun", "available_backends", "get_backend"]
