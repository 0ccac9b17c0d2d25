"""Measures: throughput, latency percentiles, peak memory, the spread of repeated measurements."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
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


# ---------------------------------------------------------------------------------------------- accuracy

OUTLIER_DZ = 0.05  # |dz| above this counts as an outlier


def accuracy(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float | None]:
    """Redshift accuracy as the upstream evaluation defines it, with dz = (z' - z) / (1 + z):

    MAE = mean|z' - z|, MSE = mean (z' - z)^2, bias = mean dz, NMAD = 1.48 median|dz - median dz|,
    R2 = 1 - SS_res / SS_tot (None when all true values are equal), outlier fraction = share of |dz| > 0.05.
    """
    z_pred = np.asarray(predicted, dtype=np.float64).reshape(-1)
    z = np.asarray(true, dtype=np.float64).reshape(-1)
    if len(z) == 0 or len(z) != len(z_pred):
        raise ValueError(f"accuracy() needs two equally long, non-empty arrays, got {len(z_pred)} and {len(z)}")
    error = z_pred - z
    dz = error / (1.0 + z)
    ss_tot = float(np.sum((z - z.mean()) ** 2))
    return {
        "samples": len(z),
        "mae": float(np.mean(np.abs(error))),
        "mse": float(np.mean(error**2)),
        "bias": float(np.mean(dz)),
        "nmad": float(1.48 * np.median(np.abs(dz - np.median(dz)))),
        "r2": float(1.0 - np.sum(error**2) / ss_tot) if ss_tot > 0 else None,
        "outlier_fraction": float(np.mean(np.abs(dz) > OUTLIER_DZ)),
    }


def photoz_metrics(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float | int]:
    """The point metrics photo-z papers give, of dz = (z' - z) / (1 + z): bias (median dz), sigma_IQR (the
    interquartile range of dz / 1.349), NMAD (1.4826 median |dz - median dz|), and the outlier rate: the share with
    |dz| > max(0.06, 3 sigma_IQR), whose bound is returned too."""
    z_pred = np.asarray(predicted, dtype=np.float64).reshape(-1)
    z = np.asarray(true, dtype=np.float64).reshape(-1)
    if len(z) == 0 or len(z) != len(z_pred):
        raise ValueError(f"photoz_metrics() needs two equally long, non-empty arrays, got {len(z_pred)} and {len(z)}")
    dz = (z_pred - z) / (1.0 + z)
    q25, q50, q75 = np.percentile(dz, [25, 50, 75])
    sigma_iqr = float((q75 - q25) / 1.349)
    bound = max(0.06, 3 * sigma_iqr)
    return {"objects": len(z), "bias": float(q50), "sigma_iqr": sigma_iqr,
            "nmad": float(1.4826 * np.median(np.abs(dz - q50))), "outlier_bound": bound,
            "outlier_rate": float(np.mean(np.abs(dz) > bound))}  # fmt: skip


def photoz_by_bin(predicted: Sequence[float], true: Sequence[float], edges: Sequence[float],
                  by: Sequence[float] | None = None, name: str = "z") -> list[dict]:  # fmt: skip
    """``photoz_metrics`` per bin of ``by`` (the true redshift unless given: an r magnitude, say), ``edges``
    ascending, each row with its bin as ``{name}_low`` and ``{name}_high``; empty bins left out."""
    z_pred, z = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    value = z if by is None else np.asarray(by, dtype=np.float64)
    rows = []
    for low, high in itertools.pairwise(edges):
        inside = (value >= low) & (value < high)
        if inside.any():
            rows.append({f"{name}_low": float(low), f"{name}_high": float(high),
                         **photoz_metrics(z_pred[inside], z[inside])})  # fmt: skip
    return rows
