"""``run``, ``predict`` and ``collect``: measure a data set on a backend, write predictions, record detached work."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_bench.cli import options as o
from cai_bench.cli.app import app, measured
from cai_bench.commands import predict as predicting
from cai_bench.commands import runner
from cai_bench.data.truth import parse_missing
from cai_bench.render import bars, run_views

Repeats = Annotated[int, typer.Option(help="Measured runs, each saved as one record.")]
CycleToGb = Annotated[
    float | None, typer.Option(help="Reuse the partitions in turn until this many GB have been processed.")
]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the run, or submit it and leave (hpc --slurm).")]
PredictOut = Annotated[
    Path, typer.Option(help="The catalogue to write: .parquet (VOParquet), .fits (astro extra) or .csv (ECSV).")
]
TruthCatalogue = Annotated[
    Path | None, typer.Option(help="A catalogue (.parquet, .fits, .csv) of true redshifts, joined by id (--on).")
]
JoinOn = Annotated[str, typer.Option("--on", help="The truth catalogue's id column.")]
TruthZ = Annotated[
    str | None, typer.Option(help="The truth catalogue's redshift column. [default: z, redshift, zspec, ...]")
]
TruthMissing = Annotated[
    str, typer.Option(help="Redshift values that mean 'no redshift' in the --truth catalogue, comma-separated; none.")
]
PredictForce = Annotated[bool, typer.Option("--force", help="Start again: replace OUT and any unfinished parts.")]
JobId = Annotated[str, typer.Argument(help="The job id that run --no-wait printed (or the scheduler's id).")]


@app.command()
@o.with_backend_options()
def run(
    backend: o.Backend = o.BackendName.cpu, data: o.DataDir = None, gb: o.Gb = None, partition_mb: o.PartitionMb = None,
    batch_size: o.BatchSize = None, precision: o.PrecisionOpt = o.Precision.auto, engine: o.EngineOpt = o.Engine.fast,
    compile_model: o.Compile = False, threads: o.Threads = None, oversubscribe: o.Oversubscribe = False,
    reprobe: o.Reprobe = False, repeats: Repeats = 1, warmup: o.Warmup = 0, weights: o.Weights = None,
    seed: o.Seed = 0, verify: o.Verify = True, cycle_to_gb: CycleToGb = None, wait: Wait = True,
    results: o.Results = Path("results"), as_json: o.AsJson = False, quiet: o.Quiet = False,
    backend_options: dict | None = None,
) -> None:  # fmt: skip
    """Run the model over a data set on one backend and record how long it took."""
    o.reprobe_if(reprobe)
    request = runner.RunRequest(
        backend=backend.value, backend_options=backend_options, data=data, gb=gb, partition_mb=partition_mb,
        batch_size=batch_size, precision=precision.value, engine=engine.value, compile=compile_model, threads=threads,
        oversubscribe=oversubscribe, repeats=repeats, warmup=warmup, weights=weights, seed=seed, verify=verify,
        cycle_to_gb=cycle_to_gb, wait=wait, results=results,
    )  # fmt: skip
    progress = bars.run_progress(as_json or quiet)
    run_views.show_run(measured(lambda: runner.run_command(request, progress), results), as_json)


@app.command()
@o.with_backend_options()
def predict(
    data: o.DataDir, out: PredictOut, weights: o.Weights = None, backend: o.Backend = o.BackendName.cpu,
    batch_size: o.BatchSize = None, precision: o.PrecisionOpt = o.Precision.auto, threads: o.Threads = None,
    oversubscribe: o.Oversubscribe = False, reprobe: o.Reprobe = False, seed: o.Seed = 0, verify: o.Verify = True,
    force: PredictForce = False,
    truth: TruthCatalogue = None, on: JoinOn = predicting.JOIN_ON, truth_z: TruthZ = None,
    truth_missing: TruthMissing = "-9999,-99,-1,nan", results: o.Results = Path("results"), as_json: o.AsJson = False,
    quiet: o.Quiet = False, backend_options: dict | None = None,
) -> None:  # fmt: skip
    """Predict the redshift of every object into a catalogue: id, ra, dec, z_pred, z_true, flags.

    Units and provenance (weights digest, runtime and precision that ran, run ids, code version, input files)
    are in the file's metadata. With --truth, true redshifts are joined by id and the photo-z metrics computed.
    Resumable: each finished partition is kept, so rerunning after an interruption predicts only the rest and
    the file holds every object exactly once. The run is timed and recorded like any run (kind "predict").
    """
    o.reprobe_if(reprobe)
    request = runner.RunRequest(
        backend=backend.value, backend_options=backend_options, data=data, batch_size=batch_size,
        precision=precision.value, threads=threads, oversubscribe=oversubscribe, weights=weights, seed=seed,
        verify=verify, results=results,
    )  # fmt: skip
    missing = parse_missing(truth_missing)
    progress = bars.run_progress(as_json or quiet)
    outcome = measured(
        lambda: predicting.predict_command(request, out, force, progress, truth, on, truth_z, missing), results,
        interrupted="interrupted; finished partitions are kept. Run the same command again to continue.",
        again="; their predictions too: run the same command again to predict the rest",
    )  # fmt: skip
    run_views.show_predict(outcome, as_json)


@app.command()
def collect(
    job_id: JobId, results: o.Results = Path("results"), as_json: o.AsJson = False, quiet: o.Quiet = False
) -> None:
    """Follow work submitted with --no-wait (any backend that can detach) to its end and record it, once."""
    progress = bars.run_progress(as_json or quiet)
    run_views.show_run(measured(lambda: runner.collect_run(job_id, results, progress), results), as_json)
