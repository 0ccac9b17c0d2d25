"""The ``cai-bench`` command line: parse options, build a Plan, call the runner, render the results."""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # Typer 0.29 carries its own click

from cai_bench import __version__
from cai_bench.choices import (
    FIGURE_FORMATS,
    PRECISIONS,
    BackendName,
    Engine,
    ExportFormat,
    Precision,
    ReportFormat,
    choice,
)
from cai_bench.errors import UserError, one_line
from cai_bench.metrics import spread

app = typer.Typer(
    help="Benchmark pcm-AstroMAE galaxy-redshift inference across CPU, HPC, GPU and serverless backends.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Make, re-partition, inspect and verify partitioned galaxy data sets.", no_args_is_help=True
)
model_app = typer.Typer(help="Inspect pcm-AstroMAE.", no_args_is_help=True)
results_app = typer.Typer(help="List, show and export the records in the results store.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(results_app, name="results")
lambda_app = typer.Typer(
    help="The AWS Lambda backend's tools: the image and the function on AWS, the local emulator, costs.",
    no_args_is_help=True,
)
app.add_typer(lambda_app, name="lambda")

ResultsDir = Annotated[Path, typer.Option("--results", help="Results directory (holds runs.jsonl).")]
PRECISION_HELP = (
    "auto: the fastest a start-up probe finds 10% faster than fp32 and within 2e-3 of it (cpu, hpc, lambda: bf16 "
    "on torch and openvino; gpu: tf32, bf16, fp16). int8: --runtime onnxruntime, kept only within 2e-3 on the "
    "probe batch. tf32 and fp16 are for --backend gpu."
)
ENGINE_HELP = "fast: the prepared model; reference: the upstream-style eager fp32 loop."
OVERSUBSCRIBE_HELP = "Allow more threads than this process may use; the record and report mark the point."
COMPILE_HELP = "torch.compile the fast engine's model (25-35 s up front on 2 cores; timed as start-up)."

_debug = False


# ---------------------------------------------------------------------------------------------- backend options


def _option_parameter(option, sweep: bool) -> inspect.Parameter:
    """The command-line parameter of one declared backend option (a comma list in a sweep)."""
    shown = str(option.default) if option.default not in (None, False) else False
    info = {"help": option.help, "show_default": shown}
    if option.kind is bool:
        kind = bool
    elif option.kind is dict:
        kind = list[str] | None
    elif sweep and option.sweepable:
        kind = str | None
        info["help"] += " Comma-separated values: a sweep axis."
    elif option.choices:
        kind = choice(option.name.title().replace("_", ""), option.choices) | None
    else:
        kind = (str if option.parse else option.kind) | None
    annotation = Annotated[kind, typer.Option(option.flag, **info)]
    default = False if option.kind is bool else None
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _given_options(values: dict, sweep: bool) -> dict:
    """What the user gave of the declared options, read as each declares (lists of values in a sweep)."""
    from cai_bench.backends.base import all_options

    out = {}
    for name, (option, _) in all_options().items():
        value = values.get(name)
        if value is None or value is False:
            continue
        if option.kind is dict:
            out[name] = {k: v for item in value for k, v in option.from_text(item).items()}
        elif option.kind is bool:
            out[name] = [True] if sweep else True
        elif sweep and option.sweepable:
            out[name] = [option.from_text(t) for t in _list(value, option.flag, str)]
        else:
            value = value.value if hasattr(value, "value") else value
            out[name] = option.from_text(value) if isinstance(value, str) else option.check(value)
    return out


def with_backend_options(sweep: bool = False):
    """Give a command every option any backend declares, collected into its ``backend_options`` argument: one
    declaration per option serves run, predict and sweep alike."""
    from cai_bench.backends.base import all_options

    declared = all_options()

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "backend_options"]
        extra = [_option_parameter(option, sweep) for option, _ in declared.values()]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name, None) for name in declared}
            return command(**kwargs, backend_options=_given_options(values, sweep))

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        return wrapper

    return decorate


def _version(value: bool) -> None:
    if value:
        print(f"cai-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    global _debug
    _debug = debug


# ---------------------------------------------------------------------------------------------- run


@app.command()
@with_backend_options()
def run(
    backend: Annotated[BackendName, typer.Option(help="Where to run.")] = BackendName.cpu,
    data: Annotated[Path | None, typer.Option(help="A data set directory (cai-bench data synth / split).")] = None,
    gb: Annotated[
        float | None, typer.Option(help="Synthetic data size in GB (GiB), generated once into the cache.")
    ] = None,
    partition_mb: Annotated[
        float | None, typer.Option(help="Partition size in MB (MiB) for synthetic data.", show_default="25")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Samples per forward pass.", show_default="512; gpu: 4096")
    ] = None,
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = Precision.auto,
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine.fast,
    compile_model: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    threads: Annotated[int | None, typer.Option(help="Threads in all.", show_default="physical cores")] = None,
    oversubscribe: Annotated[bool, typer.Option("--oversubscribe", help=OVERSUBSCRIBE_HELP)] = False,
    repeats: Annotated[int, typer.Option(help="Measured runs, each saved as one record.")] = 1,
    warmup: Annotated[int, typer.Option(help="Unrecorded runs before the measured ones.")] = 0,
    weights: Annotated[
        Path | None, typer.Option(help="Weights (.safetensors or a .pt state dict).", show_default="random init")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data and of the random-init weights.")] = 0,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare each partition's sha256 as it is read.")
    ] = True,
    cycle_to_gb: Annotated[
        float | None, typer.Option(help="Reuse the partitions in turn until this many GB have been processed.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the run, or submit it and leave (hpc --slurm).")
    ] = True,
    results: Annotated[
        Path, typer.Option(help="Results directory; records are appended to RESULTS/runs.jsonl.")
    ] = Path("results"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run records as JSON on stdout, nothing else.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    backend_options: dict | None = None,
) -> None:
    """Run the model over a data set on one backend and record how long it took."""
    from cai_bench import runner, ui
    from cai_bench.backends.base import check_options, check_precision, get_backend
    from cai_bench.plan import make_plan
    from cai_bench.results import ResultsStore

    # Everything that can be refused is refused before any data is generated or anything runs
    chosen = get_backend(backend.value)
    backend_options = check_options(chosen, backend_options)
    check_precision(chosen, precision.value)
    batch_size = batch_size or chosen.default_batch_size
    if not wait:
        runner.check_detach(backend.value, backend_options, repeats, warmup)
    runner.check_sizes(gb=gb, partition_mb=partition_mb, cycle_to_gb=cycle_to_gb)
    runner.check_threads(threads, backend_options, oversubscribe)
    store = ResultsStore(results)
    store.check_writable()
    if weights:  # refused here, not by every worker once the run has started
        weights = _check_weights(weights, backend.value)
    with ui.RichCountProgress("synthesizing", "samples") as bar:
        summary, refs = runner.resolve_data(data, gb, partition_mb, seed, None if (as_json or quiet) else bar)
    plan = make_plan(
        backend.value,
        summary,
        refs,
        batch_size=batch_size,
        precision=precision.value,
        threads=threads,
        oversubscribe=oversubscribe,
        repeats=repeats,
        warmup=warmup,
        weights=str(weights) if weights else None,
        seed=seed,
        verify_checksums=verify,
        engine=engine.value,
        compile=compile_model,
        backend_options=backend_options,
        cycle_to_gb=cycle_to_gb,
    )
    if not wait:
        job_id, collect = runner.submit_plan(plan, store)
        if as_json:
            print(json.dumps({"submitted": job_id, "collect": collect}))
        else:
            ui.stdout.print(f"job {job_id} is submitted; when it has run, record it with:")
            ui.stdout.print(f"  {collect}", markup=False, highlight=False)
        return
    progress = None if (as_json or quiet) else ui.RichRunProgress()
    records = _execute(lambda: [o.record for o in runner.execute(plan, store, progress)], store, as_json)
    _print_runs(records, store, as_json)


def _check_weights(path: str | Path, backend: str = "cpu") -> str:
    """The weights as the plan names them, checked: a local file, or (for Lambda functions, which fetch them)
    an s3:// object, also when a Path has folded its "//"."""
    from cai_bench.model.checkpoint import check_weights_file

    text = str(path)
    if re.match(r"[sS]3:/", text):
        if backend != "lambda":
            raise UserError(f"{text}: s3:// weights are fetched by Lambda functions only; copy them here first")
        from cai_bench import aws

        bucket, key = aws.parse_s3_url(text)
        if not key:
            raise UserError(f"{text}: name the weights object, s3://bucket/key")
        return aws.s3_url(bucket, key)
    from cai_bench.runtimes import is_export, read_export

    if is_export(text):  # an exported model: for --runtime onnxruntime or openvino (the plan checks which)
        read_export(text)
        return text
    check_weights_file(path)
    return text


def _execute(work, store, as_json: bool, interrupted: str | None = None, again: str = ""):
    """Run ``work`` (which records its runs in ``store``) and turn how it ended into what the user sees:
    partitions that failed for good (exit 1), Ctrl-C (exit 130; where the work goes on without us, the command
    that records it later). ``interrupted`` replaces the Ctrl-C line; ``again`` is said after a failure, where
    a rerun continues."""
    from cai_bench import ui
    from cai_bench.backends.base import PartitionsFailed

    try:
        return work()
    except PartitionsFailed as exc:
        ui.console.print(f"error: {exc}", markup=False, highlight=False)
        for failure in exc.failed:
            errors = " | ".join(failure["errors"])
            attempts = f"{failure['attempts']} attempt(s)"
            ui.console.print(
                f"  partition {failure['partition']} (unit {failure['unit']}), {attempts}: {errors}",
                markup=False,
                highlight=False,
            )
        ui.console.print(f"the partitions that finished are kept in a 'failed' record in {store.path}{again}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        if hasattr(exc, "collect"):
            ui.console.print("interrupted; the job keeps running. When it has run, record it with:")
            ui.console.print(f"  {exc.collect}", markup=False, highlight=False)
        else:
            ui.console.print(
                interrupted or f"interrupted; finished repeats and the partitions done so far are in {store.path}"
            )
        raise typer.Exit(interrupt_exit_code(exc)) from None


def _print_runs(records: list, store, as_json: bool) -> None:
    from cai_bench import ui

    if as_json:
        print(json.dumps([asdict(r) for r in records], indent=1))
        return
    ui.stdout.print(ui.run_summary_table(records))
    last = records[-1].summary
    ui.stdout.print(
        f"sum over {last.workers} worker(s) of each one's bits / own compute s (the paper's throughput measure): "
        f"{last.sum_worker_throughput_bps / 1e6:,.1f} Mbps in the last repeat"
    )
    billed = records[-1].backend_info.get("cost")
    if billed:
        ui.stdout.print(
            f"cost: {billed['requests']:,} requests, {billed['billed_gb_s']:,.1f} billed GB-s "
            f"({billed['architecture']}, prices as of {billed['prices_as_of']}): ${billed['cost_usd']:.4f} "
            "in the last repeat"
        )
    weights = records[0].weights.get("weights")
    if weights == "random-init":
        weights += " (the timings are real; the predicted redshifts are not)"
    ui.stdout.print(f"weights: {weights}")
    line = _accuracy_line(records[-1].accuracy, " in the last repeat")
    if line:
        ui.stdout.print(line, markup=False, highlight=False)
    ui.stdout.print(f"{len(records)} record(s) appended to {store.path}")


def _accuracy_line(metrics: dict | None, where: str = "") -> str | None:
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


@app.command()
@with_backend_options()
def predict(
    data: Annotated[Path, typer.Option(help="A data set directory (cai-bench data import / synth).")],
    out: Annotated[Path, typer.Option(help="predictions.parquet or predictions.csv")],
    weights: Annotated[
        Path | None, typer.Option(help="Weights (.safetensors, or a .pt state dict).", show_default="random init")
    ] = None,
    backend: Annotated[BackendName, typer.Option(help="Where to run.")] = BackendName.cpu,
    batch_size: Annotated[
        int | None, typer.Option(help="Samples per forward pass.", show_default="512; gpu: 4096")
    ] = None,
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = Precision.auto,
    threads: Annotated[int | None, typer.Option(help="Threads in all.", show_default="physical cores")] = None,
    oversubscribe: Annotated[bool, typer.Option("--oversubscribe", help=OVERSUBSCRIBE_HELP)] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random-init weights.")] = 0,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare each partition's sha256 as it is read.")
    ] = True,
    force: Annotated[bool, typer.Option(help="Start again: replace OUT and any unfinished parts.")] = False,
    results: ResultsDir = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    backend_options: dict | None = None,
) -> None:
    """Predict the redshift of every object: object id, predicted and (where known) true redshift.

    Resumable: each finished partition is kept, so rerunning after an interruption predicts only the rest and
    the file holds every object exactly once. The run is timed and recorded like any run (kind "predict").
    """
    from cai_bench import runner, ui
    from cai_bench.backends.base import check_options, check_precision, get_backend
    from cai_bench.data.partitions import open_dataset
    from cai_bench.plan import make_plan
    from cai_bench.predict import check_out
    from cai_bench.predict import predict as run_predict
    from cai_bench.results import ResultsStore

    chosen = get_backend(backend.value)
    backend_options = check_options(chosen, backend_options)
    check_precision(chosen, precision.value)
    batch_size = batch_size or chosen.default_batch_size
    runner.check_threads(threads, backend_options, oversubscribe)
    check_out(out, force)
    store = ResultsStore(results)
    store.check_writable()
    if weights:  # refused here, not by every worker once the run has started
        weights = _check_weights(weights, backend.value)
    _, summary, refs = open_dataset(data)
    plan = make_plan(
        backend.value,
        summary,
        refs,
        batch_size=batch_size,
        precision=precision.value,
        threads=threads,
        oversubscribe=oversubscribe,
        weights=str(weights) if weights else None,
        seed=seed,
        verify_checksums=verify,
        backend_options=backend_options,
    )
    progress = None if (as_json or quiet) else ui.RichRunProgress()
    outcome = _execute(
        lambda: run_predict(plan, out, store, force=force, progress=progress),
        store,
        as_json,
        interrupted="interrupted; finished partitions are kept. Run the same command again to continue.",
        again="; their predictions too: run the same command again to predict the rest",
    )
    if as_json:
        print(
            json.dumps(
                {
                    "out": str(outcome.out),
                    "objects": outcome.objects,
                    "partitions_run": outcome.partitions_run,
                    "partitions_reused": outcome.partitions_reused,
                    "accuracy": outcome.accuracy,
                    "run_ids": [r.run_id for r in outcome.records],
                },
                indent=1,
            )
        )
        return
    if outcome.records:
        ui.stdout.print(ui.run_summary_table(outcome.records))
    reused = f" ({outcome.partitions_reused} partitions from an earlier run)" if outcome.partitions_reused else ""
    ui.stdout.print(f"{outcome.out}: {outcome.objects:,} objects{reused}")
    line = _accuracy_line(outcome.accuracy)
    if line:
        ui.stdout.print(line, markup=False, highlight=False)


@app.command()
def bench(
    data: Annotated[Path | None, typer.Option(help="A data set directory.", show_default="synthetic --gb")] = None,
    gb: Annotated[float | None, typer.Option(help="Synthetic data size in GB.", show_default="0.2")] = None,
    partition_mb: Annotated[float | None, typer.Option(help="Partition size in MB.", show_default="25")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass, every arm.")] = 512,
    precision: Annotated[Precision, typer.Option(help="Of every arm but the reference (eager fp32).")] = Precision.auto,
    runtimes: Annotated[
        str | None, typer.Option(help="Comma list of torch, onnxruntime, openvino.", show_default="all installed")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Measured rounds (one run of every arm each).")] = 3,
    warmup: Annotated[int, typer.Option(help="Unrecorded runs of each arm first.")] = 1,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads.", show_default="physical cores")] = None,
    oversubscribe: Annotated[bool, typer.Option("--oversubscribe", help=OVERSUBSCRIBE_HELP)] = False,
    weights: Annotated[Path | None, typer.Option(help="Weights file.", show_default="random init")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data and random-init weights.")] = 0,
    results: ResultsDir = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The upstream-style reference loop against every runtime on the same data, alternating A B C D A B C D.

    Prints samples/s of each run, each arm's ratio to the reference of the same round and their median, peak
    RSS and what each runtime chose (version, threading, precision), and the machine with its CPU flags; every
    measured run is also a record in the store.
    """
    from rich.table import Table

    from cai_bench import runner, ui
    from cai_bench.bench import REFERENCE, available_arms, run_bench
    from cai_bench.metrics import vector_flags
    from cai_bench.plan import check_runtime, make_plan
    from cai_bench.results import ResultsStore, machine_label, this_machine

    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    arms = available_arms(_list(runtimes, "--runtimes", str))
    gb = 0.2 if data is None and gb is None else gb
    runner.check_sizes(gb=gb, partition_mb=partition_mb)
    runner.check_threads(threads, {}, oversubscribe)
    store = ResultsStore(results)
    store.check_writable()
    if weights:  # refused here, not by every worker once the run has started
        _check_weights(weights)
    for arm in arms[1:]:  # before any data is made (bench_plans checks them again, as every plan is)
        check_runtime(arm, precision.value, "fast", False)
    with ui.RichCountProgress("synthesizing", "samples") as bar:
        summary, refs = runner.resolve_data(data, gb, partition_mb, seed, None if (as_json or quiet) else bar)
    plan = make_plan(
        "cpu",
        summary,
        refs,
        batch_size=batch_size,
        precision=precision.value,
        threads=threads,
        oversubscribe=oversubscribe,
        repeats=rounds,
        weights=str(weights) if weights else None,
        seed=seed,
    )
    progress = None if (as_json or quiet) else ui.RichRunProgress()
    try:
        outcome = run_bench(plan, rounds, warmup, store, progress, arms)
    except KeyboardInterrupt as exc:
        ui.console.print(f"interrupted; the finished runs are in {store.path}")
        raise typer.Exit(interrupt_exit_code(exc)) from None
    machine = machine_label(this_machine())
    others = arms[1:]

    def chose(arm: str) -> dict:
        info = outcome.records[arm][-1].backend_info
        keep = ("runtime", "runtime_version", "engine", "precision", "threading", "lanes", "intra_op_threads")
        return {k: info[k] for k in keep if k in info}

    figures = {
        "machine": machine,
        "cpu_flags": vector_flags(),
        "data": {"samples": summary.samples, "data_gb": summary.data_gb, "partitions": summary.partitions},
        "batch_size": batch_size,
        "precision": precision.value,
        "arms": {
            arm: {
                "samples_per_s": outcome.samples_per_s(arm),
                "compute_samples_per_s": outcome.compute_samples_per_s(arm),
                "peak_rss_bytes": outcome.peak_rss_bytes(arm),
                **(
                    {}
                    if arm == REFERENCE
                    else {
                        "ratios": outcome.ratios(arm),
                        "median_ratio": outcome.median_ratio(arm),
                        "median_compute_ratio": outcome.median_ratio(arm, "compute_samples_per_s"),
                    }
                ),
                "choices": chose(arm),
                "run_ids": [r.run_id for r in outcome.records[arm]],
            }
            for arm in arms
        },
    }
    if as_json:
        print(json.dumps(figures, indent=1))
        return
    title = (
        f"reference vs {', '.join(others)} · {summary.data_gb:.3g} GB, {summary.samples:,} samples in "
        f"{summary.partitions} partitions · batch {batch_size} · precision {precision.value} · {machine}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("round", justify="right")
    for arm in arms:
        table.add_column(f"{arm} samples/s", justify="right")
    for arm in others:
        table.add_column(f"{arm} / ref.", justify="right")
    rates = {arm: outcome.samples_per_s(arm) for arm in arms}
    for number in range(rounds):
        ratios = [f"{outcome.ratios(arm)[number]:.2f}" for arm in others]
        table.add_row(str(number + 1), *(f"{rates[arm][number]:,.1f}" for arm in arms), *ratios)
    medians = [f"{spread(rates[arm]).median:,.1f}" for arm in arms]
    table.add_row("median", *medians, *(f"{outcome.median_ratio(arm):.2f}" for arm in others), style="bold")
    ui.stdout.print(table)
    forward = ", ".join(f"{arm} {outcome.median_ratio(arm, 'compute_samples_per_s'):.2f}" for arm in others)
    ui.stdout.print(
        "samples/s = samples / wall s of the whole run (start-up and loading included). "
        f"Forward passes only, median ratio to the reference: {forward}."
    )
    rss = ", ".join(f"{arm} {outcome.peak_rss_bytes(arm) / 2**20:,.0f} MB" for arm in arms)
    ui.stdout.print(f"peak RSS: {rss} (the reference holds the whole data set)")
    for arm in others:
        ui.stdout.print(f"{arm}: {json.dumps(chose(arm))}", markup=False, highlight=False)
    ui.stdout.print(f"CPU flags: {' '.join(figures['cpu_flags']) or 'none read'}")
    ui.stdout.print(f"{len(arms) * rounds} record(s) appended to {store.path}")


# ---------------------------------------------------------------------------------------------- sweep


def _list(text: str | None, option: str, kind: type) -> list | None:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``; a bad item is a UserError naming the option."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise UserError(f"{option} takes a comma-separated list of {kind.__name__} values, got {text!r}") from None
    if not values:
        raise UserError(f"{option} needs at least one value")
    return values


def _read_store(store) -> list[dict]:
    from cai_bench import ui

    records = store.read()
    for message in store.skipped:
        ui.console.print(f"warning: {message}", markup=False, highlight=False)
    return records


@app.command()
@with_backend_options(sweep=True)
def sweep(
    config: Annotated[
        str | None,
        typer.Option(help="A preset by name (laptop-quick, paper) or a TOML file; options override it."),
    ] = None,
    backend: Annotated[BackendName | None, typer.Option(help="Where to run.", show_default="cpu")] = None,
    gb: Annotated[str | None, typer.Option(help="Data sizes in GB, comma-separated.", show_default="0.1")] = None,
    partition_mb: Annotated[
        str | None, typer.Option(help="Partition sizes in MB, comma-separated.", show_default="25")
    ] = None,
    batch_size: Annotated[str | None, typer.Option(help="Batch sizes, comma-separated.", show_default="512")] = None,
    precision: Annotated[
        str | None, typer.Option(help=f"Precisions, comma-separated, of {', '.join(PRECISIONS)}.", show_default="auto")
    ] = None,
    engine: Annotated[Engine | None, typer.Option(help=ENGINE_HELP, show_default="fast")] = None,
    repeats: Annotated[int | None, typer.Option(help="Measured runs per point.", show_default="3")] = None,
    warmup: Annotated[
        int | None, typer.Option(help="Unrecorded runs before each point's repeats.", show_default="0")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads.", show_default="physical cores")] = None,
    oversubscribe: Annotated[bool, typer.Option("--oversubscribe", help=OVERSUBSCRIBE_HELP)] = False,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the synthetic data and random-init weights.", show_default="0")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Weights file.", show_default="random init")] = None,
    force: Annotated[bool, typer.Option(help="Rerun points the store already holds.")] = False,
    keep_data: Annotated[
        bool,
        typer.Option(help="Keep generated data sets in the cache; --no-keep-data deletes each after its last point."),
    ] = True,
    results: ResultsDir = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the point medians as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    backend_options: dict | None = None,
) -> None:
    """Run a grid of data sizes x partition sizes x batch sizes x precisions (x any backend option given as a
    comma list); resumes where a previous run stopped.

    Each finished repeat is appended to the store at once; rerunning the same sweep on the same machine runs only
    what is missing (--force reruns everything).
    """
    from cai_bench import report, runner, ui
    from cai_bench.backends.base import check_options, check_precision, get_backend
    from cai_bench.plan import load_sweep_config, make_sweep
    from cai_bench.results import ResultsStore

    overrides = {
        "backend": backend.value if backend else None,
        "gb": _list(gb, "--gb", float),
        "partition_mb": _list(partition_mb, "--partition-mb", float),
        "batch_size": _list(batch_size, "--batch-size", int),
        "precision": _list(precision, "--precision", str),
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "seed": seed,
        "weights": str(weights) if weights else None,
        "engine": engine.value if engine else None,
        "oversubscribe": oversubscribe or None,
        "backend_options": backend_options,
    }
    table, where = load_sweep_config(config) if config else ({}, "")
    spec = make_sweep(table, where=where, overrides=overrides)
    chosen = get_backend(spec.backend)
    for point in spec.points():  # every point's options, together, before anything runs
        options = check_options(chosen, {k: dict(v) if isinstance(v, tuple) else v for k, v in point.backend_options})
        check_precision(chosen, point.precision)
        runner.check_threads(spec.threads, options, spec.oversubscribe)
    store = ResultsStore(results)
    store.check_writable()
    if spec.weights:  # refused here, not by every worker once the run has started
        spec = replace(spec, weights=_check_weights(spec.weights, spec.backend))
    _read_store(store)  # a broken or newer store fails here, before anything runs
    progress = None if (as_json or quiet) else ui.RichSweepProgress()
    outcome = _execute(
        lambda: runner.run_sweep(
            spec,
            store,
            force=force,
            keep_data=keep_data,
            progress=progress,
            synth_progress=progress.synthesizing if progress else None,
            on_wait=lambda point: ui.console.print(
                f"{point.label()}: another process is measuring this point into {store.directory}; waiting for it"
            ),
        ),
        store,
        as_json,
        interrupted=f"interrupted; every finished repeat is in {store.path}. Run the same command again to continue.",
        again="; every finished repeat is there too: run the same command again to continue",
    )
    keys = {s.key for s in outcome.points}
    points = [p for p in report.summarize_points(store.read()) if p.key in keys]
    if as_json:
        print(report.to_json(points))
        return
    skipped = sum(1 for s in outcome.points if s.todo == 0)
    ui.stdout.print(ui.report_table(points, f"sweep {spec.name}: {len(outcome.points)} points on {spec.backend}"))
    ui.stdout.print(
        f"{len(outcome.records)} record(s) appended to {store.path}"
        + (f"; {skipped} point(s) were already complete (--force reruns them)" if skipped else "")
    )
    for runtime, probe in (outcome.auto_precisions or {"torch": outcome.auto_precision or {}}).items():
        if not probe:
            continue
        on = f" on {runtime}" if len(outcome.auto_precisions) > 1 else ""
        ui.stdout.print(
            f"precision auto ran as {probe['chose']}{on} ({probe['why']}): probed once on this machine for the "
            "whole sweep, so every repeat of a point runs the same precision"
        )


# ---------------------------------------------------------------------------------------------- report, plot


def _backends(text: str | None) -> list[str] | None:
    return _list(text, "--backend", str)


@app.command()
def report(
    results: ResultsDir = Path("results"),
    backend: Annotated[str | None, typer.Option(help="Only these backends, comma-separated.")] = None,
    baseline: Annotated[
        str, typer.Option(help="Backend (or backend:engine, e.g. cpu:reference) the speedup is measured against.")
    ] = "cpu",
    fmt: Annotated[ReportFormat, typer.Option("--format", help="How to print the report.")] = ReportFormat.table,
) -> None:
    """One row per backend x data size x partition size x batch size (x precision, threads, machine): medians
    over repeats, spread, speedup over the baseline on the same data, peak memory and cost where known."""
    from cai_bench import report as rep
    from cai_bench import ui
    from cai_bench.results import ResultsStore

    fmt = fmt.value
    store = ResultsStore(results)
    points = rep.summarize_points(_read_store(store))
    rep.add_speedups(points, baseline)
    points = rep.select(points, _backends(backend))
    if not points:
        raise UserError(f"{store.path}: no finished runs to report" + (f" for backend {backend}" if backend else ""))
    if fmt == "table":
        ui.stdout.print(ui.report_table(points, f"{store.path}: {len(points)} points"))
        for line in rep.memory_lines(points):
            ui.stdout.print(f"memory: {line}", markup=False, highlight=False)
    elif fmt == "markdown":
        print(rep.to_markdown(points), end="")
    elif fmt == "csv":
        print(rep.to_csv([rep.export_row(p) for p in points]), end="")
    else:
        print(rep.to_json(points))


@app.command()
def plot(
    results: ResultsDir = Path("results"),
    out_dir: Annotated[Path, typer.Option(help="Directory the figures are written into.")] = Path("results/figures"),
    reference: Annotated[
        str | None, typer.Option(help="Draw published results beside ours: 'paper' or a CSV of the same columns.")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="Only these backends, comma-separated.")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help=f"Image formats, comma-separated, of {', '.join(FIGURE_FORMATS)}.")
    ] = "png",
    predictions: Annotated[
        Path | None, typer.Option(help="Instead: predicted vs true redshift from a cai-bench predict file.")
    ] = None,
) -> None:
    """Scaling figures: time and throughput vs data size, throughput vs batch size, time (and cost) vs partition
    size, and the per-worker time breakdown. With --predictions: predicted vs true redshift."""
    from cai_bench import plot as plots
    from cai_bench import report as rep
    from cai_bench import ui
    from cai_bench.results import ResultsStore

    formats = _list(fmt, "--format", str)
    if predictions is not None:
        from cai_bench.predict import read_predictions

        figure = plots.predictions_figure(read_predictions(predictions), str(predictions))
        for path in plots.save_figures({f"{predictions.stem}-vs-true": figure}, out_dir, formats):
            ui.stdout.print(str(path), markup=False, highlight=False)
        return
    store = ResultsStore(results)
    points = rep.select(rep.summarize_points(_read_store(store)), _backends(backend))
    rows = None
    if reference:
        rows = plots.load_reference(reference)
    written = plots.save_figures(plots.build_figures(points, rows), out_dir, formats)
    for path in written:
        ui.stdout.print(str(path), markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------- results


@results_app.command("list")
def results_list(
    results: ResultsDir = Path("results"),
    backend: Annotated[str | None, typer.Option(help="Only these backends, comma-separated.")] = None,
    last: Annotated[int, typer.Option(help="Show the newest N records (0: all).")] = 30,
) -> None:
    """The records in the store, newest last: id, status, what ran and how fast, and where."""
    from rich.table import Table

    from cai_bench import ui
    from cai_bench.results import ResultsStore, record_row

    store = ResultsStore(results)
    records = _read_store(store)
    wanted = _backends(backend)
    rows = [record_row(r) for r in records if not wanted or r.get("backend") in wanted]
    shown = rows[-last:] if last > 0 else rows
    several_machines = len({r["machine"] for r in shown}) > 1
    table = Table(title=f"{store.path}: {len(shown)} of {len(rows)} records", title_justify="left")
    headers = ["run id", "status", "backend", "rep", "data GB", "part. MB", "batch", "prec.", "wall s", "samples/s"]
    for header in headers + (["machine"] if several_machines else []):
        table.add_column(header, justify="right" if header in ("rep", "data GB", "wall s", "samples/s") else "left")
    for r in shown:
        cells = [
            r["run_id"],
            r["status"],
            r["backend"],
            f"{r['repeat']}/{r['repeats']}",
            f"{r['data_gb']:.3g}",
            f"{r['partition_mb']:g}",
            str(r["batch_size"]),
            r["precision"],
            f"{r['wall_s']:.2f}",
            f"{r['samples_per_s']:,.1f}",
        ]
        table.add_row(*cells, *([r["machine"]] if several_machines else []))
    if not several_machines and shown:
        table.title += f" · {shown[0]['machine']}"
    ui.stdout.print(table)


def _find_record(records: list[dict], run_id: str, where: Path) -> dict:
    found = [r for r in records if r.get("run_id", "").startswith(run_id)]
    if not found:
        raise UserError(f"{where}: no record with id {run_id!r}; cai-bench results list shows the ids")
    if len(found) > 1:
        raise UserError(f"{where}: {len(found)} records start with {run_id!r}; give more of the id")
    return found[0]


@results_app.command("show")
def results_show(
    run_id: Annotated[str, typer.Argument(help="A run id, or enough of its start to be unique.")],
    results: ResultsDir = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="The whole record, per-partition workers included.")] = False,
) -> None:
    """One record: its summary, plan and environment (the whole record with --json)."""
    from cai_bench import ui
    from cai_bench.results import ResultsStore, record_row

    store = ResultsStore(results)
    record = _find_record(_read_store(store), run_id, store.path)
    if as_json:
        print(json.dumps(record, indent=1))
        return
    row = record_row(record)
    rows = [(k, "-" if v is None else f"{v:,.6g}" if isinstance(v, float) else str(v)) for k, v in row.items()]
    rows.append(("partitions run", str(len(record.get("workers", [])))))
    ui.stdout.print(ui.key_value_table(record["run_id"], rows))


@results_app.command("export")
def results_export(
    results: ResultsDir = Path("results"),
    csv_format: Annotated[bool, typer.Option("--csv", help="One CSV row per record (the default).")] = True,
    json_format: Annotated[bool, typer.Option("--json", help="A JSON array of the whole records instead.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Every record, as CSV rows (the summary's figures, plan and machine) or as JSON."""
    from cai_bench import report as rep
    from cai_bench.results import ResultsStore, record_row

    records = _read_store(ResultsStore(results))
    text = json.dumps(records, indent=1) + "\n" if json_format else rep.to_csv([record_row(r) for r in records])
    if out is None:
        print(text, end="")
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror})") from None


# ---------------------------------------------------------------------------------------------- model


@model_app.command("info")
def model_info(
    weights: Annotated[Path | None, typer.Option(help="Load these weights first (checks they fit).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Parameters (total, frozen, learnable), FLOPs per sample and the weights' source."""
    from cai_bench import ui
    from cai_bench.model.astromae import build_model, flops_per_sample
    from cai_bench.model.checkpoint import RANDOM_INIT, WeightsInfo, load_weights

    model = build_model()
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=0)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    flops = flops_per_sample(model)
    out = {
        "model": "pcm-AstroMAE",
        "parameters": total,
        "frozen_parameters": frozen,
        "learnable_parameters": total - frozen,
        "state_dict_keys": len(model.state_dict()),
        "flops_per_sample": flops,
        **info.to_dict(),
    }
    if as_json:
        print(json.dumps(out, indent=1))
        return
    rows = [
        ("parameters", f"{total:,}"),
        ("  frozen (encoder)", f"{frozen:,}"),
        ("  learnable (heads)", f"{total - frozen:,}"),
        ("state dict keys", str(out["state_dict_keys"])),
        ("FLOPs per sample", f"{flops / 1e9:.3f} GFLOP ({flops / 2e6:.1f} M multiply-adds)"),
        ("weights", info.source + (f" (sha256 {info.sha256[:16]}...)" if info.sha256 else f" (seed {info.seed})")),
    ]
    ui.stdout.print(ui.key_value_table("pcm-AstroMAE", rows))


@model_app.command("convert")
def model_convert(
    src: Annotated[Path, typer.Argument(help="Upstream's pickled model (.pt), a plain state dict, or safetensors.")],
    out: Annotated[Path, typer.Option(help="The safetensors file to write.")],
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Recover the model's tensors into a safetensors file, without importing or running anything from SRC.

    A whole pickled model (upstream's DataParallel-wrapped ViT_Astro) is read by a restricted unpickler: tensor
    building blocks are rebuilt, module classes become inert placeholders, any other pickled name is refused.
    """
    from cai_bench import ui
    from cai_bench.model.checkpoint import convert_checkpoint

    done = convert_checkpoint(src, out, overwrite=force)
    ui.stdout.print(
        f"{done.out}: {done.keys} tensors from the {done.source_kind} {done.source} "
        f"(sha256 {done.source_sha256[:16]}...); they load strictly into pcm-AstroMAE: "
        f"cai-bench run --weights {done.out}"
    )


@model_app.command("export")
def model_export(
    out: Annotated[Path, typer.Option(help="The export directory to create.")],
    format: Annotated[ExportFormat, typer.Option(help="onnx (for onnxruntime or openvino) or openvino (its IR).")],
    weights: Annotated[Path | None, typer.Option(help="The weights to export (default: random-init).")] = None,
    seed: Annotated[int, typer.Option(help="Random-init seed, without --weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace OUT if it holds files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print export.json on stdout.")] = False,
) -> None:
    """Export the model once, with torch, for --runtime onnxruntime or openvino: checked against torch fp32 on
    a fixed batch before anything is written, and naming its weights, so records of runs on it still do.

    Run it with --weights OUT; without an export, --runtime onnxruntime or openvino exports into the cache.
    """
    from cai_bench import ui
    from cai_bench.model.export import export_model
    from cai_bench.runtimes import is_export

    if weights is not None and is_export(str(weights)):
        raise UserError(f"{weights}: already an export; --weights takes the weights file it was made from")
    if weights is not None:
        _check_weights(weights)
    export, seconds = export_model(str(weights) if weights else None, format.value, out, seed=seed, overwrite=force)
    if as_json:
        print(json.dumps(export.meta, indent=1))
        return
    size = sum((Path(export.directory) / name).stat().st_size for name in export.files)
    named = export.weights.source + (f" (sha256 {export.weights.sha256[:16]}...)" if export.weights.sha256 else
                                     f" (seed {export.weights.seed})")  # fmt: skip
    ui.stdout.print(
        f"{export.directory}: {export.format} export of {named}, {size / 2**20:,.1f} MB in {seconds:.1f} s; "
        f"max |dz| against torch fp32 on {export.check['batch']} galaxies: {export.check['max_abs_dz']:.2g} "
        f"({export.check['runtime']}). Run it: cai-bench run --runtime "
        f"{'openvino' if export.format == 'openvino' else 'onnxruntime'} --weights {export.directory}"
    )


# ---------------------------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    gb: Annotated[float, typer.Option(help="Data size in GB (GiB).")],
    out: Annotated[Path, typer.Option(help="Directory to create.")],
    partition_mb: Annotated[float, typer.Option(help="Partition size in MB (MiB).")] = 25.0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bytes.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace OUT if it already holds files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Generate realistic synthetic SDSS-like galaxies, one partition at a time."""
    from cai_bench import ui
    from cai_bench.data.partitions import synthesize
    from cai_bench.plan import check_size

    check_size(gb, "--gb")
    check_size(partition_mb, "--partition-mb")
    start = time.perf_counter()
    with ui.RichCountProgress(f"synthesizing {gb:g} GB", "samples") as bar:
        manifest = synthesize(out, gb, partition_mb, seed, overwrite=force, progress=None if quiet else bar)
    seconds = time.perf_counter() - start
    written = sum(p.bytes for p in manifest.partitions)
    ui.stdout.print(
        f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions, "
        f"{written / 2**20:,.1f} MB in {seconds:.1f} s ({written / 2**20 / seconds:,.1f} MB/s)"
    )


@data_app.command("split")
def data_split(
    src: Annotated[Path, typer.Argument(help="Existing data set directory.")],
    partition_mb: Annotated[float, typer.Option(help="New partition size in MB (MiB).")],
    out: Annotated[Path, typer.Option(help="Directory to create.")],
    force: Annotated[bool, typer.Option(help="Replace OUT if it already holds files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Re-partition a data set without regenerating it (same samples, same order)."""
    from cai_bench import ui
    from cai_bench.data.partitions import split
    from cai_bench.plan import check_size

    check_size(partition_mb, "--partition-mb")
    with ui.RichCountProgress(f"splitting into {partition_mb:g} MB", "samples") as bar:
        manifest = split(src, partition_mb, out, overwrite=force, progress=None if quiet else bar)
    ui.stdout.print(
        f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions of {partition_mb:g} MB"
    )


@data_app.command("import")
def data_import(
    sources: Annotated[list[Path], typer.Argument(help="Upstream TensorDataset .pt files, in order.")],
    partition_mb: Annotated[float, typer.Option(help="Partition size in MB (MiB).")],
    out: Annotated[Path, typer.Option(help="Directory to create.")],
    force: Annotated[bool, typer.Option(help="Replace OUT if it already holds files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Convert upstream torch.save(TensorDataset(images, magnitudes, redshift)) files into partitions.

    Read with torch.load(weights_only=True), allowing only TensorDataset; images [N,64,64,5] are permuted and
    centre-cropped to [N,5,32,32]; one input file is open at a time.
    """
    from cai_bench import ui
    from cai_bench.data.upstream import import_upstream
    from cai_bench.plan import check_size

    check_size(partition_mb, "--partition-mb")
    with ui.RichCountProgress(f"importing into {partition_mb:g} MB partitions", "samples") as bar:
        manifest = import_upstream(sources, out, partition_mb, overwrite=force, progress=None if quiet else bar)
    ui.stdout.print(
        f"{out}: {manifest.samples:,} samples from {len(sources)} file(s) in {len(manifest.partitions)} partitions "
        f"of {partition_mb:g} MB; labels: {'yes' if manifest.has_labels else 'no'}"
    )


@data_app.command("info")
def data_info(
    directory: Annotated[Path, typer.Argument(help="Data set directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON.")] = False,
) -> None:
    """What a data set holds, from its manifest (no partition is read)."""
    from cai_bench import ui
    from cai_bench.data.partitions import open_dataset

    manifest, summary, refs = open_dataset(directory)
    sizes = [r.samples for r in refs]
    out = {
        **asdict(summary),
        "bytes_on_disk": sum(r.bytes for r in refs),
        "samples_per_partition_max": manifest.samples_per_partition,
        "partition_samples_min": min(sizes),
        "partition_samples_max": max(sizes),
        "schema_version": manifest.schema_version,
        "created_utc": manifest.created_utc,
    }
    if as_json:
        print(json.dumps(out, indent=1))
        return
    rows = [
        ("dataset id", summary.dataset_id),
        ("source", json.dumps(summary.source)),
        ("samples", f"{summary.samples:,}"),
        ("data size", f"{summary.data_gb:.4g} GB"),
        ("partitions", f"{summary.partitions} x {summary.partition_mb:g} MB ({min(sizes):,}-{max(sizes):,} samples)"),
        ("on disk", f"{out['bytes_on_disk'] / 2**20:,.1f} MB"),
        ("labels", "yes" if summary.has_labels else "no"),
        ("created", manifest.created_utc),
    ]
    ui.stdout.print(ui.key_value_table(str(directory), rows))


@data_app.command("verify")
def data_verify(directory: Annotated[Path, typer.Argument(help="Data set directory.")]) -> None:
    """Read every partition and compare sizes, sha256 checksums, format and values with the manifest."""
    from cai_bench import ui
    from cai_bench.data.partitions import verify_dataset

    manifest, problems = verify_dataset(directory)
    if problems:
        for problem in problems:
            ui.console.print(problem, markup=False, highlight=False)
        raise UserError(f"{directory}: {len(problems)} of {len(manifest.partitions)} partitions failed verification")
    ui.stdout.print(
        f"{directory}: all {len(manifest.partitions)} partitions match the manifest ({manifest.samples:,} samples)"
    )


@data_app.command("upload")
def data_upload(
    directory: Annotated[Path, typer.Argument(help="Local data set directory.")],
    destination: Annotated[str, typer.Argument(help="s3://bucket/prefix to copy it to.")],
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3 endpoint (an S3-compatible store); default: AWS_ENDPOINT_URL_S3 or AWS.")
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Objects uploaded at once.")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Copy a data set to S3: parallel, multipart, checksummed; objects already there unchanged are skipped, so
    a rerun resumes. The manifest goes last: a prefix with a manifest holds a whole data set."""
    from cai_bench import aws, ui
    from cai_bench.data.s3 import upload_dataset

    aws.parse_s3_url(destination)
    aws.use_endpoints(endpoint_url, emulated=False)
    with ui.RichCountProgress(f"uploading to {destination}", "bytes") as bar:
        done = upload_dataset(directory, destination, jobs=jobs, progress=None if quiet else bar)
    ui.stdout.print(
        f"{done.location}: {len(done.uploaded)} object(s) uploaded ({done.bytes_uploaded / 2**20:,.1f} MB), "
        f"{len(done.skipped)} already there, in {done.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------------------------- lambda


@lambda_app.command("emulate")
def lambda_emulate(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Loopback port of the Invoke API (0: any free one).")
    ] = 9001,
    function: Annotated[str, typer.Option(help="The emulated function's name.")] = "cai-bench",
    memory_mb: Annotated[int, typer.Option(min=128, max=10240, help="Its memory (sets its CPU share too).")] = 10240,
    timeout_s: Annotated[float, typer.Option(min=1, max=900, help="Its timeout in seconds.")] = 900.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Invocations at once; more get 429.")] = 4,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3 endpoint the function reads and writes; default: a local S3 (moto).")
    ] = None,
) -> None:
    """Serve Lambda's Invoke API on loopback, the real handler behind it, until Ctrl-C; point runs at it with
    --lambda-endpoint-url and --endpoint-url."""
    from cai_bench import aws, ui
    from cai_bench.backends.aws_lambda import emulator as emulation

    aws.check_function_name(function)
    stops = []
    try:
        if endpoint_url is None:
            local = emulation.start_local_s3()
            stops.append(local.stop)
            endpoint_url = local.url
        extra = emulation.emulated_function_env(endpoint_url)
        config = emulation.FunctionConfig(name=function, memory_mb=memory_mb, timeout_s=timeout_s)
        emulator = emulation.Emulator(config, concurrency=concurrency, extra_env=extra)
        stops.append(emulator.stop)
        url = emulator.serve(port=port)
        ui.stdout.print(
            f"Lambda Invoke API at {url}, function {function} ({memory_mb} MB, {emulator.cpu_share:.2f} vCPUs' worth "
            "each, "
            f"timeout {timeout_s:g} s, {concurrency} at once); S3 at {endpoint_url}\n"
            f"run against it: cai-bench run --backend lambda --lambda-endpoint-url {url} --endpoint-url "
            f"{endpoint_url} --bucket s3://cai-bench --memory-mb {memory_mb}",
            markup=False, highlight=False,
        )  # fmt: skip
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for stop in reversed(stops):
            stop()


AwsRegion = Annotated[str | None, typer.Option(help="AWS region (default: AWS_REGION or the profile's).")]
AwsEndpoint = Annotated[
    str | None, typer.Option(help="One endpoint for every AWS service (an AWS-compatible service, e.g. moto's).")
]
FunctionName = Annotated[str, typer.Option("--name", help="The function's name.")]


def _account(region: str | None, endpoint_url: str | None):
    from cai_bench.backends.aws_lambda.deploy import Account

    return Account(region=region, endpoint_url=endpoint_url)


@lambda_app.command("build")
def lambda_build(
    repository: Annotated[str, typer.Option(help="Image name, and the ECR repository pushed to.")] = "cai-bench",
    tag: Annotated[str, typer.Option(help="Image tag.")] = "latest",
    arch: Annotated[str, typer.Option(help="x86_64 or arm64: the function's architecture.")] = "x86_64",
    push: Annotated[bool, typer.Option(help="Push to this account's ECR (the repository made if missing).")] = True,
    context: Annotated[Path, typer.Option(help="The cai-bench source tree to build from.")] = Path("."),
    runtime: Annotated[
        str, typer.Option(help="torch, or onnxruntime / openvino: the image without torch, for an exported model.")
    ] = "torch",
    region: AwsRegion = None,
    endpoint_url: AwsEndpoint = None,
) -> None:
    """Build the function's container image (deploy/lambda/Dockerfile) and push it to ECR; where Docker is not
    reachable, print the exact commands instead."""
    from cai_bench import ui
    from cai_bench.backends.aws_lambda import deploy as deploying

    image = deploying.ImageBuild(repository, tag, arch, context, runtime).check()
    say = functools.partial(ui.stdout.print, markup=False, highlight=False)
    if not deploying.docker_reachable():
        say(
            "Docker is not reachable here; on a machine with Docker and the aws CLI, run (ACCOUNT: your account "
            "id, from `aws sts get-caller-identity`):"
        )
        account, where = "ACCOUNT", region or "REGION"
        for line in [shlex.join(image.build_command()), *(image.push_commands(account, where) if push else [])]:
            say("  " + line)
        say(f"then: cai-bench lambda deploy --image-uri {image.uri(account, where)} --role-arn ROLE_ARN")
        return
    account = _account(region, endpoint_url) if push else None
    uri = deploying.build_image(image, account, say)
    say(f"image {uri}" + (f"\nnext: cai-bench lambda deploy --image-uri {uri} --role-arn ROLE_ARN" if push else ""))


@lambda_app.command("deploy")
def lambda_deploy(
    image_uri: Annotated[str, typer.Option(help="The image in ECR (from `cai-bench lambda build`).")],
    role_arn: Annotated[str, typer.Option(help="The function's execution role (deploy/lambda/role-policy.json).")],
    memory_mb: Annotated[int, typer.Option(help="Memory in MB (128-10240; sets the CPU share too).")] = 10240,
    timeout_s: Annotated[int, typer.Option(help="Timeout in seconds (1-900).")] = 900,
    ephemeral_mb: Annotated[int, typer.Option(help="/tmp size in MB (512-10240).")] = 10240,
    arch: Annotated[str, typer.Option(help="x86_64 or arm64 (the image's).")] = "x86_64",
    name: FunctionName = "cai-bench",
    region: AwsRegion = None,
    endpoint_url: AwsEndpoint = None,
) -> None:
    """Create the function from the image, or update it (image, then configuration), and wait until it is active."""
    from cai_bench import ui
    from cai_bench.backends.aws_lambda import deploy as deploying

    spec = deploying.FunctionSpec(name, image_uri, role_arn, memory_mb, timeout_s, ephemeral_mb, arch).check()
    started = time.perf_counter()
    done = deploying.deploy(_account(region, endpoint_url), spec)
    c, took = done["configuration"], time.perf_counter() - started
    ui.stdout.print(
        f"function {c['FunctionName']} {done['action']} in {took:.1f} s: {c['MemorySize']} MB, "
        f"timeout {c['Timeout']} s, /tmp {(c.get('EphemeralStorage') or {}).get('Size')} MB, "
        f"{(c.get('Architectures') or ['x86_64'])[0]}, state {c.get('State')}\nrun it: cai-bench run --backend lambda "
        f"--function {c['FunctionName']} --bucket s3://BUCKET/cai-bench",
        markup=False, highlight=False,
    )  # fmt: skip


@lambda_app.command("status")
def lambda_status(
    name: FunctionName = "cai-bench",
    region: AwsRegion = None,
    endpoint_url: AwsEndpoint = None,
    as_json: Annotated[bool, typer.Option("--json", help="The status as JSON.")] = False,
) -> None:
    """The function's state and configuration, and the state machines cai-bench made for it."""
    from cai_bench import aws, ui
    from cai_bench.backends.aws_lambda import deploy as deploying

    found = deploying.status(_account(region, endpoint_url), aws.check_function_name(name))
    if as_json:
        print(json.dumps(found, indent=2, default=str))
        return
    if not found["exists"]:
        ui.stdout.print(f"function {name}: not deployed", markup=False, highlight=False)
    else:
        ui.stdout.print(
            f"function {name}: {found['state']} (last update {found['last_update']}), {found['memory_mb']} MB, "
            f"timeout {found['timeout_s']} s, /tmp {found['ephemeral_mb']} MB, {found['architecture']}, image "
            f"{found['image_uri']}{'' if found['managed'] else ' (not deployed by cai-bench)'}",
            markup=False, highlight=False,
        )  # fmt: skip
    for arn in found["state_machines"]:
        ui.stdout.print(f"state machine {arn}", markup=False, highlight=False)


@lambda_app.command("destroy")
def lambda_destroy(
    name: FunctionName = "cai-bench",
    region: AwsRegion = None,
    endpoint_url: AwsEndpoint = None,
) -> None:
    """Delete the function and what cai-bench made for it (state machines, log group); only what carries
    cai-bench's tag. Data and results in S3 stay: remove them with the aws CLI when you no longer need them."""
    from cai_bench import aws, ui
    from cai_bench.backends.aws_lambda import deploy as deploying

    removed = deploying.destroy(_account(region, endpoint_url), aws.check_function_name(name))
    for line in removed or [f"nothing to remove for function {name}"]:
        ui.stdout.print(("removed " if removed else "") + line, markup=False, highlight=False)


@lambda_app.command("cost")
def lambda_cost(
    workers: Annotated[
        Path | None, typer.Option(help="Per-function records (JSON list with 'total_cpu_time (seconds)' each).")
    ] = None,
    log: Annotated[Path | None, typer.Option(help="A Lambda log: every REPORT line's billed duration.")] = None,
    invocations: Annotated[
        int | None, typer.Option(min=1, help="Before a run: so many invocations (with --seconds-each, --memory-mb).")
    ] = None,
    seconds_each: Annotated[float | None, typer.Option(min=0, help="Billed seconds of each invocation.")] = None,
    transitions: Annotated[
        int, typer.Option(min=0, help="Step Functions state transitions to add (one per item, one per Map).")
    ] = 0,
    memory_mb: Annotated[
        int | None, typer.Option(min=128, help="Memory of each function (default: the log's).")
    ] = None,
    arch: Annotated[str, typer.Option(help="x86_64 or arm64.")] = "x86_64",
    price_file: Annotated[Path | None, typer.Option(help="JSON price table replacing the built-in one.")] = None,
) -> None:
    """What invocations cost: from per-function records (each one's time, rounded up to the millisecond, as its
    billed duration), from the REPORT lines of a log, or before a run from so many invocations of so long each."""
    from cai_bench import ui
    from cai_bench.backends.aws_lambda import pricing
    from cai_bench.backends.aws_lambda.report_log import parse_reports

    if sum(x is not None for x in (workers, log, invocations)) != 1:
        raise UserError("give one of --workers FILE, --log FILE or --invocations N")
    prices = pricing.load_prices(price_file)
    if invocations is not None:
        if seconds_each is None or memory_mb is None:
            raise UserError("--invocations needs --seconds-each and --memory-mb")
        billed, memory = [math.ceil(seconds_each * 1000)] * invocations, memory_mb
    elif workers is not None:
        if memory_mb is None:
            raise UserError("--workers needs --memory-mb (the records do not say)")
        billed = [math.ceil(s * 1000) for s in _worker_seconds(workers)]
        memory = memory_mb
    else:
        try:
            reports = parse_reports(log.read_text(errors="replace"))
        except OSError as exc:
            raise UserError(f"{log}: cannot read ({exc.strerror})") from None
        if not reports:
            raise UserError(f"{log}: no REPORT line in it")
        sizes = {r.memory_size_mb for r in reports}
        memory = memory_mb or (sizes.pop() if len(sizes) == 1 else 0)
        if not memory:
            raise UserError(f"{log}: REPORT lines of several memory sizes; give --memory-mb")
        billed = [r.billed_duration_ms for r in reports]
    spent = pricing.cost(billed, memory, arch, prices, transitions=transitions)
    steps = f" + ${spent.transitions_usd:.6f} for {transitions:,} state transitions" if transitions else ""
    ui.stdout.print(
        f"{spent.requests:,} invocations, {sum(billed) / 1000:,.2f} billed s at {memory:,} MB = "
        f"{spent.billed_gb_s:,.1f} GB-s: ${spent.duration_usd:.4f} duration + ${spent.request_usd:.6f} requests"
        f"{steps} = ${spent.usd:.4f} ({arch}, prices as of {spent.prices_as_of})",
        markup=False, highlight=False,
    )  # fmt: skip


def _worker_seconds(path: Path) -> list[float]:
    try:
        rows = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    key = "total_cpu_time (seconds)"
    ok = isinstance(rows, list) and rows and all(isinstance(r, dict) and isinstance(r.get(key), int | float)
                                                 and math.isfinite(r[key]) and r[key] >= 0 for r in rows)  # fmt: skip
    if not ok:
        raise UserError(f"{path}: expected a JSON list of records, each with a number {key!r}")
    return [float(r[key]) for r in rows]


# ---------------------------------------------------------------------------------------------- hpc


@app.command()
def collect(
    job_id: Annotated[str, typer.Argument(help="The job id that run --no-wait printed (or the scheduler's id).")],
    results: ResultsDir = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Follow work submitted with --no-wait (any backend that can detach) to its end and record it, once."""
    from cai_bench import runner, ui
    from cai_bench.results import ResultsStore

    store = ResultsStore(results)
    store.check_writable()
    progress = None if (as_json or quiet) else ui.RichRunProgress()
    outcome = _execute(lambda: runner.collect_job(job_id, store, progress), store, as_json)
    _print_runs([outcome.record], store, as_json)


# ---------------------------------------------------------------------------------------------- entry point


class Terminated(KeyboardInterrupt):
    """SIGTERM (a SLURM time limit, ``timeout``, ``kill``): stops a command as Ctrl-C does, so what finished is
    recorded as ``interrupted``; the command then exits with 143 (128 + SIGTERM)."""


def interrupt_exit_code(exc: BaseException) -> int:
    return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _fail(message: str, code: int) -> None:
    """One line on stderr, whatever the message holds (newlines, other libraries' colour codes), and exit."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _help_hint(ctx) -> str:
    """Where to read more: ``cai-bench data synth --help`` (named by the commands, whatever ran the program)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return f" (see: cai-bench {' '.join([*reversed(names), '--help'])})"


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        if _debug:
            raise
        _fail(str(exc), exc.exit_code)
    except ClickException as exc:  # the parser's own errors: unknown option, a value that is not a choice
        if isinstance(exc, NoArgsIsHelpError):  # the help was shown
            sys.exit(exc.exit_code)
        _fail(exc.format_message().replace("Value error, ", "") + _help_hint(getattr(exc, "ctx", None)), 2)
    except KeyboardInterrupt as exc:  # outside a run, which reports its own
        print("interrupted", file=sys.stderr)
        sys.exit(interrupt_exit_code(exc))
    except Exception as exc:
        if _debug:
            raise
        # Not a mistake of the user's that we foresaw: say so on one line, and how to see more
        _fail(f"unexpected {type(exc).__name__}: {exc} (cai-bench --debug ... shows the traceback)", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else 0)
