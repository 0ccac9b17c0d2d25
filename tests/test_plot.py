"""Figures from hand-made stores of several machines and backends, with and without the paper's curves."""

from pathlib import Path

import pytest
from conftest import hand_record, write_store

from cai_bench.analysis import report
from cai_bench.analysis.published import load_reference
from cai_bench.core.errors import UserError
from cai_bench.render.figures import common, estimates, scaling

PAPER = Path(__file__).resolve().parent.parent / "results" / "reference" / "paper-results.csv"


def sweep_like_records() -> list[dict]:
    """Two machines: a cpu data-size and batch-size sweep on one, a gpu data-size sweep on the other."""
    records = []
    for gb, wall in ((0.05, 10.0), (0.1, 19.0), (0.2, 40.0)):
        records += [hand_record("cpu", wall * f, gb=gb, host="alpha") for f in (1.0, 1.1)]
        records += [hand_record("gpu", wall / 20, gb=gb, host="gamma", gpus=("NVIDIA H100",))]
    for batch, wall in ((32, 15.0), (128, 11.0)):
        records += [hand_record("cpu", wall, gb=0.05, batch_size=batch, host="alpha")]
    for part, wall in ((5.0, 12.0), (10.0, 11.0)):
        records += [hand_record("cpu", wall, gb=0.05, partition_mb=part, host="alpha", cost_usd=wall / 1000)]
    return records


def lines_of(ax) -> dict[str, object]:
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles, strict=True))


def test_every_figure_is_drawn_with_our_series_and_the_papers_apart():
    points = report.summarize_points(sweep_like_records())
    figures = scaling.build_figures(points, load_reference(PAPER))
    assert list(figures) == [f for f in scaling.FIGURES if f != scaling.MEMORY_FIGURE]  # no memory sweep here

    ax = figures["wall-vs-data-size"].axes[0]
    labels = lines_of(ax)
    ours = [label for label in labels if label.startswith("ours:")]
    assert any(label.startswith("hollow: INVALID") for label in labels)  # hand-made runs of seconds: not valid
    # one line per backend x machine through the three data sizes; single points are left out
    assert sorted(ours) == ["ours: cpu · on alpha (Xeon A, 2 cores)", "ours: gpu · on gamma (1x NVIDIA H100, 2 cores)"]
    cpu_line = labels["ours: cpu · on alpha (Xeon A, 2 cores)"][0]
    assert list(cpu_line.get_xdata()) == pytest.approx([0.05, 0.1, 0.2], rel=1e-3)  # samples * 20,524 B
    assert list(cpu_line.get_ydata()) == pytest.approx([10.5, 19.95, 42.0])  # medians of the two repeats
    paper = [label for label in labels if label.startswith("paper:")]
    assert "paper: HPC GPU (torch profiler GPU time)" in paper
    assert "paper: CAI on AWS Lambda, 25 MB (Step Functions Map-state wall time)" in paper
    assert all("(" in label and "time)" in label for label in paper)  # every paper series names its kind of time
    assert "alpha" in ax.get_title(loc="left") and "gamma" in ax.get_title(loc="left")

    batch = lines_of(figures["throughput-vs-batch-size"].axes[0])
    (ours,) = [label for label in batch if label.startswith("ours:")]
    assert list(batch[ours][0].get_xdata()) == [32, 128, 512]
    assert any("Map-state wall time" in label for label in batch)

    partition = figures["wall-vs-partition-size"]
    assert len(partition.axes) == 2  # cost is known for some points, so it gets its own panel
    assert any("12.6 GB" in label for label in lines_of(partition.axes[0]))
    cost_lines = lines_of(partition.axes[1])
    estimate = cost_lines["paper: CAI cost estimate, 12.6 GB"][0]
    assert list(estimate.get_xdata()) == [25.0, 100.0] and list(estimate.get_ydata()) == [0.16, 0.38]
    (ours_cost,) = [label for label in cost_lines if label.startswith("ours:")]
    assert list(cost_lines[ours_cost][0].get_ydata()) == pytest.approx([0.012, 0.011])

    breakdown = figures["worker-breakdown"].axes[0]
    assert [t.get_text() for t in breakdown.get_legend().get_texts()] == ["startup", "wait", "load", "compute"]
    assert len(breakdown.get_yticklabels()) == len(points)


def test_without_reference_only_our_series_are_drawn():
    figures = scaling.build_figures(report.summarize_points(sweep_like_records()))
    for fig in figures.values():
        for ax in fig.axes:
            assert not any(label.startswith("paper:") for label in ax.get_legend_handles_labels()[1])
    assert len(figures["wall-vs-partition-size"].axes) == 2


def test_plot_command_writes_every_figure_in_every_format(cli, tmp_path):
    write_store(tmp_path / "r", sweep_like_records())
    out = tmp_path / "figs"
    code, stdout, _ = cli(
        "plot", "--results", tmp_path / "r", "--out-dir", out, "--reference", "paper", "--format", "png,svg"
    )
    assert code == 0
    for name in (f for f in scaling.FIGURES if f != scaling.MEMORY_FIGURE):
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in svg.read_bytes()[:500]
        assert str(png) in stdout


def test_plot_errors(cli, tmp_path):
    code, _, err = cli("plot", "--results", tmp_path)
    assert code == 2 and "no finished runs" in err
    write_store(tmp_path, sweep_like_records())
    code, _, err = cli("plot", "--results", tmp_path, "--out-dir", tmp_path / "f", "--format", "gif")
    assert code == 2 and "--format" in err
    code, _, err = cli("plot", "--results", tmp_path, "--reference", tmp_path / "missing.csv")
    assert code == 2 and "no such reference file" in err
    with pytest.raises(UserError, match="not a reference table"):
        bad = tmp_path / "bad.csv"
        bad.write_text("a,b\n1,2\n")
        load_reference(bad)


def test_figures_read_at_a_glance_labels_that_apply_legends_below_and_a_note_where_sizes_do_not_overlap():
    records = [hand_record("cpu", w, gb=gb) for gb in (0.02, 0.05) for w in (2.0, 2.2)]
    figures = scaling.build_figures(report.summarize_points(records), load_reference(PAPER))
    ax = figures["wall-vs-data-size"].axes[0]
    title = ax.get_title(loc="left")
    labels = ax.get_legend_handles_labels()[1]
    assert not any("1 workers" in text or "no orchestrator" in text or "the function's" in text
                   for text in [title, *labels])  # fmt: skip
    assert all(len(line) <= common.TITLE_WIDTH for line in title.splitlines())  # wrapped, not cut at the edge
    assert "the ranges do not overlap" in " ".join(title.split())  # ours at 0.02-0.05 GB, the paper's at 1-12.6
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().y0 < ax.get_window_extent().y0  # below the axes, not beside them


def test_the_estimate_figures_interval_band_has_a_legend_entry():
    from cai_bench.analysis import estimate, estimate_model
    from cai_bench.backends.aws_lambda import pricing

    request = estimate.EstimateRequest(
        ("lambda",), (1.0, 4.0), (25.0,), estimate_model.Prices(pricing.PRICES), "paper", trials=20
    )
    figure = estimates.estimate_figure(estimate.estimate_command(request))
    assert "80% interval (model error)" in figure.axes[0].get_legend_handles_labels()[1]
