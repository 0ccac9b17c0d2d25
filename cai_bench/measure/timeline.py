"""A run's timeline, from its record alone: one lane per worker across the run's wall clock, each unit split into
start-up, wait, the rest of its own time and compute, its background read drawn beside it, failed and retried
units marked, and how many workers were busy over time (``plot.timeline_figure`` draws it).

A unit is placed by ``ended_epoch_s`` (the wall clock when it ended, records from schema 1.1 on) with its
``total_s`` before it: start-up (its worker's, on its first unit), then wait, then its own time, whose last
``compute_s`` is compute. Its read (``load_s``) ran in the background, ahead of the unit, and ended by the time the
unit began: it is drawn as a thin band ending there. A worker is what the backend ran: a cpu worker (its lanes
share each unit), an hpc process, a SLURM task, a GPU device process; on Lambda, an invoker (one invocation at a
time), whose invocations are drawn from the driver's log of them: each in flight from its request to its answer
(throttled retries included), cold starts (Init Duration) and invocations that failed marked, and the units each
ran from its records.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cai_bench.core.errors import UserError

KINDS = ("call", "startup", "wait", "other", "compute", "load", "init", "failed")
GAP_S = 0.02


@dataclass(frozen=True)
class Segment:
    start_s: float  # seconds since the run's first start
    end_s: float
    kind: str  # one of KINDS
    retried: bool = False  # a unit that needed more than one attempt
    unit: int | None = None  # which of the record's units (its place in ``workers``) this piece is of


@dataclass
class Lane:
    name: str
    segments: list[Segment] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (seconds, "cold start" | "throttled x N")
    where: str = ""  # where the worker ran, where the record names it apart (a Dask worker's address)

    @property
    def label(self) -> str:
        return f"{self.name} {self.where}" if self.where else self.name


@dataclass
class Timeline:
    run_id: str
    backend: str
    wall_s: float
    lanes: list[Lane]
    notes: list[str] = field(default_factory=list)  # failures whose time the record does not hold

    def running(self) -> list[tuple[float, int]]:
        """How many workers were busy at each change, as (seconds, count) steps. A worker's pause between two
        units shorter than GAP_S (or 1% of the wall) is not counted as idle: it is the loop handing one result
        on and taking the next unit, not a wait."""
        steps: list[tuple[float, int]] = []
        for lane in self.lanes:
            for start, end in _busy(lane, max(GAP_S, 0.01 * self.wall_s)):
                steps += [(start, 1), (end, -1)]
        out, count = [(0.0, 0)], 0
        for time_s, change in sorted(steps, key=lambda s: (s[0], s[1])):
            count += change
            out.append((time_s, count))
        return out


def _busy(lane: Lane, gap_s: float) -> list[tuple[float, float]]:
    """The lane's busy spans: its segments but the background reads, merged across pauses up to ``gap_s``."""
    spans = sorted((s.start_s, s.end_s) for s in lane.segments if s.kind != "load")
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + gap_s:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def unit_segments(unit: dict, origin: float, retried: bool = False, index: int | None = None) -> list[Segment]:
    """One unit's pieces, in seconds since ``origin`` (an epoch); ``index``: its place in the record."""
    end = unit["ended_epoch_s"] - origin
    start = end - unit["total_s"]
    started = start + unit["startup_s"]
    running = started + unit["wait_s"]
    compute = max(running, end - unit["compute_s"])
    pieces = [(start, started, "startup"), (started, running, "wait"), (running, compute, "other"),
              (compute, end, "compute"), (running - unit["load_s"], running, "load")]  # fmt: skip
    return [Segment(a, b, kind, retried, index) for a, b, kind in pieces if b - a > 0]


UNIT_TIMES = ("ended_epoch_s", "total_s", "startup_s", "wait_s", "compute_s", "load_s")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _placeable(unit) -> bool:
    """A unit whose times are all numbers: one a damaged record garbled is left off the timeline, not drawn."""
    return isinstance(unit, dict) and all(_number(unit.get(name)) for name in UNIT_TIMES)


def _retried_partitions(info: dict) -> set[int]:
    return {int(r["partition"]) for r in info.get("retried") or [] if "partition" in r}


def _failure_notes(info: dict) -> list[str]:
    notes = []
    for crash in info.get("crashes") or []:
        notes.append(f"worker {crash.get('worker')} lost running partition {crash.get('partition')}: "
                     f"{str(crash.get('error', ''))[:80]}")  # fmt: skip
    for failed in info.get("failed_partitions") or []:
        notes.append(f"partition {failed.get('partition')} failed for good after {failed.get('attempts')} attempt(s)")
    return notes


def _lambda_lanes(units: list[tuple[int, dict]], info: dict, retried: set[int]) -> dict[str, Lane]:
    """A lane per invoker: each invocation's Init Duration on a cold start, its failure where it failed, and the
    units it ran, placed from the driver's first invoke (its wall clock, ``first_invoke_epoch_s``)."""
    origin = info["first_invoke_epoch_s"]
    by_request: dict[str, list[tuple[int, dict]]] = {}
    for index, unit in units:
        by_request.setdefault(unit["worker_id"], []).append((index, unit))
    lanes: dict[str, Lane] = {}
    calls = [c for c in info["invocations"] if isinstance(c, dict) and _number(c.get("sent_s")) and
             _number(c.get("client_s"))]  # fmt: skip
    for call in sorted(calls, key=lambda i: i["sent_s"]):
        lane = lanes.setdefault(call["invoker"], Lane(call["invoker"]))
        start, end = call["sent_s"], call["sent_s"] + call["client_s"]
        init_s = ((call.get("report") or {}).get("init_duration_ms") or 0.0) / 1000
        lane.segments.append(Segment(start, end, "call"))  # in flight, as the driver saw it: throttled waits too
        if call.get("cold") or init_s:  # a failed call has no reply to say so, but its REPORT has the init
            lane.marks.append((start, "cold start"))
        if call.get("throttled"):
            lane.marks.append((start, f"throttled x{call['throttled']}"))
        if init_s:
            lane.segments.append(Segment(start, start + init_s, "init"))
        if call.get("function_error") or call.get("error"):
            lane.segments.append(Segment(start + init_s, end, "failed"))
        for index, unit in by_request.get(call.get("request_id") or "", []):
            lane.segments += unit_segments(unit, origin, unit["partition"] in retried, index)
    return lanes


def _ordered(lanes: list[Lane]) -> list[Lane]:
    """Numbered workers (hpc-0, task-1, invoker-2: numbered as they started) by their number; others (a Map's
    invocations, named by request id) by when they first started."""
    numbered = [re.fullmatch(r"(\D*?)(\d+)", lane.name) for lane in lanes]
    if all(numbered) and len({m.group(1) for m in numbered}) == 1:
        return sorted(lanes, key=lambda lane: int(re.search(r"\d+$", lane.name).group()))
    return sorted(lanes, key=lambda lane: min((s.start_s for s in lane.segments), default=0.0))


def timeline_of(record: dict) -> Timeline:
    """The timeline of one stored run record; a UserError where the record holds no unit end times, or is damaged
    where a timeline reads it (the store checks what reports read, not every backend fact)."""
    units = [(i, w) for i, w in enumerate(record.get("workers") or []) if _placeable(w)]
    if not units:
        raise UserError(f"run {record.get('run_id')}: its records hold no unit end times (written before cai-bench "
                        "kept them, record schema 1.1): no timeline")  # fmt: skip
    try:
        return _built(record, units)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        where = f"run {record.get('run_id')}"
        raise UserError(f"{where}: its record is damaged where a timeline reads it ({exc!r})") from None


def _built(record: dict, units: list[tuple[int, dict]]) -> Timeline:
    info = record.get("backend_info") or {}
    retried = _retried_partitions(info)
    if isinstance(info.get("invocations"), list) and _number(info.get("first_invoke_epoch_s")):
        lanes = _lambda_lanes(units, info, retried)
    else:
        origin = min(u["ended_epoch_s"] - u["total_s"] for _, u in units)
        lanes = {}
        for index, unit in sorted(units, key=lambda item: item[1]["ended_epoch_s"]):
            lane = lanes.setdefault(str(unit["worker_id"]), Lane(str(unit["worker_id"])))
            lane.segments += unit_segments(unit, origin, unit["partition"] in retried, index)
    _place(lanes, info)
    ordered = _ordered(list(lanes.values()))
    return Timeline(record["run_id"], record["backend"], record["summary"]["wall_s"], ordered, _failure_notes(info))


def _place(lanes: dict[str, Lane], info: dict) -> None:
    """Each Dask worker's lane with its address (the record's ``dask.workers``), without its scheme."""
    workers = (info.get("dask") or {}).get("workers") if isinstance(info.get("dask"), dict) else None
    for name, lane in lanes.items():
        about = workers.get(name) if isinstance(workers, dict) else None
        if isinstance(about, dict) and isinstance(about.get("address"), str):
            lane.where = about["address"].split("://")[-1]
