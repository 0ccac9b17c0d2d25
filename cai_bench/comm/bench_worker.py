"""One rank of ``cai-bench comm bench``: ``python -m cai_bench.comm.bench_worker``, its spec (JSON, with the run's
secret) on the first line of stdin.

It connects, then for each operation and message size runs the warm-ups and repeats, each after a barrier so that
the ranks start together, and times each call. The latency of a repeat is the slowest rank's (the operation is
done when the last rank is), which rank 0 learns by a max-allreduce of every rank's times and prints as one JSON
line on stdout.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from cai_bench import comm


def _payload(nbytes: int) -> np.ndarray:
    return np.ones(max(1, nbytes // 8), np.float64)


def _call(communicator: comm.Communicator, op: str, payload: np.ndarray) -> None:
    if op == "barrier":
        communicator.barrier()
    elif op == "bcast":
        communicator.bcast(payload if communicator.rank == 0 else None, 0, size_hint=payload.nbytes)
    elif op == "allreduce":
        communicator.allreduce(payload, "sum", size_hint=payload.nbytes)
    else:
        raise comm.CommError(f"comm bench measures barrier, bcast and allreduce, not {op!r}")


def measure(spec: dict) -> dict:
    started = time.perf_counter()
    communicator = comm.connect(
        spec["urls"], spec["rank"], spec["world_size"], spec["run_id"], spec["key"], spec["timeout_s"]
    )
    connect_s = time.perf_counter() - started
    points = []
    with communicator:
        for op in spec["ops"]:
            for nbytes in [0] if op == "barrier" else spec["sizes"]:
                payload = _payload(nbytes)
                times = []
                for repeat in range(spec["warmup"] + spec["repeats"]):
                    communicator.barrier()
                    t0 = time.perf_counter()
                    _call(communicator, op, payload)
                    if repeat >= spec["warmup"]:
                        times.append(time.perf_counter() - t0)
                slowest = communicator.allreduce(np.array(times), "max")
                points.append(
                    {"op": op, "nbytes": int(payload.nbytes) if nbytes else 0, "samples_s": [float(t) for t in slowest]}
                )
        slowest_connect = communicator.allreduce(connect_s, "max")
        info = communicator.info()
    return {"points": points, "connect_s": slowest_connect, "channels": info["channels"]}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0] if argv else sys.stdin.readline())
    try:
        out = measure(spec)
    except comm.CommError as exc:
        print(f"rank {spec['rank']}: {exc}", file=sys.stderr)
        return 2
    if spec["rank"] == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
