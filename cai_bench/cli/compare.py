"""``compare``: the candidate's points against the baseline's, exit 1 where one got worse beyond the noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.analysis.compare import METRICS, compare_command
from cai_bench.cli import options as o
from cai_bench.cli.app import app
from cai_bench.core.errors import UserError
from cai_bench.render import console, estimate_views

Side = Annotated[
    str, typer.Argument(help="A results directory, a git commit the records name, or a filter: backend=hpc,workers=2.")
]
Factor = Annotated[float, typer.Option(help="How much worse fails: 1.05 is 5% slower (or dearer, or fewer samples/s).")]
Metric = Annotated[str, typer.Option(help="wall, samples_per_s or cost.")]
Format = Annotated[str, typer.Option("--format", help="table, markdown or json.")]
Across = Annotated[
    str | None,
    typer.Option(
        help="Identity keys to match across, comma-separated: machine compares one point measured on two machines."
    ),
]
AllowMissing = Annotated[
    bool, typer.Option(help="Pass although the candidate lacks points the baseline measured (listed, not failed).")
]


@app.command()
def compare(
    baseline: Side, candidate: Side, factor: Factor = 1.05, metric: Metric = "wall", fmt: Format = "table",
    results: o.ResultsRead = Path("results"), across: Across = None, allow_missing: AllowMissing = False,
) -> None:  # fmt: skip
    """Each point both sides measured: both medians, their ratio and whether the difference is beyond the noise of
    both (Mann-Whitney U, one-sided, p <= 0.05 after Holm's correction over the points). INVALID points are listed,
    not compared. Exit 1 when a point is worse than --factor beyond the noise, or the candidate lacks a point the
    baseline has (unless --allow-missing). Exit 2 where no valid point was compared or nothing could fail."""
    if fmt not in ("table", "markdown", "json"):
        raise UserError(f"--format must be table, markdown or json, got {fmt!r}")
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    keys = tuple(o.comma_list(across, "--across") or ())
    done = compare_command(baseline, candidate, results, metric, factor, console.warn, keys, allow_missing)
    estimate_views.show_comparison(done, fmt)
    if done.failed:
        raise typer.Exit(1)
