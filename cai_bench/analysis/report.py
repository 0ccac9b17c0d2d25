"""Reports from the results store: one row per measured point, with the spread over its repeats.

A point is one plan on one machine (``results.point_key``): backend x data x partition size x batch size x
precision x threads (...). Its figures are computed from the records alone, so a report is reproducible from
the store and works on a store that holds records of several machines and backends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from cai_bench.analysis.results import (
    data_identity,
    latest_comm_points,
    measured_only,
    ran_precision,
    ran_runtime,
    read_records,
    record_point_key,
)
from cai_bench.analysis.validity import DEFAULT_RULES, Rules, checked_difference, point_failures, start_kind
from cai_bench.core.choices import ENGINES, REPORT_FORMATS
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_id, machine_label
from cai_bench.core.plan import data_gb
from cai_bench.measure.metrics import Spread, spread
from cai_bench.store.jsonl import ResultsStore

BREAKDOWN = ("startup_s", "wait_s", "load_s", "compute_s")
FORMATS = REPORT_FORMATS


@dataclass
class PointReport:
    key: str
    machine: str
    machine_id: str
    backend: str
    data: str  # data_identity: which data, whatever directory it was read from
    data_gb: float
    samples: int
    partition_mb: float
    partitions: int
    batch_size: int
    precision: str
    threads: int | None  # as the backend ran it (the plan may leave it to the backend)
    workers: int  # worker processes (hpc) or array tasks (hpc --slurm) the backend ran; 1 for cpu
    repeats: int
    # "fast" or "reference" (torch), or the runtime of an export (onnxruntime, openvino): one column, one
    # vocabulary; "-" for records from before engines were recorded
    engine: str
    wall_s: Spread
    samples_per_s: Spread
    throughput_bps: Spread  # bits / wall s
    sum_worker_throughput_bps: Spread  # the paper's measure: sum over workers of bits / own compute s
    peak_rss_bytes: int  # the highest over repeats
    cost_usd: Spread | None
    worker_breakdown_s: dict[str, float]  # mean seconds per worker in each phase, median over repeats
    run_ids: list[str]
    first_utc: str
    last_utc: str
    speedup: float | None = None  # baseline median wall / this median wall
    baseline: str | None = None
    oversubscribed: bool = False  # ran more threads than its process could use (--oversubscribe)
    memory_mb: int | None = None  # Lambda: the function's memory (which also sets its CPU share)
    orchestrator: str | None = None  # Lambda: who made the invocations (direct, stepfunctions)
    map_state_s: Spread | None = None  # Lambda under Step Functions: the Map state's time, from the history
    start: str = "cold"  # validity.start_kind: warm Lambda runs are a point apart from cold ones
    invalid: tuple[str, ...] = ()  # each validity condition a repeat failed; empty: a valid point
    gflops: float | None = None  # median GFLOP/s over the wall (samples/s x the model's FLOPs per galaxy)
    mfu: float | None = None  # median share of the machine's measured fp32 peak; None where none was measured
    max_dz: float | None = None  # the largest |dz| from torch fp32 a check measured for what ran (0: torch fp32)

    @property
    def noisy(self) -> bool:
        return self.wall_s.noisy

    @property
    def valid(self) -> bool:
        return not self.invalid

    def label(self) -> str:
        return f"{self.backend} · {self.data_gb:.3g} GB · {self.partition_mb:g} MB · batch {self.batch_size}"


def engine_label(plan: dict) -> str:
    runtime = (plan.get("backend_options") or {}).get("runtime") or "torch"
    return runtime if runtime != "torch" else plan.get("engine", "-")


def _worker_breakdown(record: dict) -> dict[str, float]:
    """Mean seconds per worker in each phase; a worker that ran several partitions adds them up."""
    per_worker: dict[tuple, dict[str, float]] = {}
    for w in record["workers"]:
        totals = per_worker.setdefault((w.get("host"), w.get("pid"), w.get("worker_id")), dict.fromkeys(BREAKDOWN, 0))
        for phase in BREAKDOWN:
            totals[phase] += w.get(phase, 0.0)
    n = max(len(per_worker), 1)
    return {phase: sum(t[phase] for t in per_worker.values()) / n for phase in BREAKDOWN}


def _median_of(values) -> float | None:
    kept = [v for v in values if v is not None]
    return spread(kept).median if kept else None


def _largest_difference(group: list[dict]) -> float | None:
    """The largest |dz| from torch fp32 measured for the point's repeats: the runtime or precision probe's, an
    fp32 export's own check, 0 for torch fp32 itself; None where nothing was measured."""
    found = []
    for record in group:
        difference, _ = checked_difference(record)
        if difference is None and ran_precision(record) == "fp32":
            export = (record.get("backend_info") or {}).get("export") or {}
            difference = 0.0 if ran_runtime(record) == "torch" else export.get("max_abs_dz")
        if isinstance(difference, int | float) and not isinstance(difference, bool):
            found.append(float(difference))
    return max(found) if found else None


def summarize_points(records: list[dict], rules: Rules = DEFAULT_RULES) -> list[PointReport]:
    """One PointReport per point, from finished run records (others are ignored), each judged valid or not by
    ``rules`` (a point is valid when every repeat is); cold and warm runs are never pooled."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if record.get("kind") != "run" or record.get("status") != "ok":
            continue
        groups.setdefault((record_point_key(record), start_kind(record)), []).append(record)
    points = []
    for (key, start), group in groups.items():
        group.sort(key=lambda r: r["created_utc"])
        plan, data, last = group[-1]["plan"], group[-1]["plan"]["data"], group[-1]
        sums = [r["summary"] for r in group]
        costs = [s["cost_usd"] for s in sums if s.get("cost_usd") is not None]
        map_times = [(r.get("backend_info") or {}).get("map_state_s") for r in group]
        breakdowns = [_worker_breakdown(r) for r in group]
        info = last.get("backend_info") or {}
        # A run that cycled its partitions processed more than its data set holds: that is its data size
        cycled = plan.get("cycle_to_gb") is not None
        samples = sums[-1]["samples"] if cycled else data["samples"]
        points.append(
            PointReport(
                key=key,
                machine=machine_label(last["environment"]),
                machine_id=machine_id(last["environment"]),
                backend=last["backend"],
                data=data_identity(data),
                data_gb=data_gb(samples) if cycled else data["data_gb"],
                samples=samples,
                partition_mb=data["partition_mb"],
                partitions=data["partitions"],
                batch_size=plan["batch_size"],
                precision=ran_precision(last),
                threads=info.get("threads", plan.get("threads")),
                workers=info.get("workers") or info.get("tasks") or last["summary"]["workers"],
                repeats=len(group),
                engine=engine_label(plan),
                wall_s=spread([s["wall_s"] for s in sums]),
                samples_per_s=spread([s["samples_per_s"] for s in sums]),
                throughput_bps=spread([s["throughput_bps"] for s in sums]),
                sum_worker_throughput_bps=spread([s["sum_worker_throughput_bps"] for s in sums]),
                peak_rss_bytes=max(s["peak_rss_bytes"] for s in sums),
                cost_usd=spread(costs) if len(costs) == len(sums) else None,
                worker_breakdown_s={p: spread([b[p] for b in breakdowns]).median for p in BREAKDOWN},
                run_ids=[r["run_id"] for r in group],
                first_utc=group[0]["created_utc"],
                last_utc=last["created_utc"],
                oversubscribed=bool(plan.get("oversubscribe")),
                memory_mb=info.get("memory_mb"),
                orchestrator=info.get("orchestrator"),
                map_state_s=spread(map_times) if map_times and None not in map_times else None,
                start=start,
                invalid=tuple(point_failures(group, rules)),
                gflops=_median_of(s.get("gflops") for s in sums),
                mfu=_median_of(s.get("mfu") for s in sums),
                max_dz=_largest_difference(group),
            )
        )
    points.sort(key=lambda p: (p.backend, p.engine, p.machine, p.precision, p.data_gb, p.partition_mb, p.batch_size))
    return points


def add_speedups(points: list[PointReport], baseline: str) -> None:
    """Speedup of each point over the ``baseline`` on the same data (the same number of samples).

    ``baseline`` is a backend name, or ``backend:engine`` (``cpu:reference`` for the upstream-style loop).
    Among the baseline's points on that data, the closest is used: same machine first, then the same
    partitioning, batch size and precision; the chosen one is named in ``PointReport.baseline``.
    """
    backend, _, engine = baseline.partition(":")
    for point in points:
        candidates = [
            b
            for b in points
            if b.backend == backend and (not engine or b.engine == engine) and b.samples == point.samples
        ]
        if not candidates:
            continue
        best = max(
            candidates,
            key=lambda b: (
                b.machine_id == point.machine_id,
                b.data == point.data,
                b.batch_size == point.batch_size,
                b.precision == point.precision,
                b.threads == point.threads,
                b.repeats,
            ),
        )
        point.speedup = best.wall_s.median / point.wall_s.median if point.wall_s.median > 0 else None
        point.baseline = f"{best.label()} · {best.engine} engine · {best.precision} on {best.machine}"


def select(points: list[PointReport], backends: list[str] | None) -> list[PointReport]:
    return [p for p in points if not backends or p.backend in backends]


def read_points(
    store: ResultsStore, backends: list[str] | None = None, baseline: str | None = None, warn=None,
    rules: Rules = DEFAULT_RULES,
) -> list[PointReport]:  # fmt: skip
    """The store's points (``warn`` gets what a read skipped: a torn last line), each with its speedup over
    ``baseline`` where one is given, of ``backends`` only where they are given."""
    points = summarize_points(measured_only(read_records(store, warn), warn), rules)
    if baseline:
        add_speedups(points, baseline)
    return select(points, backends)


def report_points(
    results: str, backends: list[str] | None, baseline: str, warn=None, rules: Rules = DEFAULT_RULES
) -> tuple[list, ResultsStore, list[dict]]:
    """``cai-bench report``: the points to show and ``comm bench``'s (only without --backend), refused in one line
    where there are none."""
    store = ResultsStore(results)
    points = read_points(store, backends, baseline, warn, rules)
    comm_points = [] if backends else latest_comm_points(store)
    if not points and not comm_points:
        which = f" for backend {','.join(backends)}" if backends else ""
        raise UserError(f"{store.path}: no finished runs to report{which}")
    return points, store, comm_points


# ---------------------------------------------------------------------------------------------- rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# (header, cell) for human-readable tables; the CSV and JSON exports keep full precision instead.
DISPLAY_COLUMNS: list[tuple[str, Callable[[PointReport], str]]] = [
    ("backend", lambda p: p.backend),
    # one name per idea: what ran (--runtime), with torch's engine (--engine fast|reference) beside it
    ("runtime", lambda p: f"torch {p.engine}" if p.engine in ENGINES else p.engine),
    ("data GB", lambda p: f"{p.data_gb:.3g}"),
    ("part. MB", lambda p: f"{p.partition_mb:g} x{p.partitions}"),
    ("batch", lambda p: str(p.batch_size)),
    ("prec.", lambda p: p.precision),
    ("mem. MB", lambda p: _num(p.memory_mb, ",d")),
    ("orch.", lambda p: "-" if p.orchestrator in (None, "direct") else p.orchestrator),
    ("thr.", lambda p: _num(p.threads, "d") + (" OVERSUB" if p.oversubscribed else "")),
    ("wkr.", lambda p: "-" if p.workers == 1 else str(p.workers)),
    ("n", lambda p: str(p.repeats)),
    ("valid", lambda p: "VALID" if p.valid else "INVALID"),
    ("start", lambda p: "warm" if p.start == "warm" else "-"),
    ("wall s", lambda p: f"{p.wall_s.median:,.2f}"),
    ("Map s", lambda p: "-" if p.map_state_s is None else f"{p.map_state_s.median:,.2f}"),
    ("min-max", lambda p: f"{p.wall_s.min:,.2f}-{p.wall_s.max:,.2f}" + (" NOISY" if p.noisy else "")),
    ("samples/s", lambda p: f"{p.samples_per_s.median:,.1f}"),
    ("Mbps", lambda p: f"{p.throughput_bps.median / 1e6:,.1f}"),
    ("Mbps Σw", lambda p: f"{p.sum_worker_throughput_bps.median / 1e6:,.1f}"),
    ("speedup", lambda p: "-" if p.speedup is None else f"{p.speedup:.2f}x"),
    ("GFLOP/s", lambda p: _num(p.gflops, ",.1f")),
    ("MFU", lambda p: "-" if p.mfu is None else f"{p.mfu:.0%}"),
    ("max |dz|", lambda p: _num(p.max_dz, ".1e")),
    ("RSS MB", lambda p: f"{p.peak_rss_bytes / 2**20:,.0f}"),
    ("cost $", lambda p: "-" if p.cost_usd is None else f"{p.cost_usd.median:.4f}"),
    ("machine", lambda p: p.machine),
]

# What a column means, said under a table only where the column is shown
COLUMN_NOTES = {
    "min-max": "min-max: of wall s over the repeats.",
    "Mbps": "Mbps: bits / wall s, what a user gets.",
    "Mbps Σw": "Mbps Σw: the sum over workers of bits / own compute s, the paper's headline measure.",
    "speedup": "speedup: the baseline's median wall s / this one's, on the same data.",
    "RSS MB": "RSS MB: the highest peak resident memory of any repeat.",
    "GFLOP/s": "GFLOP/s: samples/s x the model's FLOPs per galaxy (torch's FLOP counter).",
    "MFU": "MFU: GFLOP/s as a share of the machine's fp32 peak, a large matrix product timed at the run's threads.",
    "max |dz|": "max |dz|: the largest redshift difference from torch fp32 measured for what ran (its probe, or an "
    "export's own check).",
    "thr.": "thr.: threads in all (per task for SLURM arrays).",
    "wkr.": "wkr.: worker processes, or array tasks.",
    "mem. MB": "mem. MB: a Lambda function's memory.",
    "orch.": "orch.: who invoked the functions.",
    "Map s": "Map s: the Step Functions Map state's time, from the execution history (the paper's measure), beside "
    "the driver's own wall s.",
    "valid": "valid: VALID where every repeat ran at least the minimum duration and galaxies (--min-duration, "
    "--min-samples: 10 s and 10,000 unless given) and its predictions matched torch fp32 within 2e-3.",
    "start": "start warm: a Lambda run whose invocations all found warm environments, never pooled with cold ones.",
}


def notes_for(points: list[PointReport], shown: list[str]) -> str:
    """The notes under a table of ``points`` whose columns ``shown`` are: each shown column's meaning, and only
    the flags some row carries (NOISY, OVERSUB, INVALID)."""
    notes = ["Medians over n repeats."] + [COLUMN_NOTES[h] for h in shown if h in COLUMN_NOTES]
    if any(p.noisy for p in points) and "min-max" in shown:
        notes.append("NOISY: the slowest repeat took over 1.5x the fastest, so the median is not to be trusted "
                     "blindly.")  # fmt: skip
    if any(p.oversubscribed for p in points) and "thr." in shown:
        notes.append("OVERSUB: more threads than the process could use (--oversubscribe), so they shared cores.")
    if any(not p.valid for p in points):
        notes.append("INVALID: what failed is named below the table.")
    return " ".join(notes)


def export_row(p: PointReport) -> dict:
    """A flat row with full precision and units in the names (CSV, JSON)."""
    row = {
        "machine": p.machine,
        "backend": p.backend,
        "engine": p.engine,
        "data": p.data,
        "data_gb": p.data_gb,
        "samples": p.samples,
        "partition_mb": p.partition_mb,
        "partitions": p.partitions,
        "batch_size": p.batch_size,
        "precision": p.precision,
        "threads": p.threads,
        "workers": p.workers,
        "repeats": p.repeats,
    }
    for name in ("wall_s", "samples_per_s", "throughput_bps", "sum_worker_throughput_bps"):
        s: Spread = getattr(p, name)
        row.update({f"{name}_median": s.median, f"{name}_min": s.min, f"{name}_max": s.max, f"{name}_iqr": s.iqr})
    row.update(
        {
            "noisy": p.noisy,
            "oversubscribed": p.oversubscribed,
            "speedup": p.speedup,
            "baseline": p.baseline,
            "peak_rss_bytes": p.peak_rss_bytes,
            "gflops": p.gflops,
            "mfu": p.mfu,
            "max_abs_dz": p.max_dz,
            "cost_usd_median": None if p.cost_usd is None else p.cost_usd.median,
            "memory_mb": p.memory_mb,
            "orchestrator": p.orchestrator,
            "map_state_s_median": None if p.map_state_s is None else p.map_state_s.median,
            **{f"worker_{k}": v for k, v in p.worker_breakdown_s.items()},
            "first_utc": p.first_utc,
            "last_utc": p.last_utc,
            "run_ids": " ".join(p.run_ids),
            "valid": p.valid,
            "invalid_why": "; ".join(p.invalid),
            "start": p.start,
        }
    )
    return row


def display_columns(points: list[PointReport]) -> list[tuple[str, Callable[[PointReport], str]]]:
    """The display columns with something in them for these points (no all-"-" cost column on a CPU run, no
    workers column where every point ran one worker)."""
    return [(h, cell) for h, cell in DISPLAY_COLUMNS if any(cell(p) != "-" for p in points)]


# What makes two Lambda points the same setting but for the function's memory
_SAME_BUT_MEMORY = ("backend", "engine", "machine", "data", "partition_mb", "batch_size", "precision", "orchestrator")


def memory_choices(points: list[PointReport]) -> list[dict]:
    """For every setting measured at two or more memory sizes (with a cost), the fastest and the cheapest, as
    aws-lambda-power-tuning names them: {"setting": label, "fastest": point, "cheapest": point, "points": n}."""
    groups: dict[tuple, list[PointReport]] = {}
    for p in points:
        if p.memory_mb is not None and p.cost_usd is not None:
            groups.setdefault(tuple(getattr(p, a) for a in _SAME_BUT_MEMORY), []).append(p)
    out = []
    for group in groups.values():
        if len({p.memory_mb for p in group}) < 2:
            continue
        fastest = min(group, key=lambda p: (p.wall_s.median, p.cost_usd.median))
        cheapest = min(group, key=lambda p: (p.cost_usd.median, p.wall_s.median))
        label = f"{group[0].label()} · {group[0].precision} · {group[0].orchestrator or 'direct'}"
        out.append({"setting": label, "fastest": fastest, "cheapest": cheapest, "points": len(group)})
    return out


def memory_lines(points: list[PointReport]) -> list[str]:
    """``memory_choices`` as sentences for the report."""
    lines = []
    for choice in memory_choices(points):
        f, c = choice["fastest"], choice["cheapest"]
        lines.append(
            f"{choice['setting']}: fastest at {f.memory_mb:,} MB ({f.wall_s.median:,.2f} s, ${f.cost_usd.median:.4f}); "
            f"cheapest at {c.memory_mb:,} MB (${c.cost_usd.median:.4f}, {c.wall_s.median:,.2f} s), "
            f"of {choice['points']} memory sizes"
        )
    return lines


def to_markdown(points: list[PointReport]) -> str:
    columns = display_columns(points)
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(p) for _, cell in columns) + " |" for p in points]
    invalid = "".join(f"- INVALID {p.label()}: {'; '.join(p.invalid)}\n" for p in points if not p.valid)
    lines += ["", invalid.rstrip("\n")] if invalid else []
    memory = "".join(f"- {line}\n" for line in memory_lines(points))
    notes = notes_for(points, [h for h, _ in columns])
    return "\n".join(lines) + "\n\n" + (f"Memory:\n\n{memory}\n" if memory else "") + notes + "\n"


def to_json(points: list[PointReport]) -> str:
    return json.dumps([export_row(p) for p in points], indent=1)
