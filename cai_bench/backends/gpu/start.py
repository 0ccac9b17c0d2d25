"""A device worker's start-up: the model on the device, precision ``auto`` resolved by a probe that times each
candidate in turns, graphs captured, a warm-up; all timed as start-up."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from cai_bench.backends.gpu.devices import PROBE_BATCH
from cai_bench.backends.gpu.pipeline import autocast, capture_graphs, captured_graph, forward_batch, new_pipeline
from cai_bench.core.choices import GPU_PRECISIONS
from cai_bench.core.errors import UserError, describe
from cai_bench.core.records import RANDOM_INIT, WeightsInfo
from cai_bench.inference.worker import (
    PRECISION_TOLERANCE,
    WorkerState,
    forced_precision,
)


def _probe_runner(model, image, magnitude, precision: str, graphs: bool) -> tuple[Callable, str | None]:
    """One candidate precision on the probe batch as the worker will run it: replays of a CUDA graph captured
    for it (``graphs``), else plain launches. Returns the call, and why a graph could not be captured (then
    plain launches are timed)."""
    import torch

    from cai_bench.inference.engine import set_tf32

    device, why = image.device, None
    set_tf32(precision == "tf32")
    run = functools.partial(model, image, magnitude)
    if graphs:
        try:
            graph, captured = captured_graph(device, functools.partial(autocast, device, precision), run)

            def run():
                graph.replay()
                return captured
        except Exception as exc:  # a step that cannot be captured: plain launches, as the worker then runs
            torch.cuda.synchronize(device)
            why = describe(exc)
    return run, why


def _time_once(run, device, precision: str) -> tuple[float, object]:
    """One pass of ``run`` under ``precision``, timed by CUDA events: seconds and the output."""
    import torch

    from cai_bench.inference.engine import set_tf32

    set_tf32(precision == "tf32")
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began.record()
    with autocast(device, precision):
        output = run().float()
    ended.record()
    ended.synchronize()
    return began.elapsed_time(ended) / 1e3, output


def _probe_seconds(runners: dict, device, rounds: int = 4) -> tuple[dict, dict]:
    """The candidates take turns, a pass each per round (as the CPU probe does), so that a GPU still clocking up
    does not favour the ones timed last; each one's best pass after its first. Seconds and outputs."""
    times: dict[str, list[float]] = {p: [] for p in runners}
    outputs = {}
    for _ in range(rounds):
        for precision, run in runners.items():
            seconds, output = _time_once(run, device, precision)
            times[precision].append(seconds)
            outputs[precision] = output.clone()
    return {p: min(t[1:]) for p, t in times.items()}, outputs


def choose_gpu_precision(model, device, channels_last: bool, batch: int = PROBE_BATCH,
                         graphs: bool = False) -> tuple[str, dict]:  # fmt: skip
    """For precision "auto" on a GPU: each candidate against fp32 on a probe batch of realistic galaxies (tiled
    to the worker's ``batch`` rows), run as the worker will run it (``_probe_runner``), timed taking turns
    (``_probe_seconds``); the fastest that is at least 10% faster and within PRECISION_TOLERANCE wins."""
    import torch

    from cai_bench.inference.engine import native_bf16, probe_inputs, set_tf32

    forced = forced_precision(GPU_PRECISIONS[1:])
    if forced:
        return forced
    image, magnitude = probe_inputs(device, channels_last, PROBE_BATCH)
    repeats = -(-batch // PROBE_BATCH)
    image = image.repeat(repeats, 1, 1, 1)[:batch].contiguous(memory_format=image_format(channels_last))
    magnitude = magnitude.repeat(repeats, 1)[:batch].contiguous()
    bf16 = native_bf16(device)
    candidates = ["fp32", "tf32", "fp16"] + (["bf16"] if bf16 else [])
    with torch.inference_mode():
        made = {p: _probe_runner(model, image, magnitude, p, graphs) for p in candidates}
        seconds, outputs = _probe_seconds({p: run for p, (run, _) in made.items()}, device)
    graph_errors = {p: why for p, (_, why) in made.items() if why}
    set_tf32(False)
    difference = {p: float((outputs[p] - outputs["fp32"]).abs().max()) for p in candidates}
    good = [p for p in candidates[1:] if seconds[p] < 0.9 * seconds["fp32"] and difference[p] <= PRECISION_TOLERANCE]
    chose = min(good, key=seconds.get) if good else "fp32"
    why = "fastest within tolerance" if good else "nothing 10% faster within tolerance"
    timed = "CUDA graph replays" if graphs and not graph_errors else "plain launches"
    return chose, {
        "chose": chose,
        "why": why,
        "seconds": seconds,
        "max_difference": difference,
        "batch": batch,
        "timed": f"{timed}, CUDA events, candidates taking turns",
        "bf16": "native" if bf16 else "not a candidate: no bf16 in hardware (emulated only)",
        **({"graph_errors": graph_errors} if graph_errors else {}),
    }


def image_format(channels_last: bool):
    import torch

    return torch.channels_last if channels_last else torch.contiguous_format


def start_gpu_worker(worker_id: str, options, weights: str | None, seed: int, cuda_graphs: bool,
                     label: str | None = None):  # fmt: skip
    """Build the model on the device, resolve the precision, make the fixed buffers, compile or capture graphs,
    and run warm-up batches of the full shape: all of it the worker's start-up.

    The fixed batch is ``--batch-size``: batches span partitions (``PartitionStream``), so only a stream's last
    batch is padded. ``label``: the device as the run names it, where the process sees it under another name (its
    only visible GPU, ``cuda:0``)."""
    import torch

    from cai_bench.inference.engine import set_tf32
    from cai_bench.model.astromae import build_model
    from cai_bench.model.checkpoint import load_weights
    from cai_bench.model.inference import output_in_float32, prepare_for_inference

    started = time.perf_counter()
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one batch shape: cuDNN's fastest algorithms, found once (probe too)
    model = build_model(seed=seed)
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=seed)
    model = model.to(device).eval()
    choices = {"engine": "fast", "precision_requested": options.precision, **prepare_for_inference(model)}
    precision = options.precision
    if precision in ("auto", "bf16", "fp16"):  # before the probe, which then times what will run
        float32_output = output_in_float32(model)  # under fp32 and tf32 it computes as the plain layer
    if precision == "auto":
        if device.type == "cuda":
            precision, choices["precision_probe"] = choose_gpu_precision(
                model, device, choices["channels_last"], options.batch_size, cuda_graphs and not options.compile
            )  # fmt: skip
        else:
            precision = "fp32"  # the CPU device only stands in for a GPU in tests
    if device.type != "cuda" and precision in ("tf32", "fp16"):
        raise UserError(f"--precision {precision} needs a CUDA device")
    if precision not in GPU_PRECISIONS:
        raise UserError(f"--precision {precision}: a device worker runs {', '.join(GPU_PRECISIONS)}")
    set_tf32(device.type == "cuda" and precision == "tf32")
    if precision in ("bf16", "fp16"):  # the output in float32, not rounded to the half type's coarse steps
        choices["float32_output_layer"] = float32_output
    choices["precision"] = precision
    context = functools.partial(autocast, device, precision)
    worker = WorkerState(worker_id, model, info, 0.0, 0.0, precision, choices["channels_last"], choices)
    batch = options.batch_size
    choices["batch_size_effective"] = batch
    worker.pipeline = new_pipeline(device, batch, choices["channels_last"])
    warm = time.perf_counter()
    if options.compile:
        mode = "reduce-overhead" if device.type == "cuda" else None  # its own CUDA graphs
        worker.model = torch.compile(worker.model, mode=mode)
    elif cuda_graphs:
        if device.type != "cuda":
            raise UserError("--cuda-graphs needs a CUDA device")
        try:
            capture_graphs(worker, context)
        except Exception as exc:  # a model step that cannot be captured: plain launches, and the record says why
            worker.pipeline.graphs.clear()
            worker.pipeline.outputs.clear()
            torch.cuda.synchronize(device)
            choices["cuda_graphs_error"] = describe(exc)
    with torch.inference_mode(), context():
        for slot in (0, 1, 0):  # both slots, so that compilation sees every buffer it will be given
            forward_batch(worker, slot)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    choices.update({"compile": options.compile, "cuda_graphs": bool(worker.pipeline.graphs),
                    "device": label or str(device), "cudnn_benchmark": device.type == "cuda"})  # fmt: skip
    if options.compile or worker.pipeline.graphs:
        choices["compile_or_capture_s"] = end - warm
    if device.type == "cuda":
        choices.update(_gpu_facts(device))
        # The probe, the graph capture and the warm-up peak apart: the records' peak is the run's own
        choices["startup_peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    worker.startup_s, worker.warmup_batch_s = end - started, end - warm
    return worker


def _gpu_facts(device) -> dict:
    import torch

    properties = torch.cuda.get_device_properties(device)
    return {
        "gpu_name": properties.name,
        "gpu_memory_bytes": properties.total_memory,
        "gpu_capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
