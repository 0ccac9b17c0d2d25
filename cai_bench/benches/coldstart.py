"""A torch-free Lambda worker's cold start, emulated: ``make bench-coldstart``
(``python -m cai_bench.benches.coldstart``).

Each trial is one run of the lambda backend through the emulator at concurrency 1 on one partition, so its one
invocation lands in a fresh execution environment: a cold start. It keeps that invocation's REPORT figures (Init
Duration, Duration, Max Memory Used) and what the worker did at start-up (where its export came from, how long
the fetch, the compile and the warm-up took), and prints the medians per arm as JSON. An arm is a runtime with
its export fetched from S3 at the cold start (``s3``, as before ``--export-in-image``) or read from the image
(``image``). Trials alternate between the arms, so a slow spell of the machine hits each alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.local_s3 import start_local_s3
from cai_bench.benches.ending import finish
from cai_bench.core.machine import machine_label, this_machine, vector_flags
from cai_bench.core.plan import make_plan
from cai_bench.data.datasets import resolve_data

STARTUP_FIGURES = ("fetch_s", "compile_s", "warmup_s")


def one_cold_start(plan, options: dict) -> dict:
    """One run of one partition in a fresh environment: its invocation's REPORT, the worker's start-up and the
    batches the partition ran in."""
    emitted = []
    run = run_lambda(replace(plan, backend_options=options), emitted.append)
    invocation = run.info["invocations"][0]
    report, startup = invocation["report"], run.info.get("startup") or {}
    return {
        "cold": invocation["cold"],
        "init_duration_ms": report["init_duration_ms"],
        "duration_ms": report["duration_ms"],
        "max_memory_used_mb": report["max_memory_used_mb"],
        **{k: startup.get(k) for k in STARTUP_FIGURES},
        "export_from": startup.get("export_from"),
        "batches": emitted[0].record.batches if emitted else None,
    }


def medians(trials: list[dict]) -> dict:
    out = {}
    for key in ("init_duration_ms", "duration_ms", "max_memory_used_mb", *STARTUP_FIGURES):
        values = [t[key] for t in trials if t.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["first_invocation_ms"] = out.get("duration_ms")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai_bench.benches.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--cold-starts", type=int, default=6, help="trials per arm")
    parser.add_argument("--export-from", default="s3,image", help="where the export comes from: s3, image or both")
    parser.add_argument("--memory-mb", type=int, default=3538, help="two vCPUs' worth")
    parser.add_argument("--partition-mb", type=float, default=5.0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=512, help="galaxies per batch (the run's default: 512)")
    parser.add_argument("--weights", default=None, help="weights file or export (default: random-init)")
    parser.add_argument("--option", action="append", default=[], help="extra backend option KEY=VALUE (JSON value)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    advice = {
        "memory": f"raise --memory-mb (now {args.memory_mb}) or lower --batch-size (now {args.batch_size})",
        "time": f"lower --partition-mb (now {args.partition_mb:g}) or --batch-size (now {args.batch_size})",
        "other": f"lower --cold-starts (now {args.cold_starts}) to one, and see the errors it names",
    }
    return finish("bench-coldstart", lambda: _cold_starts(args), advice)


def _cold_starts(args: argparse.Namespace) -> int:
    summary, refs = resolve_data(None, args.partition_mb / 1024, args.partition_mb, seed=0)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.option)}
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    # Each trial sets its arm's runtime; the plan is checked with the first (a precision torch lacks, int8)
    plan = make_plan("lambda", summary, refs[:1], batch_size=args.batch_size, precision=args.precision,
                     weights=args.weights, backend_options={"runtime": runtimes[0]})  # fmt: skip
    arms = [(runtime, source) for runtime in runtimes for source in args.export_from.split(",")]
    trials: dict[str, list] = {f"{r} {source}": [] for r, source in arms}
    s3 = start_local_s3()
    try:
        for _ in range(args.cold_starts):
            for runtime, source in arms:
                options = {"emulate": True, "endpoint_url": s3.url, "max_concurrency": 1, "memory_mb": args.memory_mb,
                           "retries": 0, "runtime": runtime, "export_in_image": source == "image", **extra}  # fmt: skip
                trials[f"{runtime} {source}"].append(one_cold_start(plan, options))
                print(runtime, source, json.dumps(trials[f"{runtime} {source}"][-1]), file=sys.stderr, flush=True)
    finally:
        s3.stop()
    figures = {
        "machine": machine_label(this_machine()),
        "cpu_flags": vector_flags(),
        "memory_mb": args.memory_mb,
        "partition_mb": args.partition_mb,
        "samples": refs[0].samples,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "options": extra,
        "arms": {arm: {"medians": medians(t), "trials": t} for arm, t in trials.items()},
    }
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
