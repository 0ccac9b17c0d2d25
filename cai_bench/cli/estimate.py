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
from cai_bench.decide import decide, parse_budget, parse_deadline
from cai_bench.errors import UserError
from cai_bench.estimate import (
    DEFAULT_QUOTA,
    EstimateRequest,
    Prices,
    errors_by_backend,
    estimate_command,
    validate_paper,
    validate_store,
)

Backends = Annotated[str, typer.Option("--backend", help="Comma list of lambda, hpc, gpu.")]
Gbs = Annotated[str | None, typer.Option("--gb", help="Data sizes in GB (GiB), comma-separated.")]
PartitionMbs = Annotated[
    str | None,
    typer.Option(
        "--partition-mb",
        help="Partition sizes in MB (MiB), comma-separated.",
        show_default="25; with --deadline or --budget 25,50,100",
    ),
]
Profile = Annotated[
    str,
    typer.Option(
        help="A results directory whose finished runs of each backend are its profile, paper, or one per "
        "backend: lambda=paper,hpc=DIR."
    ),
]
MemoryMb = Annotated[
    str | None,
    typer.Option(
        help="Lambda memory in MB, comma-separated; compute scales with its CPU share.",
        show_default="profile's; with --deadline or --budget 2048,4096,10240",
    ),
]
Concurrency = Annotated[str, typer.Option(help="Lambda: the account's concurrency quota, comma-separated.")]
MapConcurrency = Annotated[
    int | None, typer.Option(help="--orchestrator stepfunctions: the Map's MaxConcurrency.", show_default="10000")
]
Tasks = Annotated[
    str | None, typer.Option(help="hpc: tasks at once (array parallelism), comma-separated.", show_default="profile's")
]
Gpus = Annotated[str | None, typer.Option(help="gpu: devices, comma-separated.", show_default="profile's")]
ArrayTasks = Annotated[
    int | None,
    typer.Option(
        help="hpc: a SLURM array of this many tasks, --tasks of them at once.",
        show_default="one per task at once where the profile's runs were arrays",
    ),
]
LaunchPerS = Annotated[
    float | None, typer.Option(help="hpc arrays: tasks the scheduler starts per second.", show_default="measured")
]
SharedReadGbps = Annotated[
    float | None,
    typer.Option(
        help="hpc arrays: GB/s all tasks at once read together from the shared file system.", show_default="10"
    ),
]
Orchestrator = Annotated[str, typer.Option(help="Lambda: direct or stepfunctions (adds state transitions).")]
Deadline = Annotated[
    str | None,
    typer.Option(help="Rank every setting by cost among those whose upper bound meets this time (600, 10m, 2h)."),
]
Budget = Annotated[str | None, typer.Option(help="US$: rank among those whose cost at the upper bound is within it.")]
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


def _ints(text: str | None, option: str) -> tuple:
    return tuple(o.comma_list(text, option, int)) if text is not None else (None,)


@app.command()
def estimate(
    backend: Backends = "lambda", gb: Gbs = None, partition_mb: PartitionMbs = None, profile: Profile = "results",
    memory_mb: MemoryMb = None, concurrency: Concurrency = str(DEFAULT_QUOTA), map_concurrency: MapConcurrency = None,
    tasks: Tasks = None, gpus: Gpus = None, array_tasks: ArrayTasks = None, launch_per_s: LaunchPerS = None,
    shared_read_gbps: SharedReadGbps = None, orchestrator: Orchestrator = "direct", trials: Trials = 200,
    seed: SimSeed = 0, cores_per_task: CoresPerTask = None, core_hour_price: CoreHour = None,
    gpu_hour_price: GpuHour = None, architecture: Architecture = "x86_64", price_file: PriceFile = None,
    deadline: Deadline = None, budget: Budget = None, validate: Validate = None, hold_out: HoldOut = "run",
    figure: Figure = Path("results/figures/estimate.png"), as_json: o.AsJson = False,
) -> None:  # fmt: skip
    """Time and cost of a run at any scale, simulated from a measured profile, with an interval that holds the
    model's own error on measured runs.

    Lambda: the concurrency quota, its scaling rate (1,000 environments every 10 s) and warm reuse, the memory's CPU
    share, GB-seconds, requests, Step Functions transitions and S3 requests. hpc: tasks at once and their cores, or
    a SLURM array (launch rate, per-task start-up, shared read bandwidth); gpu: devices. --deadline and --budget
    rank the settings by cost.
    """
    if validate is not None:
        checks, skipped = (validate_paper(trials, seed), []) if validate == "paper" else validate_store(
            validate, trials, seed, ui.warn, hold_out)  # fmt: skip
        ui.show_checks(checks, skipped, errors_by_backend(checks, _made_from(validate, hold_out)), validate, as_json)
        return
    if gb is None:
        raise UserError("estimate needs --gb (the data sizes to estimate), or --validate")
    for price in (core_hour_price, gpu_hour_price):
        if price is not None and price < 0:
            raise UserError(f"a price must not be negative, got {price}")
    deciding = deadline is not None or budget is not None
    request = EstimateRequest(
        tuple(o.comma_list(backend, "--backend")), tuple(o.comma_list(gb, "--gb", float)),
        tuple(o.comma_list(partition_mb or ("25,50,100" if deciding else "25"), "--partition-mb", float)),
        Prices(pricing.load_prices(price_file), architecture, core_hour_price, gpu_hour_price), profile,
        _ints(memory_mb or ("2048,4096,10240" if deciding else None), "--memory-mb"),
        tuple(o.comma_list(concurrency, "--concurrency", int)), map_concurrency, _ints(tasks, "--tasks"),
        orchestrator, trials, seed, cores_per_task, _ints(gpus, "--gpus"), array_tasks, launch_per_s,
        shared_read_gbps,
    )  # fmt: skip
    if deciding:
        decision = decide(request, None if deadline is None else parse_deadline(deadline),
                          None if budget is None else parse_budget(budget), ui.warn)  # fmt: skip
        from cai_bench.plot import save_decision_figure  # matplotlib: only where a figure is drawn

        ui.show_decision(decision, save_decision_figure(decision, figure), as_json)
        return
    outcome = estimate_command(request, ui.warn)
    drawn = None
    if len(outcome.estimates) > 1:
        from cai_bench.plot import save_estimate_figure  # matplotlib: only where a figure is drawn

        drawn = save_estimate_figure(outcome, figure)
    ui.show_estimates(outcome, drawn, as_json)


def _made_from(source: str, hold_out: str) -> str:
    if source == "paper":
        return "the paper's published times, each predicted from the profile calibrated on 12.6 GB / 25 MB"
    return f"the runs of {source}, each predicted from the others ({hold_out} held out)"
