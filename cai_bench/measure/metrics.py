"""Measures: throughput, latency percentiles, peak memory, the spread of repeated measurements."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks of up to 32 MB (partition buffers, activations) resident for reuse, so without
    this a worker's RSS creeps up with every partition although it holds no more data. Measured on the
    2-core dev machine: 12 partitions of 25 MB, peak RSS 1267 MB without, 1212 MB with, same speed.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs).

    Lets a run report its own peak rather than one left by earlier work in the same process (data generation,
    a previous repeat). Returns False where the kernel does not allow it; the peak is then the process's.
    """
    trim_heap()  # what earlier work freed but glibc kept must not count as this run's memory
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or since the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# A point whose slowest repeat took more than this many times its fastest is flagged: its median is not to be
# trusted blindly (a noisy neighbour, thermal throttling, a cold cache in the first repeat).
NOISY_RATIO = 1.5


@dataclass(frozen=True)
class Spread:
    """Median, extremes and interquartile range of one measure over repeats."""

    n: int
    median: float
    min: float
    max: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def max_over_min(self) -> float:
        return self.max / self.min if self.min > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.n > 1 and self.max_over_min > NOISY_RATIO

    def to_dict(self) -> dict:
        return {"n": self.n, "median": self.median, "min": self.min, "max": self.max, "iqr": self.iqr}


def spread(values: Sequence[float]) -> Spread:
    """Summary of repeated measurements (quartiles by linear interpolation, as numpy's default)."""
    if len(values) == 0:
        raise ValueError("spread() needs at least one value")
    arr = np.asarray(values, dtype=np.float64)
    q1, median, q3 = (float(v) for v in np.percentile(arr, (25, 50, 75)))
    return Spread(n=len(arr), median=median, min=float(arr.min()), max=float(arr.max()), q1=q1, q3=q3)
