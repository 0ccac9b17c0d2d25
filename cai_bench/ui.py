"""Rich rendering: progress bars and summary tables. Only presentation; the figures come from the records."""

from __future__ import annotations

import numpy as np
from rich.console import Console
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

from cai_bench.records import WorkerRecord
from cai_bench.results import RunRecord

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
    )


class RichRunProgress:
    """Partitions done / total, samples/s so far and ETA, one bar per repeat."""

    def __init__(self):
        self._progress = _bar(TextColumn("{task.fields[rate]}"))
        self._task = None
        self._samples = 0
        self._compute = 0.0

    def begin(self, label: str, partitions: int, samples: int) -> None:
        self._samples, self._compute = 0, 0.0
        self._progress.start()
        self._task = self._progress.add_task(label, total=partitions, rate="")

    def advance(self, record: WorkerRecord) -> None:
        self._samples += record.samples
        self._compute += record.compute_s
        rate = f"{self._samples / self._compute:,.0f} samples/s" if self._compute > 0 else ""
        self._progress.update(self._task, advance=1, rate=rate)

    def end(self) -> None:
        self._progress.stop()


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
        self._samples, self._compute = 0, 0.0
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"{self._label}: {label}", total=partitions, rate="")

    def advance(self, record: WorkerRecord) -> None:
        super().advance(record)
        self._progress.update(self._overall, advance=record.samples)

    def end(self) -> None:
        pass


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
    title = (
        f"{first.backend}{threads} · {data['data_gb']:.3g} GB, {data['samples']:,} samples in "
        f"{data['partitions']} x {data['partition_mb']:g} MB · batch {plan['batch_size']} · {plan['precision']}"
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


def report_table(points: list, title: str) -> Table:
    """The report's rows; columns with nothing in any row are left out, and one machine goes in the title."""
    from cai_bench.report import NOTES, display_columns

    columns = display_columns(points)
    machines = {p.machine for p in points}
    if len(machines) == 1:
        columns = [(h, cell) for h, cell in columns if h != "machine"]
        title += f" · {machines.pop()}"
    table = Table(title=title, title_justify="left", caption=NOTES, caption_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("backend", "engine", "prec.", "machine") else "right")
    for p in points:
        table.add_row(*(cell(p) for _, cell in columns), style="yellow" if p.noisy else None)
    return table


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table
