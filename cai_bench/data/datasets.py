"""Which data set a run reads: a directory (or ``s3://`` prefix) it is given, or synthetic data of a size,
generated once into the cache and reused by every later run that asks for the same size, partitioning and seed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, exclusive
from cai_bench.core.plan import DataSummary, PartitionRef
from cai_bench.data.partitions import open_dataset, synthesize
from cai_bench.data.storage import MANIFEST
from cai_bench.data.synthetic import GENERATOR_VERSION

DEFAULT_GB = 0.1  # 5,231 samples: 16-20 s of fp32 inference on a 2-core machine
DEFAULT_PARTITION_MB = 25.0


def synthetic_dir(gb: float, partition_mb: float, seed: int) -> Path:
    return cache_dir() / "datasets" / f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{gb:g}gb-{partition_mb:g}mb"


def cached_synthetic(
    gb: float, partition_mb: float, seed: int, progress: Callable[[int, int], None] | None = None
) -> Path:
    """A synthetic data set in the cache, generated on first use and reused after."""
    path = synthetic_dir(gb, partition_mb, seed)
    # Another command making the same data set: wait for it, then reuse it
    with exclusive(cache_dir() / ".locks" / f"{path.name}.lock"):
        if not (path / MANIFEST).is_file():
            synthesize(path, gb, partition_mb, seed, overwrite=True, progress=progress)
    return path


def resolve_data(
    data: str | Path | None,
    gb: float | None,
    partition_mb: float | None,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[DataSummary, tuple[PartitionRef, ...]]:
    """The data a run uses: a given directory, or synthetic data of ``gb`` (default 0.1 GB) from the cache."""
    if data is not None and gb is not None:
        raise UserError("give either --data DIR or --gb X, not both")
    if data is None:
        gb = DEFAULT_GB if gb is None else gb
        data = cached_synthetic(gb, DEFAULT_PARTITION_MB if partition_mb is None else partition_mb, seed, progress)
    manifest, summary, refs = open_dataset(data)
    if partition_mb is not None and abs(partition_mb - manifest.partition_mb) > 1e-9:
        raise UserError(
            f"{data}: partitioned at {manifest.partition_mb:g} MB, not {partition_mb:g} MB; "
            f"re-partition it with: cai-bench data split {data} --partition-mb {partition_mb:g} --out DIR"
        )
    return summary, refs
