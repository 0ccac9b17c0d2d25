"""One rechunker: a stream of column batches of any length, read front to back, cut into the lengths asked for.
Importers cut survey files into partitions with it, and predict reads the objects table beside the partitions
with it; only what one request needs is held."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np


def rechunk(
    batches: Iterator[Mapping[str, np.ndarray]], ended: Callable[[int], Exception] | None = None
) -> Callable[[int], dict[str, np.ndarray]]:
    """``take(n)``: the next ``n`` rows of every column of ``batches``. Where the batches end first, raises
    ``ended(row)`` (the first row that is missing), else a RuntimeError."""
    pending: list[Mapping[str, np.ndarray]] = []
    held, position = 0, 0

    def take(n: int) -> dict[str, np.ndarray]:
        nonlocal held, position
        while held < n:
            batch = next(batches, None)
            if batch is None:
                raise (ended or _ended)(position + held)
            pending.append(batch)
            held += len(next(iter(batch.values())))
        merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
        pending[:] = [{k: v[n:] for k, v in merged.items()}] if held > n else []
        held -= n
        position += n
        return {k: v[:n] for k, v in merged.items()}

    return take


def _ended(row: int) -> Exception:
    return RuntimeError(f"internal: the data ends at row {row}, before the rows its sizes were made for")
