"""The scaling figures of a results store: wall and throughput against data, batch and partition size,
time and cost against memory, the workers' breakdown, and the comm channels' latency; ``plot_command``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from cai_bench.analysis.published import load_reference
from cai_bench.analysis.report import BREAKDOWN, PointReport, read_points
from cai_bench.analysis.results import find_record, latest_comm_points
from cai_bench.commands.predict import predictions_about, read_predictions
from cai_bench.core.choices import ENGINES, FIGURE_FORMATS
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.render.figures.common import (
    apart,
    figure_title,
    finish_axes,
    new_figure,
    seconds_text,
    series_where,
    tight_layout,
    usd_text,
)
from cai_bench.render.figures.predictions import predictions_figure
from cai_bench.render.figures.reference import (
    PAPER_COST_USD,
    ReferencePoint,
    ReferenceSeries,
    _draw_reference,
    _paper_vs_batch_size,
    _paper_vs_data_size,
    _paper_vs_partition_size,
)
from cai_bench.render.figures.timelines import timeline_entry, timeline_figures
from cai_bench.store.jsonl import ResultsStore

FIGURES = (
    "wall-vs-data-size",
    "throughput-vs-data-size",
    "throughput-vs-batch-size",
    "wall-vs-partition-size",
    "time-and-cost-vs-memory",  # MEMORY_FIGURE: only for a setting measured at two memory sizes or more
    "worker-breakdown",
)


MEMORY_FIGURE = "time-and-cost-vs-memory"


# ---------------------------------------------------------------------------------------------- our series


_SERIES_ATTRS = (
    "backend",
    "engine",
    "machine",
    "data_gb",
    "partition_mb",
    "batch_size",
    "precision",
    "threads",
    "workers",
    "memory_mb",
    "orchestrator",
)


_ATTR_TEXT = {
    "machine": lambda p: f"on {p.machine}",
    "backend": lambda p: p.backend,
    "engine": lambda p: f"torch {p.engine}" if p.engine in ENGINES else p.engine,  # what ran: --runtime
    "data_gb": lambda p: f"{p.data_gb:.3g} GB",
    "partition_mb": lambda p: f"{p.partition_mb:g} MB",
    "batch_size": lambda p: f"batch {p.batch_size}",
    "precision": lambda p: "precision auto" if p.precision == "auto" else p.precision,
    "threads": lambda p: f"{p.threads} threads",
    "workers": lambda p: f"{p.workers} worker{'s' if p.workers != 1 else ''}" if p.workers != 1 else "",
    # Only what applies: a Lambda function's memory and orchestrator, nothing of either for cpu, hpc or gpu
    "memory_mb": lambda p: "" if p.memory_mb is None else f"{p.memory_mb:,} MB",
    "orchestrator": lambda p: "" if p.orchestrator is None else f"{p.orchestrator} orchestrator",
}


# A memory sweep's lines: the CPU share, and so threads and environments, follow memory; they do not split lines
_MEMORY_SERIES = ("backend", "engine", "machine", "data_gb", "partition_mb", "batch_size", "precision", "orchestrator")


def _error_text(group: list[PointReport]) -> str:
    """A reduced precision's measured error in its line's label: the largest |dz| from torch fp32 of its points."""
    measured = [p.max_dz for p in group if p.max_dz is not None]
    if group[0].precision in ("fp32", "auto") or not measured:
        return ""
    return f"max |dz| {max(measured):.1e}"


def _series(points: list[PointReport], x_attr: str, attrs: tuple[str, ...] = _SERIES_ATTRS,
            ) -> tuple[list[tuple[str, list[PointReport]]], str]:  # fmt: skip
    """Points grouped into lines along ``x_attr``, and what all the lines share (for the title).

    A label names only what differs between the lines. Lines of a single point say nothing about scaling, so
    they are left out when some line has two or more.
    """
    attrs = [a for a in attrs if a != x_attr]
    groups: dict[tuple, list[PointReport]] = {}
    for p in points:
        groups.setdefault(tuple(getattr(p, a) for a in attrs), []).append(p)
    if any(len(g) > 1 for g in groups.values()):
        groups = {k: g for k, g in groups.items() if len(g) > 1}
    varying = [a for i, a in enumerate(attrs) if len({k[i] for k in groups}) > 1]
    shown = [a for a in attrs if a in varying or a == "backend"]
    out = []
    for group in groups.values():
        group.sort(key=lambda p: getattr(p, x_attr))
        texts = [_ATTR_TEXT[a](group[0]) for a in shown] + [_error_text(group)]
        out.append(("ours: " + " · ".join(t for t in texts if t), group))
    out.sort(key=lambda item: item[0])
    any_group = next(iter(groups.values()))
    shared = [_ATTR_TEXT[a](any_group[0]) for a in attrs if a not in shown and a != "machine"]
    return out, ", ".join(t for t in shared if t)


def _draw_ours(ax, points: list[PointReport], x_attr: str, y: Callable) -> str:
    """Median with min-max error bars; y(point) -> (median, min, max) in plot units. Returns what the lines share."""
    series, shared = _series(points, x_attr)
    for label, group in series:
        xs = [getattr(p, x_attr) for p in group]
        meds, lows, highs = zip(*(y(p) for p in group), strict=True)
        err = [[m - lo for m, lo in zip(meds, lows, strict=True)], [hi - m for m, hi in zip(meds, highs, strict=True)]]
        line = ax.errorbar(xs, meds, yerr=err, marker="o", markersize=4, capsize=3, linewidth=1.5, label=label)
        invalid = [(x, m) for x, m, p in zip(xs, meds, group, strict=True) if not p.valid]
        if invalid:  # drawn over the filled marker: hollow, in the line's colour
            ax.plot(*zip(*invalid, strict=True), linestyle="none", marker="o", markersize=7, markerfacecolor="white",
                    markeredgecolor=line[0].get_color(), zorder=3)  # fmt: skip
    if any(not p.valid for p in points):
        ax.plot([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="white", markeredgecolor="grey",
                label="hollow: INVALID (too short, too few galaxies, or unchecked against fp32)")  # fmt: skip
    return shared


def _spread_of(name: str, scale: float = 1.0) -> Callable[[PointReport], tuple[float, float, float]]:
    def y(p: PointReport) -> tuple[float, float, float]:
        s = getattr(p, name)
        return s.median * scale, s.min * scale, s.max * scale

    return y


def _throughput(seconds: float, bits: float) -> float:
    return bits / seconds


def build_figures(points: list[PointReport], reference: list[dict] | None = None) -> dict[str, Figure]:
    """Every figure in FIGURES that the points (and reference rows) have data for, by name."""
    if not points:
        raise UserError("no finished runs in the results store to plot; run cai-bench run or cai-bench sweep first")
    ref = reference or []
    has_ref = bool(ref)
    figures = {}

    fig, ax = new_figure()
    shared = _draw_ours(ax, points, "data_gb", _spread_of("wall_s"))
    _draw_reference(ax, _paper_vs_data_size(ref), seconds_text)
    what = "Inference time vs data size (ours: wall clock, median and min-max over repeats)"
    figure_title(ax, what, points, has_ref, shared, apart(points, _paper_vs_data_size(ref), "data_gb", "GB"))
    figures["wall-vs-data-size"] = finish_axes(fig, ax, "data size (GB)", "seconds")

    fig, ax = new_figure()
    shared = _draw_ours(ax, points, "data_gb", _spread_of("throughput_bps"))
    _draw_reference(ax, _paper_vs_data_size(ref), _throughput)
    figure_title(ax, "Throughput vs data size (ours: bits processed / wall s)", points, has_ref, shared,
           apart(points, _paper_vs_data_size(ref), "data_gb", "GB"))  # fmt: skip
    figures["throughput-vs-data-size"] = finish_axes(fig, ax, "data size (GB)", "throughput (bits per second)")

    if len({p.batch_size for p in points}) > 1 or _paper_vs_batch_size(ref):  # one batch size: no curve to draw
        fig, ax = new_figure()
        shared = _draw_ours(ax, points, "batch_size", _spread_of("throughput_bps"))
        _draw_reference(ax, _paper_vs_batch_size(ref), _throughput)
        figure_title(ax, "Throughput vs batch size (ours: bits processed / wall s)", points, has_ref, shared)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        figures["throughput-vs-batch-size"] = finish_axes(
            fig, ax, "batch size (samples)", "throughput (bits per second)", log_x=False
        )

    with_cost = any(p.cost_usd is not None for p in points)
    fig = Figure(figsize=(11, 8 if with_cost else 5), dpi=100)
    axes = fig.subplots(2, 1) if with_cost else [fig.subplots()]
    shared = _draw_ours(axes[0], points, "partition_mb", _spread_of("wall_s"))
    _draw_reference(axes[0], _paper_vs_partition_size(ref), seconds_text)
    figure_title(axes[0], "Inference time vs partition size (ours: wall clock)", points, has_ref, shared)
    if with_cost:
        costed = [p for p in points if p.cost_usd is not None]
        shared = _draw_ours(axes[1], costed, "partition_mb", _spread_of("cost_usd"))
        if has_ref:
            estimate = [ReferencePoint(mb, [(usd, 0.0)]) for mb, usd in sorted(PAPER_COST_USD.items())]
            _draw_reference(axes[1], [ReferenceSeries("paper: CAI cost estimate, 12.6 GB", estimate)], usd_text)
        figure_title(
            axes[1],
            "Cost vs partition size (US dollars per run; dashed: the paper's estimate)"
            if has_ref
            else "Cost vs partition size (US dollars per run)",
            costed,
            False,
            shared,
        )
        finish_axes(fig, axes[1], "partition size (MB)", "US$ per run")
    figures["wall-vs-partition-size"] = finish_axes(fig, axes[0], "partition size (MB)", "seconds")

    memory = _memory(points)
    if memory is not None:
        figures[MEMORY_FIGURE] = memory
    figures["worker-breakdown"] = _breakdown(points)
    return figures


def _memory(points: list[PointReport]) -> Figure | None:
    """Time and cost against the function's memory on two axes, as aws-lambda-power-tuning draws them; only for
    settings measured at two or more memory sizes."""
    swept = [p for p in points if p.memory_mb is not None and p.cost_usd is not None]
    series, shared = _series(swept, "memory_mb", _MEMORY_SERIES) if swept else ([], "")
    series = [(label, group) for label, group in series if len({p.memory_mb for p in group}) > 1]
    if not series:
        return None
    fig, ax = new_figure()
    cost_ax = ax.twinx()
    for index, (label, group) in enumerate(series):
        colour = f"C{index % 10}"
        xs = [p.memory_mb for p in group]
        for axis, name, style, what in ((ax, "wall_s", "-", "wall s"), (cost_ax, "cost_usd", "--", "US$")):
            meds, lows, highs = zip(*(_spread_of(name)(p) for p in group), strict=True)
            err = [[m - lo for m, lo in zip(meds, lows, strict=True)],
                   [h - m for m, h in zip(meds, highs, strict=True)]]  # fmt: skip
            axis.errorbar(xs, meds, yerr=err, color=colour, linestyle=style, marker="o" if style == "-" else "s",
                          markersize=4, capsize=3, linewidth=1.5, label=f"{label} ({what})")  # fmt: skip
    lines = [p for _, g in series for p in g]
    what = "Time (solid, left) and cost (dashed, right) vs the function's memory: medians, min-max over repeats"
    if any(p.machine_id.startswith("lambda-emulator") for p in lines):
        what += "\nemulated: each environment's CPU share follows memory up to this machine's cores, no further"
    figure_title(ax, what, lines, False, shared)
    cost_ax.set_ylabel("US$ per run")
    cost_ax.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    ticks = sorted({p.memory_mb for p in lines})
    ax.set_xscale("log", base=2)  # memory sizes are chosen by doubling: log spacing keeps them apart
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks], rotation=45)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    handles = ax.get_legend_handles_labels()
    more = cost_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1.0),
              borderaxespad=0)  # fmt: skip
    ax.set_xlabel("function memory (MB); Lambda's CPU share grows with it: 1 vCPU at 1,769 MB, 6 at 10,240 MB")
    ax.set_ylabel("seconds (wall)")
    ax.grid(True, alpha=0.3)
    tight_layout(fig)
    return fig


def _breakdown(points: list[PointReport]) -> Figure:
    """Where a worker's time goes, per point: stacked mean seconds per worker in each phase."""
    fig = Figure(figsize=(11, max(3.0, 1.2 + 0.32 * len(points))), dpi=100)
    ax = fig.subplots()
    labels = [
        f"{p.label()} · {p.precision}" + (f" · {p.machine}" if len({q.machine for q in points}) > 1 else "")
        for p in points
    ]
    left = [0.0] * len(points)
    for phase in BREAKDOWN:
        widths = [p.worker_breakdown_s[phase] for p in points]
        ax.barh(range(len(points)), widths, left=left, label=phase.removesuffix("_s"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(points)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(
        "Per-worker time breakdown: mean seconds per worker, median over repeats\n" + series_where(points),
        fontsize=9,
        loc="left",
    )
    ax.set_xlabel("seconds per worker")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, axis="x", alpha=0.3)
    tight_layout(fig)
    return fig


def save_figures(figures: dict[str, Figure], out: str | Path, formats: list[str]) -> list[Path]:
    for fmt in formats:
        if fmt not in FIGURE_FORMATS:
            raise UserError(f"--format must be among {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the --out-dir directory ({exc.strerror})") from None
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            try:
                fig.savefig(path, format=fmt)
            except OSError as exc:
                raise UserError(f"{path}: cannot write the figure ({exc.strerror})") from None
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- the command


def plot_command(
    results: str | Path, out_dir: str | Path, formats: list[str], reference: str | None = None,
    backends: list[str] | None = None, predictions: str | Path | None = None, warn=None, timeline: str | None = None,
) -> list[Path]:  # fmt: skip
    """``cai-bench plot``: every figure of the store's points (beside ``reference``'s published ones) and the
    timeline of each backend's last run; with ``predictions`` the predicted-vs-true figure of a predictions file;
    with ``timeline`` (a run id) that run's timeline alone. The files written."""
    if predictions is not None:
        figure = predictions_figure(read_predictions(predictions), str(predictions), predictions_about(predictions))
        return save_figures({f"{Path(predictions).stem}-vs-true": figure}, out_dir, formats)
    store = ResultsStore(results)
    if timeline is not None:
        return save_figures(dict([timeline_entry(find_record(store, timeline, warn=warn))]), out_dir, formats)
    points = read_points(store, backends, warn=warn)
    # The seal's own cost is a line of the report, not a channel's latency over ranks
    comm_points = [] if backends else [p for p in latest_comm_points(store) if p["channel"] != "seal"]
    rows = load_reference(reference) if reference else None
    figures = build_figures(points, rows) if points or not comm_points else {}
    runs = [r for r in store.read() if r.get("kind") == "run" and (not backends or r["backend"] in backends)]
    last = {r["backend"]: r for r in runs}  # each backend's last run, finished or not
    timelines = timeline_figures(list(last.values()))
    return save_figures({**figures, **comm_figures(comm_points), **timelines}, out_dir, formats)


def comm_figures(records: list[dict]) -> dict[str, Figure]:
    """``comm bench``'s latency vs world size, one figure per message size, a line per channel and operation
    (with the interquartile range); a barrier carries nothing, so it is drawn in each."""
    figures = {}
    for nbytes in sorted({r["nbytes"] for r in records if r["op"] != "barrier"}) or [0]:
        fig, ax = new_figure()
        shown = [r for r in records if r["nbytes"] == nbytes or r["op"] == "barrier"]
        for channel, op in sorted({(r["channel"], r["op"]) for r in shown}):
            line = sorted((r for r in shown if (r["channel"], r["op"]) == (channel, op)), key=lambda r: r["world_size"])
            x = [r["world_size"] for r in line]
            y = np.array([r["median_s"] for r in line]) * 1000
            low = y - np.array([r.get("q1_s", r["median_s"]) for r in line]) * 1000
            high = np.array([r.get("q3_s", r["median_s"]) for r in line]) * 1000 - y
            ax.errorbar(x, y, yerr=[np.maximum(low, 0), np.maximum(high, 0)], marker="o", capsize=3,
                        label=f"{channel} {op}")  # fmt: skip
        machines = sorted({machine_label(r["environment"]) for r in shown})
        ax.set_title(f"collective latency, {nbytes:,} B messages · {'; '.join(machines)}", fontsize=9, loc="left")
        figures[f"comm-latency-{nbytes}B"] = finish_axes(fig, ax, "world size (ranks)", "median latency (ms)")
    return figures if records else {}
