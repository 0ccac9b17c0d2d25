"""A data set's manifest: every partition with its sample count, byte size and sha256, where the data came
from, and the optional objects table; checked field by field on reading, summarised for a plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cai_bench.core.errors import UserError
from cai_bench.core.files import loads_json
from cai_bench.core.plan import (
    BYTES_PER_SAMPLE,
    DataSummary,
    PartitionRef,
)
from cai_bench.core.shapes import FLAG, INT, LIST, NUMBER, TABLE, TEXT, problem
from cai_bench.data.objects import ID_TYPES, ObjectsEntry
from cai_bench.data.storage import MANIFEST, Storage, storage_for

if TYPE_CHECKING:
    pass


SCHEMA_VERSION = "1.1"  # 1.1: the optional objects table


# name -> (safetensors dtype, per-sample shape, numpy dtype)
FIELDS = {
    "images": ("F32", (5, 32, 32), np.float32),
    "magnitudes": ("F64", (5,), np.float64),
    "redshift": ("F32", (), np.float32),
    "object_id": ("I64", (), np.int64),
}


FLOAT_FIELDS = ("images", "magnitudes", "redshift")


@dataclass
class PartitionEntry:
    file: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    dataset_id: str
    source: dict
    samples: int
    data_gb: float
    partition_mb: float
    samples_per_partition: int
    partitions: list[PartitionEntry]
    has_labels: bool = True
    bytes_per_sample: int = BYTES_PER_SAMPLE
    schema_version: str = SCHEMA_VERSION
    created_utc: str = ""
    fields: dict = field(default_factory=lambda: {k: [v[0], list(v[1])] for k, v in FIELDS.items()})
    objects: ObjectsEntry | None = None


# ---------------------------------------------------------------------------------------------- manifest


_MANIFEST_SHAPE = {
    "dataset_id": TEXT,
    "source": TABLE,
    "samples": INT,
    "data_gb": NUMBER,
    "partition_mb": NUMBER,
    "samples_per_partition": INT,
    "partitions": LIST,
}


_OPTIONAL_SHAPE = {"has_labels": FLAG, "bytes_per_sample": INT, "schema_version": TEXT, "created_utc": TEXT,
                   "fields": TABLE, "objects": TABLE}  # fmt: skip


_ENTRY_SHAPE = {"file": TEXT, "samples": INT, "bytes": INT, "sha256": TEXT}


_OBJECTS_SHAPE = {"file": TEXT, "rows": INT, "bytes": INT, "sha256": TEXT, "id_type": TEXT, "id_column": TEXT,
                  "has_position": FLAG}  # fmt: skip


def _check_objects(raw: object, samples: int, path: str, directory: str | Path) -> ObjectsEntry | None:
    if raw is None:
        return None
    found = problem(raw, _OBJECTS_SHAPE, "objects.")
    unknown = sorted(set(raw) - set(_OBJECTS_SHAPE))
    if found or unknown:
        raise UserError(f"{path}: malformed manifest ({found or 'unknown field(s) in objects: ' + ', '.join(unknown)})")
    entry = ObjectsEntry(**raw)
    if entry.id_type not in ID_TYPES:
        raise UserError(f"{path}: objects.id_type is {entry.id_type!r}; expected int64 or string")
    if entry.rows != samples:
        raise UserError(f"{path}: the objects table has {entry.rows} rows, the data set {samples} samples")
    check_partition_name(entry.file, directory, path)
    return entry


def _check_entry(entry: object, number: int, path: str, directory: str | Path) -> PartitionEntry:
    where = f"partitions[{number}]"
    if not isinstance(entry, dict):
        raise UserError(f"{path}: {where} is not an object")
    found = problem(entry, _ENTRY_SHAPE, f"{where}.")
    if found:
        raise UserError(f"{path}: {found}")
    unknown = sorted(set(entry) - set(_ENTRY_SHAPE))
    if unknown:
        raise UserError(f"{path}: {where} has unknown field(s) {', '.join(unknown)}")
    if entry["samples"] < 1 or entry["bytes"] < 8:
        raise UserError(f"{path}: {where} has {entry['samples']} samples in {entry['bytes']} bytes")
    if len(entry["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in entry["sha256"]):
        raise UserError(f"{path}: {where}.sha256 is not a sha256 hex digest")
    check_partition_name(entry["file"], directory, path)
    return PartitionEntry(**entry)


def check_partition_name(name: str, directory: str | Path, manifest: str) -> None:
    """A partition is a plain file name inside its data set's directory: no path, no ``..``, and no symbolic
    link that leads out of the directory, so that a manifest can never make cai-bench read elsewhere."""
    plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    if not plain or Path(name).is_absolute():
        raise UserError(f"{manifest}: partition file {name!r} is not a plain file name inside the data set")
    if storage_for(directory).leads_outside(name):
        raise UserError(f"{manifest}: partition file {name!r} is a link that leads outside the data set")


def load_manifest(directory: str | Path) -> Manifest:
    storage = storage_for(directory)
    storage.check()
    path = storage.where(MANIFEST)
    if storage.size(MANIFEST) is None:
        raise UserError(f"{path}: manifest not found; is {directory} a cai-bench data set (cai-bench data synth)?")
    raw = loads_json(storage.read(MANIFEST), str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a cai-bench manifest (expected a JSON object)")
    version = str(raw.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise UserError(
            f"{path}: manifest schema version {version!r} is not supported (this cai-bench reads {SCHEMA_VERSION})"
        )
    found = problem(raw, _MANIFEST_SHAPE) or problem(raw, _OPTIONAL_SHAPE, optional=True)
    if found:
        raise UserError(f"{path}: malformed manifest ({found})")
    unknown = sorted(set(raw) - set(_MANIFEST_SHAPE) - set(_OPTIONAL_SHAPE))
    if unknown:
        raise UserError(f"{path}: malformed manifest (unknown field(s) {', '.join(unknown)})")
    if not raw["partitions"]:
        raise UserError(f"{path}: the data set has no partitions")
    if raw["partition_mb"] == 0:
        raise UserError(f"{path}: malformed manifest (partition_mb is 0)")
    entries = [_check_entry(entry, n, path, directory) for n, entry in enumerate(raw.pop("partitions"))]
    if len({e.file for e in entries}) != len(entries):
        raise UserError(f"{path}: lists a partition file twice")
    objects = _check_objects(raw.pop("objects", None), raw["samples"], path, directory)
    manifest = Manifest(partitions=entries, objects=objects, **raw)
    counted = sum(e.samples for e in manifest.partitions)
    if counted != manifest.samples:
        raise UserError(f"{path}: partition sample counts add up to {counted}, manifest says {manifest.samples}")
    return manifest


def data_summary(location: str, manifest: Manifest) -> DataSummary:
    return DataSummary(
        path=location,
        dataset_id=manifest.dataset_id,
        source=manifest.source,
        samples=manifest.samples,
        data_gb=manifest.data_gb,
        partition_mb=manifest.partition_mb,
        partitions=len(manifest.partitions),
        has_labels=manifest.has_labels,
    )


def partition_refs(storage: Storage, manifest: Manifest) -> tuple[PartitionRef, ...]:
    return tuple(
        PartitionRef(storage.where(e.file), index, e.samples, e.bytes, e.sha256)
        for index, e in enumerate(manifest.partitions)
    )
