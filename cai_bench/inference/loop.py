"""The loop every worker runs, whatever carries its units, importable without torch: a worker that never runs
the model through torch (the Lambda handler's no-model mode, a worker on another runtime) still runs this loop.
Beside it, what a driver does for its workers before its clock starts (``prepare_model``, ``auto_precision``)
and what a worker runs for its runtime (``model_worker``).

``engine`` supplies the default ``load`` and ``run`` (read a partition, run the model over it) and the
``WorkerState`` that ``start`` returns; a worker with its own passes them in. ``engine`` and ``model.export``
import torch, so they are imported only where a worker or a driver runs the model through torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cai_bench.core.errors import UserError, describe
from cai_bench.core.plan import PartitionRef
from cai_bench.core.records import PartitionResult
from cai_bench.inference import runtimes
from cai_bench.inference.worker import EngineOptions
from cai_bench.model.export_format import is_export, read_export

# A unit as a worker loop sees it: (its place in the run's list of work, the partition)
LoopUnit = tuple[int, PartitionRef]


def worker_loop(
    start: Callable[[], Any],
    next_units: Callable[[bool], list[LoopUnit]],
    options: EngineOptions,
    on_done: Callable[[int, PartitionResult], None],
    on_failed: Callable[[int, str], None] | None = None,
    *,
    load: Callable[[PartitionRef], Any] | None = None,
    run: Callable[..., Any] | None = None,
    read_ahead: int = 1,
    drain: Callable[[Any], list] | None = None,
) -> Any:
    """The loop every worker runs, whatever carries its units: hpc node processes, SLURM array tasks, the cpu
    backend, GPU device processes and the Lambda handler.

    ``next_units(ahead)`` asks for work: ``ahead=False`` when the worker has nothing (an empty answer ends the
    loop), ``ahead=True`` while it starts its last unit, to read one more in the background (an empty answer
    just means not now). The first units are read while the worker starts (``start``), then ``read_ahead`` units
    are read behind the one that runs, each by a thread of its own, so reading overlaps compute. A unit that
    raises goes to ``on_failed`` with its error, and the loop goes on; without ``on_failed`` the error ends the
    loop. Returns the started worker (None when there was no work), for its weights and choices; the caller
    closes it.

    ``load`` (a reference to what ``run`` takes) and ``run`` (that, the worker and the seconds waited, to a
    PartitionResult) replace reading and running a partition. With ``drain``, ``run`` streams: called as
    ``run(partition, worker, wait_s, position)``, it returns the units that finished meanwhile, earlier ones
    included, as ``(position, PartitionResult or error message)``, and ``drain(worker)`` returns the rest
    before the worker waits for work (the GPU worker's batches span partitions).
    """
    if load is None or run is None:
        from cai_bench.inference import engine  # torch: only in the workers that run the model through it

        load = load or (lambda ref: engine.load_partition(ref, options))
        run = run or (lambda partition, worker, wait_s: engine.run_partition(partition, worker, options, wait_s=wait_s))
    run = run if drain is not None else _as_stream(run)

    held: list[tuple[int, Future]] = []
    worker = None
    with ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix="cai-prefetch") as reader:

        def ask(ahead: bool) -> int:
            units = next_units(ahead)
            for position, ref in units:
                held.append((position, reader.submit(load, ref)))
            return len(units)

        ask(ahead=False)
        if not held:
            return None
        worker = start()
        try:
            while held:
                position, pending = held[0]
                try:
                    waited = time.perf_counter()
                    partition = pending.result()
                    wait_s = time.perf_counter() - waited
                    while len(held) <= read_ahead and ask(ahead=True):
                        pass  # keep ``read_ahead`` units reading behind the one about to run
                    finished = run(partition, worker, wait_s, position)
                except Exception as exc:
                    held.pop(0)
                    if on_failed is None:
                        raise
                    on_failed(position, describe(exc))
                else:
                    held.pop(0)
                    del partition
                    _settle(finished, on_done, on_failed)
                if not held:
                    if drain is not None:  # before waiting for work: the driver waits for these to finish
                        _settle(drain(worker), on_done, on_failed)
                    ask(ahead=False)
        except BaseException:
            worker.close()
            raise
    return worker


def _as_stream(run: Callable) -> Callable:
    """A plain ``run`` in the streaming form: one unit in, that unit out, nothing held back."""
    return lambda partition, worker, wait_s, position: [(position, run(partition, worker, wait_s))]


def _settle(finished: list, on_done, on_failed) -> None:
    """A streaming run's finished units: results to ``on_done``, error messages to ``on_failed``."""
    for position, outcome in finished:
        if not isinstance(outcome, str):
            on_done(position, outcome)
        elif on_failed is None:
            raise RuntimeError(outcome)
        else:
            on_failed(position, outcome)


def model_worker(
    worker_id: str, options: EngineOptions, model: str | None, seed: int
) -> tuple[Callable[[], Any], Callable | None, Callable | None]:
    """``start``, ``load`` and ``run`` for ``worker_loop`` on ``options.runtime``: the torch engine (``model``: a
    weights file or None for random-init), or an exported model on ONNX Runtime or OpenVINO (``model``: the
    export's directory, ``prepare_model``), which never imports torch."""
    if options.runtime == "torch":
        from cai_bench.inference import engine  # torch: only in the workers that run the model through it

        return (lambda: engine.start_worker(worker_id, options, weights=model, seed=seed)), None, None
    return (lambda: runtimes.start_worker(worker_id, options, model)), *loop_functions(options)


def loop_functions(options: EngineOptions) -> tuple[Callable | None, Callable | None]:
    """``load`` and ``run`` for ``worker_loop`` on ``options.runtime`` (None, None: the torch engine's)."""
    if options.runtime == "torch":
        return None, None
    return runtimes.loop_functions(options)


def units_from(units: list[LoopUnit]) -> Callable[[bool], list[LoopUnit]]:
    """``next_units`` for a worker given its whole list up front: one unit per request, ahead or not."""
    remaining = list(reversed(units))
    return lambda ahead: [remaining.pop()] if remaining else []


def prepare_model(weights: str | None, runtime: str, seed: int, precision: str = "fp32") -> tuple[str | None, dict]:
    """What the workers of ``runtime`` load, made ready by the driver before its clock starts: for torch the
    weights as given; for the others an export, ``weights`` itself where it is one, else the export of
    ``weights`` (random-init from ``seed`` when None) from the cache, made there first with torch when missing;
    for OpenVINO int8, that export's int8 export (made into the cache first, ``openvino_int8``). Returns it with
    what was done, for the run record."""
    model, done = _prepare_export(weights, runtime, seed)
    if runtime == "openvino" and precision == "int8":
        export, made = runtimes.int8_export(model)
        return export.directory, {**done, **made}
    return model, done


def _prepare_export(weights: str | None, runtime: str, seed: int) -> tuple[str | None, dict]:
    if runtime == "torch":
        if is_export(weights):
            raise UserError(f"{weights}: an exported model; run it with --runtime onnxruntime or openvino")
        return weights, {}
    if is_export(weights):
        read_export(weights, runtime)
        return weights, {"export_made": False}
    if weights and str(weights).startswith("s3:/"):
        raise UserError(f"--runtime {runtime} runs an export: export {weights} here first (cai-bench model export)")
    try:
        from cai_bench.inference.export import cached_export  # torch, to make the export: only where one is made
    except ImportError:
        raise UserError(f"--runtime {runtime} needs an export (--weights EXPORT_DIR), or torch to make one") from None
    export, seconds, cached = cached_export(weights, "openvino" if runtime == "openvino" else "onnx", seed)
    return export.directory, {"export_made": not cached, "export_s": round(seconds, 3)}


def auto_precision(runtime: str, weights: str | None, seed: int, threads: int) -> tuple[str, dict]:
    """What precision "auto" runs as on this machine and ``runtime`` (with what the probe measured), asked once
    by a sweep for all its points: the torch engine's probe, or the export's on its runtime."""
    if runtime == "torch":
        from cai_bench.inference import engine  # torch: the probe runs the model through it

        return engine.auto_precision(seed)
    model, _ = prepare_model(weights, runtime, seed)
    return runtimes.auto_precision(runtime, model, threads)
