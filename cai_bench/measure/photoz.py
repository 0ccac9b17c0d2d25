"""Photo-z point metrics, one definition each, all of ez = (z_pred - z_true) / (1 + z_true).

Two sets, never printed side by side without their names:

- ``point_metrics``: the set of LSST DESC RAIL's point-estimate metrics (qp's PointBias, PointSigmaIQR,
  PointSigmaMAD, PointOutlierRate), under those names: the median of ez, the interquartile range of ez over
  1.349, 1.4826 times the median absolute deviation of ez, and the share of |ez| above max(0.06, 3 sigma_IQR).
  ``tests/test_photoz.py`` checks them against qp itself. This is the set cai-bench reports.
- ``upstream_paper_metrics``: the set the upstream pcm-AstroMAE paper reports (MAE, MSE, mean bias, NMAD, R2 and
  the share of |ez| > 0.05), kept for the tables that reproduce that paper and labelled "upstream paper" wherever
  it is printed. Its NMAD uses the same constant as sigma_MAD.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

NMAD_SCALE = 1.4826  # median absolute deviation -> standard deviation of a normal distribution
IQR_SCALE = 1.349  # interquartile range -> standard deviation of a normal distribution
OUTLIER_FLOOR = 0.06  # RAIL's outlier bound is max(OUTLIER_FLOOR, 3 sigma_IQR)
UPSTREAM_OUTLIER_EZ = 0.05  # the upstream paper's outliers: |ez| above this


def _pair(predicted: Sequence[float], true: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    z_pred = np.asarray(predicted, dtype=np.float64).reshape(-1)
    z = np.asarray(true, dtype=np.float64).reshape(-1)
    if len(z) == 0 or len(z) != len(z_pred):
        raise ValueError(f"{what}() needs two equally long, non-empty arrays, got {len(z_pred)} and {len(z)}")
    return z_pred, z


def point_metrics(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float | int]:
    """RAIL's point metrics (the module's docstring), with the outlier bound they used."""
    z_pred, z = _pair(predicted, true, "point_metrics")
    ez = (z_pred - z) / (1.0 + z)
    q25, median, q75 = np.percentile(ez, [25, 50, 75])
    sigma_iqr = float((q75 - q25) / IQR_SCALE)
    bound = max(OUTLIER_FLOOR, 3 * sigma_iqr)
    return {
        "objects": len(z),
        "point_bias": float(median),
        "point_sigma_iqr": sigma_iqr,
        "point_sigma_mad": float(NMAD_SCALE * np.median(np.abs(ez - median))),
        "point_outlier_rate": float(np.mean(np.abs(ez) > bound)),
        "outlier_bound": bound,
    }


def point_metrics_by_bin(predicted: Sequence[float], true: Sequence[float], edges: Sequence[float],
                         by: Sequence[float] | None = None, name: str = "z") -> list[dict]:  # fmt: skip
    """``point_metrics`` per bin of ``by`` (the true redshift unless given: an r magnitude, say), ``edges``
    ascending, each row with its bin as ``{name}_low`` and ``{name}_high``; empty bins left out."""
    z_pred, z = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    value = z if by is None else np.asarray(by, dtype=np.float64)
    rows = []
    for low, high in itertools.pairwise(edges):
        inside = (value >= low) & (value < high)
        if inside.any():
            bin_ = {f"{name}_low": float(low), f"{name}_high": float(high)}
            rows.append({**bin_, **point_metrics(z_pred[inside], z[inside])})
    return rows


def upstream_paper_metrics(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float | None]:
    """The upstream paper's set: MAE = mean|z' - z|, MSE = mean (z' - z)^2, bias = mean ez, NMAD = 1.4826
    median|ez - median ez|, R2 = 1 - SS_res / SS_tot (None when all true values are equal), outlier fraction =
    share of |ez| > 0.05. A run's record keeps it under ``accuracy``."""
    z_pred, z = _pair(predicted, true, "upstream_paper_metrics")
    error = z_pred - z
    ez = error / (1.0 + z)
    ss_tot = float(np.sum((z - z.mean()) ** 2))
    return {
        "samples": len(z),
        "mae": float(np.mean(np.abs(error))),
        "mse": float(np.mean(error**2)),
        "bias": float(np.mean(ez)),
        "nmad": float(NMAD_SCALE * np.median(np.abs(ez - np.median(ez)))),
        "r2": float(1.0 - np.sum(error**2) / ss_tot) if ss_tot > 0 else None,
        "outlier_fraction": float(np.mean(np.abs(ez) > UPSTREAM_OUTLIER_EZ)),
    }
