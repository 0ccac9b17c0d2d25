"""One rank of a run, as a process of its own, for the comm tests that kill a rank:
``python tests/comm_rank.py SPEC_JSON``. It connects, says "ready" on stdout, waits for a line on stdin, then
runs ``spec["op"]`` and prints "ok" or the error's line."""

import json
import sys
import time

from cai_bench import comm

spec = json.loads(sys.argv[1])
communicator = comm.connect(spec["urls"], spec["rank"], spec["world_size"], spec["run_id"], spec["key"],
                            spec["timeout_s"])  # fmt: skip
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
try:
    if spec["op"] == "barrier":
        communicator.barrier()
    else:
        communicator.allreduce(spec["rank"] + 1, "sum")
    print("ok", flush=True)
except comm.CommError as exc:
    print(f"error after {time.monotonic() - started:.2f} s: {exc}", flush=True)
communicator.close()
