"""What a run leaves behind, importable without torch or the model: the per-partition ``WorkerRecord``, the
``PartitionResult`` a worker hands back, the ``RunRecord`` the store keeps, and the one wire format in which a
``PartitionResult`` crosses a process or network boundary.

Reports, plots and listings read records only, so they import this module and never the engine.
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from cai_bench.core.stats import percentiles, rate

SCHEMA_VERSION = "1.3"  # 1.1: a unit's ended_epoch_s; 1.2: non_finite; 1.3: validity, a device unit's busy_s
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])
RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from; goes into every record."""

    source: str  # RANDOM_INIT or the file path
    sha256: str | None = None
    seed: int | None = None

    def to_dict(self) -> dict:
        if self.source == RANDOM_INIT:
            return {"weights": RANDOM_INIT, "seed": self.seed}
        return {"weights": self.source, "sha256": self.sha256}


@dataclass
class WorkerRecord:
    worker_id: str
    partition: int
    partition_file: str
    samples: int
    bits: int
    batches: int
    batch_size: int
    precision: str
    device: str
    startup_s: float
    wait_s: float
    load_s: float
    compute_s: float
    total_s: float
    samples_per_s: float  # samples / own compute (busy_s where set, else compute_s)
    throughput_bps: float  # bits / own compute: the worker's own throughput, as the paper counts per function
    batch_latency_p50_s: float | None
    batch_latency_p90_s: float | None
    batch_latency_p99_s: float | None
    peak_rss_bytes: int
    host: str
    pid: int
    batch_latency_s: list[float] = field(default_factory=list)
    # What a device worker measured of the device (GPU: bytes and seconds of host-to-device copies, seconds the
    # model ran, peak device memory); None on the CPU
    device_stats: dict | None = None
    # --comm: seconds the worker that ran this unit spent in the run's closing collectives (after its units; the
    # same for every unit of one worker), None without them
    comm_s: float | None = None
    # The wall-clock time (time.time()) the unit ended: where a timeline places it, its total_s before that end.
    # Comparable between the processes of one machine (and, as far as their clocks agree, between machines)
    ended_epoch_s: float | None = None
    # A device unit's share of its device's busy time (the union of the batches' forward passes); its compute_s
    # is then a latency that overlaps its neighbours'. None elsewhere: compute_s is the unit's own
    busy_s: float | None = None

    @property
    def own_compute_s(self) -> float:
        """What the unit's compute adds to its worker's: its busy time on a device, else its compute time."""
        return self.compute_s if self.busy_s is None else self.busy_s


@dataclass
class PartitionResult:
    record: WorkerRecord
    object_id: np.ndarray  # int64
    prediction: np.ndarray  # float32 redshift per object
    redshift: np.ndarray  # float32, the partition's labels (NaN-free when the data has labels)


@dataclass
class RunSummary:
    """Figures of one run, derived from its worker records and wall clock."""

    samples: int
    bits: int
    partitions: int
    workers: int
    wall_s: float
    samples_per_s: float  # samples / wall_s
    throughput_bps: float  # bits / wall_s: what the user gets
    sum_worker_throughput_bps: float  # sum over workers of their bits / their own compute: the paper's headline
    compute_s: float  # the units' own compute summed (on a device: its busy time, which adds up)
    load_s: float
    wait_s: float
    startup_s: float
    batch_latency_p50_s: float | None
    batch_latency_p90_s: float | None
    batch_latency_p99_s: float | None
    peak_rss_bytes: int
    cost_usd: float | None = None  # what the run cost where the backend bills for it (Lambda); None elsewhere
    comm_s: float | None = None  # --comm: the longest any worker spent in the closing collectives; None without
    flops_per_sample: int | None = None  # the model's, counted by torch's FLOP counter (model/flops.py)
    gflops: float | None = None  # samples_per_s x flops_per_sample: what the run achieved over its wall
    # gflops as a share of the machine's measured fp32 peak (environment.fp32_peak); None where none was measured
    mfu: float | None = None


@dataclass
class RunRecord:
    run_id: str
    created_utc: str
    status: str  # "ok", "failed" or "interrupted"
    backend: str
    repeat: int
    repeats: int
    plan: dict
    weights: dict
    environment: dict
    summary: RunSummary
    workers: list[WorkerRecord]
    backend_info: dict = field(default_factory=dict)
    accuracy: dict | None = None  # with labelled data: metrics.accuracy, and whether the weights make it mean anything
    error: str | None = None
    kind: str = "run"  # "run": a timing run; "predict": a (possibly resumed) pass that writes predictions
    command: str | None = None  # the cai-bench command that measured it (run, sweep, predict, bench, collect)
    # validity.verdict when the run ended: valid or not, each failed condition, the rules it was judged by
    validity: dict | None = None
    schema_version: str = SCHEMA_VERSION
    # The record's note of numbers JSON cannot hold (inf, nan): where each was (a dotted path) and what it was;
    # each is stored as null, so that nothing else of what the run measured is lost with it
    non_finite: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        found: dict[str, str] = {}
        data = finite_only(data, "", found)
        data["non_finite"] = {**self.non_finite, **found}
        return json.dumps(data, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        """A stored record as dataclasses again; fields a later minor version added are left out."""
        out = _known(cls, data)
        out["summary"] = RunSummary(**_known(RunSummary, data["summary"]))
        out["workers"] = [worker_record(w) for w in data["workers"]]
        return cls(**out)


def finite_only(value, path: str, found: dict[str, str]):
    """``value`` with every float that is not finite replaced by None, each one's path and value put in ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = repr(value)
        return None
    if isinstance(value, dict):
        return {k: finite_only(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_only(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


@dataclass(frozen=True)
class UnitFailure:
    """A work unit that failed for good: which partition, how often it was tried, every attempt's error."""

    partition: int
    unit: int  # place in the run's list of work units
    attempts: int
    errors: tuple[str, ...]
    workers: tuple[str, ...] = ()  # the workers it failed on, in order

    def to_dict(self) -> dict:
        return {**asdict(self), "errors": list(self.errors), "workers": list(self.workers)}


def _known(cls, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def worker_record(data: dict) -> WorkerRecord:
    return WorkerRecord(**_known(WorkerRecord, data))


def summarize_run(workers: list[WorkerRecord], wall_s: float) -> RunSummary:
    samples = sum(w.samples for w in workers)
    bits = sum(w.bits for w in workers)
    latencies = [x for w in workers for x in w.batch_latency_s]
    lat = percentiles(latencies)
    # A worker that ran several partitions one after another has one throughput: its bits over its compute.
    per_worker: dict[tuple, list[float]] = {}
    for w in workers:
        totals = per_worker.setdefault((w.host, w.pid, w.worker_id), [0.0, 0.0])
        totals[0] += w.bits
        totals[1] += w.own_compute_s
    return RunSummary(
        samples=samples,
        bits=bits,
        partitions=len(workers),
        workers=len(per_worker),
        wall_s=wall_s,
        samples_per_s=rate(samples, wall_s),
        throughput_bps=rate(bits, wall_s),
        sum_worker_throughput_bps=float(sum(rate(b, c) for b, c in per_worker.values())),
        compute_s=sum(w.own_compute_s for w in workers),
        load_s=sum(w.load_s for w in workers),
        wait_s=sum(w.wait_s for w in workers),
        startup_s=sum(w.startup_s for w in workers),
        batch_latency_p50_s=lat["p50"],
        batch_latency_p90_s=lat["p90"],
        batch_latency_p99_s=lat["p99"],
        peak_rss_bytes=max((w.peak_rss_bytes for w in workers), default=0),
        comm_s=max((w.comm_s for w in workers if w.comm_s is not None), default=None),
    )


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------- wire format

WIRE_FORMAT = "cai-bench-partition-result/1"
_ARRAYS = {"object_id": np.int64, "prediction": np.float32, "redshift": np.float32}


class WireFormatError(ValueError):
    """Bytes that are not a PartitionResult in the wire format."""


def encode_result(result: PartitionResult) -> bytes:
    """A PartitionResult as one npz: the record as JSON (in a uint8 array), the arrays as they are, bit for bit.

    Binary rather than JSON float lists: a 25 MB partition's 1,277 predictions stay 5 KB, and what is read back
    is exactly what the worker computed.
    """
    # Infinity and NaN cross as JSON's extensions (Python reads them back): the driver's record notes them
    header = json.dumps({"format": WIRE_FORMAT, "record": asdict(result.record)}).encode()
    arrays = {name: np.ascontiguousarray(getattr(result, name), dtype=kind) for name, kind in _ARRAYS.items()}
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(header, dtype=np.uint8), **arrays)
    return buffer.getvalue()


def decode_result(data: bytes) -> PartitionResult:
    """The PartitionResult ``encode_result`` wrote; never unpickles anything."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes())
            arrays = {name: npz[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise WireFormatError(f"not a partition result: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != WIRE_FORMAT:
        raise WireFormatError(f"not a partition result in {WIRE_FORMAT}")
    for name, kind in _ARRAYS.items():
        if arrays[name].dtype != kind or arrays[name].ndim != 1:
            raise WireFormatError(f"{name}: expected a 1-d {np.dtype(kind)} array, got {arrays[name].dtype}")
    if not len(arrays["object_id"]) == len(arrays["prediction"]) == len(arrays["redshift"]):
        raise WireFormatError("object_id, prediction and redshift differ in length")
    return PartitionResult(worker_record(header["record"]), **arrays)
