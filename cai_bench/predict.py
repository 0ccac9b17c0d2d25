"""``cai-bench predict``: redshift predictions for every object of a data set, written once each, resumable.

Each finished partition's predictions go to ``<out>.parts/part-<index>.npz`` (temporary file + rename), so an
interrupted or killed run keeps every partition it finished. A rerun predicts only the partitions without a
part file, then writes ``<out>`` (Parquet or CSV) from the parts in partition order, renames it into place and
removes the parts. ``job.json`` in the parts directory records which data, weights and precision the parts come
from; parts of another job are never mixed in.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cai_bench.data.partitions import read_partition_arrays
from cai_bench.errors import UserError
from cai_bench.files import file_sha256, loads_json
from cai_bench.metrics import accuracy, photoz_by_bin, photoz_metrics
from cai_bench.model.export_format import is_export, read_export
from cai_bench.plan import PartitionRef, Plan, replace_plan
from cai_bench.records import RANDOM_INIT, PartitionResult, RunRecord
from cai_bench.runner import ProgressSink, RunRequest, execute, labelled_accuracy
from cai_bench.store import ResultsStore

FORMATS = {".parquet": "parquet", ".csv": "csv"}
COLUMNS = ("object_id", "predicted_redshift", "true_redshift")
JOB_FILE = "job.json"


@dataclass
class PredictOutcome:
    out: Path
    objects: int
    partitions_run: int
    partitions_reused: int
    accuracy: dict | None
    records: list[RunRecord]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:06d}.npz"


def _job(plan: Plan) -> dict:
    weights = {"weights": RANDOM_INIT, "seed": plan.seed}
    if plan.weights and str(plan.weights).startswith("s3://"):
        weights = {"weights": plan.weights}  # read by the functions: the driver does not fetch it to hash it
    elif is_export(plan.weights):  # the weights it was exported from
        named = read_export(plan.weights).weights
        weights = {"weights": Path(named.source).name, "sha256": named.sha256, "seed": named.seed}
    elif plan.weights:
        weights = {"weights": Path(plan.weights).name, "sha256": file_sha256(Path(plan.weights))}
    job = {"dataset_id": plan.data.dataset_id, "samples": plan.data.samples, "precision": plan.precision, **weights}
    runtime = plan.backend_options.get("runtime") or "torch"
    if runtime != "torch":  # another runtime's predictions differ in the last digits: parts never mix
        job["runtime"] = runtime
    return job


def _open_parts(parts: Path, job: dict, force: bool) -> None:
    """Make sure ``parts`` holds parts of this job only (or none)."""
    job_file = parts / JOB_FILE
    if parts.is_dir() and (force or not job_file.is_file()):
        shutil.rmtree(parts)
    if job_file.is_file():
        found = loads_json(job_file.read_bytes(), str(job_file))
        if found != job:
            differ = ", ".join(k for k in job if found.get(k) != job[k])
            raise UserError(
                f"{parts}: holds predictions of another job (different {differ}); "
                "rerun with --force to start again, or choose another --out"
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomically(job_file, lambda tmp: tmp.write_text(json.dumps(job, indent=1) + "\n"))


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_part(parts: Path, result: PartitionResult) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, object_id=result.object_id, prediction=result.prediction, redshift=result.redshift)
            fh.flush()
            os.fsync(fh.fileno())

    try:
        _write_atomically(_part_path(parts, result.record.partition), write)
    except OSError as exc:
        raise UserError(
            f"{parts}: cannot keep the predictions of partition {result.record.partition} ({exc.strerror})"
        ) from None


def _read_part(path: Path, ref: PartitionRef) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            part = {name: npz[name] for name in ("object_id", "prediction", "redshift")}
    except Exception as exc:  # a damaged part file fails in numpy's or zipfile's own ways
        raise UserError(f"{path}: unreadable part ({type(exc).__name__}); delete it and run again to redo it") from None
    if len(part["object_id"]) != ref.samples:
        raise UserError(f"{path}: holds {len(part['object_id'])} predictions, partition {ref.index} has {ref.samples}")
    return part


def _done(parts: Path, refs: tuple[PartitionRef, ...]) -> set[int]:
    return {ref.index for ref in refs if _part_path(parts, ref.index).is_file()}


def _iter_parts(parts: Path, refs: tuple[PartitionRef, ...]) -> Iterator[dict[str, np.ndarray]]:
    for ref in refs:
        yield _read_part(_part_path(parts, ref.index), ref)


Z_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0, 2.0, 6.0)  # true-redshift bins of the per-bin point metrics
# r-band magnitude bins (SDSS's main galaxy sample ends at r = 17.77)
R_BINS = (0.0, 14.0, 15.0, 16.0, 17.0, 17.77, 19.0, 30.0)
METADATA_KEY = b"cai_bench"  # the Parquet file's key-value metadata: what the predictions are


@contextmanager
def _table_writer(path: Path, fmt: str, columns: tuple[str, ...],
                  about: dict | None = None) -> Iterator[Callable[[list[np.ndarray]], None]]:  # fmt: skip
    """A function that appends columns of arrays to a Parquet or CSV file, one chunk at a time; Parquet keeps
    ``about`` (the weights, and whether the predictions mean anything) in its metadata."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"object_id": pa.int64(), "predicted_redshift": pa.float32(), "true_redshift": pa.float32()}
        metadata = {METADATA_KEY: json.dumps(about).encode()} if about else None
        schema = pa.schema([(name, types[name]) for name in columns], metadata=metadata)
        with pq.ParquetWriter(path, schema) as writer:
            yield lambda arrays: writer.write_table(pa.table(dict(zip(columns, arrays, strict=True)), schema=schema))
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            yield lambda arrays: writer.writerows(zip(*(a.tolist() for a in arrays), strict=True))


def _assemble(out: Path, parts: Path, refs: tuple[PartitionRef, ...], has_labels: bool,
              about: dict | None = None) -> tuple[int, dict | None]:  # fmt: skip
    """Write ``out`` from the parts (one part in memory at a time), then rename it into place."""
    columns = COLUMNS if has_labels else COLUMNS[:2]
    predicted, true, r_band = [], [], []
    local = all(not str(ref.path).startswith("s3:") for ref in refs)

    def write(tmp: Path) -> None:
        with _table_writer(tmp, FORMATS[out.suffix], columns, about) as append:
            for part, ref in zip(_iter_parts(parts, refs), refs, strict=True):
                append([part["object_id"], part["prediction"], part["redshift"]][: len(columns)])
                predicted.append(part["prediction"])
                true.append(part["redshift"])
                if has_labels and local:  # the r magnitudes of the magnitude bins, one partition at a time
                    r_band.append(read_partition_arrays(ref, verify=False)["magnitudes"][:, 2])

    _write_atomically(out, write)
    objects = sum(len(p) for p in predicted)
    metrics = None
    if has_labels:
        z_pred, z = np.concatenate(predicted), np.concatenate(true)
        metrics = {**accuracy(z_pred, z), "photoz": photoz_metrics(z_pred, z),
                   "photoz_by_z": photoz_by_bin(z_pred, z, Z_BINS)}  # fmt: skip
        if r_band:
            metrics["photoz_by_r"] = photoz_by_bin(z_pred, z, R_BINS, np.concatenate(r_band), "r")
    return objects, metrics


def check_out(out: Path, force: bool) -> None:
    """Refuse, before anything runs, an --out that cannot become the predictions file."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise UserError(f"{out}: --out must end in .parquet or .csv")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the predictions file to write")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to predict again, or choose another --out")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{out}: {parent} is a file, not a directory")
    probe = parent / f".{out.name}.writable-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{out}: cannot write there ({exc.strerror})") from None


def predict(
    plan: Plan,
    out: str | Path,
    store: ResultsStore | None,
    *,
    force: bool = False,
    progress: ProgressSink | None = None,
) -> PredictOutcome:
    """Predict every partition of ``plan`` that has no part yet, then write ``out`` from all parts."""
    out = Path(out)
    check_out(out, force)
    parts = parts_dir(out)
    job = _job(plan)  # hashes the weights file: once, for the parts and for the file's metadata
    try:
        _open_parts(parts, job, force)
    except (OSError, ValueError) as exc:  # ValueError: a job.json that is not JSON
        raise UserError(f"{parts}: cannot use the parts directory ({exc}); remove it or pass --force") from None
    done = _done(parts, plan.partitions)
    todo = tuple(ref for ref in plan.partitions if ref.index not in done)
    records = []
    if todo:
        remaining = replace_plan(plan, partitions=todo, repeats=1, warmup=0)
        outcomes = execute(remaining, store, progress, on_result=lambda r: _write_part(parts, r), kind="predict")
        records = [o.record for o in outcomes]
    try:
        about = {
            "weights": job.get("weights"),
            "random_init": not plan.weights,
            "meaning": "random-init weights: the redshifts mean nothing" if not plan.weights else "trained weights",
        }
        objects, metrics = _assemble(out, parts, plan.partitions, plan.data.has_labels, about)
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write the predictions ({exc.strerror}); the parts in {parts} are kept"
        ) from None
    shutil.rmtree(parts)
    if metrics is not None:
        metrics = labelled_accuracy(metrics, {"weights": plan.weights or RANDOM_INIT}, plan.data)
    return PredictOutcome(out, objects, len(todo), len(done), metrics, records)


def predict_command(request: RunRequest, out: str | Path, force: bool = False, progress=None) -> PredictOutcome:
    """``cai-bench predict``: the checks (``out`` first), then ``predict`` over the request's data set."""
    check_out(Path(out), force)
    ready = request.check()
    return predict(request.plan(ready), out, ready.store, force=force, progress=progress)


def predictions_about(path: str | Path) -> dict:
    """What a Parquet predictions file says of itself (its weights, whether they are random-init); {} for CSV or
    a file that says nothing."""
    if Path(path).suffix != ".parquet":
        return {}
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata.get(METADATA_KEY, b"{}"))
    except (OSError, ValueError):  # read_predictions reports an unreadable file
        return {}


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a predictions file (Parquet or CSV) as arrays."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise UserError(f"{path}: expected a .parquet or .csv predictions file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns = {name: table.column(name).to_numpy() for name in table.column_names}
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            names = list(rows[0]) if rows else []
            columns = {name: np.array([float(r[name]) for r in rows]) for name in names}
    except Exception as exc:  # pyarrow and csv raise many kinds; any of them means the file is not readable
        raise UserError(f"{path}: not a readable predictions file ({type(exc).__name__}: {exc})") from None
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path}: lacks column(s) {', '.join(missing)} (true redshifts are needed for this plot)")
    return columns
