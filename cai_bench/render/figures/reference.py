"""The paper's published series, drawn dashed and grey-blue beside ours and labelled with their kind of time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cai_bench.core.plan import BITS_PER_SAMPLE, samples_for_gb
from cai_bench.measure.metrics import spread
from cai_bench.measure.time_kinds import kind_text

SYSTEMS = {
    "cai-lambda": "CAI on AWS Lambda",
    "hpc-cpu": "HPC CPU",
    "hpc-gpu": "HPC GPU",
    "laptop-cpu": "laptop CPU",
}


# The paper's cost estimates for the whole 12.6 GB set on 10,240 MB functions, by partition size (MB -> US$)
PAPER_COST_USD = {25.0: 0.16, 100.0: 0.38}


REFERENCE_COLOURS = ("#4c6a8a", "#8a9bb0", "#2f4f4f", "#a0785a", "#6b8e23")


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


def _draw_reference(ax, series: list[ReferenceSeries], y: Callable[[float, float], float]) -> None:
    """The paper's series; y(seconds, bits) -> plot units."""
    for index, line in enumerate(series):
        xs = [p.x for p in line.points]
        stats = [spread([y(seconds, bits) for seconds, bits in p.runs]) for p in line.points]
        meds = [s.median for s in stats]
        err = [[s.median - s.min for s in stats], [s.max - s.median for s in stats]]
        colour = REFERENCE_COLOURS[index % len(REFERENCE_COLOURS)]
        ax.errorbar(
            xs, meds, yerr=err, color=colour, linestyle="--", marker="s", markersize=4, markerfacecolor="none",
            capsize=2, linewidth=1, label=line.label,
        )  # fmt: skip
