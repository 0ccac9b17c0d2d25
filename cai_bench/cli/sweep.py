"""``sweep``, ``report`` and ``plot``: a grid of runs that resumes, and what the store's points show."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.analysis.report import report_points
from cai_bench.analysis.validity import MIN_DURATION_S, MIN_SAMPLES, Rules
from cai_bench.cli import options as o
from cai_bench.cli.app import app, measured
from cai_bench.commands.sweep import sweep_command
from cai_bench.core.choices import FIGURE_FORMATS, PRECISIONS
from cai_bench.render import bars, console, run_views

Config = Annotated[
    str | None, typer.Option(help="A preset by name (laptop-quick, paper) or a TOML file; options override it.")
]
SweepBackend = Annotated[o.BackendName | None, typer.Option(help="Where to run.", show_default="cpu")]
Gbs = Annotated[str | None, typer.Option("--gb", help="Data sizes in GB, comma-separated.", show_default="0.1")]
PartitionMbs = Annotated[
    str | None, typer.Option("--partition-mb", help="Partition sizes in MB, comma-separated.", show_default="25")
]
BatchSizes = Annotated[
    str | None, typer.Option("--batch-size", help="Batch sizes, comma-separated.", show_default="512")
]
Precisions = Annotated[
    str | None,
    typer.Option("--precision", help=f"Precisions, comma-separated, of {', '.join(PRECISIONS)}.", show_default="auto"),
]
SweepEngine = Annotated[o.Engine | None, typer.Option(help=o.ENGINE_HELP, show_default="fast")]
SweepRepeats = Annotated[int | None, typer.Option(help="Measured runs per point.", show_default="3")]
SweepWarmup = Annotated[int | None, typer.Option(help="Unrecorded runs before each point's repeats.", show_default="0")]
SweepSeed = Annotated[
    int | None,
    typer.Option(min=0, help="Seed of the synthetic data and random-init weights (0 or more).", show_default="0"),
]
Rerun = Annotated[bool, typer.Option("--force", help="Rerun points the store already holds.")]
KeepData = Annotated[
    bool, typer.Option(help="Keep generated data sets in the cache; --no-keep-data deletes each after its last point.")
]
Baseline = Annotated[
    str, typer.Option(help="Backend (or backend:engine, e.g. cpu:reference) the speedup is measured against.")
]
Format = Annotated[o.ReportFormat, typer.Option("--format", help="How to print the report.")]
OutDir = Annotated[Path, typer.Option(help="Directory the figures are written into.")]
Reference = Annotated[
    str | None, typer.Option(help="Draw published results beside ours: 'paper' or a CSV of the same columns.")
]
FigureFormats = Annotated[
    str, typer.Option("--format", help=f"Image formats, comma-separated, of {', '.join(FIGURE_FORMATS)}.")
]
Predictions = Annotated[
    Path | None, typer.Option(help="Instead: predicted vs true redshift from a cai-bench predict file.")
]


def _overrides(given: dict) -> dict:
    """The command line's values as a sweep spec takes them: comma lists as lists, choices by their values."""
    lists = {"gb": float, "partition_mb": float, "batch_size": int, "precision": str}
    out = {k: o.comma_list(v, "--" + k.replace("_", "-"), lists[k]) if k in lists else v for k, v in given.items()}
    out.update(backend=given["backend"].value if given["backend"] else None,
               engine=given["engine"].value if given["engine"] else None,
               weights=str(given["weights"]) if given["weights"] else None,
               oversubscribe=given["oversubscribe"] or None)  # fmt: skip
    return out


@app.command()
@o.with_backend_options(sweep=True)
def sweep(
    config: Config = None, backend: SweepBackend = None, gb: Gbs = None, partition_mb: PartitionMbs = None,
    batch_size: BatchSizes = None, precision: Precisions = None, engine: SweepEngine = None,
    repeats: SweepRepeats = None, warmup: SweepWarmup = None, threads: o.Threads = None,
    oversubscribe: o.Oversubscribe = False, reprobe: o.Reprobe = False, seed: SweepSeed = None,
    weights: o.Weights = None, force: Rerun = False,
    keep_data: KeepData = True, results: o.Results = Path("results"), as_json: o.AsJson = False,
    quiet: o.Quiet = False, backend_options: dict | None = None,
) -> None:  # fmt: skip
    """Run a grid of data sizes x partition sizes x batch sizes x precisions (x any backend option given as a
    comma list); resumes where a previous run stopped.

    Each finished repeat is appended to the store at once; rerunning the same sweep on the same machine runs only
    what is missing (--force reruns everything).
    """
    o.reprobe_if(reprobe)
    overrides = _overrides(
        {"backend": backend, "gb": gb, "partition_mb": partition_mb, "batch_size": batch_size, "precision": precision,
         "repeats": repeats, "warmup": warmup, "threads": threads, "seed": seed, "weights": weights, "engine": engine,
         "oversubscribe": oversubscribe, "backend_options": backend_options}
    )  # fmt: skip
    progress = bars.sweep_progress(as_json or quiet)
    done = measured(
        lambda: sweep_command(config, overrides, results, force=force, keep_data=keep_data, progress=progress,
                              on_wait=run_views.waiting_for(Path(results)), warn=console.warn),
        results, interrupted="interrupted; every finished repeat is in {store}. Run the same command again to "
        "continue.", again="; every finished repeat is there too: run the same command again to continue",
    )  # fmt: skip
    run_views.show_sweep(done, as_json)


@app.command()
def report(
    results: o.ResultsRead = Path("results"),
    backend: o.BackendList = None,
    baseline: Baseline = "cpu",
    fmt: Format = o.ReportFormat.table,
    min_duration: o.MinDuration = MIN_DURATION_S,
    min_samples: o.MinSamples = MIN_SAMPLES,
    html_out: HtmlOut = None,
) -> None:
    """One row per backend x data size x partition size x batch size (x precision, threads, machine): medians
    over repeats, spread, speedup over the baseline on the same data, peak memory, cost where known, and whether
    the point is a valid measurement."""
    rules = Rules(min_duration, min_samples)
    if html_out is not None:
        from cai_bench.render.html import write_html  # matplotlib: only where a page is drawn

        console.say(f"wrote {write_html(results, html_out, rules, console.warn)}")
        return
    points, store, comm_points = report_points(
        results, o.comma_list(backend, "--backend"), baseline, console.warn, rules
    )
    run_views.show_report(points, store.path, fmt.value, comm_points)


HtmlOut = Annotated[
    Path | None,
    typer.Option(
        "--html",
        help="Write one self-contained page of the store (table, figures, machines, timelines, "
        "commands) to this .html file instead.",
    ),
]
Timeline = Annotated[
    str | None,
    typer.Option(
        help="A run id (or its start): its timeline alone, a bar per worker split into start-up, read, "
        "wait and compute, failures marked, and the workers busy over time."
    ),
]


@app.command()
def plot(
    results: o.ResultsRead = Path("results"), out_dir: OutDir = Path("results/figures"), reference: Reference = None,
    backend: o.BackendList = None, fmt: FigureFormats = "png", predictions: Predictions = None,
    timeline: Timeline = None,
) -> None:  # fmt: skip
    """Scaling figures: time and throughput vs data size, throughput vs batch size, time (and cost) vs partition
    size, the per-worker time breakdown, and the timeline of each backend's last run. With --predictions:
    predicted vs true redshift; with --timeline RUN_ID: that run's timeline."""
    from cai_bench.render.figures.scaling import plot_command

    formats = o.comma_list(fmt, "--format")
    backends = o.comma_list(backend, "--backend")
    console.show_paths(plot_command(results, out_dir, formats, reference, backends, predictions, warn=console.warn,
                               timeline=timeline))  # fmt: skip
