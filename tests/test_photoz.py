"""The photo-z point metrics against LSST DESC RAIL's own (qp's point-estimate metric classes), on synthetic
galaxies with a realistic scatter and catastrophic outliers: the same figures, to the last digit that float64
arithmetic in another order can change."""

from __future__ import annotations

import numpy as np
import pytest

from cai_bench.data.synthetic import generate
from cai_bench.measure.photoz import point_metrics, upstream_paper_metrics

rail = pytest.importorskip(
    "qp.metrics.point_estimate_metric_classes", reason="qp-prob (the dev extra) is not installed"
)


def _predictions(objects: int = 20_000, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """True redshifts of synthetic galaxies and predictions scattered about them by 0.02 (1 + z), 3% of them
    catastrophic (anywhere in 0-0.6)."""
    z = generate(seed=seed, start=0, stop=objects).redshift.astype(np.float64)
    rng = np.random.default_rng(seed)
    z_pred = z + rng.normal(0.0, 0.02, objects) * (1 + z)
    wild = rng.random(objects) < 0.03
    z_pred[wild] = rng.uniform(0.0, 0.6, int(wild.sum()))
    return z_pred, z


def test_the_point_metrics_equal_rails():
    z_pred, z = _predictions()
    ours = point_metrics(z_pred, z)
    theirs = {
        "point_bias": rail.PointBias().evaluate(z_pred, z),
        "point_sigma_iqr": rail.PointSigmaIQR().evaluate(z_pred, z),
        "point_sigma_mad": rail.PointSigmaMAD().evaluate(z_pred, z),
        "point_outlier_rate": rail.PointOutlierRate().evaluate(z_pred, z),
    }
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(float(value), rel=1e-12, abs=1e-15), name
    assert 0.005 < ours["point_outlier_rate"] < 0.05  # the comparison saw outliers, not an empty set
    assert ours["objects"] == len(z)


def test_the_upstream_papers_set_is_another_set_and_says_so():
    """Its bias is a mean, the RAIL set's a median: on skewed errors they differ, which is why every printed
    figure names its set."""
    z_pred, z = _predictions(objects=5_000)
    paper, rails = upstream_paper_metrics(z_pred, z), point_metrics(z_pred, z)
    assert paper["bias"] != pytest.approx(rails["point_bias"], abs=1e-4)
    assert paper["nmad"] == pytest.approx(rails["point_sigma_mad"])  # one NMAD constant: the same figure
