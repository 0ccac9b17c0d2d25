"""The tables of runs, measured points and the comm channels, narrowed to the terminal by dropping the
least needed columns first."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from cai_bench.analysis.report import display_columns, notes_for
from cai_bench.core.machine import machine_label
from cai_bench.core.records import RunRecord
from cai_bench.measure.metrics import spread
from cai_bench.render.console import key_value_table, mb_text, ms_text, natural_width, stdout


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
            ms_text(s.batch_latency_p50_s),
            ms_text(s.batch_latency_p99_s),
            mb_text(s.peak_rss_bytes),
        ]
        if costed:
            row.append("-" if s.cost_usd is None else f"{s.cost_usd:.4f}")
        table.add_row(*row, *([rec.status] if failed else []))
    if len(records) > 1:
        sums = [r.summary for r in records]
        walls = [s.wall_s for s in sums]
        rates = [s.samples_per_s for s in sums]
        mbps = [s.throughput_bps / 1e6 for s in sums]
        peak = mb_text(max(s.peak_rss_bytes for s in sums))
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
                "speedup", "runtime")  # fmt: skip


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
    shown = [h for h, _ in display_columns(points) if h not in dropped]
    return Group(*tables, Text(notes_for(points, shown) + left_out, style="dim"))


def _fitted_tables(points: list, title: str, width: int) -> tuple[list[Table], list[str]]:
    columns = display_columns(points)
    machines = sorted({p.machine for p in points})
    if len(machines) == 1:
        columns = [(h, cell) for h, cell in columns if h != "machine"]
        title += f" · {machines[0]}"
    if natural_width(_report_rows(points, "", columns)) <= width:
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
        if natural_width(_report_rows(points, "", columns)) <= width:
            break
        if any(h == name for h, _ in columns):
            columns = [(h, cell) for h, cell in columns if h != name]
            dropped.append(name)
    if natural_width(_report_rows(points, "", columns)) > width:  # still too wide: each point stacked
        return [key_value_table(title, [(h, cell(p)) for h, cell in columns]) for p in points], dropped
    return [_report_rows(points, title, columns)], dropped


def _report_rows(points: list, title: str, columns: list) -> Table:
    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("backend", "runtime", "prec.", "machine") else "right",
                         no_wrap=True)  # fmt: skip
    for p in points:
        table.add_row(*(cell(p) for _, cell in columns), style="yellow" if p.noisy else None)
    return table


# ---------------------------------------------------------------------------------------------- bench, sweep


def bench_table(done) -> Table:
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
