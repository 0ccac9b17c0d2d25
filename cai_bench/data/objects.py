"""The objects table of a data set: who each object is, kept beside the partitions in ``objects.parquet``.

Row ``k`` describes the object at position ``k`` of the data set (the ``object_id`` field of its partition holds
that position): its id as the survey gave it (int64 or string), ``ra`` and ``dec`` in degrees where the input had
them, and where it came from (``file``: index into the manifest's source files; ``row``: its row there). The
partitions stay fixed-width numbers that every backend reads alike; a catalogue joins the predictions back to
the ids by position. Re-partitioning keeps the order, so the table is copied unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cai_bench.core.errors import UserError
from cai_bench.data.rechunk import rechunk

OBJECTS = "objects.parquet"
ID_TYPES = ("int64", "string")


@dataclass
class ObjectsEntry:
    """The manifest's note of the objects table: enough to check it before it is read."""

    file: str
    rows: int
    bytes: int
    sha256: str
    id_type: str  # "int64" or "string"
    id_column: str  # what the input called it
    has_position: bool  # ra and dec known


def _schema(id_type: str, has_position: bool):
    import pyarrow as pa

    fields = [("id", pa.int64() if id_type == "int64" else pa.string())]
    if has_position:
        fields += [("ra", pa.float64()), ("dec", pa.float64())]
    return pa.schema([*fields, ("file", pa.int32()), ("row", pa.int64())])


@contextmanager
def objects_writer(path: Path, id_type: str, has_position: bool) -> Iterator[Callable[[dict], None]]:
    """A function that appends rows (a dict of equal-length arrays) to the objects table at ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(id_type, has_position)
    with pq.ParquetWriter(path, schema) as writer:
        yield lambda columns: writer.write_table(pa.table({f.name: columns[f.name] for f in schema}, schema=schema))


def objects_entry(path: Path, id_type: str, id_column: str, has_position: bool) -> ObjectsEntry:
    import pyarrow.parquet as pq

    data = path.read_bytes()
    rows = pq.ParquetFile(path).metadata.num_rows
    return ObjectsEntry(path.name, rows, len(data), hashlib.sha256(data).hexdigest(), id_type, id_column, has_position)


def check_objects_bytes(data: bytes, entry: ObjectsEntry, where: str) -> None:
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise UserError(f"{where}: does not match the manifest's size and sha256 (corrupt or replaced)")


def iter_objects(data: bytes, entry: ObjectsEntry, where: str) -> Iterator[dict[str, np.ndarray]]:
    """The table's rows in order, a record batch at a time, after checking it against ``entry``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_objects_bytes(data, entry, where)
    try:
        table = pq.ParquetFile(pa.BufferReader(data))
        if table.metadata.num_rows != entry.rows:
            raise UserError(f"{where}: holds {table.metadata.num_rows} rows, the manifest says {entry.rows}")
        for batch in table.iter_batches(batch_size=65536):
            yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{where}: unreadable objects table ({type(exc).__name__}: {exc})") from None


def rows_for(batches: Iterator[dict[str, np.ndarray]]) -> Callable[[int, int], dict[str, np.ndarray]]:
    """A function giving rows [start, start + n) of a table read front to back (``rechunk``), for consecutive
    requests only."""
    take = rechunk(
        batches,
        ended=lambda row: UserError(f"the objects table ends at row {row}, before the rows the partitions hold"),
    )
    position = 0

    def rows(start: int, n: int) -> dict[str, np.ndarray]:
        nonlocal position
        if start != position:
            raise UserError(f"objects table read out of order: rows from {start} asked, {position} next")
        position += n
        return take(n)

    return rows
