"""The fan-out machinery at scale, without the model: ``make bench-lambda``
(``python -m cai_bench.benches.lambda_fanout``).

N invocations of the real handler in its no-model mode (each reads one partition from S3, checks its size,
sha256 and values, writes its result, returns its record) through the emulator's Invoke API at a given
concurrency, driven by the Lambda backend's own driver and dispatcher. It checks that every unit was emitted
exactly once (emits, per-partition counts, result objects in S3) and prints the wall clock and the driver's
overhead per invocation: its time from request to response beyond the function's own Duration. Many inits on few
cores may overrun Lambda's 10 s init limit: as on Lambda they run again inside their invocation (counted as
``init_timeouts``). Where it cannot finish, it ends in one line naming what to lower.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.local_s3 import start_local_s3
from cai_bench.benches.ending import finish
from cai_bench.core import aws
from cai_bench.core.machine import machine_id, this_machine
from cai_bench.core.plan import make_plan
from cai_bench.core.stats import percentiles
from cai_bench.data.datasets import resolve_data
from cai_bench.data.s3 import S3Prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cai_bench.benches.lambda_fanout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--invocations", type=positive_int, default=1000)
    parser.add_argument("--concurrency", type=positive_int, default=64)
    parser.add_argument("--gb", type=float, default=0.02, help="synthetic data set, cycled over the invocations")
    parser.add_argument("--partition-mb", type=float, default=1.0)
    parser.add_argument("--memory-mb", type=positive_int, default=1769, help="one vCPU's worth per environment")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    concurrency = f"--concurrency (now {args.concurrency}, on {cores} cores here)"
    advice = {
        "memory": f"raise --memory-mb (now {args.memory_mb}) or lower --partition-mb (now {args.partition_mb:g})",
        "time": f"lower {concurrency}: its environments' inits and invocations overran their limits",
        "other": f"lower {concurrency}, and see the errors it names",
    }
    return finish("bench-lambda", lambda: _fan_out(args), advice)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 1")
    return value


def _fan_out(args: argparse.Namespace) -> int:
    summary, refs = resolve_data(None, args.gb, args.partition_mb, seed=0)
    plan = make_plan("lambda", summary, refs, precision="fp32")
    units = tuple(itertools.islice(itertools.cycle(refs), args.invocations))
    emitted: Counter = Counter()

    def emit(result) -> None:
        emitted[result.record.partition] += 1

    s3 = start_local_s3()  # its own, so that the results can be listed after the run
    try:
        # the dispatcher's own retries: a unit whose environment died is tried again on a fresh one, and the
        # figures say how many were
        options = {"emulate": True, "endpoint_url": s3.url, "max_concurrency": args.concurrency,
                   "memory_mb": args.memory_mb}  # fmt: skip
        plan = replace(plan, partitions=units, backend_options=options)
        started = time.perf_counter()
        run = run_lambda(plan, emit, mode="no-model")
        elapsed = time.perf_counter() - started
        aws.use_endpoints(s3.url, emulated=True)
        objects = len(S3Prefix.parse(run.info["results"]).objects())
    finally:
        s3.stop()
    figures = _figures(args, refs, units, emitted, objects, run, elapsed)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if not figures["exactly_once"]:
        print(f"bench-lambda: {figures['emitted']} units emitted and {objects} results in S3 for "
              f"{args.invocations} invocations: not each exactly once", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _figures(args, refs, units, emitted: Counter, objects: int, run, elapsed: float) -> dict:
    expected = Counter(r.index for r in units)
    info = run.info
    durations = sorted(i["report"]["duration_ms"] for i in info["invocations"] if i["report"])
    return {
        "machine": machine_id(this_machine()),
        "invocations": args.invocations,
        "concurrency": args.concurrency,
        "memory_mb": args.memory_mb,
        "partition_mb": args.partition_mb,
        "partitions_in_data_set": len(refs),
        "emitted": sum(emitted.values()),
        "exactly_once": emitted == expected and objects == args.invocations,
        "result_objects_in_s3": objects,
        "invocations_made": info["invocations_made"],
        "throttled": info["throttled"],
        "cold_starts": info["cold_starts"],
        # inits past Lambda's 10 s that ran again inside their invocation (many inits sharing few cores)
        "init_timeouts": info["init_timeouts"],
        "init_duration_ms_median": info["init_duration_ms_median"],
        "function_errors": info["function_errors"],
        "retried_units": info["retried_units"],
        "units_returned_unstarted": info["units_returned_unstarted"],
        "wall_s": run.wall_s,
        "command_s": elapsed,
        "staging_s": info["staging_s"],
        "handler_duration_ms_median": percentiles(durations, (50,))["p50"],
        "driver_overhead_s_median": info["overhead_s_median"],
        "driver_overhead_s_p90": info["overhead_s_p90"],
        "driver_overhead_s_mean": info["overhead_s_mean"],
        # of which outside the emulator's own handling of the call (it runs in the driver's process)
        "client_side_s_median": info["client_side_s_median"],
        "client_side_s_p90": info["client_side_s_p90"],
        "invocations_per_s": args.invocations / run.wall_s if run.wall_s else None,
        "cost_usd_if_billed": info["cost"]["cost_usd"],
    }


if __name__ == "__main__":
    sys.exit(main())
