"""Pinned host buffers, one per partition in flight and reused, and the reads that decode a partition straight
into one (its sha256 checked on its first read only)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from cai_bench.data.partitions import read_partition

# ---------------------------------------------------------------------------------------------- host side


@dataclass
class HostBuffer:
    """Host memory for one partition's inputs: pinned where the device is a GPU, so copies run asynchronously."""

    images: object  # torch.Tensor float32 [capacity, 5, 32, 32]
    magnitudes: object  # torch.Tensor float64 [capacity, 5]


class PinnedPool:
    """A fixed number of host buffers, each big enough for the largest partition, handed out and returned as
    partitions are read and run: memory stays bounded, and pinning (slow) happens once per buffer."""

    def __init__(self, count: int, capacity: int, pin: bool):
        self.capacity, self.pin = capacity, pin
        self.free: queue.Queue[HostBuffer | None] = queue.Queue()
        for _ in range(count):
            self.free.put(None)  # allocated on first use

    def acquire(self) -> HostBuffer:
        import torch

        buffer = self.free.get()
        if buffer is None:
            images = torch.empty((self.capacity, 5, 32, 32), dtype=torch.float32, pin_memory=self.pin)
            buffer = HostBuffer(images, torch.empty((self.capacity, 5), dtype=torch.float64, pin_memory=self.pin))
        return buffer

    def release(self, buffer: HostBuffer) -> None:
        self.free.put(buffer)


@dataclass
class HostPartition:
    """One partition read into a host buffer: ``n`` rows of it hold the partition."""

    ref: object  # PartitionRef
    buffer: HostBuffer
    n: int
    object_id: object  # numpy int64
    redshift: object  # numpy float32
    load_s: float
    pool: PinnedPool | None = None  # where the buffer goes back to after the run

    def release(self) -> None:
        if self.pool is not None:
            self.pool.release(self.buffer)
            self.pool = None


def read_into(pool: PinnedPool | None, ref, verify: bool) -> HostPartition:
    """Read, check and decode one partition into a buffer of ``pool`` (a buffer of its own without a pool)."""
    import torch

    started = time.perf_counter()
    partition = read_partition(ref, verify=verify)
    n = len(partition)
    buffer = pool.acquire() if pool is not None else PinnedPool(1, n, pin=torch.cuda.is_available()).acquire()
    try:
        buffer.images[:n].copy_(partition.images)
        buffer.magnitudes[:n].copy_(partition.magnitudes)
    except BaseException:
        if pool is not None:
            pool.release(buffer)
        raise
    return HostPartition(
        ref, buffer, n, partition.object_id.numpy(), partition.redshift.numpy(), time.perf_counter() - started, pool
    )


def once_checked(load: Callable, verify: bool) -> Callable:
    """``load(ref, verify)`` that checks a partition's sha256 on its first read only: with ``--cycle-to-gb`` a
    worker reads the same partitions again and again, and a 25 MB hash is some 20 ms of a reader's time."""
    checked: set[str] = set()

    def loaded(ref):
        partition = load(ref, verify and ref.path not in checked)
        if verify:
            checked.add(ref.path)  # after a read that passed its check
        return partition

    return loaded
