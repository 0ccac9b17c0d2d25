"""The two figures every record computes: latency percentiles and a rate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` (linear interpolation); ``None`` for no values."""
    if len(values) == 0:
        return {f"p{q:g}": None for q in qs}
    found = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, found, strict=True)}


def rate(amount: float, seconds: float) -> float:
    """``amount / seconds``, 0 for an empty or unmeasurably short interval."""
    return amount / seconds if seconds > 0 else 0.0
