"""The dask backend against the hpc node backend on one machine: the same synthetic data, partitions, workers,
threads, runtime and precision. After an unrecorded warm-up of each (which also starts the hpc fork server and
the embedded Dask cluster, both before any clock), repeats alternate hpc, dask, hpc, dask, ... so that a noisy
machine's drifts hit both alike. Every measured run is an ordinary record in the store.

Per backend, medians with their range over the repeats:

- throughput: samples / wall s (the record's, from dispatch to the last result);
- start-up: before the clock, what each starts once and keeps for its later repeats (hpc: the fork server;
  dask: the cluster), as the warm-up's record has it, when it started cold; inside the clock, the slowest
  worker's model start-up (charged to its first unit);
- peak memory: the proportional set size (PSS: a page shared by several processes counted once, in shares) of
  the whole process tree (driver, fork server or scheduler and nannies, workers), summed, sampled every 50 ms
  over one more run of each after the timed ones (reading PSS costs the CPU time the timed runs are measuring),
  each without the other backend's processes; resident memory where the system has no PSS;
- overhead per partition: (workers x wall s - the units' total s) / units, the seconds of the workers' wall that
  no unit accounts for (dispatch, the wire, results, idling at the end), charged alike to both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from pathlib import Path

import psutil

from cai_bench.backends.dask.cluster import close_clusters
from cai_bench.benches.ending import finish
from cai_bench.benches.lambda_fanout import positive_int
from cai_bench.commands.runner import NoProgress, RunRequest, run_repeat
from cai_bench.core.machine import default_threads, machine_label, this_machine
from cai_bench.core.plan import replace_plan
from cai_bench.core.records import RunRecord
from cai_bench.measure.metrics import spread

BACKENDS = ("hpc", "dask")
SAMPLE_S = 0.05


class TreeMemory:
    """The largest memory of this process and its descendants, summed, while it is running; ``skip``: processes
    of the tree that are not the measured backend's (the other backend's, kept alive for its later repeats)."""

    def __init__(self, skip=lambda process: False):
        self.peak_bytes = 0
        self.skip = skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # it ended between the listing and the reading
                    total += 0 if self.skip(process) else _proportional(process)
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _fork_server(process: psutil.Process) -> bool:
    """The hpc backend's fork server (multiprocessing's), which outlives its runs: no part of a dask run."""
    return any("forkserver" in part for part in process.cmdline())


def _proportional(process: psutil.Process) -> int:
    """PSS where the system reports it (Linux): the fork server's pages its workers share are not counted thrice."""
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return process.memory_info().rss


def per_partition_overhead_s(record: RunRecord) -> float:
    units = record.workers
    workers = len({w.worker_id for w in units})
    return (workers * record.summary.wall_s - sum(w.total_s for w in units)) / len(units)


def figures(records: list[RunRecord], peak_bytes: int, cold: RunRecord) -> dict:
    first = cold.backend_info
    before = first.get("fork_server_start_s", first.get("dask", {}).get("cluster_start_s"))

    def summary(values: list[float]) -> dict:
        s = spread(values)
        return {"median": s.median, "min": s.min, "max": s.max, "n": s.n}

    return {
        "samples_per_s": summary([r.summary.samples_per_s for r in records]),
        "wall_s": summary([r.summary.wall_s for r in records]),
        "start_before_clock_s": before,
        "worker_startup_s": summary([max(w.startup_s for w in r.workers) for r in records]),
        "peak_tree_pss_bytes": peak_bytes,
        "overhead_per_partition_s": summary([per_partition_overhead_s(r) for r in records]),
        "partitions": len(records[0].workers),
        "run_ids": [r.run_id for r in records],
    }


def compare(args: argparse.Namespace) -> int:
    options = {"workers": args.workers, "runtime": args.runtime}
    request = RunRequest(backend="hpc", backend_options=options, gb=args.gb, partition_mb=args.partition_mb,
                         precision=args.precision, threads=args.threads, results=args.results)  # fmt: skip
    ready = request.check()
    plans = {"hpc": request.plan(ready)}
    plans["dask"] = replace_plan(plans["hpc"], backend="dask")
    progress = NoProgress()
    # The fork server and the cluster start here, before any measured clock
    cold = {name: run_repeat(plans[name], 0, None, progress, f"{name}: warm-up").record for name in BACKENDS}
    records: dict[str, list[RunRecord]] = {name: [] for name in BACKENDS}
    for number in range(1, args.repeats + 1):
        for name in BACKENDS:
            outcome = run_repeat(plans[name], number, ready.store, progress, f"{name}: {number}", command="bench")
            records[name].append(outcome.record)
    # Apart from the timed runs, and not recorded: hpc's without the Dask cluster (closed here, so that its idle
    # workers are not counted), dask's without the fork server (its cluster starts again first, untimed)
    close_clusters()
    peaks: dict[str, int] = {}
    for name, skip in (("hpc", lambda process: False), ("dask", _fork_server)):
        with TreeMemory(skip) as memory:
            run_repeat(plans[name], 0, None, progress, f"{name}: memory")
        peaks[name] = memory.peak_bytes
    out = {
        "machine": machine_label(this_machine()),
        "data": {"gb": args.gb, "partition_mb": args.partition_mb, "samples": plans["hpc"].data.samples},
        "workers": args.workers,
        "threads": args.threads or default_threads(),
        "runtime": args.runtime,
        "precision": args.precision,
        "repeats": args.repeats,
        "backends": {name: figures(records[name], peaks[name], cold[name]) for name in BACKENDS},
    }
    hpc, dask = (out["backends"][n]["samples_per_s"]["median"] for n in BACKENDS)
    out["dask_throughput_vs_hpc"] = dask / hpc
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cai_bench.benches.dask_vs_hpc", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--gb", type=float, default=0.2)
    parser.add_argument("--partition-mb", type=float, default=10.0)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--workers", type=positive_int, default=default_threads(), help="default: one per core")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino"))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--results", default="results/dask-vs-hpc")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    advice = {"memory": "lower --workers or --partition-mb", "time": "lower --gb", "other": "see the errors it names"}
    return finish("bench-dask", lambda: compare(args), advice)


if __name__ == "__main__":
    sys.exit(main())
