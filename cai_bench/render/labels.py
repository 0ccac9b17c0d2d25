"""The photo-z metric sets as one line of text each, the same on the terminal and in a figure: RAIL's point
metrics under their names, the upstream paper's set labelled as such, so that no two "bias" or "NMAD" stand
side by side without saying which they are."""

from __future__ import annotations

UPSTREAM_LABEL = "upstream paper's metrics"


def point_metrics_text(m: dict) -> str:
    """``photoz.point_metrics`` in one line."""
    return (
        f"PointBias {m['point_bias']:+.4f}, PointSigmaIQR {m['point_sigma_iqr']:.4f}, "
        f"PointSigmaMAD {m['point_sigma_mad']:.4f}, PointOutlierRate {m['point_outlier_rate']:.1%} "
        f"(|dz/(1+z)| > {m['outlier_bound']:.3f})"
    )


def upstream_paper_text(m: dict, sep: str = ", ") -> str:
    """``photoz.upstream_paper_metrics`` (or a record's ``accuracy``, which holds it) in one line, or one line a
    figure with ``sep="\\n"``; the caller names the set (UPSTREAM_LABEL)."""
    r2 = "-" if m["r2"] is None else f"{m['r2']:.4f}"
    figures = [f"MAE {m['mae']:.5f}", f"MSE {m['mse']:.6f}", f"mean bias {m['bias']:.5f}", f"NMAD {m['nmad']:.5f}",
               f"R2 {r2}", f"outliers (|dz/(1+z)| > 0.05) {m['outlier_fraction']:.2%}"]  # fmt: skip
    return sep.join(figures)
