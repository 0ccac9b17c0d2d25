"""What the workers of a run do together at its end when it is given ``--comm`` (the paper's use of FMI): every
worker has a rank; after its units they barrier, allreduce the accuracy sums (so rank 0 has the run's MAE, MSE,
bias, R2 and outlier fraction without reading a prediction), reduce their compute times as the paper did, and
gather their results to rank 0, which makes one aggregate that the driver reads instead of one object per unit.

The same few functions serve the Lambda handler and the hpc worker processes; a worker that cannot finish the
collectives (a rank died) says why, and its driver reads the per-unit results instead, so nothing is lost.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cai_bench import comm
from cai_bench.comm.policy import ChannelModel, models_from
from cai_bench.core.machine import capture_environment, machine_id
from cai_bench.core.records import PartitionResult, decode_result, encode_result
from cai_bench.measure.photoz import UPSTREAM_OUTLIER_EZ
from cai_bench.store.jsonl import ResultsStore

AGGREGATE_FORMAT = "cai-bench-aggregate/1"
_SUMS = ("samples", "abs_error", "sq_error", "dz", "z", "z_sq", "outliers")
_PACKED = len(_SUMS)  # after the sums, the allreduce carries the bytes every rank will gather, summed


@dataclass(frozen=True)
class CommConfig:
    """What every rank of a run is given: the channels, the world, the run's name and key, its patience."""

    urls: tuple[str, ...]
    world_size: int
    run_id: str
    key: str
    timeout_s: float = 60.0
    hint: str = "fast"
    models: dict | None = None  # scheme -> ChannelModel fields: comm bench's figures for this machine
    bind: str | None = None  # where a direct channel listens (--comm-bind); None: where it reaches the server from

    def to_dict(self) -> dict:
        return {**asdict(self), "urls": list(self.urls)}

    @classmethod
    def from_dict(cls, data: dict) -> CommConfig:
        return cls(**{**{k: v for k, v in data.items() if k in cls.__dataclass_fields__}, "urls": tuple(data["urls"])})

    def public(self) -> dict:
        """What may travel and be kept where others may read it (an event, an execution's input, a job's state, a
        pickle): all but the key and the channels' URLs (a Redis URL may hold a password), shown redacted."""
        return {**self.to_dict(), "key": None, "urls": [comm.redact(u) for u in self.urls]}

    def secret(self) -> dict:
        """What ``public`` leaves out: kept in memory, in a 0600 file, or in the run's secret in AWS."""
        return {"key": self.key, "urls": list(self.urls)}

    @classmethod
    def joined(cls, public: dict, secret: dict) -> CommConfig:
        return cls.from_dict({**public, "key": secret["key"], "urls": secret["urls"]})


def accuracy_sums(results: list[PartitionResult]) -> np.ndarray:
    """The sums the run's accuracy is made of, over this worker's labelled samples."""
    sums = np.zeros(len(_SUMS), np.float64)
    for result in results:
        z_pred = np.asarray(result.prediction, np.float64)
        z = np.asarray(result.redshift, np.float64)
        keep = np.isfinite(z_pred) & np.isfinite(z)
        z_pred, z = z_pred[keep], z[keep]
        error, dz = z_pred - z, (z_pred - z) / (1.0 + z)
        sums += [len(z), np.abs(error).sum(), (error**2).sum(), dz.sum(), z.sum(), (z**2).sum(),
                 (np.abs(dz) > UPSTREAM_OUTLIER_EZ).sum()]  # fmt: skip
    return sums


def accuracy_from_sums(sums: np.ndarray) -> dict | None:
    """MAE, MSE, bias, R2 and outlier fraction of the whole run, from every worker's sums (None: no labels)."""
    total = dict(zip(_SUMS, (float(v) for v in sums), strict=True))
    n = total["samples"]
    if n == 0:
        return None
    ss_tot = total["z_sq"] - total["z"] ** 2 / n
    return {"samples": int(n), "mae": total["abs_error"] / n, "mse": total["sq_error"] / n, "bias": total["dz"] / n,
            "r2": 1.0 - total["sq_error"] / ss_tot if ss_tot > 1e-12 * max(1.0, total["z_sq"]) else None,
            "outlier_fraction": total["outliers"] / n}  # fmt: skip


def _pack(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.frombuffer(data, np.uint8) for name, data in entries.items()})
    return buffer.getvalue()


def _unpack(data: bytes) -> dict[str, bytes]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name].tobytes() for name in npz.files}


def finish_together(
    config: CommConfig, rank: int, results: list[tuple[int, PartitionResult]]
) -> tuple[bytes | None, dict]:
    """This worker's part of the run's closing collectives: (the aggregate at rank 0, else None; what this rank
    records of them). A CommError (a rank gone, a channel down) is the caller's: it falls back."""
    started = time.perf_counter()
    models = models_from(config.models) if config.models else None
    mine = _pack({f"unit_{position:09d}": encode_result(result) for position, result in results})
    with comm.connect(list(config.urls), rank, config.world_size, config.run_id, config.key, config.timeout_s,
                      config.hint, models, bind=config.bind) as communicator:  # fmt: skip
        communicator.barrier()
        totals = communicator.allreduce(np.append(accuracy_sums([r for _, r in results]), len(mine)), "sum",
                                        size_hint=8 * (len(_SUMS) + 1))  # fmt: skip
        sums, gathered_bytes = totals[:_PACKED], int(totals[_PACKED])
        compute_s = float(sum(r.record.own_compute_s for _, r in results))
        compute_sum = communicator.reduce(compute_s, "sum")
        compute_max = communicator.reduce(compute_s, "max")
        # Every rank passes the same hint (the run's mean share), so all of them take the same channel for it
        packs = communicator.gather(np.frombuffer(mine, np.uint8), size_hint=gathered_bytes // config.world_size)
        comm_s = time.perf_counter() - started
        by_rank = communicator.gather(comm_s)
        # collectives_s: inside the operations; comm_s: connecting included, what the run spent on them
        info = {**communicator.info(), "rank": rank, "comm_s": round(time.perf_counter() - started, 6)}
        fallback = [c for c in info["channels"] if c.get("fallback_pairs")]
        if fallback:  # direct pairs that could not connect, and what they went through instead
            info["fallback"] = fallback
    if rank != 0:
        return None, info
    units: dict[str, bytes] = {}
    for r, pack in enumerate(packs):
        for name, data in _unpack(pack.tobytes()).items():
            result = decode_result(data)
            result.record = replace(result.record, comm_s=round(by_rank[r], 6))
            units[name] = encode_result(result)
    summary = {"format": AGGREGATE_FORMAT, "world_size": config.world_size, "accuracy": accuracy_from_sums(sums),
               "compute_s_sum": compute_sum, "compute_s_max": compute_max,
               "comm_s_by_rank": [round(s, 6) for s in by_rank], "channels": info["channels"],
               "operations": info["operations"]}  # fmt: skip
    return _pack({"summary": json.dumps(summary).encode(), **units}), info


RANK_FIELDS = ("rank", "worker", "comm_s", "collectives_s", "error", "fallback", "rejected")


def rank_account(info: dict) -> dict:
    """What a run's record keeps of one rank's collectives."""
    return {k: v for k, v in info.items() if k in RANK_FIELDS}


def record_of(config: CommConfig, ranks: list[dict], summary: dict | None, aggregate_reads: int,
              unit_reads: int | None = None) -> dict:  # fmt: skip
    """``backend_info.comm``: the channels, how results were read, each rank's account, the aggregate's summary."""
    accounts = sorted((rank_account(r) for r in ranks), key=lambda r: r["rank"])
    failed = [{"rank": a["rank"], "error": a["error"]} for a in accounts if a.get("error")]
    dropped = sum(entry.get("dropped", 0) for a in accounts for entry in a.get("rejected") or [])
    out = {"channels": [comm.redact(u) for u in config.urls], "world_size": config.world_size, "hint": config.hint,
           "aggregate_reads": aggregate_reads, "ranks": accounts,
           "collectives": "failed" if failed or summary is None else "ok", "failed_ranks": failed,
           "dropped_frames": dropped}  # fmt: skip
    if unit_reads is not None:
        out["unit_reads"] = unit_reads
    return {**out, **{k: v for k, v in (summary or {}).items() if k != "format"}}


def read_aggregate(data: bytes) -> tuple[dict[int, PartitionResult], dict]:
    """The units' results (by position) and the summary of an aggregate; never unpickles anything."""
    entries = _unpack(data)
    summary = json.loads(entries.pop("summary"))
    if summary.get("format") != AGGREGATE_FORMAT:
        raise ValueError(f"not an aggregate in {AGGREGATE_FORMAT}")
    return {int(name.split("_")[1]): decode_result(data) for name, data in entries.items()}, summary


def measured_models(results: str | Path | None) -> dict[str, ChannelModel]:
    """The policy's channel models with this machine's measurements where ``comm bench`` made them: a message's
    overhead from bcast between 2 ranks at the smallest size, the bandwidth from the largest; FMI's elsewhere."""
    if results is None:
        return models_from({})
    here = machine_id(capture_environment(with_torch=False))
    measured: dict[str, dict[int, float]] = {}
    for record in ResultsStore(results).read_comm():
        if record["op"] == "bcast" and record["world_size"] == 2 and machine_id(record["environment"]) == here:
            measured.setdefault(record["channel"], {})[record["nbytes"]] = record["median_s"]
    fields = {}
    for scheme, by_size in measured.items():
        small, large = min(by_size), max(by_size)
        fields[scheme] = {"overhead_s": by_size[small], "poll_s": 0.0, "source": "comm bench"}
        if large > small and by_size[large] > by_size[small]:
            fields[scheme]["bandwidth_Bps"] = (large - small) / (by_size[large] - by_size[small])
    return models_from(fields)


def config_for_run(options: dict, world_size: int, work_dir: str | None) -> CommConfig | None:
    """The run's CommConfig from its backend options (None without --comm): a fresh name and key per run."""
    if not options.get("comm"):
        return None
    urls = comm.split_urls(options["comm"])
    comm.check_urls(urls)
    measured = {s: asdict(m) for s, m in measured_models(work_dir).items() if m.source != "default"}
    return CommConfig(tuple(urls), world_size, f"comm-{time.strftime('%Y%m%dT%H%M%S')}-{comm.new_key()[:8]}",
                      comm.new_key(), float(options.get("comm_timeout_s") or 60.0), options.get("comm_hint") or "fast",
                      measured or None, options.get("comm_bind") or None)  # fmt: skip
