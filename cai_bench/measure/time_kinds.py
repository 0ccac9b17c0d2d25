"""The kinds of time a figure can be, one entry each: its name in records and JSON, the sentence that says what it
covers, and (for the kinds cai-bench draws) a short label for tables and the label of an axis. A figure, a table
or an estimate names its kind, and nothing adds or compares two kinds.

``wall`` and ``compute`` are what cai-bench measures and predicts; the others are the kinds of the paper's
published figures, which mixes them (Step Functions wall time, profiler CPU time, profiler GPU time)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimeKind:
    text: str
    short: str | None = None  # table and axis labels: for the kinds cai-bench measures and predicts
    axis: str | None = None


WALL, COMPUTE = "wall", "compute"
TIME_KINDS: dict[str, TimeKind] = {
    WALL: TimeKind("wall clock: from the start of dispatch to the last result", "wall", "wall time (s)"),
    COMPUTE: TimeKind(
        "compute only (torch profiler): no start-up, no reading, no orchestration; not a wall-clock prediction",
        "compute only",
        "compute time only (s), torch profiler",
    ),
    "map-state-wall": TimeKind("Step Functions Map-state wall time"),
    "execution-wall": TimeKind("Step Functions execution wall time"),
    "mean-worker-profiler-cpu": TimeKind("mean per-function profiler CPU time"),
    "profiler-cpu": TimeKind("torch profiler CPU time"),
    "profiler-gpu": TimeKind("torch profiler GPU time"),
}


def kind_text(kind: str) -> str:
    """The sentence for ``kind``; an unknown kind (a newer reference file, say) as itself."""
    found = TIME_KINDS.get(kind)
    return found.text if found else kind
