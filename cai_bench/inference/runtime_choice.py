"""``--runtime auto``: which installed runtime, at which precision, runs a worker of this machine fastest.

The driver asks once, before its clock starts (a sweep once per batch size). Each candidate, a runtime at a
precision it takes, is started as a worker would start it (the worker's lanes and threads, an export made into
the cache first where it needs one) and runs the same probe partition through the worker's own ``run_partition``:
one pass to warm up, then ``PROBE_PASSES`` timed passes, the candidates taking turns so a slow spell of the
machine hits each alike. Its time is the best of its timed passes, compute only.

The rule (``decide_runtime``): of the candidates whose predictions on the probe partition are within
PRECISION_TOLERANCE of torch fp32's, the fastest fp32 runtime, where candidates within TIE of each other are
tied and the first in a fixed order (torch, onnxruntime, openvino) wins; a reduced precision (bf16) replaces it
only where it is at least 10% faster (the precision probe's rule). That check always runs: where
torch fp32 is not a candidate (``--precision bf16`` asked for), a torch fp32 pass is made for it alone; where torch
cannot run the weights (an export given as ``--weights``), an fp32 candidate of the export's runtime stands in,
and the probe says so; with no fp32 at all, no reduced precision can be checked and none is chosen. The probe
batch is the run's batch size, up to PROBE_MAX_BATCH per lane (the probe's own time), and the record says which,
with every candidate's time the choice was made from. A run that asks again takes the kept answer (below), so
the choice does not follow the machine's noise from one run to the next. bf16
is a candidate only where the CPU has it natively (elsewhere it is emulated and never faster); OpenVINO's int8
only where the CPU has int8 dot products (VNNI, AMX: without them it was slower than fp32), and it starts only
where it is within the tolerance on a held-out batch too; ONNX Runtime's int8 only by explicit choice.

A runtime whose package is missing is skipped and named. FORCE_RUNTIME_ENV replaces the probe's answer (a
runtime, or runtime:precision), so that tests can stand for a machine that answers either way.

The answer belongs to the machine (host, CPU, its flags and the cores this process may use, the installed
packages), the weights, the requested precision, the worker's layout and the probe batch: it is kept in the
cache (``probes/``) under those, and a later run that asks the same question takes it at once, with when it was
measured in its record. Anything of the key that changes asks again; ``--reprobe`` (REPROBE_ENV) always does.
While the probe runs, ``say`` is told what it is doing and what it found.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cai_bench import __version__
from cai_bench.core.choices import REPROBE_ENV, RUNTIME_PRECISIONS, RUNTIMES
from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, file_sha256, loads_json, write_json_atomic
from cai_bench.core.machine import int8_dot_product_cpu, machine_identity, native_bf16_cpu
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import utc_now
from cai_bench.data.partitions import Partition
from cai_bench.inference.loop import model_worker, prepare_model
from cai_bench.inference.runtimes import RUNTIME_PACKAGES
from cai_bench.inference.worker import PRECISION_TOLERANCE, EngineOptions, probe_arrays, torch_threads

FORCE_RUNTIME_ENV = "CAI_BENCH_FORCE_RUNTIME"
PROBE_CACHE_VERSION = 1
PROBE_PER_LANE = 128  # galaxies per lane in the probe partition where no batch size is given
PROBE_MAX_BATCH = 512  # the largest batch per lane the probe times: 3 passes x each candidate, before the run
PROBE_PASSES = 2  # timed passes after the warm-up
MARGIN = 0.9  # a reduced precision must take at most this share of the fp32 choice's time
TIE = 0.03  # candidates this close to the fastest are tied: the first in ORDER wins, never the noise
BASELINE = ("torch", "fp32")


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str
    seconds: float | None = None  # best timed pass over the probe partition, compute only
    max_difference: float | None = None  # largest |dz| from torch fp32's predictions on it
    skipped: str | None = None  # why it was not timed
    checked_against: str | None = None  # what max_difference is measured from (torch fp32, else what stood in)


@dataclass(frozen=True)
class Layout:
    """How a worker of the run splits its threads: what the probe starts each candidate with."""

    lanes: int
    intra_threads: int


def forced_runtime() -> tuple[str, str | None] | None:
    """FORCE_RUNTIME_ENV's answer (runtime, precision or None), or None when it is not set."""
    text = os.environ.get(FORCE_RUNTIME_ENV, "").strip().lower()
    if not text:
        return None
    runtime, _, precision = text.partition(":")
    if runtime not in RUNTIMES or (precision and precision not in RUNTIME_PRECISIONS[runtime]):
        raise UserError(f"{FORCE_RUNTIME_ENV}={text!r}: give one of {', '.join(RUNTIMES)}[:precision], or unset it")
    return runtime, precision or None


def installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec(RUNTIME_PACKAGES[runtime][0]) is not None


# The reduced precisions auto weighs, where the CPU computes them natively: (runtime, precision)
AUTO_REDUCED = {("torch", "bf16"), ("openvino", "bf16"), ("openvino", "int8")}


def candidates_for(precision: str, native_bf16: bool, native_int8: bool = False) -> list[tuple[str, str]]:
    """Every (runtime, precision) the probe weighs for a requested ``precision``: under "auto" each runtime's
    fp32, bf16 where it is native and OpenVINO's int8 where the CPU has int8 dot products; else each runtime that
    runs ``precision``."""
    if precision != "auto":
        return [(r, precision) for r in RUNTIMES if precision in RUNTIME_PRECISIONS[r]]
    native = {"bf16": native_bf16, "int8": native_int8}
    return [(r, p) for r in RUNTIMES for p in RUNTIME_PRECISIONS[r]
            if p == "fp32" or ((r, p) in AUTO_REDUCED and native[p])]  # fmt: skip


def _fastest(group: list[Candidate]) -> tuple[Candidate, bool]:
    """The fastest of ``group``, the first in the fixed order among those within TIE of it; whether it was a tie."""
    best = min(c.seconds for c in group)
    tied = [c for c in group if c.seconds <= best * (1 + TIE)]
    order = {(r, p): i for i, (r, p) in enumerate((r, p) for p in RUNTIME_PRECISIONS["torch"] for r in RUNTIMES)}
    return min(tied, key=lambda c: (order.get((c.runtime, c.precision), len(order)), c.seconds)), len(tied) > 1


def decide_runtime(candidates: list[Candidate], tolerance: float = PRECISION_TOLERANCE) -> tuple[Candidate, str]:
    """The rule, apart from the timing: of the candidates within ``tolerance``, the fastest in fp32 (``_fastest``),
    replaced by the fastest reduced precision only where that takes at most MARGIN of its time. A candidate that
    could not be checked (no fp32 reference) is weighed only in fp32."""
    timed = [c for c in candidates if c.seconds is not None]
    if not timed:
        raise UserError("--runtime auto: no runtime could be started here: " + _skipped_text(candidates))
    passed = [c for c in timed if (c.max_difference is None and c.precision == "fp32")
              or (c.max_difference is not None and c.max_difference <= tolerance)]  # fmt: skip
    if not passed:
        unchecked = ", ".join(f"{c.runtime} {c.precision}" for c in timed if c.max_difference is None)
        raise UserError(f"--runtime auto: no candidate passed the check against torch fp32 ({unchecked or 'none'}"
                        f" could not be checked: no fp32 reference); give --runtime and --precision")  # fmt: skip
    full = [c for c in passed if c.precision == "fp32"]
    reduced = [c for c in passed if c.precision != "fp32"]
    choice, tied = _fastest(full or reduced)
    why = f"the fastest {choice.precision} runtime within {tolerance:g} of torch fp32"
    if tied:
        why += f" (others within {TIE:.0%} of it: tied, and the first of {', '.join(RUNTIMES)} taken)"
    if full and reduced:
        quick, _ = _fastest(reduced)
        if quick.seconds <= MARGIN * choice.seconds:
            choice = quick
            why = f"{quick.precision}: at least 10% faster than the fastest fp32, within {tolerance:g} of torch fp32"
    return choice, why


def _skipped_text(candidates: list[Candidate]) -> str:
    return "; ".join(f"{c.runtime} {c.precision}: {c.skipped}" for c in candidates if c.skipped) or "none tried"


def probe_partition(runtime: str, samples: int) -> Partition:
    """The probe's galaxies as the runtime's worker reads a partition: torch tensors for torch, numpy else."""
    images, magnitudes = probe_arrays(samples)
    ids, redshift = np.arange(samples, dtype=np.int64), np.zeros(samples, np.float32)
    ref = PartitionRef(path="probe", index=-1, samples=samples, bytes=0, sha256="")
    if runtime == "torch":
        import torch  # the torch worker's partitions are tensors: only where torch is a candidate

        tensors = [torch.from_numpy(a) for a in (images, magnitudes, redshift, ids)]
        return Partition(ref, *tensors, load_s=0.0)
    return Partition(ref, images, magnitudes, redshift, ids, load_s=0.0)


@dataclass
class _Started:
    """A candidate started as a worker: its state, its ``run`` and its probe partition."""

    candidate: Candidate
    worker: object
    run: object
    partition: Partition
    passes: list


def _start(candidate: Candidate, options: EngineOptions, models: dict, seed: int) -> _Started:
    options = replace(options, runtime=candidate.runtime, precision=candidate.precision)
    if candidate.runtime == "torch":
        options = replace(options, intra_threads=0)
    start, _, run = model_worker(f"probe-{candidate.runtime}-{candidate.precision}", options,
                                 models[candidate.runtime], seed)  # fmt: skip
    if run is None:
        from cai_bench.inference import engine  # torch: only where torch is a candidate

        run = lambda partition, worker, wait_s: engine.run_partition(partition, worker, options)  # noqa: E731
    samples = options.batch_size * max(1, options.lanes)  # one batch of each lane's share
    return _Started(candidate, start(), run, probe_partition(candidate.runtime, samples), [])


def _reference(predictions: dict, options: EngineOptions, models: dict, seed: int) -> tuple[object, str]:
    """torch fp32's predictions on the probe partition, and what they are: the timed candidate's; else a pass
    made for the check alone; else, where torch cannot run the weights, an fp32 candidate's (the export's own
    runtime); else None, with why."""
    for candidate, predicted in predictions.items():
        if (candidate.runtime, candidate.precision) == BASELINE:
            return predicted, "torch fp32"
    why = "torch cannot run these weights (an export)"
    if "torch" in models:
        try:
            alone = _start(Candidate(*BASELINE), options, models, seed)
            try:
                result = alone.run(alone.partition, alone.worker, 0.0)
            finally:
                alone.worker.close()
            return np.asarray(result.prediction, np.float64), "torch fp32 (a pass for the check alone)"
        except Exception as exc:  # the check then falls back, and says why
            why = f"torch fp32 did not run ({str(exc).splitlines()[0][:160]})"
    stand_in = next(((c, p) for c, p in predictions.items() if c.precision == "fp32"), None)
    if stand_in is not None:
        return stand_in[1], f"{stand_in[0].runtime} fp32, standing in: {why}"
    return None, f"no fp32 reference: {why}"


def time_candidates(candidates: list[Candidate], options: EngineOptions, models: dict, seed: int) -> list[Candidate]:
    """Each candidate started and timed in turns; a candidate that cannot start is skipped with its error."""
    started, out = [], {}
    for candidate in candidates:
        try:
            started.append(_start(candidate, options, models, seed))
        except Exception as exc:  # a runtime that fails here is left out of the choice, with why
            out[candidate] = replace(candidate, skipped=f"did not start ({str(exc).splitlines()[0][:160]})")
    predictions = {}
    try:
        for _ in range(1 + PROBE_PASSES):
            for s in [s for s in started if s.candidate not in out]:
                try:
                    result = s.run(s.partition, s.worker, 0.0)
                except Exception as exc:  # as above: out of the choice, with why
                    out[s.candidate] = replace(s.candidate, skipped=f"failed ({str(exc).splitlines()[0][:160]})")
                    continue
                s.passes.append(result.record.compute_s)
                predictions[s.candidate] = np.asarray(result.prediction, np.float64)
    finally:
        for s in started:
            s.worker.close()
    reference, against = _reference(predictions, options, models, seed)
    for s in [s for s in started if s.candidate not in out]:
        difference = None if reference is None else float(np.abs(predictions[s.candidate] - reference).max())
        out[s.candidate] = replace(s.candidate, seconds=min(s.passes[1:]), max_difference=difference,
                                   checked_against=against)  # fmt: skip
    return [out[c] for c in candidates]


# ---------------------------------------------------------------------------------------------- the cache


def _weights_identity(weights: str | None, seed: int) -> str:
    """What the probe's accuracy check depends on: the weights' bytes (a file's digest, an export's metadata),
    an S3 address as given, or random-init's seed."""
    if not weights:
        return f"random-init seed {seed}"
    path = Path(weights)
    if path.is_dir() and (path / "export.json").is_file():
        return "export " + file_sha256(path / "export.json")
    return file_sha256(path) if path.is_file() else str(weights)


def probe_key(weights: str | None, seed: int, layout: Layout, precision: str, batch: int) -> dict:
    """Everything the probe's answer depends on: where any of it differs, the answer is measured again."""
    return {"version": PROBE_CACHE_VERSION, "cai_bench": __version__, "machine": machine_identity(),
            "native_bf16": native_bf16_cpu(), "native_int8": int8_dot_product_cpu(),
            "installed": [r for r in RUNTIMES if installed(r)],
            "weights": _weights_identity(weights, seed), "precision": precision, "lanes": layout.lanes,
            "intra_threads": layout.intra_threads, "batch": batch}  # fmt: skip


def _probe_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / "probes" / f"{digest}.json"


def cached_probe(key: dict) -> tuple[str, str, dict] | None:
    """The answer kept for ``key``; None where there is none, it is for another key, or it cannot be read."""
    path = _probe_file(key)
    try:
        kept = loads_json(path.read_bytes(), str(path))
    except (OSError, UserError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    probe = kept.get("probe")
    if not isinstance(probe, dict) or kept.get("runtime") not in RUNTIMES:
        return None
    return kept["runtime"], str(kept.get("precision")), {**probe, "cached_from": kept.get("probed_utc")}


def keep_probe(key: dict, runtime: str, precision: str, probe: dict) -> None:
    """The answer kept for the next run that asks the same (written whole or not at all; a cache that cannot be
    written only means the next run probes again)."""
    write_json_atomic(_probe_file(key), {"key": key, "runtime": runtime, "precision": precision, "probe": probe,
                                         "probed_utc": utc_now()})  # fmt: skip


def fixed_choice(reason: str, precision: str) -> tuple[str, str, dict]:
    """Torch without a probe, where the probe cannot speak for the workers (the reference loop, torch.compile,
    workers on other machines)."""
    return "torch", precision, {"requested": "auto", "chose": "torch", "precision": precision, "why": reason}


def choose_runtime(weights: str | None, seed: int, layout: Layout, precision: str = "auto",
                   batch_size: int = PROBE_PER_LANE, say: Callable[[str], None] | None = None,
                   ) -> tuple[str, str, dict]:  # fmt: skip
    """(runtime, precision, what the probe measured and why) for ``--runtime auto`` with ``precision`` requested,
    on this machine, for a worker of ``layout`` running batches of ``batch_size``: the cache's answer where it
    holds one for the same question, else the probe's (kept for the next time)."""
    forced = forced_runtime()
    if forced:
        runtime, forced_precision = forced
        chose = forced_precision or precision
        if chose not in ("auto", *RUNTIME_PRECISIONS[runtime]):
            raise UserError(f"{FORCE_RUNTIME_ENV}={runtime}: it runs no --precision {chose}")
        return runtime, chose, {"requested": "auto", "chose": runtime, "precision": chose,
                                "why": f"forced by {FORCE_RUNTIME_ENV}"}  # fmt: skip
    say = say or (lambda text: None)
    batch = max(1, min(batch_size, PROBE_MAX_BATCH))
    key = probe_key(weights, seed, layout, precision, batch)
    cached = None if os.environ.get(REPROBE_ENV) else cached_probe(key)
    if cached is not None:
        say(f"runtime auto: {cached[0]} {cached[1]}, as the probe of {cached[2]['cached_from']} found on this "
            "machine for the same question (--reprobe measures again)")  # fmt: skip
        return cached
    runtime, chose, probe = _probe(weights, seed, layout, precision, batch_size, say)
    keep_probe(key, runtime, chose, probe)
    return runtime, chose, probe


def _probe(weights: str | None, seed: int, layout: Layout, precision: str, batch_size: int,
           say: Callable[[str], None]) -> tuple[str, str, dict]:  # fmt: skip
    """The probe itself: each installed candidate started, timed and checked, then the rule."""
    candidates, models = [], {}
    for runtime, wanted in candidates_for(precision, native_bf16_cpu(), int8_dot_product_cpu()):
        if not installed(runtime):
            extra = RUNTIME_PACKAGES[runtime][1]
            candidates.append(Candidate(runtime, wanted, skipped=f"not installed (pip install 'cai-bench[{extra}]')"))
            continue
        try:
            if runtime not in models:
                models[runtime] = prepare_model(weights, runtime, seed)[0]
        except UserError as exc:  # torch beside an export given as --weights, or no torch to export with
            candidates.append(Candidate(runtime, wanted, skipped=str(exc)))
            continue
        candidates.append(Candidate(runtime, wanted))
    batch = max(1, min(batch_size, PROBE_MAX_BATCH))
    options = EngineOptions(batch_size=batch, lanes=layout.lanes, intra_threads=layout.intra_threads,
                            verify_checksums=False)  # fmt: skip
    to_time = [c for c in candidates if c.skipped is None]
    say(
        f"choosing the fastest runtime: {', '.join(f'{c.runtime} {c.precision}' for c in to_time)} each timed on "
        f"{batch * layout.lanes:,} galaxies (once for this machine, model and batch; kept for the next run)"
    )
    with torch_threads(layout.intra_threads if any(c.runtime == "torch" for c in to_time) else None):
        timed = time_candidates(to_time, options, models, seed)
    weighed = [next((t for t in timed if (t.runtime, t.precision) == (c.runtime, c.precision)), c) for c in candidates]
    choice, why = decide_runtime(weighed)
    say("runtime probe: " + ", ".join(f"{c.runtime} {c.precision} {c.seconds:.2f} s" for c in weighed
                                      if c.seconds is not None) + f": {choice.runtime} {choice.precision}")  # fmt: skip
    probe = {"requested": "auto", "precision_requested": precision, "chose": choice.runtime,
             "precision": choice.precision, "why": why, "lanes": layout.lanes,
             "intra_threads": layout.intra_threads, "samples": batch * layout.lanes, "batch": batch,
             "batch_note": "the run's batch size" if batch == batch_size else
             f"the run's batch size {batch_size} capped at {PROBE_MAX_BATCH} (the probe's own time)",
             "checked_against": next((c.checked_against for c in weighed if c.checked_against), None),
             "candidates": [asdict(c) for c in weighed]}  # fmt: skip
    return choice.runtime, choice.precision, probe
