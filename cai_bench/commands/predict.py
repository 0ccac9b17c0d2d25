"""``cai-bench predict``: redshift predictions for every object of a data set, written once each, resumable.

Each finished partition's predictions go to ``<out>.parts/part-<index>.npz`` (temporary file + rename), so an
interrupted or killed run keeps every partition it finished. A rerun predicts only the partitions without a
part file, then writes the catalogue ``<out>`` (Parquet, FITS, CSV or HATS: ``data/catalogue.py``) from the parts in
partition order, renames it into place and removes the parts. ``job.json`` in the parts directory records which
data, weights and precision the parts come from; parts of another job are never mixed in. Each part also keeps
the run, runtime and precision that made it, for the catalogue's provenance. Ids, ra and dec come from the data
set's objects table, joined by position.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cai_bench.backends.registry import get_backend
from cai_bench.commands.runner import ProgressSink, RunRequest, execute, labelled_accuracy, resolve_runtime
from cai_bench.core.errors import UserError
from cai_bench.core.files import file_sha256, loads_json
from cai_bench.core.machine import tool_version
from cai_bench.core.plan import PartitionRef, Plan, replace_plan
from cai_bench.core.records import RANDOM_INIT, PartitionResult, RunRecord, new_run_id, utc_now
from cai_bench.core.text import shown
from cai_bench.data.catalogue import (
    DIRECTORY_FORMATS,
    FORMATS,
    MODEL_NAME,
    check_catalogue_path,
    flag_counts,
    flag_meanings,
    object_flags,
    read_catalogue,
    write_catalogue,
)
from cai_bench.data.manifest import Manifest, load_manifest
from cai_bench.data.objects import iter_objects, rows_for
from cai_bench.data.partitions import read_partition_arrays
from cai_bench.data.storage import storage_for
from cai_bench.data.truth import MISSING_DEFAULT, Truth, join_truth, load_truth
from cai_bench.measure.photoz import point_metrics, point_metrics_by_bin, upstream_paper_metrics
from cai_bench.model.export_format import is_export, read_export
from cai_bench.store.jsonl import ResultsStore

JOB_FILE = "job.json"
JOIN_ON = "objid"  # --on: the truth catalogue's id column, SDSS's name


@dataclass
class PredictOutcome:
    out: Path
    objects: int
    partitions_run: int
    partitions_reused: int
    accuracy: dict | None
    records: list[RunRecord]
    provenance: dict  # what the catalogue's metadata says, with how many objects carry each flag


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


def _ours(parts: Path) -> bool:
    """Whether ``parts`` holds nothing but what predict puts there: its job file, parts and their temporaries."""
    return all(p.is_file() and (p.name == JOB_FILE or p.name.startswith(("part-", ".part-", f".{JOB_FILE}.tmp-")))
               for p in parts.iterdir())  # fmt: skip


def _open_parts(parts: Path, job: dict, force: bool) -> None:
    """Make sure ``parts`` holds parts of this job only (or none); another's directory is never removed."""
    job_file = parts / JOB_FILE
    if parts.is_dir() and (force or not job_file.is_file()):
        if not _ours(parts):
            raise UserError(f"{parts}: exists and is not a parts directory of predict; it is left as it is: move it "
                            "away or choose another --out")  # fmt: skip
        if not force and any(parts.iterdir()):
            raise UserError(f"{parts}: holds parts without their job file; pass --force to remove them")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    """A file, or a directory catalogue (HATS) with everything in it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """The temporaries of ``path`` that a killed writer left (``.NAME.tmp-PID`` of a process no longer alive)."""
    start = f".{path.name}.tmp-"
    for found in path.parent.iterdir() if path.parent.is_dir() else ():
        pid = found.name[len(start) :]
        if found.name.startswith(start) and pid.isdigit() and not _pid_alive(int(pid)):
            _remove(found)


def _write_atomically(path: Path, write) -> None:
    """``write`` to a temporary beside ``path``, then renamed into place. A directory (a HATS catalogue) that
    ``--force`` replaces is moved aside first and removed once the new one is in place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        write(tmp)
        if not path.is_dir():
            os.replace(tmp, path)
            return
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path)  # the catalogue that was there stays there
            raise
    finally:
        _remove(tmp)
        _remove(old)


def _write_part(parts: Path, result: PartitionResult, ran: dict[str, str]) -> None:
    """One partition's predictions, with the run, runtime and precision that made them (for the provenance)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            facts = {"precision": result.record.precision, **ran}
            np.savez(fh, object_id=result.object_id, prediction=result.prediction, redshift=result.redshift,
                     **{name: np.array(value) for name, value in facts.items()})  # fmt: skip
            fh.flush()
            os.fsync(fh.fileno())

    try:
        _write_atomically(_part_path(parts, result.record.partition), write)
    except OSError as exc:
        raise UserError(
            f"{parts}: cannot keep the predictions of partition {result.record.partition} ({exc.strerror})"
        ) from None


PART_ARRAYS = ("object_id", "prediction", "redshift")
PART_FACTS = ("run_id", "runtime", "precision")


def _read_part(path: Path, ref: PartitionRef) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            part = {name: npz[name] for name in PART_ARRAYS}
            part.update({name: str(npz[name]) if name in npz.files else "" for name in PART_FACTS})
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


def _objects_rows(plan: Plan, manifest: Manifest) -> Callable[[int, int], dict[str, np.ndarray]] | None:
    if manifest.objects is None:
        return None
    storage = storage_for(plan.data.path)
    where = storage.where(manifest.objects.file)
    return rows_for(iter_objects(storage.read(manifest.objects.file), manifest.objects, where))


def _gather(parts: Path, plan: Plan, manifest: Manifest) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The catalogue's columns from the parts (one part in memory at a time) and the data set's objects table;
    the magnitudes where the partitions are local; the runs, runtimes and precisions the parts came from."""
    refs = plan.partitions
    local = all(not str(ref.path).startswith("s3:") for ref in refs)
    objects = _objects_rows(plan, manifest)
    offsets = np.cumsum([0] + [e.samples for e in manifest.partitions])
    chunks: dict[str, list[np.ndarray]] = {}
    ran: dict[str, set[str]] = {name: set() for name in PART_FACTS}
    for part, ref in zip(_iter_parts(parts, refs), refs, strict=True):
        start, n = int(offsets[ref.index]), ref.samples
        found = {"z_pred": part["prediction"], "z_true": part["redshift"]}
        if objects is None:
            found["id"] = part["object_id"]
        elif not np.array_equal(part["object_id"], np.arange(start, start + n)):
            raise UserError(f"{ref.path}: its objects are not at positions {start}..{start + n - 1} of the data "
                            "set's objects table (a damaged data set? cai-bench data verify)")  # fmt: skip
        else:
            found.update(objects(start, n))
        if local:  # for the flags and the magnitude bins, one partition at a time
            found["magnitudes"] = read_partition_arrays(ref, verify=False)["magnitudes"]
        for name, values in found.items():
            chunks.setdefault(name, []).append(values)
        for name in PART_FACTS:
            ran[name].add(part[name])
    columns = {name: np.concatenate(values) for name, values in chunks.items()}
    return columns, {f"{name}s": sorted(values - {""}) for name, values in ran.items()}


def _metrics(columns: dict[str, np.ndarray]) -> dict | None:
    """The point metrics over the objects with a known true redshift; None where none has one."""
    if "z_true" not in columns:
        return None
    known = np.isfinite(columns["z_true"]) & np.isfinite(columns["z_pred"])
    if not known.any():
        return None
    z_pred, z = columns["z_pred"][known], columns["z_true"][known]
    metrics = {
        **upstream_paper_metrics(z_pred, z),
        "photoz": point_metrics(z_pred, z),
        "photoz_by_z": point_metrics_by_bin(z_pred, z, Z_BINS),
    }
    if "magnitudes" in columns:
        metrics["photoz_by_r"] = point_metrics_by_bin(z_pred, z, R_BINS, columns["magnitudes"][known, 2], "r")
    return metrics


def _provenance(plan: Plan, job: dict, manifest: Manifest, ran: dict[str, list[str]]) -> dict:
    """Where the catalogue's numbers come from: the model, weights, runs, code and inputs."""
    inputs = [{"name": f.get("name"), "sha256": f.get("sha256")} for f in manifest.source.get("files", [])]
    return {
        "model": MODEL_NAME,
        "weights": job.get("weights"),
        "weights_sha256": job.get("sha256"),
        "random_init": not plan.weights,
        "meaning": "random-init weights: the redshifts mean nothing" if not plan.weights else "trained weights",
        **ran,
        **tool_version(),
        "dataset_id": manifest.dataset_id,
        "data_source": {k: v for k, v in manifest.source.items() if k != "files"},
        "inputs": inputs,
        "created_utc": utc_now(),
        "flags": flag_meanings(),
    }


def _assemble(out: Path, parts: Path, plan: Plan, job: dict, truth: Truth | None) -> tuple[int, dict | None, dict]:
    """Write the catalogue ``out`` from the parts, then rename it into place; its metrics and provenance. A
    backend with a Dask cluster (``catalogue_computing``) writes a HATS catalogue's partitions on its workers."""
    manifest = load_manifest(plan.data.path)
    columns, ran = _gather(parts, plan, manifest)
    provenance = _provenance(plan, job, manifest, ran)
    if truth is not None:
        if plan.data.has_labels:  # the data set's own redshifts stay beside the catalogue's, never dropped
            columns["z_data"] = columns["z_true"]
            provenance["z_data"] = "the data set's labels"
        columns["z_true"], provenance["z_true"] = join_truth(columns["id"], truth)
    elif plan.data.has_labels:
        provenance["z_true"] = "the data set's labels"
    else:
        del columns["z_true"]
    columns["flags"] = object_flags(columns["z_pred"], columns.get("magnitudes"), not plan.weights)
    writes = getattr(get_backend(plan.backend), "catalogue_computing", None)
    computing = writes(plan) if writes is not None and FORMATS[out.suffix] in DIRECTORY_FORMATS else None
    try:
        _remove_stale_temporaries(out)  # once, for the catalogue: not beside every part, per partition
        _write_atomically(out, lambda tmp: write_catalogue(tmp, FORMATS[out.suffix], columns, provenance,
                                                           name=out.stem, computing=computing))  # fmt: skip
    except (ValueError, TypeError, UnicodeError) as exc:  # the writer's own refusal: the parts are still there
        raise UserError(f"{out}: the {FORMATS[out.suffix]} writer refused the catalogue ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); the parts in {parts} are kept") from None  # fmt: skip
    provenance["flag_counts"] = flag_counts(columns["flags"])
    return len(columns["z_pred"]), _metrics(columns), provenance


def check_out(out: Path, force: bool) -> None:
    """Refuse, before anything runs, an --out that cannot become the catalogue."""
    out = Path(out)
    check_catalogue_path(out)
    directory = FORMATS[out.suffix] in DIRECTORY_FORMATS
    if out.is_dir() and not directory:
        raise UserError(f"{out}: is a directory; --out names the catalogue file to write")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to predict again, or choose another --out")
    if directory and out.exists() and not (out.is_dir() and _is_hats(out)):
        raise UserError(f"{out}: exists and is not a HATS catalogue; it is left as it is: move it away or choose "
                        "another --out")  # fmt: skip
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


def _run_missing(plan: Plan, parts: Path, store: ResultsStore | None, progress) -> tuple[list[RunRecord], int]:
    """Predict the partitions without a part yet, each kept as it arrives; the records and how many were done."""
    done = _done(parts, plan.partitions)
    todo = tuple(ref for ref in plan.partitions if ref.index not in done)
    if not todo:
        return [], len(done)
    remaining = resolve_runtime(replace_plan(plan, partitions=todo, repeats=1, warmup=0),
                                say=getattr(progress, "note", None))  # fmt: skip
    ran = {"run_id": new_run_id(), "runtime": remaining.backend_options.get("runtime") or "torch"}
    outcomes = execute(remaining, store, progress, on_result=lambda r: _write_part(parts, r, ran), kind="predict",
                       run_id=ran["run_id"], command="predict")  # fmt: skip
    return [o.record for o in outcomes], len(done)


def predict(
    plan: Plan,
    out: str | Path,
    store: ResultsStore | None,
    *,
    force: bool = False,
    progress: ProgressSink | None = None,
    truth: Truth | None = None,
) -> PredictOutcome:
    """Predict every partition of ``plan`` that has no part yet, then write the catalogue ``out`` from all
    parts, its true redshifts joined from ``truth`` by id where given."""
    out = Path(out)
    check_out(out, force)
    parts = parts_dir(out)
    job = _job(plan)  # hashes the weights file: once, for the parts and for the file's metadata
    try:
        _open_parts(parts, job, force)
    except (OSError, ValueError) as exc:  # ValueError: a job.json that is not JSON
        raise UserError(f"{parts}: cannot use the parts directory ({exc}); remove it or pass --force") from None
    records, reused = _run_missing(plan, parts, store, progress)
    try:
        objects, metrics, provenance = _assemble(out, parts, plan, job, truth)
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write the predictions ({exc.strerror}); the parts in {parts} are kept"
        ) from None
    shutil.rmtree(parts)
    if metrics is not None:
        metrics = labelled_accuracy(metrics, {"weights": plan.weights or RANDOM_INIT}, plan.data)
    outcome = PredictOutcome(out, objects, len(plan.partitions) - reused, reused, metrics, records, provenance)
    joined = provenance.get("z_true")
    if truth is not None and not joined["matched"]:
        raise UserError(f"{truth.path}: none of the {objects:,} ids is in its column {truth.on}: nothing was compared "
                        f"(the catalogue {out} is written, without true redshifts)")  # fmt: skip
    return outcome


def _is_hats(path: Path) -> bool:
    """Whether ``path`` is a HATS catalogue or collection, which --force may replace (and nothing else)."""
    return (path / "collection.properties").is_file() or (path / "properties").is_file()


def check_positions(plan: Plan, out: Path) -> None:
    """Before anything is predicted: a HATS catalogue is partitioned by position, so the data set must give
    each object's ra and dec (an objects table from FITS or HDF5 with them)."""
    if FORMATS.get(out.suffix) != "hats":
        return
    manifest = load_manifest(plan.data.path)
    if manifest.objects is None or not manifest.objects.has_position:
        raise UserError(f"{out}: a HATS catalogue is partitioned by sky position, and data set "
                        f"{manifest.dataset_id} has no ra and dec (import FITS or HDF5 with them: cai-bench data "
                        "import); write .parquet, .fits or .csv instead. Nothing was predicted")  # fmt: skip


def check_fits_ids(plan: Plan, out: Path) -> None:
    """Before anything is predicted: a FITS catalogue holds ASCII text only, so text ids that are not ASCII are
    refused now, not after the whole prediction."""
    if FORMATS.get(out.suffix) != "fits":
        return
    manifest = load_manifest(plan.data.path)
    if manifest.objects is None or manifest.objects.id_type != "string":
        return
    storage = storage_for(plan.data.path)
    where = storage.where(manifest.objects.file)
    for batch in iter_objects(storage.read(manifest.objects.file), manifest.objects, where):
        ids = batch["id"].astype(str)
        wide = np.char.str_len(np.char.encode(ids, "utf-8")) != np.char.str_len(ids)
        if wide.any():
            raise UserError(f"{out}: the data set's id {shown(ids[wide][0])} is not ASCII, which FITS text cannot "
                            "hold; write .parquet or .csv (UTF-8) instead. Nothing was predicted")  # fmt: skip


def predict_command(request: RunRequest, out: str | Path, force: bool = False, progress=None, truth: Path | None = None,
                    on: str = JOIN_ON, truth_z: str | None = None,
                    missing: tuple[float, ...] = MISSING_DEFAULT) -> PredictOutcome:  # fmt: skip
    """``cai-bench predict``: the checks (``out`` and the truth catalogue first), then ``predict`` over the
    request's data set; ``truth``'s redshifts (column ``truth_z``; ``missing`` values are no redshift) joined by
    its id column ``on``."""
    check_out(Path(out), force)
    if truth is None and (on != JOIN_ON or truth_z is not None):
        raise UserError("--on and --truth-z name columns of the --truth catalogue; give it too")
    joined = load_truth(truth, on, truth_z, missing) if truth else None
    ready = request.check()
    plan = request.plan(ready)
    check_fits_ids(plan, Path(out))
    check_positions(plan, Path(out))
    return predict(plan, out, ready.store, force=force, progress=progress, truth=joined)


def predictions_about(path: str | Path) -> dict:
    """What a catalogue says of itself (weights, whether random-init, provenance); {} where it says nothing."""
    try:
        return read_catalogue(path, "predictions file")[1]
    except UserError:  # read_predictions reports an unreadable file
        return {}


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a catalogue predict wrote (Parquet, FITS or CSV; older column names read as today's)."""
    columns, _ = read_catalogue(path, "predictions file")
    missing = [c for c in ("id", "z_pred", "z_true") if c not in columns]
    if missing:
        raise UserError(f"{path}: lacks column(s) {', '.join(missing)} (true redshifts are needed for this plot)")
    return columns
