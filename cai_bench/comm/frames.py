"""What one message between two ranks is: a header saying which operation of which call it belongs to and what
it carries, then the raw bytes of each value. A receiver checks the header against what it waits for, so ranks
that called different operations, or passed different kinds of data, fail with both sides named instead of
reading each other's bytes as their own.

A value is a number, a list of numbers or a numpy array of any dtype and shape; it comes back as what was sent
(an int as an int, a list as a list). A message holds several values (a subtree's share of a gather).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from cai_bench.core.errors import UserError

_LENGTH = struct.Struct("!I")
# Kinds of value, each back to what was sent
SCALAR, LIST, ARRAY, NONE = "scalar", "list", "array", "none"


class CommError(UserError):
    """A collective that cannot complete: a rank missing, a mismatch between ranks, a channel that failed."""


@dataclass(frozen=True)
class Header:
    op: str  # the operation of the call this message belongs to (bcast, allreduce, ...)
    seq: int  # which call of the communicator: every rank numbers its calls the same way
    src: int
    parts: tuple[dict, ...]  # per value: kind, dtype, shape, nbytes


def _as_array(value) -> tuple[str, np.ndarray]:
    if value is None:  # what a barrier's messages carry
        return NONE, np.zeros(0, np.uint8)
    if isinstance(value, np.ndarray):
        return ARRAY, np.ascontiguousarray(value)
    if isinstance(value, (list, tuple)):
        return LIST, np.asarray(value)
    if isinstance(value, (bool, int, float, complex, np.generic)):
        return SCALAR, np.asarray(value)
    raise CommError(f"cannot send a {type(value).__name__}: numbers, lists of numbers and numpy arrays only")


def encode(op: str, seq: int, src: int, values: list) -> bytes:
    """One message: the header's length, the header (JSON), then each value's bytes."""
    parts, blobs = [], []
    for value in values:
        kind, array = _as_array(value)
        if array.dtype == object:
            raise CommError(f"cannot send {value!r}: a list of numbers only")
        parts.append({"kind": kind, "dtype": array.dtype.str, "shape": list(array.shape), "nbytes": array.nbytes})
        blobs.append(array.tobytes())
    header = json.dumps({"op": op, "seq": seq, "src": src, "parts": parts}).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *blobs])


def decode_header(frame: bytes) -> tuple[Header, int]:
    (length,) = _LENGTH.unpack_from(frame)
    raw = json.loads(frame[_LENGTH.size : _LENGTH.size + length])
    return Header(raw["op"], raw["seq"], raw["src"], tuple(raw["parts"])), _LENGTH.size + length


def decode(frame: bytes, me: int, expect_op: str, expect_seq: int, expect_src: int) -> list:
    """The values of ``frame``, after checking that it is the message this rank waits for."""
    header, offset = decode_header(frame)
    if (header.op, header.seq, header.src) != (expect_op, expect_seq, expect_src):
        raise CommError(
            f"rank {me} waits for {expect_op} #{expect_seq} from rank {expect_src}, but rank {header.src} "
            f"sent {header.op} #{header.seq}: the ranks called different operations"
        )
    values = []
    for part in header.parts:
        array = np.frombuffer(frame, dtype=np.dtype(part["dtype"]), count=_count(part), offset=offset)
        array = array.reshape(part["shape"])
        offset += part["nbytes"]
        kind = part["kind"]
        if kind == NONE:
            values.append(None)
        else:
            values.append(array.copy() if kind == ARRAY else array.tolist() if kind == LIST else array.item())
    if offset != len(frame):
        raise CommError(f"rank {me}: a message from rank {header.src} of {len(frame)} bytes, its header says {offset}")
    return values


def _count(part: dict) -> int:
    return int(np.prod(part["shape"], dtype=np.int64)) if part["shape"] else 1


def describe_value(value) -> str:
    """What a value is, for an error that names two ranks' data: its kind, dtype and shape."""
    kind, array = _as_array(value)
    return f"{kind} {array.dtype} {list(array.shape)}"
