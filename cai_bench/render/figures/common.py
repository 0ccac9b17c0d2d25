"""What every figure shares: its title wrapped to the width, its axes finished alike, the figures' text for
seconds and dollars, and how a figure is written to a file."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure

from cai_bench.analysis.report import PointReport
from cai_bench.core.errors import UserError
from cai_bench.render.figures.reference import ReferenceSeries


def series_where(points: list[PointReport]) -> str:
    machines = sorted({p.machine for p in points})
    first = min(p.first_utc for p in points)[:10]
    last = max(p.last_utc for p in points)[:10]
    when = first if first == last else f"{first} to {last}"
    shown = "; ".join(machines[:3]) + (f" and {len(machines) - 3} more" if len(machines) > 3 else "")
    return f"measured on {shown}, {when}"


TITLE_WIDTH = 105  # characters of a 9-point title line that fit an 11-inch figure


def figure_title(ax, what: str, points: list[PointReport], reference: bool, shared: str = "", note: str = "") -> None:
    """The figure's title and subtitle, each wrapped to fit the figure, naming only what applies."""
    lines = [what, series_where(points) + (f"; all ours at {shared}" if shared else "")]
    if reference:
        lines.append("dashed: the paper's published times, each with its kind of time")
    if note:
        lines.append(note)
    wrapped = [part for line in lines for part in textwrap.wrap(line, TITLE_WIDTH) or [""]]
    ax.set_title("\n".join(wrapped), fontsize=9, loc="left")


def apart(points: list[PointReport], series: list[ReferenceSeries], x_attr: str, unit: str) -> str:
    """A note where our points and the paper's lie in ranges that do not overlap (0.05 GB beside 12.6 GB)."""
    ours = [getattr(p, x_attr) for p in points]
    theirs = [point.x for line in series for point in line.points]
    if not ours or not theirs or (min(ours) <= max(theirs) and min(theirs) <= max(ours)):
        return ""
    return (f"note: ours span {min(ours):.3g}-{max(ours):.3g} {unit}, the paper's {min(theirs):.3g}-"
            f"{max(theirs):.3g} {unit}: the ranges do not overlap, so the lines are not the same measurement at the "
            f"same size")  # fmt: skip


def tight_layout(fig: Figure) -> None:
    """``fig.tight_layout()``, quietly: a long label from a record (a host, cut to 64 characters) can leave it no
    room; the figure is written as it is, and matplotlib's warning would be a line nobody can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied", category=UserWarning)
        fig.tight_layout()


def finish_axes(fig: Figure, ax, xlabel: str, ylabel: str, log_x: bool = True, log_y: bool = True) -> Figure:
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
    if handles:  # below the axis label, across the figure's width: the plot keeps the width, the label shows
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2), borderaxespad=0, frameon=False,
                  ncol=2 if len(handles) > 4 else 1)  # fmt: skip
    tight_layout(fig)
    return fig


def new_figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(11, 5), dpi=100)
    return fig, fig.subplots()


def usd_text(usd: float, bits: float) -> float:
    return usd


def seconds_text(seconds: float, bits: float) -> float:
    return seconds


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the figure ({exc.strerror})") from None
    return path
