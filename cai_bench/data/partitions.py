"""The partition format: one safetensors file per partition plus a ``manifest.json`` (``manifest.py``).

A partition holds ``images`` f32 [N,5,32,32], ``magnitudes`` f64 [N,5], ``redshift`` f32 [N] and ``object_id``
i64 [N], each object's position in the data set. A data set imported from survey files also has an objects
table (``objects.py``) with each position's survey id, ra and dec.

Data sets are written into a temporary sibling directory and renamed into place when complete, so a
directory with a manifest is always a whole data set.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from cai_bench.core.errors import UserError
from cai_bench.core.files import loads_json, staged_directory
from cai_bench.core.plan import (
    DataSummary,
    PartitionRef,
    data_gb,
    partition_sizes,
    samples_for_gb,
    samples_per_partition,
)
from cai_bench.data import synthetic
from cai_bench.data.objects import ObjectsEntry, check_objects_bytes
from cai_bench.data.rechunk import rechunk
from cai_bench.data.storage import MANIFEST, split_ref, storage_for

if TYPE_CHECKING:
    import torch
from cai_bench.data.manifest import (
    FIELDS,
    FLOAT_FIELDS,
    SCHEMA_VERSION,
    Manifest,
    PartitionEntry,
    data_summary,
    load_manifest,
    partition_refs,
)

MAX_HEADER = 1 << 20  # a partition header is a few hundred bytes; more is not a partition


FORMAT = "cai-bench-partition"


Progress = Callable[[int, int], None]  # (samples written so far, total samples)


@dataclass
class Partition:
    """One partition in memory, decoded to torch tensors."""

    ref: PartitionRef
    images: torch.Tensor
    magnitudes: torch.Tensor
    redshift: torch.Tensor
    object_id: torch.Tensor
    load_s: float

    def __len__(self) -> int:
        return int(self.object_id.shape[0])


def open_dataset(directory: str | Path) -> tuple[Manifest, DataSummary, tuple[PartitionRef, ...]]:
    """Read the manifest and check, cheaply, that every file it names is there, whole and well formed.

    Checksums are compared when a partition is read (``read_partition``) or by ``verify_dataset``.
    """
    manifest = load_manifest(directory)
    storage = storage_for(directory)
    refs = partition_refs(storage, manifest)
    for ref, entry in zip(refs, manifest.partitions, strict=True):
        size = storage.size(entry.file)
        if size is None:
            raise UserError(f"{ref.path}: partition listed in {storage.where(MANIFEST)} is missing")
        if size != ref.bytes:
            raise UserError(
                f"{ref.path}: {size} bytes on disk but the manifest says {ref.bytes} (truncated or replaced?)"
            )
        check_header(ref.path, ref.samples)
    return manifest, data_summary(storage.location, manifest), refs


def dataset_info(directory: str | Path) -> dict:
    """What ``data info`` shows of a data set, from its manifest (no partition is read)."""
    manifest, summary, refs = open_dataset(directory)
    sizes = [r.samples for r in refs]
    return {
        **asdict(summary),
        "bytes_on_disk": sum(r.bytes for r in refs),
        "samples_per_partition_max": manifest.samples_per_partition,
        "partition_samples_min": min(sizes),
        "partition_samples_max": max(sizes),
        "schema_version": manifest.schema_version,
        "created_utc": manifest.created_utc,
        "ids": (
            f"{manifest.objects.id_type} ids from column {manifest.objects.id_column}"
            + (", with ra and dec" if manifest.objects.has_position else "")
            if manifest.objects
            else "object ids are positions (row numbers in the order written)"
        ),
    }


# ---------------------------------------------------------------------------------------------- reading


def _header(data: bytes | memoryview, path: Path) -> dict:
    if len(data) < 8:
        raise UserError(f"{path}: not a safetensors partition (file too short)")
    length = int.from_bytes(data[:8], "little")
    if length <= 0 or 8 + length > len(data):
        raise UserError(f"{path}: corrupt or truncated partition (bad header length)")
    header = loads_json(bytes(data[8 : 8 + length]), f"{path}: corrupt partition, its header")
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt partition (header is not a JSON object)")
    return header


def _check_fields(header: dict, path: Path, expected_samples: int) -> None:
    names = {k for k in header if k != "__metadata__"}
    if names != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - names), sorted(names - set(FIELDS))
        detail = "; ".join(x for x in (missing and f"missing {missing}", extra and f"unexpected {extra}") if x)
        raise UserError(f"{path}: not a cai-bench partition ({detail})")
    for name, (dtype, shape, _) in FIELDS.items():
        info = header[name]
        if not isinstance(info, dict):
            raise UserError(f"{path}: corrupt partition (the header's {name} entry is not an object)")
        want = [expected_samples, *shape]
        if info.get("dtype") != dtype:
            raise UserError(f"{path}: {name} has dtype {info.get('dtype')}, expected {dtype}")
        if info.get("shape") != want:
            raise UserError(f"{path}: {name} has shape {info.get('shape')}, expected {want}")


def check_header(path: str | Path, expected_samples: int) -> None:
    """Read only the header: field names, dtypes and shapes against what the manifest promises."""
    storage, name = split_ref(str(path))
    data = storage.read_head(name, 8 + MAX_HEADER)
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    _check_fields(_header(data[: 8 + min(length, MAX_HEADER)], path), path, expected_samples)


def _decoded(ref: PartitionRef, verify: bool, load: Callable, finite: Callable) -> dict:
    """A partition read and checked against its manifest entry (size, sha256, header), decoded by ``load`` and
    its float fields checked for NaN and inf with ``finite``: one read for torch and for numpy workers."""
    path = ref.path
    storage, name = split_ref(path)
    data = storage.read(name)
    if len(data) != ref.bytes:
        raise UserError(f"{path}: {len(data)} bytes but the manifest says {ref.bytes} (truncated or replaced?)")
    if verify and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise UserError(f"{path}: sha256 does not match the manifest (corrupt file); run cai-bench data verify")
    _check_fields(_header(data, path), path, ref.samples)
    try:
        fields = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise UserError(f"{path}: corrupt partition ({exc})") from None
    for field_name in FLOAT_FIELDS:
        values = fields[field_name]
        # a redshift may be NaN: unknown (data import's "no redshift"); never infinite
        ok = np.asarray(finite(values))
        if field_name == "redshift":
            ok = ok | np.asarray(values != values)
        if not bool(ok.all()):
            bad = int(ok.reshape(ref.samples, -1).all(axis=1).argmin())
            raise UserError(f"{path}: {field_name} holds NaN or inf values (first at sample {bad})")
    return fields


def read_partition(ref: PartitionRef, verify: bool = True) -> Partition:
    """Read, check (size, checksum, format, finite values) and decode one partition."""
    import torch  # only a torch worker decodes to tensors: the rest of the format is numpy and bytes
    from safetensors.torch import load as load_safetensors  # (it imports torch too)

    start = time.perf_counter()
    tensors = _decoded(ref, verify, load_safetensors, lambda t: torch.isfinite(t).numpy())
    return Partition(
        ref=ref,
        images=tensors["images"],
        magnitudes=tensors["magnitudes"],
        redshift=tensors["redshift"],
        object_id=tensors["object_id"],
        load_s=time.perf_counter() - start,
    )


def read_partition_arrays(ref: PartitionRef, verify: bool = True) -> dict[str, np.ndarray]:
    """The same read and checks as ``read_partition``, decoded to numpy arrays: for workers without torch."""
    return _decoded(ref, verify, safetensors.numpy.load, np.isfinite)


def verify_dataset(directory: str | Path) -> tuple[Manifest, list[str]]:
    """Check every partition fully (size, sha256, format, values); returns the problems found."""
    manifest = load_manifest(directory)
    problems = []
    storage = storage_for(directory)
    offsets = np.cumsum([0] + [e.samples for e in manifest.partitions]).tolist()
    for ref, entry in zip(partition_refs(storage, manifest), manifest.partitions, strict=True):
        if storage.size(entry.file) is None:
            problems.append(f"{ref.path}: missing")
            continue
        try:
            part = read_partition(ref, verify=True)
        except UserError as exc:
            problems.append(str(exc))
            continue
        start = offsets[ref.index]
        if manifest.objects and not np.array_equal(part.object_id.numpy(), np.arange(start, start + ref.samples)):
            problems.append(f"{ref.path}: its object positions are not {start}..{start + ref.samples - 1}")
    if manifest.objects:
        try:
            name = manifest.objects.file
            check_objects_bytes(storage.read(name), manifest.objects, storage.where(name))
        except (UserError, OSError) as exc:
            problems.append(str(exc))
    return manifest, problems


# ---------------------------------------------------------------------------------------------- writing


def _serialize(batch: synthetic.GalaxyBatch) -> bytes:
    arrays = {name: np.ascontiguousarray(getattr(batch, name), dtype=spec[2]) for name, spec in FIELDS.items()}
    # One metadata entry only: safetensors writes several in no fixed order, and the same seed must give the
    # same bytes.
    return safetensors.numpy.save(arrays, metadata={"format": f"{FORMAT}/{SCHEMA_VERSION}"})


def _dataset_id(entries: list[PartitionEntry]) -> str:
    return hashlib.sha256("\n".join(e.sha256 for e in entries).encode()).hexdigest()[:16]


def rebatch(stream: Iterator[synthetic.GalaxyBatch]) -> Callable[[int], synthetic.GalaxyBatch]:
    """A ``take(n)`` that cuts galaxy batches of any size, read from ``stream`` in order, into batches of ``n``:
    what ``write_partitions`` asks for (``rechunk`` over the batch's fields)."""
    take = rechunk(vars(batch) for batch in stream)  # the batch's own arrays: asdict would deep-copy each
    return lambda n: synthetic.GalaxyBatch(**take(n))


def write_partitions(staging: Path, sizes: list[int], take: Callable[[int], synthetic.GalaxyBatch],
                     progress: Progress | None = None) -> list[PartitionEntry]:  # fmt: skip
    """Write partitions of ``sizes`` samples into ``staging``, each from ``take(n)``, one in memory at a time."""
    entries: list[PartitionEntry] = []
    written, total = 0, sum(sizes)
    digits = max(5, len(str(len(sizes) - 1)))
    for index, size in enumerate(sizes):
        batch = take(size)
        if len(batch) != size:
            raise RuntimeError(f"expected {size} samples for partition {index}, got {len(batch)}")
        data = _serialize(batch)
        name = f"part-{index:0{digits}d}.safetensors"
        (staging / name).write_bytes(data)
        entries.append(PartitionEntry(name, size, len(data), hashlib.sha256(data).hexdigest()))
        written += size
        del batch, data
        if progress:
            progress(written, total)
    return entries


def finish_manifest(staging: Path, entries: list[PartitionEntry], *, source: dict, partition_mb: float,
                    has_labels: bool = True, objects: ObjectsEntry | None = None) -> Manifest:  # fmt: skip
    """Write the manifest of the partitions in ``staging``: last, so that a manifest means a whole data set."""
    total = sum(e.samples for e in entries)
    manifest = Manifest(
        dataset_id=_dataset_id(entries),
        source=source,
        samples=total,
        data_gb=data_gb(total),
        partition_mb=partition_mb,
        samples_per_partition=samples_per_partition(partition_mb),
        partitions=entries,
        has_labels=has_labels,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        objects=objects,
    )
    raw = asdict(manifest)
    if objects is None:
        del raw["objects"]  # a data set without one reads as it did before the objects table existed
    (staging / MANIFEST).write_text(json.dumps(raw, indent=1) + "\n")
    return manifest


def write_dataset(
    out: str | Path,
    sizes: list[int],
    take: Callable[[int], synthetic.GalaxyBatch],
    *,
    source: dict,
    partition_mb: float,
    has_labels: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Write partitions of ``sizes`` samples, each from ``take(n)``; only one partition is in memory at a time."""
    with staged_directory(out, overwrite, "data set", MANIFEST) as staging:
        entries = write_partitions(staging, sizes, take, progress)
        return finish_manifest(staging, entries, source=source, partition_mb=partition_mb, has_labels=has_labels)


def synthesize(
    out: str | Path,
    gb: float,
    partition_mb: float,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Generate ``gb`` GB of synthetic galaxies from ``seed`` in ``partition_mb`` MB partitions."""
    samples = samples_for_gb(gb)
    position = 0

    def take(n: int) -> synthetic.GalaxyBatch:
        nonlocal position
        batch = synthetic.generate(seed, position, position + n)
        position += n
        return batch

    source = {"kind": "synthetic", "seed": seed, "generator_version": synthetic.GENERATOR_VERSION, "gb": gb}
    return write_dataset(
        out,
        partition_sizes(samples, partition_mb),
        take,
        source=source,
        partition_mb=partition_mb,
        overwrite=overwrite,
        progress=progress,
    )


def split(
    src: str | Path, partition_mb: float, out: str | Path, *, overwrite: bool = False, progress: Progress | None = None
) -> Manifest:
    """Re-partition a data set without regenerating it: same samples, same order, new partition size; its
    objects table, indexed by position, is copied as it is."""
    src = Path(src)
    if Path(out).resolve() == src.resolve():
        raise UserError(f"{out}: --out must differ from the source data set")
    manifest, _, refs = open_dataset(src)
    parts = (read_partition(ref, verify=True) for ref in refs)  # one source partition read at a time
    stream = (
        synthetic.GalaxyBatch(p.images.numpy(), p.magnitudes.numpy(), p.redshift.numpy(), p.object_id.numpy())
        for p in parts
    )
    lineage = {"dataset_id": manifest.dataset_id, "partition_mb": manifest.partition_mb}
    source = {**manifest.source, "split_from": [*manifest.source.get("split_from", []), lineage]}
    with staged_directory(out, overwrite, "data set", MANIFEST) as staging:
        entries = write_partitions(staging, partition_sizes(manifest.samples, partition_mb), rebatch(stream), progress)
        if manifest.objects:
            data = storage_for(src).read(manifest.objects.file)
            check_objects_bytes(data, manifest.objects, str(src / manifest.objects.file))
            (staging / manifest.objects.file).write_bytes(data)
        return finish_manifest(staging, entries, source=source, partition_mb=partition_mb,
                               has_labels=manifest.has_labels, objects=manifest.objects)  # fmt: skip
