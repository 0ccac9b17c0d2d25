"""``estimate``: time and cost at scale, simulated from measured runs or the paper's; ``--validate``: how well
the simulation predicts runs that were measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.analysis.decide import decide, parse_budget, parse_deadline
from cai_bench.analysis.estimate import EstimateRequest, estimate_command
from cai_bench.analysis.estimate_checks import errors_by_backend, validate_paper, validate_store
from cai_bench.analysis.estimate_model import DEFAULT_QUOTA, Prices
from cai_bench.analysis.estimate_terms import TERMS, parse_terms
from cai_bench.backends.aws_lambda import pricing
from cai_bench.cli import options as o
from cai_bench.cli.app import app
from cai_bench.core.errors import UserError
from cai_bench.render import console, estimate_views

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
    int | None,
    typer.Option(
        help="--orchestrator stepfunctions: the Map's MaxConcurrency, its children in flight (throttled ones too).",
        show_default="--concurrency, as cai-bench's state machine sets it",
    ),
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
SimSeed = Annotated[
    int, typer.Option("--seed", min=0, help="Seed of the draws (0 or more): the same seed, the same estimate.")
]
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
    str,
    typer.Option(help="--validate: predict each run without all repeats of its point (point) or without itself (run)."),
]
Figure = Annotated[
    Path,
    typer.Option(
        help="Where the figure goes: several sizes or backends, a decision, or --validate's error against "
        "extrapolation."
    ),
]
Terms = Annotated[
    list[str] | None,
    typer.Option(
        "--term",
        help="NAME=VALUE (repeatable): change one mechanism of scale from its default: "
        + ", ".join(TERMS)
        + " (docs/estimate.md: what each is and where its default comes from).",
    ),
]


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
    deadline: Deadline = None, budget: Budget = None, validate: Validate = None, hold_out: HoldOut = "point",
    figure: Figure = Path("results/figures/estimate.png"), term: Terms = None, as_json: o.AsJson = False,
) -> None:  # fmt: skip
    """Time and cost of a run at any scale, simulated from a measured profile, with an interval that holds the
    model's own error on measured runs; --deadline and --budget rank the settings by cost.

    Lambda: quota, scaling rate, memory, GB-s, requests, transitions, S3. hpc: tasks, or a SLURM array. gpu: devices.
    """
    if validate is not None:
        _validate(validate, trials, seed, hold_out, as_json, figure)
        return
    deciding = deadline is not None or budget is not None
    request = _request(
        deciding, backend=backend, gb=gb, partition_mb=partition_mb, profile=profile, memory_mb=memory_mb,
        concurrency=concurrency, map_concurrency=map_concurrency, tasks=tasks, gpus=gpus, array_tasks=array_tasks,
        launch_per_s=launch_per_s, shared_read_gbps=shared_read_gbps, orchestrator=orchestrator, trials=trials,
        seed=seed, cores_per_task=cores_per_task, core_hour_price=core_hour_price, gpu_hour_price=gpu_hour_price,
        architecture=architecture, price_file=price_file, terms=parse_terms(term),
    )  # fmt: skip
    if deciding:
        decision = decide(request, None if deadline is None else parse_deadline(deadline),
                          None if budget is None else parse_budget(budget), console.warn)  # fmt: skip
        from cai_bench.render.figures.estimates import save_decision_figure

        estimate_views.show_decision(decision, save_decision_figure(decision, figure), as_json)
        return
    _estimates(request, figure, as_json)


def _estimates(request: EstimateRequest, figure: Path, as_json: bool) -> None:
    outcome = estimate_command(request, console.warn)
    drawn = None
    if len(outcome.estimates) > 1:
        from cai_bench.render.figures.estimates import save_estimate_figure

        drawn = save_estimate_figure(outcome, figure)
    estimate_views.show_estimates(outcome, drawn, as_json)


def _validate(source: str, trials: int, seed: int, hold_out: str, as_json: bool, figure: Path) -> None:
    checks, skipped = (validate_paper(trials, seed), []) if source == "paper" else validate_store(
        source, trials, seed, console.warn, hold_out)  # fmt: skip
    drawn = None
    if any(not c.calibration for c in checks):
        from cai_bench.render.figures.estimates import save_validation_figure

        drawn = save_validation_figure(checks, source, figure)
    estimate_views.show_checks(
        checks, skipped, errors_by_backend(checks, _made_from(source, hold_out)), source, as_json, drawn
    )


def _request(deciding: bool, **given) -> EstimateRequest:
    """The options as a request: every list parsed; with --deadline or --budget, more partition sizes and Lambda
    memories to rank by default."""
    if given["gb"] is None:
        raise UserError("estimate needs --gb (the data sizes to estimate), or --validate")
    for price in (given["core_hour_price"], given["gpu_hour_price"]):
        if price is not None and price < 0:
            raise UserError(f"a price must not be negative, got {price}")
    prices = Prices(pricing.load_prices(given["price_file"]), given["architecture"], given["core_hour_price"],
                    given["gpu_hour_price"])  # fmt: skip
    return EstimateRequest(
        tuple(o.comma_list(given["backend"], "--backend")), tuple(o.comma_list(given["gb"], "--gb", float)),
        tuple(o.comma_list(given["partition_mb"] or ("25,50,100" if deciding else "25"), "--partition-mb", float)),
        prices, given["profile"], _ints(given["memory_mb"] or ("2048,4096,10240" if deciding else None), "--memory-mb"),
        tuple(o.comma_list(given["concurrency"], "--concurrency", int)), given["map_concurrency"],
        _ints(given["tasks"], "--tasks"), given["orchestrator"], given["trials"], given["seed"],
        given["cores_per_task"], _ints(given["gpus"], "--gpus"), given["array_tasks"], given["launch_per_s"],
        given["shared_read_gbps"], given["terms"],
    )  # fmt: skip


def _made_from(source: str, hold_out: str) -> str:
    if source == "paper":
        return (
            "the paper's published times, each predicted from the profile calibrated without its size, or on "
            "the sizes up to 4 GB only"
        )
    return f"the runs of {source}, each predicted from the others ({hold_out} held out)"
