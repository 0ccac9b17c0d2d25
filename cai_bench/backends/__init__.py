"""Backends decide where workers run and how partitions reach them; the engine does the work."""

from cai_bench.backends.base import Backend, BackendRun
from cai_bench.backends.registry import available_backends, get_backend, register_backend

__all__ = ["Backend", "BackendRun", "available_backends", "get_backend", "register_backend"]
