"""A run's timeline: one row per lane, one bar per piece of each unit, coloured by what it was."""

from __future__ import annotations

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.measure.timeline import timeline_of
from cai_bench.render.figures.common import tight_layout

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
    bars.set_yticks(range(rows), [lane.label[:28] for lane in timeline.lanes], fontsize=6 if rows > 12 else 8)
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
    tight_layout(fig)
    return fig


def timeline_entry(record: dict) -> tuple[str, Figure]:
    """A record's timeline figure and its name, ``timeline-<backend>-<run id>``; a UserError where it has none."""
    figure = timeline_figure(timeline_of(record), machine_label(record["environment"]))
    return f"timeline-{record['backend']}-{record['run_id']}", figure


def timeline_figures(records: list[dict]) -> dict[str, Figure]:
    """The timeline of each record; records that hold no unit end times (from before schema 1.1) or are damaged
    where a timeline reads them are left out."""
    figures = {}
    for record in records:
        try:
            name, figure = timeline_entry(record)
        except UserError:
            continue
        figures[name] = figure
    return figures
