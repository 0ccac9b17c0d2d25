"""``estimate``: time and cost at scale, simulated from measured runs or the paper's; ``--validate``: how well
the simulation predicts runs that were measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench import ui
from cai_bench.backends.aws_lambda import pricing
from cai_bench.cli import options as o
from cai_bench.cli.app import app
from cai_bench.errors import UserError
from cai_bench.estimate import (
    DEFAULT_QUOTA,
    EstimateRequest,
    Prices,
    estimate_command,
    median_abs_error,
    validate_paper,
    validate_store,
)

Backends = Annotated[str, typer.Option("--backend", help="Comma list of lambda, hpc, gpu.")]
Gbs = Annotated[str | None, typer.Option("--gb", help="Data sizes in GB (GiB), comma-separated.")]
PartitionMbs = Annotated[str, typer.Option("--partition-mb", help="Partition sizes in MB (MiB), comma-separated.")]
Profile = Annotated[
    str,
    typer.Option(
        help="A results directory whose finished runs of each backend are its profile, paper, or one per "
        "backend: lambda=paper,hpc=DIR."
    ),
]
MemoryMb = Annotated[
    int | None, typer.Option(help="Lambda memory in MB; compute scales with its CPU share.", show_default="profile's")
]
Concurrency = Annotated[int, typer.Option(help="Lambda: the account's concurrency quota.")]
MapConcurrency = Annotated[
    int | None, typer.Option(help="--orchestrator stepfunctions: the Map's MaxConcurrency.", show_default="10000")
]
Tasks = Annotated[int | None, typer.Option(help="hpc: tasks at once (array parallelism).", show_default="profile's")]
Gpus = Annotated[int | None, typer.Option(help="gpu: devices.", show_default="profile's")]
Orchestrator = Annotated[str, typer.Option(help="Lambda: direct or stepfunctions (adds state transitions).")]
Trials = Annotated[int, typer.Option(help="Simulated runs; median and p90 over them.")]
SimSeed = Annotated[int, typer.Option("--seed", help="Seed of the draws: the same seed, the same estimate.")]
CoresPerTask = Annotated[
    int | None, typer.Option(help="hpc: cores each task computes on (and is priced for).", show_default="profile's")
]
CoreHour = Annotated[float | None, typer.Option(help="hpc: US$ per core-hour (unpriced without it).")]
GpuHour = Annotated[float | None, typer.Option(help="gpu: US$ per GPU-hour (unpriced without it).")]
Architecture = Annotated[str, typer.Option(help="Lambda: x86_64 or arm64 (its GB-second price).")]
PriceFile = Annotated[str | None, typer.Option(help="JSON price table replacing the built-in Lambda one.")]
Validate = Annotated[
    str | None,
    typer.Option(help="Predict each run of this results directory from the others (or the paper's times: paper)."),
]
HoldOut = Annotated[
    str, typer.Option(help="--validate: predict each run without itself (run) or without all repeats of its point.")
]
Figure = Annotated[Path, typer.Option(help="Where the figure goes when there are several sizes or backends.")]


@app.command()
def estimate(
    backend: Backends = "lambda", gb: Gbs = None, partition_mb: PartitionMbs = "25", profile: Profile = "results",
    memory_mb: MemoryMb = None, concurrency: Concurrency = DEFAULT_QUOTA, map_concurrency: MapConcurrency = None,
    tasks: Tasks = None, gpus: Gpus = None, orchestrator: Orchestrator = "direct", trials: Trials = 200,
    seed: SimSeed = 0, cores_per_task: CoresPerTask = None, core_hour_price: CoreHour = None,
    gpu_hour_price: GpuHour = None, architecture: Architecture = "x86_64", price_file: PriceFile = None,
    validate: Validate = None, hold_out: HoldOut = "run", figure: Figure = Path("results/figures/estimate.png"),
    as_json: o.AsJson = False,
) -> None:  # fmt: skip
    """Wall time and cost of a run at any scale, simulated from a measured profile: median and p90 over trials.

    Lambda: the concurrency quota, its scaling rate (1,000 environments every 10 s) and warm reuse, the memory's CPU
    share, GB-seconds, requests and Step Functions transitions. hpc: tasks at once and their cores; gpu: devices.
    """
    if validate is not None:
        checks, skipped = (validate_paper(trials, seed), []) if validate == "paper" else validate_store(
            validate, trials, seed, ui.warn, hold_out)  # fmt: skip
        ui.show_checks(checks, skipped, median_abs_error(checks), validate, as_json)
        return
    if gb is None:
        raise UserError("estimate needs --gb (the data sizes to estimate), or --validate")
    for price in (core_hour_price, gpu_hour_price):
        if price is not None and price < 0:
            raise UserError(f"a price must not be negative, got {price}")
    request = EstimateRequest(
        tuple(o.comma_list(backend, "--backend")), tuple(o.comma_list(gb, "--gb", float)),
        tuple(o.comma_list(partition_mb, "--partition-mb", float)),
        Prices(pricing.load_prices(price_file), architecture, core_hour_price, gpu_hour_price), profile, memory_mb,
        concurrency, map_concurrency, tasks, orchestrator, trials, seed, cores_per_task, gpus,
    )  # fmt: skip
    outcome = estimate_command(request, ui.warn)
    drawn = None
    if len(outcome.estimates) > 1:
        from cai_bench.plot import save_estimate_figure  # matplotlib: only where a figure is drawn

        drawn = save_estimate_figure(outcome, figure)
    ui.show_estimates(outcome, drawn, as_json)
