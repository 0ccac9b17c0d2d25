"""The ``cai-bench`` command line: parse options, build a Plan, call the runner, render the results."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from cai_bench import __version__
from cai_bench.errors import UserError

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
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

_debug = False


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
def run(
    backend: Annotated[
        str, typer.Option(help="Where to run (cai-bench run --backend NAME); see the error for the list.")
    ] = "cpu",
    data: Annotated[Path | None, typer.Option(help="A data set directory (cai-bench data synth / split).")] = None,
    gb: Annotated[
        float | None, typer.Option(help="Synthetic data size in GB (GiB), generated once into the cache.")
    ] = None,
    partition_mb: Annotated[
        float | None, typer.Option(help="Partition size in MB (MiB) for synthetic data [default: 25].")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 512,
    precision: Annotated[str, typer.Option(help="fp32 or bf16 (autocast).")] = "fp32",
    threads: Annotated[int | None, typer.Option(help="Intra-op threads [default: physical cores].")] = None,
    repeats: Annotated[int, typer.Option(help="Measured runs, each saved as one record.")] = 1,
    warmup: Annotated[int, typer.Option(help="Unrecorded runs before the measured ones.")] = 0,
    weights: Annotated[
        Path | None, typer.Option(help="Weights (.safetensors or a .pt state dict); default: random init.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data and of the random-init weights.")] = 0,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare each partition's sha256 as it is read.")
    ] = True,
    results: Annotated[
        Path, typer.Option(help="Results directory; records are appended to RESULTS/runs.jsonl.")
    ] = Path("results"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run records as JSON on stdout, nothing else.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the model over a data set on one backend and record how long it took."""
    from cai_bench import runner, ui
    from cai_bench.backends import get_backend
    from cai_bench.plan import make_plan
    from cai_bench.results import ResultsStore

    get_backend(backend)  # an unknown name fails before any data is generated
    with ui.RichCountProgress("synthesizing", "samples") as bar:
        summary, refs = runner.resolve_data(data, gb, partition_mb, seed, None if (as_json or quiet) else bar)
    plan = make_plan(
        backend,
        summary,
        refs,
        batch_size=batch_size,
        precision=precision,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        weights=str(weights) if weights else None,
        seed=seed,
        verify_checksums=verify,
    )
    store = ResultsStore(results)
    progress = None if (as_json or quiet) else ui.RichRunProgress()
    try:
        outcomes = runner.execute(plan, store, progress)
    except KeyboardInterrupt:
        ui.console.print(f"interrupted; finished repeats and the partitions done so far are in {store.path}")
        raise typer.Exit(130) from None
    records = [o.record for o in outcomes]
    if as_json:
        print(json.dumps([asdict(r) for r in records], indent=1))
        return
    ui.stdout.print(ui.run_summary_table(records))
    last = records[-1].summary
    ui.stdout.print(
        f"sum over {last.workers} worker(s) of each one's bits / own compute s (the paper's throughput measure): "
        f"{last.sum_worker_throughput_bps / 1e6:,.1f} Mbps in the last repeat"
    )
    weights = records[0].weights.get("weights")
    if weights == "random-init":
        weights += " (the timings are real; the predicted redshifts are not)"
    ui.stdout.print(f"weights: {weights}")
    ui.stdout.print(f"{len(records)} record(s) appended to {store.path}")


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

    with ui.RichCountProgress(f"splitting into {partition_mb:g} MB", "samples") as bar:
        manifest = split(src, partition_mb, out, overwrite=force, progress=None if quiet else bar)
    ui.stdout.print(
        f"{out}: {manifest.samples:,} samples in {len(manifest.partitions)} partitions of {partition_mb:g} MB"
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


# ---------------------------------------------------------------------------------------------- entry point


def main() -> None:
    try:
        app()
    except UserError as exc:
        if _debug:
            raise
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(exc.exit_code)
