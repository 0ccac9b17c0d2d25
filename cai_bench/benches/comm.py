"""``cai-bench comm bench``: the latency of barrier, bcast and allreduce on a channel, per world size and message
size, with the ranks as processes of this machine (``comm/bench_worker.py``); one record per point in the store's
``comm.jsonl``, beside the machine it was measured on. What it measured also sets the channel policy's model of
that channel (``gathering.measured_models``) for runs on this machine that give ``--comm-hint``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cai_bench import comm
from cai_bench.comm.s3_channel import purge
from cai_bench.comm.seal import Sealer
from cai_bench.core.errors import UserError, one_line, redact
from cai_bench.core.machine import capture_environment
from cai_bench.core.records import SCHEMA_VERSION, new_run_id, utc_now
from cai_bench.measure.metrics import spread
from cai_bench.store.jsonl import ResultsStore

OPS = ("barrier", "bcast", "allreduce")


def _ranks(
    url: str, world_size: int, sizes: list[int], ops: list[str], repeats: int, warmup: int, timeout_s: float
) -> tuple[str, dict]:
    """One world: its processes started, waited for, and rank 0's answer."""
    run_id, key = new_run_id(), comm.new_key()
    base = {
        "urls": [url],
        "world_size": world_size,
        "run_id": run_id,
        "key": key,
        "ops": ops,
        "sizes": sizes,
        "repeats": repeats,
        "warmup": warmup,
        "timeout_s": timeout_s,
    }
    # The spec (the run's secret in it) goes through each rank's stdin: a command line is anyone's to read (ps)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cai_bench.comm.bench_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    for rank, proc in enumerate(procs):
        proc.stdin.write(json.dumps({**base, "rank": rank}) + "\n")
        proc.stdin.flush()
    deadline = time.monotonic() + timeout_s * (4 + len(ops) * len(sizes) * (repeats + warmup))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        raise UserError(f"comm bench over {redact(url)}: {world_size} ranks did not finish in time") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        if url.startswith("s3://"):
            purge(url, comm.space(key, run_id))
    failed = [(r, err) for r, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=False)) if proc.returncode != 0]
    if failed:
        rank, err = failed[0]
        raise UserError(
            f"comm bench over {redact(url)}, {world_size} ranks: rank {rank} failed: "
            f"{one_line(err.strip().splitlines()[-1] if err.strip() else 'no message')}"
        )
    return run_id, json.loads(outputs[0][0])


def comm_bench(
    urls: list[str],
    world_sizes: list[int],
    sizes: list[int],
    ops: list[str],
    repeats: int,
    warmup: int,
    timeout_s: float,
    results: str | Path,
) -> Iterator[dict]:
    """Each point's record, as it is stored: a world that fails stops the bench, the points before it kept."""
    for url in urls:
        comm.check_urls([url])
    if any(op not in OPS for op in ops):
        raise UserError(f"--ops: one or more of {', '.join(OPS)}")
    if any(p < 1 for p in world_sizes) or any(s < 0 for s in sizes) or repeats < 1 or warmup < 0:
        raise UserError("--world-sizes from 1, --sizes from 0 bytes, --repeats from 1, --warmup from 0")
    store = ResultsStore(results)
    store.check_writable()
    environment = capture_environment(with_torch=False)
    for url in urls:
        for world_size in world_sizes:
            run_id, answer = _ranks(url, world_size, sizes, ops, repeats, warmup, timeout_s)
            for point in answer["points"]:
                record = _record(run_id, url.split("://")[0], point, world_size, repeats, warmup, environment)
                record.update(url=redact(url), connect_s=answer["connect_s"], channel_info=answer["channels"][0])
                store.append_comm(record)
                yield record
    run_id = new_run_id()
    for point in seal_points(sizes, repeats):  # what the seal adds to every message above, on its own
        record = _record(run_id, "seal", point, 1, repeats, 0, environment)
        store.append_comm(record)
        yield record


def _record(run_id: str, channel: str, point: dict, world_size: int, repeats: int, warmup: int,
            environment: dict) -> dict:  # fmt: skip
    figures = spread(point["samples_s"])
    return {
        "kind": "comm", "schema_version": SCHEMA_VERSION, "run_id": run_id, "created_utc": utc_now(),
        "channel": channel, "op": point["op"], "world_size": world_size, "nbytes": point["nbytes"],
        "repeats": repeats, "warmup": warmup, "median_s": figures.median, "q1_s": figures.q1, "q3_s": figures.q3,
        "min_s": figures.min, "max_s": figures.max, "samples_s": point["samples_s"], "environment": environment,
    }  # fmt: skip


def seal_points(sizes: list[int], repeats: int) -> list[dict]:
    """The cost of authenticating one message of each size, in this process: a sender's seal and its receiver's
    check (HMAC-SHA256 over the frame, and the copy each makes). A sample is the mean of a batch of messages, so
    that microseconds are not left to the clock's resolution."""
    key, points = comm.new_key(), []
    for nbytes in sizes:
        sender, receiver = Sealer(key, "comm-bench", 0), Sealer(key, "comm-bench", 1)
        frame = bytes(max(1, nbytes))
        batch = max(1, min(1000, (1 << 24) // max(1, nbytes)))
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(batch):
                if receiver.open("direct", 0, sender.seal("direct", 1, frame)) is None:
                    raise RuntimeError("internal: a frame sealed with the run's key failed its own check")
            samples.append((time.perf_counter() - started) / batch)
        points.append({"op": "seal+open", "nbytes": nbytes, "samples_s": samples})
    return points
