"""Import the upstream project's data files: ``torch.save(TensorDataset(images, magnitudes, redshift))``.

Files are read with ``torch.load(weights_only=True)`` and one more allowed global, ``TensorDataset``: any other
pickled content is refused before it is built. Zip-format files are memory-mapped, so only the slice of samples
that goes into the partition being written is ever read into memory (never more than one input file at a time);
images stored as ``[N, 64, 64, 5]`` (height, width, band) are permuted and centre-cropped to ``[N, 5, 32, 32]``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cai_bench.core.errors import UserError
from cai_bench.core.files import file_sha256
from cai_bench.core.plan import partition_sizes
from cai_bench.data import synthetic
from cai_bench.data.manifest import Manifest
from cai_bench.data.partitions import Progress, rebatch, write_dataset

CROP = 32


@dataclass
class UpstreamFile:
    path: Path
    samples: int
    image_layout: str  # "NCHW" ([N,5,32,32] or [N,5,64,64]) or "NHWC" ([N,64,64,5])
    has_labels: bool
    sha256: str


def _load(path: Path) -> tuple[torch.Tensor, ...]:
    """The tensors of a TensorDataset (or a plain tuple of tensors) file, memory-mapped where possible."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with torch.serialization.safe_globals([TensorDataset]):
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"names {named.group(1)}, which" if named else "holds pickled objects that"
            raise UserError(
                f"{path}: refused: the pickle {what} a TensorDataset of tensors does not need; nothing was run"
            ) from None
        except Exception as exc:  # a corrupt file makes the unpickler and zip reader fail in many ways
            raise UserError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    tensors = obj.tensors if isinstance(obj, TensorDataset) else obj
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UserError(f"{path}: expected a TensorDataset(images, magnitudes[, redshift]), found {type(obj).__name__}")
    if len(tensors) not in (2, 3):
        raise UserError(f"{path}: expected 2 or 3 tensors (images, magnitudes[, redshift]), found {len(tensors)}")
    return tuple(tensors)


def _inspect(path: Path, tensors: tuple[torch.Tensor, ...]) -> UpstreamFile:
    images, magnitudes = tensors[0], tensors[1]
    n = images.shape[0] if images.ndim else 0
    if images.ndim == 4 and tuple(images.shape[1:]) in ((5, 32, 32), (5, 64, 64)):
        layout = "NCHW"
    elif images.ndim == 4 and tuple(images.shape[1:]) == (64, 64, 5):
        layout = "NHWC"
    else:
        raise UserError(
            f"{path}: images have shape {list(images.shape)}; expected [N,5,32,32], [N,5,64,64] or [N,64,64,5]"
        )
    if tuple(magnitudes.shape) != (n, 5):
        raise UserError(f"{path}: magnitudes have shape {list(magnitudes.shape)}; expected [{n},5]")
    if len(tensors) == 3:
        redshift = tensors[2]
        if tuple(redshift.shape) not in ((n,), (n, 1)):
            raise UserError(f"{path}: redshift has shape {list(redshift.shape)}; expected [{n}] or [{n},1]")
    for name, tensor in zip(("images", "magnitudes", "redshift"), tensors, strict=False):
        if not tensor.is_floating_point():
            raise UserError(f"{path}: {name} are {tensor.dtype}; expected floating point values")
    if n == 0:
        raise UserError(f"{path}: holds no samples")
    return UpstreamFile(path, n, layout, len(tensors) == 3, file_sha256(path))


def _slice(info: UpstreamFile, tensors: tuple[torch.Tensor, ...], start: int, stop: int,
           first_id: int) -> synthetic.GalaxyBatch:  # fmt: skip
    """Samples [start, stop) of one file in our layout and dtypes; only this slice is read from the file."""
    images = tensors[0][start:stop]
    if info.image_layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    offset = (images.shape[-1] - CROP) // 2
    images = images[:, :, offset : offset + CROP, offset : offset + CROP]
    fields = {
        "images": images.to(torch.float32).contiguous().numpy(),
        "magnitudes": tensors[1][start:stop].to(torch.float64).numpy(),
        "redshift": (
            tensors[2][start:stop].reshape(-1).to(torch.float32).numpy()
            if info.has_labels
            else np.zeros(stop - start, np.float32)
        ),
    }
    for name, values in fields.items():
        if not np.isfinite(values).all():
            bad = start + int(np.nonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0][0])
            raise UserError(f"{info.path}: sample {bad} has NaN or inf in {name}")
    ids = np.arange(first_id, first_id + stop - start, dtype=np.int64)
    return synthetic.GalaxyBatch(fields["images"], fields["magnitudes"], fields["redshift"], ids)


def import_upstream(
    sources: list[str | Path],
    out: str | Path,
    partition_mb: float,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Convert upstream TensorDataset files, in the order given, into our partitions and manifest.

    Object ids number the samples 0..N-1 in that order (upstream files carry none).
    """
    paths = [Path(s) for s in sources]
    if not paths:
        raise UserError("give at least one upstream .pt file")
    files = []
    for path in paths:  # first pass: check every file and count its samples before writing anything
        tensors = _load(path)
        files.append(_inspect(path, tensors))
        del tensors
    if len({f.has_labels for f in files}) > 1:
        raise UserError("some files have redshift labels and some do not; import them separately")
    total = sum(f.samples for f in files)

    def slices() -> Iterator[synthetic.GalaxyBatch]:
        first_id = 0
        for info in files:
            tensors = _load(info.path)  # one input file open at a time
            for start in range(0, info.samples, 4096):
                stop = min(start + 4096, info.samples)
                yield _slice(info, tensors, start, stop, first_id)
                first_id += stop - start
            del tensors

    source = {
        "kind": "upstream-tensordataset",
        "ids": "row numbers 0..N-1 in the order of the files (upstream files carry no object ids)",
        "files": [
            {"name": f.path.name, "samples": f.samples, "image_layout": f.image_layout, "sha256": f.sha256}
            for f in files
        ],
    }
    return write_dataset(
        out,
        partition_sizes(total, partition_mb),
        rebatch(slices()),
        source=source,
        partition_mb=partition_mb,
        has_labels=files[0].has_labels,
        overwrite=overwrite,
        progress=progress,
    )
