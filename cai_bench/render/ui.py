"""Everything the command line shows, in one place: progress bars, tables and the lines each command prints,
on stdout (results) or stderr (progress, warnings, errors). Only presentation: every figure comes from the
records and outcomes the commands hand it; ``as_json`` prints the same as JSON, nothing else.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console, Group
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cai_bench.analysis.compare import ALPHA, TEST_NAME
from cai_bench.analysis.estimate import TIME_KINDS
from cai_bench.analysis.report import NOTES, display_columns, export_row, memory_lines, to_json, to_markdown
from cai_bench.analysis.results import to_csv
from cai_bench.analysis.validity import MIN_DURATION_S, MIN_SAMPLES, Rules, verdict_line
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_label
from cai_bench.core.records import RunRecord, WorkerRecord
from cai_bench.measure.metrics import spread

# Progress and errors go to stderr, results to stdout. Messages are never wrapped (soft_wrap), so a path or
# a figure stays on one line in logs and pipes.
console = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)
if not stdout.is_terminal:
    stdout.width = max(stdout.width, 160)  # logs and pipes: wide enough for the report tables


def _bar(*extra) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        # In a log or a pipe a bar cannot redraw, and each stop would print every bar again: RichRunProgress
        # writes one line per finished run there instead
        disable=not console.is_terminal,
    )


class RichRunProgress:
    """Partitions done / total, samples/s so far and ETA, one bar per repeat; before them, a bar while synthetic
    data is generated (``synthesizing``). The rate is the summary's: samples over the wall clock since the run
    began. Where stderr is no terminal, one line per finished run instead of the bars."""

    def __init__(self):
        self._progress = _bar(TextColumn("{task.fields[rate]}"))
        self._task = None
        self._samples = 0
        self._began = time.perf_counter()
        self._done = (0, 0, "")  # partitions done, partitions in all, the run's label
        self._synth = None

    def synthesizing(self, done: int, total: int) -> None:
        if self._synth is None:
            self._synth = RichCountProgress("synthesizing", "samples")
        self._synth(done, total)
        if done >= total:
            self._synth.__exit__()
            self._synth = None

    def begin(self, label: str, partitions: int, samples: int) -> None:
        if self._synth is not None:
            self._synth.__exit__()
            self._synth = None
        self._restart(label, partitions)
        self._progress.start()
        self._task = self._progress.add_task(label, total=partitions, rate="")

    def _restart(self, label: str, partitions: int) -> None:
        self._samples, self._began, self._done = 0, time.perf_counter(), (0, partitions, label)

    def _rate(self) -> str:
        elapsed = time.perf_counter() - self._began
        return f"{self._samples / elapsed:,.0f} samples/s (wall)" if elapsed > 0 and self._samples else ""

    def advance(self, record: WorkerRecord) -> None:
        self._samples += record.samples
        self._done = (self._done[0] + 1, *self._done[1:])
        self._progress.update(self._task, advance=1, rate=self._rate())

    def _log_line(self) -> None:
        done, total, label = self._done
        if not console.is_terminal and total:
            console.print(f"{label}: {done}/{total} partitions, {self._rate() or 'no samples'} over "
                          f"{time.perf_counter() - self._began:,.1f} s", markup=False, highlight=False)  # fmt: skip

    def end(self) -> None:
        self._progress.stop()
        self._log_line()


class RichSweepProgress(RichRunProgress):
    """Two bars: the whole sweep (samples of all points, with points done / total and ETA), and the current run."""

    def __init__(self):
        super().__init__()
        self._overall = None
        self._points = 0
        self._points_done = 0
        self._skipped = 0
        self._label = ""
        self._synth = None

    def sweep_begin(self, points: int, samples: int) -> None:
        self._points = points
        self._progress.start()
        self._overall = self._progress.add_task("sweep", total=max(samples, 1), rate=self._points_text())

    def _points_text(self) -> str:
        skipped = f", {self._skipped} already in the store" if self._skipped else ""
        return f"points {self._points_done}/{self._points}{skipped}"

    def point_begin(self, number: int, label: str) -> None:
        self._label = label

    def point_end(self, skipped: bool) -> None:
        self._points_done += 1
        self._skipped += skipped
        self._progress.update(self._overall, rate=self._points_text())

    def sweep_end(self) -> None:
        self._progress.stop()

    def synthesizing(self, done: int, total: int) -> None:
        """Data generation for a point, as a third bar while it lasts (one live display at a time)."""
        if self._synth is None:
            self._synth = self._progress.add_task(f"{self._label}: generating data", total=total, rate="samples")
        self._progress.update(self._synth, completed=done, total=total)
        if done >= total:
            self._progress.remove_task(self._synth)
            self._synth = None

    def begin(self, label: str, partitions: int, samples: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._restart(f"{self._label}: {label}", partitions)
        self._task = self._progress.add_task(f"{self._label}: {label}", total=partitions, rate="")

    def advance(self, record: WorkerRecord) -> None:
        super().advance(record)
        self._progress.update(self._overall, advance=record.samples)

    def end(self) -> None:
        self._log_line()  # the bars stay up for the sweep's next run


class RichCountProgress:
    """A plain bar over a count (samples written); nothing is drawn unless it is called."""

    def __init__(self, label: str, unit: str):
        self._progress = _bar(TaskProgressColumn(), TextColumn(unit))
        self._label = label
        self._task = None

    def __enter__(self) -> RichCountProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._task is not None:
            self._progress.stop()

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=total)
        self._progress.update(self._task, completed=done, total=total)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def run_summary_table(records: list[RunRecord]) -> Table:
    first = records[0]
    plan, data = first.plan, first.plan["data"]
    info = first.backend_info
    threads = f", {info['threads']} threads" if "threads" in info else ""
    ran = f"{info['runtime']} {plan['precision']}" if info.get("runtime") not in (None, "torch") else plan["precision"]
    title = (
        f"{first.backend}{threads} · {data['data_gb']:.3g} GB, {data['samples']:,} samples in "
        f"{data['partitions']} x {data['partition_mb']:g} MB · batch {plan['batch_size']} · {ran}"
    )
    caption = "Mbps: bits / wall s · p50, p99: batch latency · RSS: peak resident memory"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ["repeat", "wall s", "samples", "samples/s", "Mbps", "p50 ms", "p99 ms", "RSS MB"]
    costed = any(r.summary.cost_usd is not None for r in records)
    failed = any(r.status != "ok" for r in records)
    for name in columns + (["cost $"] if costed else []) + (["status"] if failed else []):
        table.add_column(name, justify="left" if name in ("repeat", "status") else "right")
    for rec in records:
        s = rec.summary
        row = [
            str(rec.repeat),
            f"{s.wall_s:.2f}",
            f"{s.samples:,}",
            f"{s.samples_per_s:,.1f}",
            f"{s.throughput_bps / 1e6:,.1f}",
            _ms(s.batch_latency_p50_s),
            _ms(s.batch_latency_p99_s),
            _mb(s.peak_rss_bytes),
        ]
        if costed:
            row.append("-" if s.cost_usd is None else f"{s.cost_usd:.4f}")
        table.add_row(*row, *([rec.status] if failed else []))
    if len(records) > 1:
        sums = [r.summary for r in records]
        walls = [s.wall_s for s in sums]
        rates = [s.samples_per_s for s in sums]
        mbps = [s.throughput_bps / 1e6 for s in sums]
        peak = _mb(max(s.peak_rss_bytes for s in sums))
        medians = [
            f"{np.median(walls):.2f}",
            f"{sums[0].samples:,}",
            f"{np.median(rates):,.1f}",
            f"{np.median(mbps):,.1f}",
        ]
        costs = [s.cost_usd for s in sums if s.cost_usd is not None]
        cost = ([f"{np.median(costs):.4f}" if costs else "-"] if costed else []) + ([""] if failed else [])
        table.add_row("median", *medians, "", "", peak, *cost, style="bold")
        ranges = [f"{min(v):,.1f}-{max(v):,.1f}" for v in (walls, rates, mbps)]
        table.add_row("min-max", ranges[0], "", ranges[1], ranges[2], "", "", "", *([""] * len(cost)))
    return table


# The report's columns a narrow terminal loses first, in order; what stays answers "how fast, at what setting"
NARROW_DROPS = ("Mbps Σw", "RSS MB", "Mbps", "min-max", "mem. MB", "thr.", "wkr.", "orch.", "Map s", "cost $",
                "speedup", "engine")  # fmt: skip


def report_table(points: list, title: str, width: int | None = None):
    """The report's rows, then its notes; columns with nothing in any row are left out, and one machine goes in
    the title. Where the table is wider than ``width`` (the terminal's; a pipe's is unbounded), it is narrowed,
    never cut: several machines become one table each, columns with one value in every row go into the title,
    and then columns are left out in NARROW_DROPS' order until it fits, the notes naming them."""
    if width is None:
        width = stdout.width if stdout.is_terminal else 1_000_000
    tables, dropped = _fitted_tables(points, title, width)
    left_out = (
        f" Left out at {width} columns: {', '.join(dropped)} (--format markdown or csv has them)." if dropped else ""
    )
    return Group(*tables, Text(NOTES + left_out, style="dim"))


def _fitted_tables(points: list, title: str, width: int) -> tuple[list[Table], list[str]]:
    columns = display_columns(points)
    machines = sorted({p.machine for p in points})
    if len(machines) == 1:
        columns = [(h, cell) for h, cell in columns if h != "machine"]
        title += f" · {machines[0]}"
    if _natural_width(_report_rows(points, "", columns)) <= width:
        return [_report_rows(points, title, columns)], []
    if len(machines) > 1:
        tables, dropped = [], []
        for machine in machines:
            more, gone = _fitted_tables([p for p in points if p.machine == machine], title, width)
            tables += more
            dropped += [name for name in gone if name not in dropped]
        return tables, dropped
    constant = [(h, cell) for h, cell in columns if len(points) > 1 and h not in ("backend", "machine")
                and len({cell(p) for p in points}) == 1]  # fmt: skip
    title += "".join(f" · {h} {cell(points[0])}" for h, cell in constant)
    columns = [c for c in columns if c not in constant]
    dropped: list[str] = []
    for name in NARROW_DROPS:
        if _natural_width(_report_rows(points, "", columns)) <= width:
            break
        if any(h == name for h, _ in columns):
            columns = [(h, cell) for h, cell in columns if h != name]
            dropped.append(name)
    if _natural_width(_report_rows(points, "", columns)) > width:  # still too wide: each point stacked
        return [key_value_table(title, [(h, cell(p)) for h, cell in columns]) for p in points], dropped
    return [_report_rows(points, title, columns)], dropped


def print_fitted(renderable) -> None:
    """A report on a terminal, its notes wrapped to it (the table fits it: ``report_table``); in a pipe or a log,
    at its natural width, nothing wrapped or cut."""
    if stdout.is_terminal:
        stdout.print(renderable, soft_wrap=False)
        return
    width = stdout.width
    stdout.width = 100_000  # print takes no width over the console's own
    try:
        stdout.print(renderable, soft_wrap=True)
    finally:
        stdout.width = width


def _report_rows(points: list, title: str, columns: list) -> Table:
    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("backend", "engine", "prec.", "machine") else "right",
                         no_wrap=True)  # fmt: skip
    for p in points:
        table.add_row(*(cell(p) for _, cell in columns), style="yellow" if p.noisy else None)
    return table


def _natural_width(table: Table) -> int:
    """The width ``table`` takes with no cell wrapped or cut."""
    return Measurement.get(stdout, stdout.options.update(width=10_000), table).maximum


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def run_progress(quiet: bool) -> RichRunProgress | None:
    """A run's progress bars, or none (``--quiet``, ``--json``)."""
    return None if quiet else RichRunProgress()


def sweep_progress(quiet: bool) -> RichSweepProgress | None:
    return None if quiet else RichSweepProgress()


def count_progress(label: str, unit: str, quiet: bool):
    """A bar over a count for a block (``with``), drawn only when called and not ``quiet``."""
    return RichCountProgress(label, unit) if not quiet else _NoCount()


class _NoCount:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        pass


def say(text: str) -> None:
    """One result line on stdout, as it is (no markup, no highlighting)."""
    stdout.print(text, markup=False, highlight=False)


def warn(text: str) -> None:
    console.print(f"warning: {text}", markup=False, highlight=False)


def tell(text: str) -> None:
    """A line on stderr: what happened to a command, beside its results."""
    console.print(text, markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------- runs


def accuracy_line(metrics: dict | None, where: str = "") -> str | None:
    if not metrics:
        return None
    r2 = "-" if metrics["r2"] is None else f"{metrics['r2']:.4f}"
    line = (
        f"accuracy over {metrics['samples']:,} objects{where}: MAE {metrics['mae']:.5f}, MSE {metrics['mse']:.6f}, "
        f"bias {metrics['bias']:.5f}, NMAD {metrics['nmad']:.5f}, R2 {r2}, "
        f"outliers {metrics['outlier_fraction']:.2%}"
    )
    if not metrics.get("meaningful", True):
        line = "MEANINGLESS " + line
    return line + (f" ({metrics['note']})" if metrics.get("note") else "")


def show_runs(records: list[RunRecord], store_path: Path, as_json: bool) -> None:
    """The records a command appended: the summary table with what the last repeat cost and reached."""
    if as_json:
        print(json.dumps([asdict(r) for r in records], indent=1))
        return
    stdout.print(run_summary_table(records))
    last = records[-1].summary
    stdout.print(
        f"sum over {last.workers} worker(s) of each one's bits / own compute s (the paper's throughput measure): "
        f"{last.sum_worker_throughput_bps / 1e6:,.1f} Mbps in the last repeat"
    )
    billed = records[-1].backend_info.get("cost")
    if billed:
        stdout.print(
            f"cost: {billed['requests']:,} requests, {billed['billed_gb_s']:,.1f} billed GB-s "
            f"({billed['architecture']}, prices as of {billed['prices_as_of']}): ${billed['cost_usd']:.4f} "
            "in the last repeat"
        )
    chose = runtime_choice_line(records[0].plan.get("runtime_choice"))
    if chose:
        say(chose)
    weights = records[0].weights.get("weights")
    if weights == "random-init":
        weights += " (the timings are real; the predicted redshifts are not)"
    stdout.print(f"weights: {weights}")
    line = accuracy_line(records[-1].accuracy, " in the last repeat")
    if line:
        say(line)
    line = comm_line(records[-1].backend_info.get("comm"))
    if line:
        say(line)
    for record in records:
        if record.non_finite:
            noted = ", ".join(f"{path} ({value})" for path, value in record.non_finite.items())
            say(f"repeat {record.repeat}: not finite numbers, stored as null (the record notes them): {noted}")
    verdicts = {validity_line(r) for r in records}
    for record in records if len(verdicts) > 1 else records[-1:]:
        say(("" if len(verdicts) == 1 else f"repeat {record.repeat}: ") + validity_line(record))
    stdout.print(f"{len(records)} record(s) appended to {store_path}")
    say(f"run id{'s' if len(records) > 1 else ''}: {', '.join(r.run_id for r in records)} (results show and plot "
        f"--timeline take the id, or the start of its last part)")  # fmt: skip


def comm_line(comm: dict | None) -> str | None:
    """What the run's closing collectives (--comm) came to, in the last repeat: done, or failed and why."""
    if not comm:
        return None
    # The channels as URLs, or (where rank 0's aggregate was read) as what each channel recorded of itself
    schemes = [c.get("scheme") if isinstance(c, dict) else str(c).split("://")[0] for c in comm.get("channels") or []]
    channels = ", ".join(str(s) for s in schemes)
    dropped = comm.get("dropped_frames") or 0
    dropped_text = f"; dropped {dropped} frame(s) that failed the seal (not this run's)" if dropped else ""
    head = f"collectives over {channels}, {comm.get('world_size')} rank(s)"
    if comm.get("collectives") != "failed":
        return f"{head}: done{dropped_text}"
    failed = comm.get("failed_ranks") or []
    why = f"rank {failed[0]['rank']}: {failed[0]['error']}" if failed else "no aggregate was read"
    return f"{head}: FAILED ({why}); each unit's own result was read instead{dropped_text}"


def runtime_choice_line(choice: dict | None) -> str | None:
    """What --runtime auto chose and why, with the probe's time of each candidate (None: it was not asked)."""
    if not choice:
        return None
    timed = [
        f"{c['runtime']} {c['precision']} " + (f"{c['seconds']:.3f} s" if c.get("seconds") is not None else
                                               f"skipped: {c['skipped']}")
        for c in choice.get("candidates") or []
    ]  # fmt: skip
    batch = f" in batches of {choice['batch']}" if choice.get("batch") else ""
    checked = f", checked against {choice['checked_against']}" if choice.get("checked_against") else ""
    probe = (f"; probe ({choice['samples']} galaxies{batch}{checked}, best of the timed passes): {', '.join(timed)}"
             if timed else "")  # fmt: skip
    return f"runtime auto ran as {choice['chose']} {choice['precision']} ({choice['why']}){probe}"


def validity_line(record) -> str:
    """A record's VALID or INVALID line, from the verdict it carries."""
    found = record.validity or {}
    rules = found.get("rules") or {}
    return verdict_line(
        found.get("failed") or [],
        Rules(rules.get("min_duration_s", MIN_DURATION_S), rules.get("min_samples", MIN_SAMPLES)),
    )


def show_run(done, as_json: bool) -> None:
    """What ``run`` did: its records, or the job it submitted and the command that records it."""
    if done.submitted is None:
        show_runs(done.records, done.store.path, as_json)
        return
    job_id, collect = done.submitted
    if as_json:
        print(json.dumps({"submitted": job_id, "collect": collect}))
        return
    stdout.print(f"job {job_id} is submitted; when it has run, record it with:")
    say(f"  {collect}")


def show_partitions_failed(exc, store_path: Path, again: str = "") -> None:
    """Partitions that failed for good: each, its attempts and their errors, and where the rest was kept."""
    tell(f"error: {exc}")
    for failure in exc.failed:
        errors = " | ".join(failure["errors"])
        tell(f"  partition {failure['partition']} (unit {failure['unit']}), {failure['attempts']} attempt(s): {errors}")
    console.print(f"the partitions that finished are kept in a 'failed' record in {store_path}{again}")


def show_interrupted(exc, store_path: Path, interrupted: str | None = None) -> None:
    if hasattr(exc, "collect"):
        console.print("interrupted; the job keeps running. When it has run, record it with:")
        tell(f"  {exc.collect}")
    else:
        console.print(
            interrupted or f"interrupted; finished repeats and the partitions done so far are in {store_path}"
        )


def show_predict(outcome, as_json: bool) -> None:
    if as_json:
        figures = {"out": str(outcome.out), "objects": outcome.objects, "partitions_run": outcome.partitions_run,
                   "partitions_reused": outcome.partitions_reused, "accuracy": outcome.accuracy,
                   "run_ids": [r.run_id for r in outcome.records], "provenance": outcome.provenance}  # fmt: skip
        print(json.dumps(figures, indent=1))
        return
    if outcome.records:
        stdout.print(run_summary_table(outcome.records))
    reused = f" ({outcome.partitions_reused} partitions from an earlier run)" if outcome.partitions_reused else ""
    stdout.print(f"{outcome.out}: {outcome.objects:,} objects{reused}")
    for line in catalogue_lines(outcome.provenance):
        say(line)
    if outcome.accuracy is not None and not outcome.accuracy.get("meaningful", True):
        say("weights: random-init (the timings are real; the predicted redshifts are not)")
    line = accuracy_line(outcome.accuracy)
    if line:
        say(line)
    for line in photoz_lines(outcome.accuracy):
        say(line)
    if outcome.records:
        say(f"run id: {', '.join(r.run_id for r in outcome.records)}")


def catalogue_lines(provenance: dict) -> list[str]:
    """Where the true redshifts came from and how many objects carry each flag."""
    lines = []
    joined = provenance.get("z_true")
    if isinstance(joined, dict):
        lines.append(f"z_true: {joined['matched']:,} of {joined['objects']:,} ids found in {joined['catalogue']} "
                     f"(column {joined['z_column']}, joined on {joined['on']})")  # fmt: skip
    meanings = provenance.get("flags", {})
    for bit, count in provenance.get("flag_counts", {}).items():
        if count:
            lines.append(f"flag {bit}: {count:,} objects: {meanings.get(bit, '')}")
    return lines


def photoz_lines(metrics: dict | None) -> list[str]:
    """The photo-z point metrics of dz/(1+z), overall and per bin of true redshift, labelled as the accuracy is."""
    if not metrics or "photoz" not in metrics:
        return []
    label = "" if metrics.get("meaningful", True) else "MEANINGLESS "

    def text(m: dict) -> str:
        return (f"bias {m['bias']:+.4f}, sigma_IQR {m['sigma_iqr']:.4f}, NMAD {m['nmad']:.4f}, outliers "
                f"{m['outlier_rate']:.1%} (|dz/(1+z)| > {m['outlier_bound']:.3f}), "
                f"{m['objects']:,} objects")  # fmt: skip

    lines = [f"{label}photo-z metrics of dz/(1+z): {text(metrics['photoz'])}"]
    lines += [f"  z {row['z_low']:g}-{row['z_high']:g}: {text(row)}" for row in metrics.get("photoz_by_z") or []]
    lines += [f"  r {row['r_low']:g}-{row['r_high']:g} mag: {text(row)}" for row in metrics.get("photoz_by_r") or []]
    return lines


# ---------------------------------------------------------------------------------------------- bench, sweep


def _bench_table(done) -> Table:
    outcome, data, figures = done.outcome, done.plan.data, done.figures
    arms, others = outcome.arms, outcome.arms[1:]
    title = (
        f"reference vs {', '.join(others)} · {data.data_gb:.3g} GB, {data.samples:,} samples in "
        f"{data.partitions} partitions · batch {figures['batch_size']} · precision {figures['precision']} · "
        f"{figures['machine']}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("round", justify="right")
    for arm in arms:
        table.add_column(f"{arm} samples/s", justify="right")
    for arm in others:
        table.add_column(f"{arm} / ref.", justify="right")
    rates = {arm: outcome.samples_per_s(arm) for arm in arms}
    for number in range(len(rates[arms[0]])):
        ratios = [f"{outcome.ratios(arm)[number]:.2f}" for arm in others]
        table.add_row(str(number + 1), *(f"{rates[arm][number]:,.1f}" for arm in arms), *ratios)
    medians = [f"{spread(rates[arm]).median:,.1f}" for arm in arms]
    table.add_row("median", *medians, *(f"{outcome.median_ratio(arm):.2f}" for arm in others), style="bold")
    return table


def show_bench(done, as_json: bool) -> None:
    if as_json:
        print(json.dumps(done.figures, indent=1))
        return
    outcome, others = done.outcome, done.outcome.arms[1:]
    stdout.print(_bench_table(done))
    forward = ", ".join(f"{arm} {outcome.median_ratio(arm, 'compute_samples_per_s'):.2f}" for arm in others)
    stdout.print(
        "samples/s = samples / wall s of the whole run (start-up and loading included). "
        f"Forward passes only, median ratio to the reference: {forward}."
    )
    rss = ", ".join(f"{arm} {outcome.peak_rss_bytes(arm) / 2**20:,.0f} MB" for arm in outcome.arms)
    stdout.print(f"peak RSS: {rss} (the reference holds the whole data set)")
    for arm in others:
        chose = dict(done.figures["arms"][arm]["choices"])
        default = runtime_choice_line(chose.pop("runtime_choice", None))
        say(f"{arm}: {json.dumps(chose)}")
        if default:
            say(f"{arm} (what `cai-bench run` runs without flags): {default}")
    stdout.print(f"CPU flags: {' '.join(done.figures['cpu_flags']) or 'none read'}")
    stdout.print(f"{sum(len(r) for r in outcome.records.values())} record(s) appended to {done.store.path}")


def show_sweep(done, as_json: bool) -> None:
    if as_json:
        print(to_json(done.points))
        return
    outcome, spec = done.outcome, done.spec
    skipped = sum(1 for s in outcome.points if s.todo == 0)
    print_fitted(report_table(done.points, f"sweep {spec.name}: {len(outcome.points)} points on {spec.backend}"))
    stdout.print(
        f"{len(outcome.records)} record(s) appended to {done.store.path}"
        + (f"; {skipped} point(s) were already complete (--force reruns them)" if skipped else "")
    )
    for runtime, probe in (outcome.auto_precisions or {"torch": outcome.auto_precision or {}}).items():
        if not probe:
            continue
        on = f" on {runtime}" if len(outcome.auto_precisions) > 1 else ""
        stdout.print(
            f"precision auto ran as {probe['chose']}{on} ({probe['why']}): probed once on this machine for the "
            "whole sweep, so every repeat of a point runs the same precision"
        )
    for choice in outcome.runtime_choices:
        say(f"{runtime_choice_line(choice)}; asked once for the sweep's points of one batch size")


def waiting_for(store_directory: Path):
    """What a sweep says when another process holds a point's lock."""
    return lambda point: console.print(
        f"{point.label()}: another process is measuring this point into {store_directory}; waiting for it"
    )


def show_report(points: list, store_path: Path, fmt: str, comm_points: list | None = None) -> None:
    if fmt == "table":
        if points:
            print_fitted(report_table(points, f"{store_path}: {len(points)} points"))
        for p in points:
            if not p.valid:
                say(f"INVALID {p.label()} · {p.precision} · {p.engine}: {'; '.join(p.invalid)}")
        for line in memory_lines(points):
            say(f"memory: {line}")
        if comm_points:
            stdout.print(comm_table(comm_points, f"{store_path.parent / 'comm.jsonl'}: {len(comm_points)} points"))
    elif fmt == "markdown":
        print(to_markdown(points), end="")
    elif fmt == "csv":
        print(to_csv([export_row(p) for p in points]), end="")
    else:
        print(to_json(points))


def comm_table(records: list[dict], title: str) -> Table:
    """``comm bench``'s points: per channel, operation, ranks and size, the median latency and its spread."""
    machines = {machine_label(r["environment"]) for r in records}
    table = Table(title=title + (f" · {machines.pop()}" if len(machines) == 1 else ""), title_justify="left")
    for header in ("channel", "op", "ranks", "bytes", "median ms", "IQR ms", "min-max ms", "connect s"):
        table.add_column(header, justify="left" if header in ("channel", "op") else "right")
    for r in records:
        ms = lambda s: f"{s * 1000:.3g}"  # noqa: E731
        table.add_row(r["channel"], r["op"], str(r["world_size"]), f"{r['nbytes']:,}", ms(r["median_s"]),
                      ms(r.get("q3_s", 0) - r.get("q1_s", 0)), f"{ms(r.get('min_s', 0))}-{ms(r.get('max_s', 0))}",
                      f"{r.get('connect_s', 0):.2f}")  # fmt: skip
    return table


def show_comm_points(points, results: Path) -> None:
    """``comm bench``: each point as it is stored, then the table of them."""
    done = []
    for record in points:
        done.append(record)
        tell(f"{record['channel']} {record['op']} x{record['world_size']} {record['nbytes']} B: "
             f"{record['median_s'] * 1000:.3g} ms")  # fmt: skip
    stdout.print(comm_table(done, f"{results / 'comm.jsonl'}: {len(done)} points"))


def show_paths(paths) -> None:
    for path in paths:
        say(str(path))


# ---------------------------------------------------------------------------------------------- results


_LIST_HEADERS = ["run id", "kind", "status", "backend", "rep", "data GB", "part. MB", "batch", "prec.", "wall s",
                 "samples/s"]  # fmt: skip


def show_record_list(rows: list[dict], total: int, store_path: Path) -> None:
    """``results list``: one row per record, the machine in the title where all share one."""
    several_machines = len({r["machine"] for r in rows}) > 1
    table = Table(title=f"{store_path}: {len(rows)} of {total} records", title_justify="left")
    for header in _LIST_HEADERS + (["machine"] if several_machines else []):
        table.add_column(header, justify="right" if header in ("rep", "data GB", "wall s", "samples/s") else "left")
    for r in rows:
        cells = [r["run_id"], r["kind"] or "run", r["status"], r["backend"], f"{r['repeat']}/{r['repeats']}",
                 f"{r['data_gb']:.3g}", f"{r['partition_mb']:g}", str(r["batch_size"]), r["precision_ran"],
                 f"{r['wall_s']:.2f}", f"{r['samples_per_s']:,.1f}"]  # fmt: skip
        table.add_row(*cells, *([r["machine"]] if several_machines else []))
    if not several_machines and rows:
        table.title += f" · {rows[0]['machine']}"
    stdout.print(table)


def show_record(record: dict, row: dict, as_json: bool) -> None:
    """``results show``: the record's flat row, or the whole record."""
    if as_json:
        print(json.dumps(record, indent=1))
        return
    rows = [(k, "-" if v is None else f"{v:,.6g}" if isinstance(v, float) else str(v)) for k, v in row.items()]
    rows.append(("partitions run", str(len(record.get("workers", [])))))
    stdout.print(key_value_table(record["run_id"], rows))


def show_export(text: str, out: Path | None) -> None:
    """``results export``: on stdout, or into ``out``."""
    if out is None:
        print(text, end="")
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror})") from None


# ---------------------------------------------------------------------------------------------- model


def show_model_info(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=1))
        return
    flops, total, frozen = info["flops_per_sample"], info["parameters"], info["frozen_parameters"]
    named = f" (sha256 {info['sha256'][:16]}...)" if info.get("sha256") else f" (seed {info.get('seed')})"
    rows = [
        ("parameters", f"{total:,}"),
        ("  frozen (encoder)", f"{frozen:,}"),
        ("  learnable (heads)", f"{total - frozen:,}"),
        ("state dict keys", str(info["state_dict_keys"])),
        ("FLOPs per sample", f"{flops / 1e9:.3f} GFLOP ({flops / 2e6:.1f} M multiply-adds)"),
        ("weights", info["weights"] + named),
    ]
    stdout.print(key_value_table("pcm-AstroMAE", rows))


def show_conversion(done) -> None:
    say(
        f"{done.out}: {done.keys} tensors from the {done.source_kind} {done.source} "
        f"(sha256 {done.source_sha256[:16]}...); they load strictly into pcm-AstroMAE: "
        f"cai-bench run --weights {done.out}"
    )


def show_model_export(export, seconds: float, as_json: bool) -> None:
    if as_json:
        print(json.dumps(export.meta, indent=1))
        return
    size = sum((Path(export.directory) / name).stat().st_size for name in export.files)
    w = export.weights
    named = w.source + (f" (sha256 {w.sha256[:16]}...)" if w.sha256 else f" (seed {w.seed})")
    runtime = "openvino" if export.format == "openvino" else "onnxruntime"
    say(
        f"{export.directory}: {export.format} export of {named}, {size / 2**20:,.1f} MB in {seconds:.1f} s; "
        f"max |dz| against torch fp32 on {export.check['batch']} galaxies: {export.check['max_abs_dz']:.2g} "
        f"({export.check['runtime']}). Run it: cai-bench run --runtime {runtime} --weights {export.directory}"
    )


# ---------------------------------------------------------------------------------------------- data


def show_synthesized(out: Path, manifest, seconds: float) -> None:
    written = sum(p.bytes for p in manifest.partitions)
    stdout.print(
        f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions, "
        f"{written / 2**20:,.1f} MB in {seconds:.1f} s ({written / 2**20 / seconds:,.1f} MB/s)"
    )


def show_split(out: Path, manifest, partition_mb: float) -> None:
    stdout.print(f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions of {partition_mb:g} MB")


def show_imported(out: Path, manifest, files: int, partition_mb: float) -> None:
    stdout.print(
        f"{out}: {manifest.samples:,} samples from {files} file(s) in {len(manifest.partitions)} partitions "
        f"of {partition_mb:g} MB; labels: {'yes' if manifest.has_labels else 'no'}"
    )
    ids = manifest.objects
    if ids is not None:
        say(f"ids: {ids.id_type}, from column {ids.id_column}{', with ra and dec' if ids.has_position else ''}; "
            f"kept in {out / ids.file}")  # fmt: skip
    else:
        say(f"ids: {manifest.source.get('ids', 'row numbers 0..N-1 in the order written')}")


def show_data_info(directory: Path, info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=1))
        return
    low, high = info["partition_samples_min"], info["partition_samples_max"]
    rows = [
        ("dataset id", info["dataset_id"]),
        ("source", json.dumps(info["source"])),
        ("samples", f"{info['samples']:,}"),
        ("data size", f"{info['data_gb']:.4g} GB"),
        ("partitions", f"{info['partitions']} x {info['partition_mb']:g} MB ({low:,}-{high:,} samples)"),
        ("on disk", f"{info['bytes_on_disk'] / 2**20:,.1f} MB"),
        ("labels", "yes" if info["has_labels"] else "no"),
        ("ids", info["ids"]),
        ("created", info["created_utc"]),
    ]
    stdout.print(key_value_table(str(directory), rows))


def show_verified(directory: Path, manifest, problems: list[str]) -> None:
    """Every partition that failed verification on stderr, then the one error line; or that all match."""
    if problems:
        for problem in problems:
            tell(problem)
        raise UserError(f"{directory}: {len(problems)} of {len(manifest.partitions)} partitions failed verification")
    stdout.print(
        f"{directory}: all {len(manifest.partitions)} partitions match the manifest ({manifest.samples:,} samples)"
    )


def show_upload(done) -> None:
    stdout.print(
        f"{done.location}: {len(done.uploaded)} object(s) uploaded ({done.bytes_uploaded / 2**20:,.1f} MB), "
        f"{len(done.skipped)} already there, in {done.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------------------------- lambda


def show_emulator(emulator, url: str, s3_url: str) -> None:
    config = emulator.config
    say(
        f"Lambda Invoke API at {url}, function {config.name} ({config.memory_mb} MB, {emulator.cpu_share:.2f} vCPUs' "
        f"worth each, timeout {config.timeout_s:g} s, {emulator.concurrency} at once); S3 at {s3_url}\n"
        f"run against it: cai-bench run --backend lambda --lambda-endpoint-url {url} --endpoint-url "
        f"{s3_url} --bucket s3://cai-bench --memory-mb {config.memory_mb}"
    )


def show_build_commands(image, region: str | None, push: bool) -> None:
    """Where Docker is not reachable: the commands that build and push the image elsewhere."""
    say("Docker is not reachable here; on a machine with Docker and the aws CLI, run (ACCOUNT: your account id, "
        "from `aws sts get-caller-identity`):")  # fmt: skip
    account, where = "ACCOUNT", region or "REGION"
    for line in [shlex.join(image.build_command()), *(image.push_commands(account, where) if push else [])]:
        say("  " + line)
    say(f"then: cai-bench lambda deploy --image-uri {image.uri(account, where)} --role-arn ROLE_ARN")


def show_built(uri: str, push: bool) -> None:
    say(f"image {uri}" + (f"\nnext: cai-bench lambda deploy --image-uri {uri} --role-arn ROLE_ARN" if push else ""))


def show_deployed(done: dict) -> None:
    c = done["configuration"]
    say(
        f"function {c['FunctionName']} {done['action']} in {done['seconds']:.1f} s: {c['MemorySize']} MB, "
        f"timeout {c['Timeout']} s, /tmp {(c.get('EphemeralStorage') or {}).get('Size')} MB, "
        f"{(c.get('Architectures') or ['x86_64'])[0]}, state {c.get('State')}\nrun it: cai-bench run --backend lambda "
        f"--function {c['FunctionName']} --bucket s3://BUCKET/cai-bench"
    )


def show_function_status(found: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(found, indent=2, default=str))
        return
    name = found["function"]
    if not found["exists"]:
        say(f"function {name}: not deployed")
    else:
        say(
            f"function {name}: {found['state']} (last update {found['last_update']}), {found['memory_mb']} MB, "
            f"timeout {found['timeout_s']} s, /tmp {found['ephemeral_mb']} MB, {found['architecture']}, image "
            f"{found['image_uri']}{'' if found['managed'] else ' (not deployed by cai-bench)'}"
        )
    for arn in found["state_machines"]:
        say(f"state machine {arn}")


def show_destroyed(removed: list[str], name: str) -> None:
    for line in removed or [f"nothing to remove for function {name}"]:
        say(("removed " if removed else "") + line)


def show_cost(spent, billed, arch: str) -> None:
    steps = f" + ${spent.transitions_usd:.6f} for {spent.transitions:,} state transitions" if spent.transitions else ""
    say(
        f"{spent.requests:,} invocations, {sum(billed.billed_ms) / 1000:,.2f} billed s at {billed.memory_mb:,} MB = "
        f"{spent.billed_gb_s:,.1f} GB-s: ${spent.duration_usd:.4f} duration + ${spent.request_usd:.6f} requests"
        f"{steps} = ${spent.usd:.4f} ({arch}, prices as of {spent.prices_as_of})"
    )


# ---------------------------------------------------------------------------------------------- estimates


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4f}" if value < 1 else f"{value:,.2f}"


_KIND_SHORT = {"wall": "wall", "compute": "compute only"}


def estimate_table(outcome) -> Table:
    """``estimate``: per setting, partition size and data size, the units, the workers at once, the kind of time,
    its median and its interval with the model's error, and the cost."""
    names = sorted({e.profile for e in outcome.estimates})
    table = Table(title=f"estimate from {'; '.join(names)}", title_justify="left")
    headers = ("setting", "data GB", "part. MB", "units", "time", "s p50", "80% interval s", "US$ p50", "US$ high",
               "US$/M gal.")  # fmt: skip
    for header in headers:
        table.add_column(header, justify="left" if header in ("setting", "time") else "right")
    for e in outcome.estimates:
        table.add_row(e.label, f"{e.gb:g}", f"{e.partition_mb:g}", f"{e.units:,}", _KIND_SHORT[e.time_kind],
                      f"{e.wall_s_p50:,.1f}", _interval(e), _usd(e.cost_usd_p50), _usd(e.cost_usd_high),
                      _usd(e.cost.get("usd_per_million_galaxies")))  # fmt: skip
    return table


def _interval(e) -> str:
    return "unbounded" if e.wall_s_low is None else f"{e.wall_s_low:,.1f}-{e.wall_s_high:,.1f}"


def _cost_line(e) -> str:
    """The itemised cost of one estimate (its median-cost trial)."""
    c = e.cost
    if e.backend == "lambda":
        return (f"{c['billed_gb_s']:,.0f} GB-s ({e.prices['architecture']}) US$ {_usd(c['duration_usd'])}, "
                f"{c['requests']:,.0f} requests US$ {_usd(c['request_usd'])}, {c['transitions']:,.0f} transitions "
                f"US$ {_usd(c['transitions_usd'])}, S3 {c['s3_gets']:,.0f} GET + {c['s3_puts']:,.0f} PUT "
                f"US$ {_usd(c['s3_usd'])}")  # fmt: skip
    if e.backend == "hpc":
        hours = "cores unknown" if c["core_hours"] is None else f"{c['core_hours']:,.1f} core-hours"
        return f"{hours} at US$ {e.prices['core_hour_usd'] or '-'} per core-hour ({e.prices['billed']})"
    return f"{c['gpu_hours']:,.2f} GPU-hours at US$ {e.prices['gpu_hour_usd'] or '-'} ({e.prices['billed']})"


def _assumption_lines(estimates: list) -> list[str]:
    """One line per backend: the kind of time, how its interval was made, and the prices assumed."""
    lines, seen = [], set()
    for e in estimates:
        if e.backend in seen:
            continue
        seen.add(e.backend)
        prices = ", ".join(f"{k} {_price_text(v)}" for k, v in e.prices.items())
        lines += [f"{e.backend} time: {TIME_KINDS[e.time_kind]}", f"{e.backend} {e.interval}",
                  f"{e.backend} prices: {prices}"]  # fmt: skip
    return lines


def _price_text(value) -> str:
    return "not given (unpriced)" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def show_estimates(outcome, figure: Path | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**outcome.to_dict(), "figure": str(figure) if figure else None}, indent=1))
        return
    stdout.print(estimate_table(outcome))
    for line in _assumption_lines(outcome.estimates):
        say(line)
    if len(outcome.estimates) == 1:
        say(f"cost: {_cost_line(outcome.estimates[0])}")
    for backend, facts in outcome.profiles.items():
        shown = {k: v for k, v in facts.items() if k not in ("name", "model_error") and v is not None}
        say(f"{backend} profile {facts['name']}: " + ", ".join(f"{k} {_fact(v)}" for k, v in shown.items()))
    took = sum(e.simulated_s for e in outcome.estimates)
    units = sum(e.units for e in outcome.estimates)
    trials = outcome.estimates[0].trials
    say(f"simulated {units:,} units x {trials} trials (seed {outcome.estimates[0].seed}) in {took:.2f} s")
    if figure:
        say(f"figure: {figure}")


def show_decision(decision, figure: Path | None, as_json: bool) -> None:
    """``estimate --deadline/--budget``: the settings ranked, what each costs item by item, and the choice."""
    if as_json:
        print(json.dumps({**decision.to_dict(), "figure": str(figure) if figure else None}, indent=1))
        return
    goal = " and ".join(
        x
        for x in (
            decision.deadline_s is not None and f"deadline {decision.deadline_s:,.0f} s",
            decision.budget_usd is not None and f"budget US$ {decision.budget_usd:,.2f}",
        )
        if x
    )
    gb = decision.candidates[0].estimate.gb
    table = Table(title=f"{gb:g} GB, {goal}: cheapest first among those that meet it, then the rest, fastest first",
                  title_justify="left")  # fmt: skip
    for header in ("#", "setting", "part. MB", "wall s p50", "upper s", "US$ p50", "US$/M gal.", "frontier", "verdict"):
        table.add_column(header, justify="left" if header in ("setting", "verdict") else "right")
    for rank, c in enumerate(decision.candidates[:25], 1):
        e = c.estimate
        table.add_row(str(rank), e.label, f"{e.partition_mb:g}", f"{e.wall_s_p50:,.0f}",
                      "-" if e.wall_s_high is None else f"{e.wall_s_high:,.0f}", _usd(e.cost_usd_p50),
                      _usd(e.cost.get("usd_per_million_galaxies")), "yes" if c.frontier else "",
                      "meets" if c.meets else c.why_not)  # fmt: skip
    stdout.print(table)
    if len(decision.candidates) > 25:
        say(f"{len(decision.candidates) - 25} more in --json")
    chosen = decision.chosen
    if chosen:
        say(f"cheapest that meets it: {chosen.estimate.label}, {chosen.estimate.partition_mb:g} MB partitions; "
            f"cost: {_cost_line(chosen.estimate)}")  # fmt: skip
    else:
        say("nothing meets it: the fastest are first in the table")
    for line in _assumption_lines([c.estimate for c in decision.candidates]) + decision.left_out:
        say(line)
    say(f"every time is wall clock; each setting simulated {decision.trials} times")
    if figure:
        say(f"figure: {figure}")


def _fact(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def show_checks(checks: list, skipped: list[str], errors: dict, source: str, as_json: bool) -> None:
    """``estimate --validate``: each measured run against its prediction, and per backend the median absolute
    error and how often the 80% interval covered the points held out."""
    if as_json:
        print(json.dumps({"source": source, "checks": [c.to_dict() for c in checks], "skipped": skipped,
                          "by_backend": {b: e.to_dict() for b, e in errors.items()}}, indent=1))  # fmt: skip
        return
    table = Table(title=f"{source}: predicted vs measured", title_justify="left")
    for header in ("run", "runs of", "time", "data GB", "part. MB", "at once", "measured s", "predicted s p50",
                   "p90", "error"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("run", "runs of", "time") else "right")
    for c in checks:
        error = "calibration" if c.calibration else f"{c.error * 100:+.0f}%"
        table.add_row(c.what, c.group or c.backend, _KIND_SHORT[c.time_kind], f"{c.gb:.3g}",
                      "-" if c.partition_mb is None else f"{c.partition_mb:g}", str(c.slots), f"{c.measured_s:,.2f}",
                      f"{c.predicted_s_p50:,.2f}", f"{c.predicted_s_p90:,.2f}", error)  # fmt: skip
    stdout.print(table)
    for line in skipped:
        say(f"not predicted: {line}")
    for backend, error in errors.items():
        if not error.points:
            continue
        covered, bounded = error.coverage()
        coverage = f"{covered} of {bounded} ({covered / bounded:.0%})" if bounded else "none bounded (too few points)"
        say(f"{backend}: median absolute error {error.median_abs_error * 100:.1f}% over {len(error.points)} points "
            f"(calibration excluded); the {error.coverage_target:.0%} interval, made from the others, covered "
            f"{coverage}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- compare


def _comparison_rows(done) -> list[list[str]]:
    rows = []
    for p in done.points:
        verdict = "WORSE" if p.regressed else ("worse, within noise" if p.worse_by > done.factor else "ok")
        if not p.can_fail:
            verdict = f"cannot fail: needs {p.needs}"
        if p.invalid:
            verdict += " (INVALID)"
        rows.append([p.label, f"{statistics.median(p.baseline):,.4g} ({len(p.baseline)})",
                     f"{statistics.median(p.candidate):,.4g} ({len(p.candidate)})", f"{p.ratio:.3f}",
                     f"{p.p_value:.3g}", verdict])  # fmt: skip
    return rows


def show_comparison(done, fmt: str) -> None:
    """``compare``: a row per matched point (medians with their repeats, ratio, p-value, verdict), then the points
    one side lacks, and one line of what failed."""
    if fmt == "json":
        print(json.dumps(done.to_dict(), indent=1))
        return
    columns = ["point", f"baseline {done.metric}", f"candidate {done.metric}", "ratio", "p", "verdict"]
    rows = _comparison_rows(done)
    if fmt == "markdown":
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        table = Table(title=f"{done.candidate} against {done.baseline}: {done.metric}, factor {done.factor:g}",
                      title_justify="left")  # fmt: skip
        for name in columns:
            table.add_column(name, justify="left" if name in ("point", "verdict") else "right")
        for row in rows:
            table.add_row(*row, style="bold red" if row[-1] == "WORSE" else None)
        stdout.print(table)
    for side, labels in (("baseline", done.only_baseline), ("candidate", done.only_candidate)):
        for label in labels:
            say(f"only in the {side}: {label}")
    for p in done.points:
        for why in p.invalid:
            say(f"INVALID {p.label}: {why}")
    blind = sum(not p.can_fail for p in done.points)
    if blind:
        say(f"{blind} matched point(s) with too few repeats for the test to fail: not counted as passes")
    failed = len(done.regressions)
    say(f"{failed} of {len(done.points)} matched point(s) worse than {done.factor:g}x beyond the noise "
        f"({TEST_NAME}, p <= {ALPHA:g})" if failed else
        f"no matched point worse than {done.factor:g}x beyond the noise ({len(done.points) - blind} compared "
        f"that could fail; {TEST_NAME}, p <= {ALPHA:g})")  # fmt: skip
