"""``bench``: the upstream-style reference loop against every runtime on the same data, alternating."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.benches.cpu_runtimes import bench_command
from cai_bench.cli import options as o
from cai_bench.cli.app import app, measured
from cai_bench.commands.runner import RunRequest
from cai_bench.render import bars, run_views

Runtimes = Annotated[
    str | None,
    typer.Option(
        help="Comma list of torch, onnxruntime, openvino, and default (what run does without flags: --runtime "
        "auto --precision auto, probed once); runtime:precision pins an arm's precision (openvino:int8).",
        show_default="all installed, and default",
    ),
]
Rounds = Annotated[int, typer.Option(help="Measured rounds (one run of every arm each).")]
BenchGb = Annotated[float | None, typer.Option(help="Synthetic data size in GB.", show_default="0.2")]
BenchPrecision = Annotated[o.Precision, typer.Option(help="Of every arm but the reference (eager fp32).")]
BenchWarmup = Annotated[int, typer.Option(help="Unrecorded runs of each arm first.")]


@app.command()
def bench(
    data: o.DataDir = None, gb: BenchGb = None, partition_mb: o.PartitionMb = None, batch_size: o.BatchSize = None,
    precision: BenchPrecision = o.Precision.auto, runtimes: Runtimes = None, rounds: Rounds = 3,
    warmup: BenchWarmup = 1, threads: o.Threads = None, oversubscribe: o.Oversubscribe = False,
    weights: o.Weights = None, seed: o.Seed = 0, results: o.Results = Path("results"), as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:  # fmt: skip
    """The upstream-style reference loop against every runtime on the same data, alternating A B C D A B C D.

    Prints samples/s of each run, each arm's ratio to the reference of the same round and their median, peak
    RSS, each arm's GFLOP/s and MFU (against this machine's measured fp32 peak) and largest |dz| from the
    reference over every galaxy, what each runtime chose (version, threading, precision), and the machine with
    its CPU flags; every measured run is also a record in the store.
    """
    request = RunRequest(
        data=data, gb=gb, partition_mb=partition_mb, batch_size=batch_size, precision=precision.value,
        threads=threads, oversubscribe=oversubscribe, repeats=rounds, warmup=warmup, weights=weights, seed=seed,
        results=results,
    )  # fmt: skip
    progress = bars.run_progress(as_json or quiet)
    arms = o.comma_list(runtimes, "--runtimes")
    done = measured(lambda: bench_command(request, arms, progress), results, "interrupted; the finished runs are in "
                    "{store}")  # fmt: skip
    run_views.show_bench(done, as_json)
