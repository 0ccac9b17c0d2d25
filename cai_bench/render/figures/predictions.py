"""Predicted against true redshift, and beneath it the residual with the outlier bounds and RAIL's point
metrics."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from cai_bench.core.errors import UserError
from cai_bench.measure.photoz import point_metrics, upstream_paper_metrics
from cai_bench.render.figures.common import tight_layout
from cai_bench.render.labels import UPSTREAM_LABEL, point_metrics_text, upstream_paper_text

# ---------------------------------------------------------------------------------------------- predictions


def predictions_figure(columns: dict, title: str, about: dict | None = None) -> Figure:
    """Predicted against true redshift (each point coloured by how many objects share its neighbourhood, the
    y = x line, the accuracy figures in the legend) and beneath it the residual every photo-z figure shows:
    dz/(1+z) against z with the outlier bounds, and the point metrics. Random-init weights say so on the figure."""
    z = np.asarray(columns["z_true"], dtype=np.float64)
    z_pred = np.asarray(columns["z_pred"], dtype=np.float64)
    known = np.isfinite(z) & np.isfinite(z_pred)  # a joined truth catalogue may lack some objects
    predicted = bool(np.isfinite(z_pred).any())
    z, z_pred = z[known], z_pred[known]
    if len(z) == 0:
        lacks = "true redshifts for its predictions" if predicted else "predictions"
        raise UserError(
            f"{title}: holds no {lacks}, so there is nothing to plot against the truth"
            + (" (predict --truth CATALOGUE joins true redshifts by id)" if lacks != "predictions" else "")
        )
    m = upstream_paper_metrics(z_pred, z)
    top = max(float(z.max()), float(z_pred.max()), 1e-3) * 1.05
    low = min(float(z.min()), float(z_pred.min()), 0.0)
    counts, x_edges, y_edges = np.histogram2d(z, z_pred, bins=120, range=[[low, top], [low, top]])
    xi = np.clip(np.searchsorted(x_edges, z, side="right") - 1, 0, counts.shape[0] - 1)
    yi = np.clip(np.searchsorted(y_edges, z_pred, side="right") - 1, 0, counts.shape[1] - 1)
    density = counts[xi, yi]
    order = np.argsort(density, kind="stable")  # the densest points on top
    fig = Figure(figsize=(7, 9.5), dpi=100)
    ax, residual = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1.4]})
    label = f"{m['samples']:,} objects, {UPSTREAM_LABEL}:\n" + upstream_paper_text(m, sep="\n")
    points = ax.scatter(z[order], z_pred[order], c=density[order], s=3, cmap="viridis", linewidths=0, label=label)
    ax.plot([low, top], [low, top], color="black", linewidth=1, linestyle="--", label="y = x")
    fig.colorbar(points, ax=ax, label="objects in the same bin (1/120 of the range)")
    ax.set_xlim(low, top)
    ax.set_ylim(low, top)
    ax.set_aspect("equal")
    ax.set_xlabel("true redshift")
    ax.set_ylabel("predicted redshift")
    ax.set_title(f"Predicted vs true redshift\n{title}", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper left", markerscale=4)
    _residual_panel(residual, z, z_pred, (low, top))
    if (about or {}).get("random_init"):
        fig.text(0.5, 0.5, "RANDOM-INIT WEIGHTS\nthese redshifts mean nothing", ha="center", va="center",
                 fontsize=22, color="red", alpha=0.35, rotation=30)  # fmt: skip
    tight_layout(fig)
    return fig


def _residual_panel(ax, z: np.ndarray, z_pred: np.ndarray, limits: tuple[float, float]) -> None:
    """dz/(1+z) against true z, the outlier bounds dashed, the point metrics in the legend."""
    dz = (z_pred - z) / (1 + z)
    m = point_metrics(z_pred, z)
    ax.scatter(z, dz, s=2, color="#1f77b4", linewidths=0, alpha=0.5,
               label=point_metrics_text(m))  # fmt: skip
    for sign in (1, -1):
        ax.axhline(sign * m["outlier_bound"], color="red", linestyle="--", linewidth=1,
                   label=f"outlier bounds: |dz/(1+z)| > max(0.06, 3 sigma_IQR) = {m['outlier_bound']:.3f}"
                   if sign > 0 else None)  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlim(*limits)
    ax.set_xlabel("true redshift")
    ax.set_ylabel("dz / (1 + z)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
