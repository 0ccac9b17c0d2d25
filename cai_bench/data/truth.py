"""Catalogues of true (spectroscopic) redshifts, checked and joined to predictions by id.

Ids match exactly or not at all: integers as int64 (a CSV's are read as integers, never through float), text as
text; an id stored as a float matches only where it is a whole number that float64 holds exactly. Redshift
catalogues write "no redshift" as -9999, -99, -1 or NaN: those values are missing (``--truth-missing`` sets
them), and a redshift outside ``Z_RANGE`` is not used either. Both are counted and never enter a metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cai_bench.core.errors import UserError
from cai_bench.core.files import file_sha256
from cai_bench.core.text import shown
from cai_bench.data.catalogue import read_catalogue

Z_TRUTH_NAMES = ("z", "redshift", "zspec", "z_spec", "specz", "Z", "REDSHIFT", "z_true")
MISSING_DEFAULT = (-9999.0, -99.0, -1.0, math.nan)  # the "no redshift" values of SDSS, DESI and most surveys
Z_RANGE = (-1.0, 20.0)  # above -1 (1 + z > 0); at most 20, past any galaxy known (z ~ 14)
EXACT_FLOAT = 2**53  # every whole number up to here is exactly a float64, and no further
INT64 = np.iinfo(np.int64)
USED, MISSING, OUT_OF_RANGE = 0, 1, 2
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"^$|^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf)$", re.IGNORECASE)


@dataclass
class Truth:
    """A catalogue of true redshifts, checked, keyed by its id column; ``z`` is NaN where it is not used and
    ``status`` says why (``MISSING``, ``OUT_OF_RANGE``)."""

    path: Path
    on: str
    z_column: str
    ids: np.ndarray
    z: np.ndarray
    status: np.ndarray
    missing_values: tuple[float, ...]
    sha256: str


def parse_missing(text: str) -> tuple[float, ...]:
    """``--truth-missing``: numbers (and ``nan``) separated by commas; ``none`` for no value at all."""
    if text.strip().lower() in ("", "none"):
        return ()
    values = []
    for word in text.split(","):
        try:
            values.append(float(word))
        except ValueError:
            raise UserError(f"--truth-missing: {shown(word.strip())} is not a number (numbers and nan, "
                            "separated by commas, or none)") from None  # fmt: skip
    return tuple(values)


def _missing_text(values: tuple[float, ...]) -> str:
    return ", ".join("NaN" if math.isnan(v) else f"{v:g}" for v in values) or "none"


def _row_of(mask: np.ndarray) -> int:
    return int(np.argmax(mask)) + 1


def _checked_ids(path: Path, on: str, ids: np.ndarray) -> np.ndarray:
    """The id column as int64, float64 (whole or not, each exact) or text; one line for an id that is not there
    or would not be exact."""
    if ids.dtype.kind in "OSU":
        ids = np.char.strip(ids.astype(str))
        if (empty := ids == "").any():
            raise UserError(f"{path}: row {_row_of(empty)} has no id in column {on}")
        # a column of integers that the reader kept as text because one of them is past int64
        too_big = [
            v for v in ids[np.char.str_len(ids) > 18] if _INTEGER.fullmatch(v) and not INT64.min <= int(v) <= INT64.max
        ]
        if too_big and all(_INTEGER.fullmatch(v) for v in ids):
            raise UserError(f"{path}: id {shown(too_big[0])} in column {on} does not fit a 64-bit integer")
        return ids
    if ids.dtype.kind == "u":
        if len(ids) and ids.max() > INT64.max:
            raise UserError(f"{path}: id {ids.max()} in column {on} does not fit a 64-bit signed integer")
        return ids.astype(np.int64)
    if ids.dtype.kind == "f":
        if (nan := ~np.isfinite(ids)).any():
            raise UserError(f"{path}: row {_row_of(nan)} has no id in column {on} ({ids[nan][0]})")
        if (inexact := np.abs(ids) >= EXACT_FLOAT).any():
            raise UserError(
                f"{path}: column {on} holds ids as floating point, and {ids[inexact][0]:.17g} is past "
                "2^53, where floats skip whole numbers: the ids are not exact; store them as integers"
            )
        return ids.astype(np.float64)
    if ids.dtype.kind not in "i":
        raise UserError(f"{path}: column {on} holds {ids.dtype}, not ids")
    return ids.astype(np.int64)


def _checked_z(path: Path, name: str, z: np.ndarray, missing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The redshifts, NaN where missing or out of range, and each one's status."""
    if z.dtype.kind not in "fiu":
        cells = [str(v).strip() for v in z]
        row, cell = next(((n, v) for n, v in enumerate(cells, 1) if not _NUMBER.match(v)), (0, ""))
        raise UserError(f"{path}: redshift column {name} holds text, not numbers (row {row}: {shown(cell)})")
    return usable_redshifts(z.astype(np.float64), missing)


def usable_redshifts(z: np.ndarray, missing: tuple[float, ...] = MISSING_DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """``z`` with NaN where it is one of the ``missing`` values or outside ``Z_RANGE``, and each one's status:
    the one rule of a usable redshift, for a truth catalogue and for ``data import`` alike."""
    numbers = np.array([v for v in missing if not math.isnan(v)], np.float64)
    absent = np.isin(z, numbers) | (np.isnan(z) if any(math.isnan(v) for v in missing) else False)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(z) & (z > Z_RANGE[0]) & (z <= Z_RANGE[1])
    status = np.where(absent, MISSING, np.where(usable, USED, OUT_OF_RANGE)).astype(np.int8)
    return np.where(status == USED, z, np.nan), status


def load_truth(path: str | Path, on: str, z_column: str | None = None,
               missing: tuple[float, ...] = MISSING_DEFAULT) -> Truth:  # fmt: skip
    """Read and check a truth catalogue before anything runs: rows, the columns, ids whole and unique, the
    redshifts numbers (``missing`` values and those out of ``Z_RANGE`` are not used)."""
    path = Path(path)
    columns, _ = read_catalogue(path, "truth catalogue", extra=(".ecsv",))
    found = ", ".join(map(shown, columns))
    if on not in columns:
        raise UserError(f"{path}: no column {on!r} to join on (--on); found {found}")
    z_column = z_column or next((n for n in Z_TRUTH_NAMES if n in columns and n != on), None)
    if z_column is None or z_column not in columns:
        raise UserError(f"{path}: no redshift column {z_column or 'z or redshift'} (--truth-z names it); found {found}")
    if not len(columns[on]):
        raise UserError(f"{path}: holds no rows: there is nothing to join")
    ids = _checked_ids(path, on, columns[on])
    z, status = _checked_z(path, z_column, columns[z_column], missing)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{path}: id {unique[counts > 1][0]} appears {int(counts.max())} times in column {on}")
    return Truth(path, on, z_column, ids, z, status, missing, file_sha256(path))


def _comparable(ids: np.ndarray, truth: Truth) -> tuple[np.ndarray, np.ndarray]:
    """The truth's ids as the same kind of value as ours, and which of them can equal one of ours at all."""
    theirs = truth.ids
    whole = np.ones(len(theirs), bool)
    if theirs.dtype.kind == "f":  # exact below 2^53 (load_truth): a whole number is that integer, the rest none
        whole = theirs == np.round(theirs)
        as_integers = np.where(whole, theirs, 0).astype(np.int64)
        if ids.dtype.kind in "OSU":  # "5000" for 5000.0, as a text id would write it
            return np.where(whole, as_integers.astype(str), theirs.astype(str)), np.ones(len(theirs), bool)
        return as_integers, whole
    if ids.dtype.kind in "OSU":
        return theirs.astype(str), whole
    if theirs.dtype.kind in "OSU":
        raise UserError(f"{truth.path}: column {truth.on} holds text ids, the predictions integer ids")
    return theirs, whole


def join_truth(ids: np.ndarray, truth: Truth) -> tuple[np.ndarray, dict]:
    """The true redshift of each of ``ids`` (NaN where the catalogue has none or it is not used), and what was
    joined: ids found, redshifts used, missing and out of range among those found, ids that match nothing."""
    theirs, can = _comparable(ids, truth)
    ours = ids.astype(str) if ids.dtype.kind in "OSU" else ids
    candidates = np.flatnonzero(can)
    order = candidates[np.argsort(theirs[candidates], kind="stable")]
    where = np.full(len(ids), -1, np.int64)
    if len(order):
        ranked = theirs[order]
        at = np.minimum(np.searchsorted(ranked, ours), len(ranked) - 1)
        where = np.where(ranked[at] == ours, order[at], -1)
    found = where[where >= 0]
    z = np.full(len(ids), np.nan, np.float64)
    z[where >= 0] = truth.z[found]
    status = truth.status[found]
    note = {"catalogue": truth.path.name, "sha256": truth.sha256, "on": truth.on, "z_column": truth.z_column,
            "matched": len(found), "objects": len(ids), "used": int((status == USED).sum()),
            "missing": int((status == MISSING).sum()), "out_of_range": int((status == OUT_OF_RANGE).sum()),
            "missing_values": _missing_text(truth.missing_values), "z_range": list(Z_RANGE),
            "not_whole": int((~can).sum())}  # fmt: skip
    return z, note
