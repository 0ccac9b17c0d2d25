"""How close to the hardware a run ran: the GFLOP/s it achieved (samples/s x the model's FLOPs per galaxy) and
that as a share of this machine's measured fp32 peak (the MFU).

The peak is measured, not read from a datasheet: a large fp32 matrix product (torch.mm, PEAK_SIZE square) timed
at the run's thread count, the best of PEAK_REPEATS after a warm-up. It is kept in the cache (``peaks/``) per
machine, thread count and instruction-set limit, so a run pays for it once per machine, after its clock stops.
The instruction-set limits the runtimes read (``machine.ISA_LIMITS``) are part of the key: a peak measured under
``ONEDNN_MAX_CPU_ISA=AVX2`` is AVX2's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time

from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, loads_json, write_json_atomic
from cai_bench.core.machine import isa_limits
from cai_bench.core.records import utc_now

PEAK_SIZE = 2048  # 17 GFLOP a product: long enough to time, short enough to run at every new machine
PEAK_REPEATS = 5
PEAK_VERSION = 1


def achieved_gflops(samples_per_s: float | None, flops_per_sample: int | None) -> float | None:
    if not samples_per_s or not flops_per_sample:
        return None
    return samples_per_s * flops_per_sample / 1e9


def mfu(gflops: float | None, peak: dict | None) -> float | None:
    """``gflops`` as a share of the peak record ``peak`` (None where either is missing)."""
    if gflops is None or not peak or not peak.get("gflops"):
        return None
    return gflops / peak["gflops"]


def measure_gemm_peak(threads: int, size: int = PEAK_SIZE, repeats: int = PEAK_REPEATS) -> dict:
    """The fp32 GFLOP/s of a ``size`` x ``size`` matrix product on ``threads`` threads, best of ``repeats``."""
    import torch  # heavy: only where a peak is measured

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up: the library's threads and buffers
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return {"gflops": 2 * size**3 / best / 1e9, "threads": threads, "size": size, "repeats": repeats,
            "how": f"torch.mm fp32 {size}x{size}, best of {repeats} after a warm-up", "isa_limits": isa_limits(),
            "measured_utc": utc_now()}  # fmt: skip


def _peak_file(machine: dict, threads: int):
    key = {"version": PEAK_VERSION, "machine": machine, "threads": threads, "isa_limits": isa_limits()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / "peaks" / f"{digest}.json", key


def gemm_peak(machine: dict, threads: int, measure=measure_gemm_peak) -> dict:
    """This machine's peak at ``threads`` from the cache, measured and kept there first where missing
    (``machine``: what identifies it, as the runtime probe's cache names it)."""
    path, key = _peak_file(machine, threads)
    with contextlib.suppress(OSError, UserError):
        kept = loads_json(path.read_bytes(), str(path))
        if isinstance(kept, dict) and kept.get("key") == json.loads(json.dumps(key, default=str)):
            return {**kept["peak"], "cached": True}
    peak = measure(threads)
    write_json_atomic(path, {"key": key, "peak": peak})
    return peak
