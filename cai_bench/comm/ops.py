"""Reductions: sum, prod, min and max element-wise, and a user's function of two values, which says whether it
is associative and commutative. A collective uses what those allow: a tree in any order for the usual ones, a
tree that keeps the ranks' order for an associative one that is not commutative, and a left-to-right fold in rank
order for one that is not associative."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cai_bench.comm.frames import CommError, describe_value


@dataclass(frozen=True)
class ReduceOp:
    name: str
    fn: Callable  # (left, right) -> combined; left holds the lower ranks
    associative: bool = True
    commutative: bool = True
    elementwise: bool = False  # a numpy ufunc over numbers, lists and arrays: values must match in shape


def _elementwise(name: str, ufunc) -> ReduceOp:
    return ReduceOp(name, ufunc, elementwise=True)


SUM = _elementwise("sum", np.add)
PROD = _elementwise("prod", np.multiply)
MIN = _elementwise("min", np.minimum)
MAX = _elementwise("max", np.maximum)
BUILTIN = {op.name: op for op in (SUM, PROD, MIN, MAX)}


def user_op(fn: Callable, *, associative: bool, commutative: bool, name: str | None = None) -> ReduceOp:
    """A reduction of the user's: ``fn(left, right)``, where ``left`` stands for the lower ranks."""
    return ReduceOp(name or getattr(fn, "__name__", "user"), fn, associative, commutative)


def as_op(op: ReduceOp | str) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    if op not in BUILTIN:
        raise CommError(f"unknown reduction {op!r}: one of {', '.join(BUILTIN)}, or comm.user_op(...)")
    return BUILTIN[op]


def combine(op: ReduceOp, left, right, left_ranks: str, right_ranks: str):
    """``op`` over two values, the left one from the lower ranks; values that cannot combine name both sides."""
    if not op.elementwise:
        return op.fn(left, right)
    a, b = np.asarray(left), np.asarray(right)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise CommError(
            f"{op.name}: {left_ranks} passed {describe_value(left)}, {right_ranks} passed {describe_value(right)}"
        )
    out = op.fn(a, b)
    if isinstance(left, np.ndarray):
        return out
    return out.tolist() if isinstance(left, (list, tuple)) else out.item()
