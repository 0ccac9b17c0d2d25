"""Sizes as the paper counts them, and the Plan of a run (pure: no I/O here).

Facts from ``shared/spec/data-and-measures.md``: "GB"/"MB" are GiB/MiB; one sample is 20,524 bytes
(image f32 [5,32,32] + magnitudes f64 [5] + redshift f32); 164,160 bits per sample are counted as processed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cai_bench.errors import UserError

BYTES_PER_SAMPLE = 20_480 + 40 + 4
BITS_PER_SAMPLE = (20_480 + 40) * 8  # image + magnitudes; the label is not input
MIB = 1 << 20
GIB = 1 << 30
PRECISIONS = ("fp32", "bf16")


def samples_for_gb(gb: float) -> int:
    """D GB of data holds floor(D * 2^30 / 20,524) samples."""
    if not gb > 0:
        raise UserError(f"data size must be positive, got {gb} GB")
    samples = math.floor(gb * GIB / BYTES_PER_SAMPLE)
    if samples < 1:
        raise UserError(f"{gb} GB is less than one sample ({BYTES_PER_SAMPLE} bytes)")
    return samples


def samples_per_partition(partition_mb: float) -> int:
    """A P MB partition holds at most ceil(P * 2^20 / 20,524) samples."""
    if not partition_mb > 0:
        raise UserError(f"partition size must be positive, got {partition_mb} MB")
    return math.ceil(partition_mb * MIB / BYTES_PER_SAMPLE)


def partition_count(samples: int, partition_mb: float) -> int:
    """Number of partitions: ceil(data MB / P), as the paper counts its Lambda functions.

    For 12.6 GB this is 517/259/173/130 at 25/50/75/100 MB. Filling partitions to the brim instead would need
    one fewer for 25, 50 and 100 MB (the paper's real set held slightly more than 12.6 GiB), so samples are
    spread evenly over this count instead; no partition then exceeds ``samples_per_partition``.
    """
    count = math.ceil(samples * BYTES_PER_SAMPLE / (partition_mb * MIB))
    return max(1, min(samples, count))


def partition_sizes(samples: int, partition_mb: float) -> list[int]:
    """Balanced partition sizes (they differ by at most one sample), largest first."""
    count = partition_count(samples, partition_mb)
    base, extra = divmod(samples, count)
    return [base + 1] * extra + [base] * (count - extra)


def data_gb(samples: int) -> float:
    return samples * BYTES_PER_SAMPLE / GIB


@dataclass(frozen=True)
class PartitionRef:
    """One unit of work: a partition file and what its manifest promises about it."""

    path: str
    index: int
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DataSummary:
    """What a record says about its data; the partition list itself stays in the manifest."""

    path: str
    dataset_id: str
    source: dict
    samples: int
    data_gb: float
    partition_mb: float
    partitions: int
    has_labels: bool = True


@dataclass(frozen=True)
class Plan:
    backend: str
    data: DataSummary
    partitions: tuple[PartitionRef, ...]
    batch_size: int = 512
    precision: str = "fp32"
    threads: int | None = None
    repeats: int = 1
    warmup: int = 0
    weights: str | None = None
    seed: int = 0
    verify_checksums: bool = True
    backend_options: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        """The plan as records keep it: everything but the per-partition list."""
        out = asdict(self)
        out.pop("partitions")
        return out


def make_plan(
    backend: str,
    data: DataSummary,
    partitions: tuple[PartitionRef, ...],
    *,
    batch_size: int = 512,
    precision: str = "fp32",
    threads: int | None = None,
    repeats: int = 1,
    warmup: int = 0,
    weights: str | None = None,
    seed: int = 0,
    verify_checksums: bool = True,
    backend_options: dict | None = None,
) -> Plan:
    """Validate options and build a Plan; every problem is a UserError naming the option."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    if not partitions:
        raise UserError(f"{data.path}: the data set has no partitions")
    return Plan(
        backend=backend,
        data=data,
        partitions=partitions,
        batch_size=batch_size,
        precision=precision,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        weights=weights,
        seed=seed,
        verify_checksums=verify_checksums,
        backend_options=dict(backend_options or {}),
    )
