"""The Lambda function: ``cai_bench.backends.aws_lambda.handler.handler`` (the image's entry point, and what the
emulator's execution environments import).

One invocation runs the one worker loop (``loop.worker_loop``) over the units in its event, writes each unit's
result in the wire format to ``<results>/unit-NNNNNN.npz`` (a retried unit overwrites its own key) and returns
the records. The model is built once per execution environment, on its first invocation, and kept while the
environment stays warm; torch is imported only then, so importing this module (the init phase) is light and a
no-model invocation never imports it.

The event, where results go and the reply are the wire protocol (``wire.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from cai_bench.backends.aws_lambda import run_secret
from cai_bench.backends.aws_lambda.wire import (
    ForgedInput,
    aggregate_key,
    event_units,
    open_event,
    reply_key,
    result_key,
    write_sealed,
)
from cai_bench.comm import CommError
from cai_bench.core.machine import allowed_cpus
from cai_bench.core.plan import BITS_PER_SAMPLE, PartitionRef
from cai_bench.core.records import RANDOM_INIT, PartitionResult, WeightsInfo, WorkerRecord, encode_result
from cai_bench.data.partitions import read_partition_arrays
from cai_bench.data.s3 import S3Prefix
from cai_bench.inference.gathering import CommConfig, finish_together
from cai_bench.inference.loop import loop_functions, model_worker, units_from, worker_loop
from cai_bench.inference.worker import EngineOptions
from cai_bench.measure.metrics import peak_rss_bytes
from cai_bench.model.export_format import EXPORT_META, read_export

ENVIRONMENT_ID = uuid.uuid4().hex[:12]  # this execution environment, for as long as it lives


@dataclass
class _Warm:
    """What an execution environment keeps between invocations."""

    workers: dict = field(default_factory=dict)  # (options, weights, seed) -> engine.WorkerState
    weights_files: dict = field(default_factory=dict)  # s3:// weights -> the local copy in /tmp
    secrets: dict = field(default_factory=dict)  # a run's secret's ARN -> its value, read once per environment
    invocations: int = 0


_WARM = _Warm()


def _run_secret(ref: str) -> dict:
    if ref not in _WARM.secrets:
        _WARM.secrets[ref] = run_secret.read(ref)
    return _WARM.secrets[ref]


def _fetched(folder: S3Prefix, name: str, staged: dict) -> bytes:
    """An object the driver staged, checked against the digest the sealed event gives for it."""
    data = folder.read(name)
    expected = staged.get(name)
    if expected is None:  # not staged by the driver (weights the user named in S3): nothing to check against
        return data
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise ForgedInput(f"{folder.where(name)}: sha256 {found[:16]}..., not the {expected[:16]}... the driver "
                          "staged: the object was replaced in the bucket; nothing was run with it")  # fmt: skip
    return data


def _weights_file(weights: str | None, staged: dict) -> str | None:
    """A local file of the weights: a path in the image as it is, an s3:// object fetched to /tmp once."""
    if not weights or not weights.startswith("s3:/"):
        return weights
    if weights not in _WARM.weights_files:
        folder, name = weights.rsplit("/", 1)
        local = f"/tmp/cai-bench-weights-{uuid.uuid4().hex[:8]}-{name}"
        data = _fetched(S3Prefix.parse(folder), name, staged)
        with open(local, "wb") as fh:
            fh.write(data)
        _WARM.weights_files[weights] = local
    return _WARM.weights_files[weights]


def _export_folder(weights: str, staged: dict) -> str:
    """A local copy of an export: a directory in the image as it is, an s3:// folder fetched to /tmp once."""
    if not weights.startswith("s3:/"):
        return weights
    if weights not in _WARM.weights_files:
        folder = S3Prefix.parse(weights)
        local = f"/tmp/cai-bench-export-{uuid.uuid4().hex[:8]}"
        os.makedirs(local)
        meta = _fetched(folder, EXPORT_META, staged)
        for name in json.loads(meta).get("files", []):
            with open(os.path.join(local, os.path.basename(name)), "wb") as fh:
                fh.write(_fetched(folder, name, staged))
        with open(os.path.join(local, EXPORT_META), "wb") as fh:  # last: a folder with it is whole
            fh.write(meta)
        _WARM.weights_files[weights] = local
    return _WARM.weights_files[weights]


def _checked_export(event: dict) -> tuple[str, dict]:
    """The export's local folder (fetched from S3 once, or in the image), checked against the weights the run
    names where it read it from the image; with where it came from and how long the fetch took."""
    weights = event.get("weights") or ""
    started = time.perf_counter()
    folder = _export_folder(weights, event.get("staged") or {})
    figures = {"export_from": "s3" if weights.startswith("s3:/") else "image", "fetch_s": time.perf_counter() - started}
    expected = event.get("export_weights")
    if expected:
        found = asdict(read_export(folder).weights)
        keys = ("sha256",) if expected.get("sha256") else ("source", "seed")
        if any(found.get(k) != expected.get(k) for k in keys):
            raise ValueError(
                f"{folder}: the image's export was made from {found}, but the run names {expected}; build the "
                "image with this run's export (cai-bench lambda build --export DIR)"
            )
    return folder, figures


def _model_worker(options, event: dict, request_id: str):
    """The environment's worker for these options, built on first use: on torch (import torch, build, load,
    probe), or on an exported model's runtime (compile, probe), which imports no torch."""
    key = (options, event.get("weights"), int(event.get("seed", 0)))
    if key not in _WARM.workers:  # once per environment: the cold start of the model
        startup: dict = {}
        if options.runtime == "torch":
            import torch  # once per environment, and never where the model runs on another runtime

            torch.set_num_threads(allowed_cpus())  # what Lambda allots for the memory (the emulator pins as many)
            model = _weights_file(event.get("weights"), event.get("staged") or {})
        else:
            model, startup = _checked_export(event)
        start, _, _ = model_worker(request_id, options, model, key[2])
        worker = start()
        if startup:  # the export's fetch, before the runtime's own compile and warm-up
            worker.choices["startup"] = {**startup, **worker.choices.get("startup", {})}
        if options.runtime == "torch" and (event.get("weights") or "").startswith("s3:/"):
            # Named as the run named them, not by the copy in /tmp
            worker.weights = replace(worker.weights, source=event["weights"])
        _WARM.workers[key] = worker
    return _WARM.workers[key]


@dataclass
class _NoModelWorker:
    """Stands where the model worker stands, in no-model mode."""

    worker_id: str
    weights: WeightsInfo
    choices: dict

    def close(self) -> None:
        pass


def _no_model_run(hold_s: float):
    def load(ref: PartitionRef):
        started = time.perf_counter()
        return ref, read_partition_arrays(ref), time.perf_counter() - started

    def run(loaded, worker: _NoModelWorker, wait_s: float) -> PartitionResult:
        ref, arrays, load_s = loaded
        entered = time.perf_counter()
        if hold_s:
            time.sleep(hold_s)
        n = int(arrays["object_id"].shape[0])
        own_s = time.perf_counter() - entered
        record = WorkerRecord(
            worker_id=worker.worker_id, partition=ref.index, partition_file=os.path.basename(ref.path), samples=n,
            bits=n * BITS_PER_SAMPLE, batches=0, batch_size=0, precision="none", device="none", startup_s=0.0,
            wait_s=wait_s, load_s=load_s, compute_s=0.0, total_s=wait_s + own_s, samples_per_s=0.0,
            throughput_bps=0.0, batch_latency_p50_s=None, batch_latency_p90_s=None, batch_latency_p99_s=None,
            peak_rss_bytes=peak_rss_bytes(), host=socket.gethostname(), pid=os.getpid(), ended_epoch_s=time.time(),
        )  # fmt: skip
        return PartitionResult(record, arrays["object_id"], np.full(n, np.nan, np.float32), arrays["redshift"])

    return load, run


def handler(event: dict, context) -> dict:
    entered = time.perf_counter()
    fields, unit_list, secrets_ = open_event(event, _run_secret)  # ForgedInput: nothing is run
    event, seal = {**fields, "units": unit_list, "comm_secret": secrets_.get("comm")}, secrets_["seal"]
    request_id = getattr(context, "aws_request_id", None) or uuid.uuid4().hex
    cold = _WARM.invocations == 0
    _WARM.invocations += 1
    results = S3Prefix.parse(event["results"])
    units = event_units(unit_list)
    for _, ref in units:
        if not ref.path.startswith("s3:/"):
            raise ValueError(f"{ref.path}: a Lambda function reads partitions from S3 only")
    done, failed, kept = [], [], []
    ready: dict = {}
    mode = event.get("mode", "model")
    if mode == "no-model":
        load, run = _no_model_run(float(event.get("hold_s", 0.0)))
        worker = _NoModelWorker(request_id, WeightsInfo(RANDOM_INIT), {"mode": "no-model"})
        start, options = (lambda: worker), None
    elif mode == "model":
        options = EngineOptions(device="cpu", **event["options"])
        if options.runtime != "torch":  # the threads Lambda allots for the memory, shared by the lanes
            options = replace(options, intra_threads=max(1, allowed_cpus() // max(1, options.lanes)))
        load, run = loop_functions(options)  # (None, None): the torch engine's
        start = lambda: _model_worker(options, event, request_id)  # noqa: E731
    else:
        raise ValueError(f"unknown mode {mode!r}")

    def on_done(position: int, result: PartitionResult) -> None:
        # Each invocation is one function run in the paper's sense: its own throughput is its bits over its
        # compute, so the record names the invocation, not the environment that ran it.
        result.record.worker_id = request_id
        result.record.host = f"lambda:{ENVIRONMENT_ID}"
        write_sealed(results, result_key(position), encode_result(result), seal, event["run_id"])
        done.append({"position": position, "key": results.where(result_key(position)),
                     "record": asdict(result.record)})  # fmt: skip
        if event.get("comm"):
            kept.append((position, result))

    def on_failed(position: int, error: str) -> None:
        failed.append({"position": position, "error": error})

    started = worker_loop(start, units_from(units), options, on_done, on_failed, load=load, run=run)
    if started is not None:
        # torch_imported: whether this environment has imported torch by now (the torch-free worker's proof)
        choices = {**started.choices, "threads": allowed_cpus(), "torch_imported": "torch" in sys.modules}
        ready = {"weights": asdict(started.weights), "choices": choices}
    reply = {
        "environment": ENVIRONMENT_ID,
        "request_id": request_id,
        "cold": cold,
        "ready": ready,
        "done": done,
        "failed": failed,
        "timing": {"duration_ms": round((time.perf_counter() - entered) * 1000, 3)},
    }
    if event.get("comm"):
        reply["comm"] = finish_together_in_task(event, kept, results, units, seal)
    if event.get("replies"):
        write_sealed(results, reply_key(event["replies"], request_id), json.dumps(reply).encode(), seal,
                     event["run_id"])  # fmt: skip
    return reply


def finish_together_in_task(event: dict, kept: list, results: S3Prefix, units: list, seal: str) -> dict:
    """The run's closing collectives (``gathering``): rank 0 writes the aggregate. A failure is reported, not
    raised: every unit's own result is in S3 already, for the driver to read instead. Under Step Functions the
    Map's items carry no rank: an invocation's is its first unit's position over the units per invocation."""
    fields = event["comm"]
    config = CommConfig.joined(fields, event["comm_secret"])
    rank = int(fields["rank"]) if "rank" in fields else units[0][0] // int(fields["per_invocation"])
    try:
        aggregate, info = finish_together(config, rank, kept)
    except CommError as exc:
        return {"rank": rank, "error": str(exc)}
    if aggregate is not None:
        write_sealed(results, aggregate_key(config.run_id), aggregate, seal, event["run_id"])
        info["aggregate"] = results.where(aggregate_key(config.run_id))
    return info
