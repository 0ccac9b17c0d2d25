"""Scaling figures from the results store, optionally beside the paper's published numbers.

Built with matplotlib's object interface (no pyplot, no global state), so figures can be made in tests and
in threads. Our series are solid lines; the paper's are dashed and grey-blue, each labelled with the kind of time
it is (the paper mixes Step Functions wall time, profiler CPU time and profiler GPU time), never blended in.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cai_bench.analysis.published import load_reference
from cai_bench.analysis.report import BREAKDOWN, PointReport, read_points
from cai_bench.analysis.results import find_record, latest_comm_points
from cai_bench.commands.predict import predictions_about, read_predictions
from cai_bench.core.choices import FIGURE_FORMATS
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.core.plan import BITS_PER_SAMPLE, samples_for_gb
from cai_bench.measure.metrics import spread
from cai_bench.measure.photoz import point_metrics, upstream_paper_metrics
from cai_bench.measure.time_kinds import COMPUTE, TIME_KINDS, WALL, kind_text
from cai_bench.measure.timeline import timeline_of
from cai_bench.render.labels import point_metrics_text, upstream_paper_text
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

SYSTEMS = {
    "cai-lambda": "CAI on AWS Lambda",
    "hpc-cpu": "HPC CPU",
    "hpc-gpu": "HPC GPU",
    "laptop-cpu": "laptop CPU",
}
# The paper's cost estimates for the whole 12.6 GB set on 10,240 MB functions, by partition size (MB -> US$)
PAPER_COST_USD = {25.0: 0.16, 100.0: 0.38}
_REFERENCE_COLOURS = ("#4c6a8a", "#8a9bb0", "#2f4f4f", "#a0785a", "#6b8e23")


# ---------------------------------------------------------------------------------------------- the paper


@dataclass
class ReferencePoint:
    x: float
    runs: list[tuple[float, float]]  # (seconds, bits) of each published run


@dataclass
class ReferenceSeries:
    label: str
    points: list[ReferencePoint]


def _reference_series(
    rows: list[dict], keep: Callable[[dict], bool], x_column: str, label: Callable[[dict], str]
) -> list[ReferenceSeries]:
    series: dict[str, dict[float, ReferencePoint]] = {}
    for row in rows:
        if not keep(row):
            continue
        x = float(row[x_column])
        # Where the paper gives no bit count, the data size does: floor(GB * 2^30 / 20,524) samples.
        bits = float(row["bits"]) if row["bits"] else samples_for_gb(float(row["data_gb"])) * BITS_PER_SAMPLE
        point = series.setdefault(label(row), {}).setdefault(x, ReferencePoint(x, []))
        point.runs.append((float(row["seconds"]), bits))
    return [ReferenceSeries(name, sorted(pts.values(), key=lambda p: p.x)) for name, pts in series.items()]


def _paper_label(row: dict, with_partition: bool = True) -> str:
    system = SYSTEMS.get(row["system"], row["system"])
    part = f", {float(row['partition_mb']):g} MB" if with_partition and row["partition_mb"] else ""
    return f"paper: {system}{part} ({kind_text(row['seconds_kind'])})"


def _paper_vs_data_size(rows: list[dict]) -> list[ReferenceSeries]:
    # The 25 MB Lambda curve stands for CAI here; the other partition sizes are in the partition-size figure.
    def keep(r):
        lambda_25 = (
            r["system"] == "cai-lambda" and r["partition_mb"] == "25.0" and r["seconds_kind"] == "map-state-wall"
        )
        return r["experiment"] == "vary-data-size" and (lambda_25 or r["system"] != "cai-lambda")

    return _reference_series(rows, keep, "data_gb", _paper_label)


def _paper_vs_batch_size(rows: list[dict]) -> list[ReferenceSeries]:
    def label(r):
        return _paper_label(r) + f", {float(r['data_gb']):g} GB"

    return _reference_series(rows, lambda r: r["experiment"] == "vary-batch-size", "batch_size", label)


def _paper_vs_partition_size(rows: list[dict]) -> list[ReferenceSeries]:
    def keep(r):
        return (
            r["experiment"] == "vary-data-size"
            and r["system"] == "cai-lambda"
            and r["seconds_kind"] == "map-state-wall"
            and float(r["data_gb"]) == 12.6
        )

    def label(r):
        return _paper_label(r, with_partition=False) + ", 12.6 GB"

    return _reference_series(rows, keep, "partition_mb", label)


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
    "engine": lambda p: f"{p.engine} engine",
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
        texts = (_ATTR_TEXT[a](group[0]) for a in shown)
        out.append(("ours: " + " · ".join(t for t in texts if t), group))
    out.sort(key=lambda item: item[0])
    any_group = next(iter(groups.values()))
    shared = [_ATTR_TEXT[a](any_group[0]) for a in attrs if a not in shown and a != "machine"]
    return out, ", ".join(t for t in shared if t)


def _where(points: list[PointReport]) -> str:
    machines = sorted({p.machine for p in points})
    first = min(p.first_utc for p in points)[:10]
    last = max(p.last_utc for p in points)[:10]
    when = first if first == last else f"{first} to {last}"
    shown = "; ".join(machines[:3]) + (f" and {len(machines) - 3} more" if len(machines) > 3 else "")
    return f"measured on {shown}, {when}"


TITLE_WIDTH = 105  # characters of a 9-point title line that fit an 11-inch figure


def _title(ax, what: str, points: list[PointReport], reference: bool, shared: str = "", note: str = "") -> None:
    """The figure's title and subtitle, each wrapped to fit the figure, naming only what applies."""
    lines = [what, _where(points) + (f"; all ours at {shared}" if shared else "")]
    if reference:
        lines.append("dashed: the paper's published times, each with its kind of time")
    if note:
        lines.append(note)
    wrapped = [part for line in lines for part in textwrap.wrap(line, TITLE_WIDTH) or [""]]
    ax.set_title("\n".join(wrapped), fontsize=9, loc="left")


def _apart(points: list[PointReport], series: list[ReferenceSeries], x_attr: str, unit: str) -> str:
    """A note where our points and the paper's lie in ranges that do not overlap (0.05 GB beside 12.6 GB)."""
    ours = [getattr(p, x_attr) for p in points]
    theirs = [point.x for line in series for point in line.points]
    if not ours or not theirs or (min(ours) <= max(theirs) and min(theirs) <= max(ours)):
        return ""
    return (f"note: ours span {min(ours):.3g}-{max(ours):.3g} {unit}, the paper's {min(theirs):.3g}-"
            f"{max(theirs):.3g} {unit}: the ranges do not overlap, so the lines are not the same measurement at the "
            f"same size")  # fmt: skip


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


def _draw_reference(ax, series: list[ReferenceSeries], y: Callable[[float, float], float]) -> None:
    """The paper's series; y(seconds, bits) -> plot units."""
    for index, line in enumerate(series):
        xs = [p.x for p in line.points]
        stats = [spread([y(seconds, bits) for seconds, bits in p.runs]) for p in line.points]
        meds = [s.median for s in stats]
        err = [[s.median - s.min for s in stats], [s.max - s.median for s in stats]]
        colour = _REFERENCE_COLOURS[index % len(_REFERENCE_COLOURS)]
        ax.errorbar(
            xs, meds, yerr=err, color=colour, linestyle="--", marker="s", markersize=4, markerfacecolor="none",
            capsize=2, linewidth=1, label=line.label,
        )  # fmt: skip


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, log_x: bool = True, log_y: bool = True) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    for axis, log in ((ax.xaxis, log_x), (ax.yaxis, log_y)):
        if log:
            # 1, 2, 5, 10, 20 ... as plain numbers: easier to read off than 4x10^1
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
    if ylabel.startswith("throughput"):
        ax.yaxis.set_major_formatter(ticker.EngFormatter(unit="bps"))
    ax.grid(True, which="both", alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if handles:  # below the axes, across the figure's width: the plot keeps the width
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.13), borderaxespad=0, frameon=False,
                  ncol=2 if len(handles) > 4 else 1)  # fmt: skip
    fig.tight_layout()
    return fig


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(11, 5), dpi=100)
    return fig, fig.subplots()


def _spread_of(name: str, scale: float = 1.0) -> Callable[[PointReport], tuple[float, float, float]]:
    def y(p: PointReport) -> tuple[float, float, float]:
        s = getattr(p, name)
        return s.median * scale, s.min * scale, s.max * scale

    return y


def _throughput(seconds: float, bits: float) -> float:
    return bits / seconds


def _usd(usd: float, bits: float) -> float:
    return usd


def _seconds(seconds: float, bits: float) -> float:
    return seconds


def build_figures(points: list[PointReport], reference: list[dict] | None = None) -> dict[str, Figure]:
    """Every figure in FIGURES that the points (and reference rows) have data for, by name."""
    if not points:
        raise UserError("no finished runs in the results store to plot; run cai-bench run or cai-bench sweep first")
    ref = reference or []
    has_ref = bool(ref)
    figures = {}

    fig, ax = _figure()
    shared = _draw_ours(ax, points, "data_gb", _spread_of("wall_s"))
    _draw_reference(ax, _paper_vs_data_size(ref), _seconds)
    what = "Inference time vs data size (ours: wall clock, median and min-max over repeats)"
    _title(ax, what, points, has_ref, shared, _apart(points, _paper_vs_data_size(ref), "data_gb", "GB"))
    figures["wall-vs-data-size"] = _finish(fig, ax, "data size (GB)", "seconds")

    fig, ax = _figure()
    shared = _draw_ours(ax, points, "data_gb", _spread_of("throughput_bps"))
    _draw_reference(ax, _paper_vs_data_size(ref), _throughput)
    _title(ax, "Throughput vs data size (ours: bits processed / wall s)", points, has_ref, shared,
           _apart(points, _paper_vs_data_size(ref), "data_gb", "GB"))  # fmt: skip
    figures["throughput-vs-data-size"] = _finish(fig, ax, "data size (GB)", "throughput (bits per second)")

    fig, ax = _figure()
    shared = _draw_ours(ax, points, "batch_size", _spread_of("throughput_bps"))
    _draw_reference(ax, _paper_vs_batch_size(ref), _throughput)
    _title(ax, "Throughput vs batch size (ours: bits processed / wall s)", points, has_ref, shared)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    figures["throughput-vs-batch-size"] = _finish(
        fig, ax, "batch size (samples)", "throughput (bits per second)", log_x=False
    )

    with_cost = any(p.cost_usd is not None for p in points)
    fig = Figure(figsize=(11, 8 if with_cost else 5), dpi=100)
    axes = fig.subplots(2, 1) if with_cost else [fig.subplots()]
    shared = _draw_ours(axes[0], points, "partition_mb", _spread_of("wall_s"))
    _draw_reference(axes[0], _paper_vs_partition_size(ref), _seconds)
    _title(axes[0], "Inference time vs partition size (ours: wall clock)", points, has_ref, shared)
    if with_cost:
        costed = [p for p in points if p.cost_usd is not None]
        shared = _draw_ours(axes[1], costed, "partition_mb", _spread_of("cost_usd"))
        if has_ref:
            estimate = [ReferencePoint(mb, [(usd, 0.0)]) for mb, usd in sorted(PAPER_COST_USD.items())]
            _draw_reference(axes[1], [ReferenceSeries("paper: CAI cost estimate, 12.6 GB", estimate)], _usd)
        _title(
            axes[1],
            "Cost vs partition size (US dollars per run; dashed: the paper's estimate)"
            if has_ref
            else "Cost vs partition size (US dollars per run)",
            costed,
            False,
            shared,
        )
        _finish(fig, axes[1], "partition size (MB)", "US$ per run")
    figures["wall-vs-partition-size"] = _finish(fig, axes[0], "partition size (MB)", "seconds")

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
    fig, ax = _figure()
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
    _title(ax, what, lines, False, shared)
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
    fig.tight_layout()
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
        "Per-worker time breakdown: mean seconds per worker, median over repeats\n" + _where(points),
        fontsize=9,
        loc="left",
    )
    ax.set_xlabel("seconds per worker")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
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


# ---------------------------------------------------------------------------------------------- predictions


def predictions_figure(columns: dict, title: str, about: dict | None = None) -> Figure:
    """Predicted against true redshift (each point coloured by how many objects share its neighbourhood, the
    y = x line, the accuracy figures in the legend) and beneath it the residual every photo-z figure shows:
    dz/(1+z) against z with the outlier bounds, and the point metrics. Random-init weights say so on the figure."""
    z = np.asarray(columns["z_true"], dtype=np.float64)
    z_pred = np.asarray(columns["z_pred"], dtype=np.float64)
    known = np.isfinite(z) & np.isfinite(z_pred)  # a joined truth catalogue may lack some objects
    z, z_pred = z[known], z_pred[known]
    if len(z) == 0:
        raise UserError(f"{title}: holds no predictions")
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
    label = f"{m['samples']:,} objects\n" + upstream_paper_text(m, sep="\n").replace(": ", ":\n", 1)
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
    fig.tight_layout()
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
        return save_figures(dict([_timeline_entry(find_record(store, timeline, warn=warn))]), out_dir, formats)
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
        fig, ax = _figure()
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
        figures[f"comm-latency-{nbytes}B"] = _finish(fig, ax, "world size (ranks)", "median latency (ms)")
    return figures if records else {}


# ---------------------------------------------------------------------------------------------- estimates


def _estimate_series(estimates: list) -> dict[str, list]:
    series: dict[str, list] = {}
    for e in estimates:
        memory = f", {e.memory_mb:,} MB functions" if e.memory_mb else ""
        part = f", {e.partition_mb:g} MB partitions"
        workers = "" if e.backend == "lambda" else f", {e.slots:,} {'GPU' if e.backend == 'gpu' else 'task'}(s)"
        kind = "" if e.time_kind == "wall" else " (compute only)"
        series.setdefault(f"predicted: {e.backend}{part}{memory}{workers}{kind}", []).append(e)
    return {k: sorted(v, key=lambda e: e.gb) for k, v in series.items()}


def estimate_figure(outcome) -> Figure:
    """Predicted time (and cost where priced) against data size per backend: the median as a line, the interval
    with the model's error as a band; the profile's measured points over it. Each kind of time on its own axes."""
    priced = any(e.cost_usd_p50 is not None for e in outcome.estimates)
    kinds = [k for k in (WALL, COMPUTE) if any(e.time_kind == k for e in outcome.estimates)]
    rows = len(kinds) + priced
    fig = Figure(figsize=(12, 1.5 + 3.5 * rows), dpi=100)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    time_axes = dict(zip(kinds, axes, strict=False))
    partitions = {(e.backend, e.partition_mb) for e in outcome.estimates}
    banded = set()
    for label, group in _estimate_series(outcome.estimates).items():
        ax, xs = time_axes[group[0].time_kind], [e.gb for e in group]
        line = ax.plot(xs, [e.wall_s_p50 for e in group], marker="o", markersize=3, label=label)[0]
        if all(e.wall_s_low is not None for e in group):
            ax.fill_between(
                xs,
                [e.wall_s_low for e in group],
                [e.wall_s_high for e in group],
                alpha=0.15,
                color=line.get_color(),
                label=None if ax in banded else "80% interval (model error)",
            )
            banded.add(ax)
        if priced and group[0].cost_usd_p50 is not None:
            axes[-1].plot(xs, [e.cost_usd_p50 for e in group], marker="o", markersize=3, color=line.get_color(),
                          label=label)  # fmt: skip
    kind_of = {e.backend: e.time_kind for e in outcome.estimates}
    for index, (what, points) in enumerate(_measured_series(outcome.measured, partitions).items()):
        colour = _REFERENCE_COLOURS[index % len(_REFERENCE_COLOURS)]
        time_axes[kind_of[points[0]["backend"]]].plot(
            [p["gb"] for p in points], [p["wall_s"] for p in points], linestyle="none", marker="s",
            markerfacecolor="none", color=colour, label=what)  # fmt: skip
    axes[0].set_title(f"estimated from {'; '.join(sorted(outcome.profiles[b]['name'] for b in outcome.profiles))}",
                      fontsize=9, loc="left")  # fmt: skip
    if priced:
        _finish(fig, axes[-1], "data size (GB)", "cost (US$, median)")
    for kind, ax in list(time_axes.items())[1:]:
        _finish(fig, ax, "data size (GB)", TIME_KINDS[kind].axis)
    return _finish(fig, axes[0], "data size (GB)", TIME_KINDS[kinds[0]].axis)


def decision_figure(decision) -> Figure:
    """``estimate --deadline``: each candidate's upper bound of time against its median cost, the frontier
    joined, the deadline and the budget as lines; those that miss hollow."""
    fig, ax = _figure()
    markers, colours = {"lambda": "o", "hpc": "s", "gpu": "^"}, {"lambda": "C0", "hpc": "C1", "gpu": "C2"}
    for backend in dict.fromkeys(c.estimate.backend for c in decision.candidates):
        for meets in (True, False):
            shown = [c.estimate for c in decision.candidates if c.estimate.backend == backend and c.meets == meets
                     and c.estimate.wall_s_high is not None and c.estimate.cost_usd_p50 is not None]  # fmt: skip
            if shown:
                ax.plot([e.wall_s_high for e in shown], [e.cost_usd_p50 for e in shown], linestyle="none",
                        marker=markers[backend], color=colours[backend], markerfacecolor=None if meets else "none",
                        label=f"{backend}, {'meets' if meets else 'misses'}")  # fmt: skip
    edge = sorted((c.estimate for c in decision.candidates if c.frontier), key=lambda e: e.wall_s_high)
    if edge:
        ax.plot([e.wall_s_high for e in edge], [e.cost_usd_p50 for e in edge], color="grey", linewidth=1,
                label="frontier (nothing faster and cheaper)")  # fmt: skip
    if decision.deadline_s is not None:
        ax.axvline(decision.deadline_s, color="red", linestyle="--", linewidth=1, label="deadline")
    if decision.budget_usd is not None:
        ax.axhline(decision.budget_usd, color="red", linestyle=":", linewidth=1, label="budget")
    if decision.chosen:
        chosen = decision.chosen.estimate
        ax.plot([chosen.wall_s_high], [chosen.cost_usd_p50], marker="*", markersize=14, color="gold",
                markeredgecolor="black", linestyle="none", label=f"cheapest that meets: {chosen.label}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    gb = decision.candidates[0].estimate.gb if decision.candidates else 0
    sources = "; ".join(f"{b} {'; '.join(f['machines']) if f.get('machines') else f['name']}"
                        for b, f in decision.outcome.profiles.items())  # fmt: skip
    ax.set_title(f"{gb:g} GB: every setting, wall clock upper bound (80% interval) against median cost\n"
                 f"profiles: {sources}\n" + _price_note([c.estimate for c in decision.candidates]), fontsize=8,
                 loc="left")  # fmt: skip
    return _finish(fig, ax, "wall time, upper bound of the 80% interval (s)", "cost, median (US$)")


def _price_note(estimates: list) -> str:
    """The prices each backend's costs assume, short enough for a title line."""
    notes = {}
    for e in estimates:
        p = e.prices
        if e.backend == "lambda":
            notes["lambda"] = (f"lambda {p['architecture']} USD {p['gb_second_usd']:.4g}/GB-s, "
                               f"{p['request_usd'] * 1e6:.2g}/M requests, S3, transitions ({p['as_of']})")  # fmt: skip
        elif e.backend == "hpc":
            notes["hpc"] = f"hpc USD {p['core_hour_usd']}/core-hour x {p['cores_per_task']} core(s) per task"
        else:
            notes["gpu"] = f"gpu USD {p['gpu_hour_usd']}/GPU-hour with its host"
    return "prices: " + "; ".join(notes.values())


def save_decision_figure(decision, path: str | Path) -> Path:
    return _save(decision_figure(decision), path)


def _measured_series(measured: list[dict], partitions: set) -> dict[str, list[dict]]:
    """The measured points of the estimated backends and partition sizes (any partition size off Lambda)."""
    series: dict[str, list[dict]] = {}
    for point in measured:
        lambda_point = point["backend"] == "lambda"
        if lambda_point and (point["backend"], point["partition_mb"]) not in partitions:
            continue
        if not any(b == point["backend"] for b, _ in partitions):
            continue
        source = point["run_id"] if str(point["run_id"]).startswith("paper") else "measured"
        part = f", {point['partition_mb']:g} MB" if lambda_point else ""
        series.setdefault(f"{source}: {point['backend']}{part}", []).append(point)
    return series


def save_estimate_figure(outcome, path: str | Path) -> Path:
    return _save(estimate_figure(outcome), path)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the figure ({exc.strerror})") from None
    return path


# ---------------------------------------------------------------------------------------------- timelines

TIMELINE_COLOURS = {"call": "#dddddd", "startup": "#9467bd", "init": "#e377c2", "wait": "#d62728",
                    "other": "#bcbd22", "compute": "#1f77b4", "load": "#2ca02c", "failed": "#000000"}  # fmt: skip
TIMELINE_NAMES = {"call": "invocation in flight (driver's view)", "startup": "start-up",
                  "init": "Init Duration (cold start)", "wait": "wait for data", "other": "own time beside compute",
                  "compute": "compute", "load": "read (in the background)", "failed": "failed invocation"}  # fmt: skip


def _lane_bars(ax, row: int, segments: list) -> None:
    """One worker's row: its pieces as bars, reads as a thin band above them, retried units hatched."""
    for segment in segments:
        y, height = {"load": (row + 0.28, 0.14), "call": (row - 0.36, 0.72)}.get(segment.kind, (row - 0.3, 0.55))
        ax.broken_barh([(segment.start_s, segment.end_s - segment.start_s)], (y, height),
                       facecolors=TIMELINE_COLOURS[segment.kind], edgecolor="red" if segment.retried else "none",
                       hatch="///" if segment.retried else None, linewidth=0.6)  # fmt: skip


def _timeline_legend(timeline) -> list:
    """A legend entry for each kind of piece drawn, retried units and each kind of mark, in a fixed order."""
    kinds = {s.kind for lane in timeline.lanes for s in lane.segments}
    handles = [Patch(color=colour, label=TIMELINE_NAMES[k]) for k, colour in TIMELINE_COLOURS.items() if k in kinds]
    if any(s.retried for lane in timeline.lanes for s in lane.segments):
        handles.append(Patch(facecolor="white", edgecolor="red", hatch="///", label="retried unit"))
    marks = {what.split()[0] for lane in timeline.lanes for _, what in lane.marks}
    if "cold" in marks:
        handles.append(Line2D([], [], marker="v", color="black", linestyle="none", label="cold start"))
    if "throttled" in marks:
        handles.append(Line2D([], [], marker="x", color="black", linestyle="none",
                              label="throttled (429), retried with backoff"))  # fmt: skip
    return handles


def timeline_figure(timeline, machine: str = "") -> Figure:
    """One bar per worker across the run's wall clock, split by ``timeline.KINDS``, with cold starts and throttles
    marked; beneath it, how many workers were busy."""
    rows = len(timeline.lanes)
    fig = Figure(figsize=(11, 2.6 + min(rows, 40) * 0.22), dpi=100)
    bars, busy = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for row, lane in enumerate(timeline.lanes):
        _lane_bars(bars, row, lane.segments)
        for time_s, what in lane.marks:
            bars.plot([time_s], [row], marker="v" if what == "cold start" else "x", color="black", markersize=5)
    bars.legend(handles=_timeline_legend(timeline), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0)  # fmt: skip
    bars.set_yticks(range(rows), [lane.name[:18] for lane in timeline.lanes], fontsize=6 if rows > 12 else 8)
    bars.set_ylim(rows - 0.5, -0.7)
    bars.set_title(f"run {timeline.run_id} · {timeline.backend} · wall {timeline.wall_s:.2f} s"
                   + (f" · {machine}" if machine else ""), fontsize=9, loc="left")  # fmt: skip
    steps = timeline.running()
    busy.step([t for t, _ in steps], [n for _, n in steps], where="post", color="#1f77b4")
    busy.set_ylabel("workers busy" if timeline.backend != "lambda" else "invocations\nin flight", fontsize=8)
    busy.set_xlabel("seconds from the run's start (its first worker's start; Lambda: its first invoke)")
    busy.set_ylim(0, max(n for _, n in steps) + 1)
    busy.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    busy.axvline(timeline.wall_s, color="grey", linestyle=":", linewidth=1)
    last = max([timeline.wall_s, *(s.end_s for lane in timeline.lanes for s in lane.segments)])
    busy.set_xlim(-0.01 * last, last * 1.02)  # room for the marks at the start
    if timeline.notes:
        fig.text(0.01, 0.005, "; ".join(timeline.notes)[:300], fontsize=7, color="red")
    fig.tight_layout()
    return fig


def _timeline_entry(record: dict) -> tuple[str, Figure]:
    """A record's timeline figure and its name, ``timeline-<backend>-<run id>``; a UserError where it has none."""
    figure = timeline_figure(timeline_of(record), machine_label(record["environment"]))
    return f"timeline-{record['backend']}-{record['run_id']}", figure


def timeline_figures(records: list[dict]) -> dict[str, Figure]:
    """The timeline of each record; records that hold no unit end times (from before schema 1.1) or are damaged
    where a timeline reads them are left out."""
    figures = {}
    for record in records:
        try:
            name, figure = _timeline_entry(record)
        except UserError:
            continue
        figures[name] = figure
    return figures
