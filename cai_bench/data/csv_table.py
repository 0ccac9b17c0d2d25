"""CSV and ECSV tables read exactly: an integer column stays integers (never through float, where an id above
2^53 would round onto its neighbour's), text stays text, and every bad line is named by its number.

A leading block of ``#`` lines is the header: ECSV's (its delimiter, which columns it declares as strings, its
``meta``) or plain comments. pyarrow's CSV reader splits the rest into columns of text; each column is then
typed on its own: int64 where every cell is an integer that fits, float64 where every cell is a number or empty
(empty: NaN, missing), text otherwise. A column of integers too large for int64, or with empty cells, and digits
that float64 cannot hold (over 15), stays text: no value is ever changed by reading it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from cai_bench.core.errors import UserError

BOM = b"\xef\xbb\xbf"  # what Excel puts before a UTF-8 CSV
INTEGER = r"^[+-]?[0-9]+$"
EXACT_IN_FLOAT = 15  # digits every float64 holds exactly
# ECSV's column declarations, as astropy writes them (YAML flow) or as cai-bench does (JSON)
DECLARED = re.compile(r"""^- \{.*?["']?name["']?: *["']?([^,"'}]+)["']?.*?datatype["']?: *["']?(\w+)""")
TEXT_PREFIX = "'"  # what cai-bench's CSV writer puts before a cell a spreadsheet would take as a formula


def _header(data: bytes) -> tuple[list[str], int]:
    """The leading ``#`` lines (without their ``# ``) and the offset where the table starts."""
    lines, at = [], 0
    while data.startswith(b"#", at):
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end + 1
        lines.append(data[at:end].decode("utf-8", "replace").rstrip("\r\n")[1:].lstrip(" "))
        at = end
    return lines, at


def _header_facts(lines: list[str]) -> tuple[str, set[str], dict]:
    """An ECSV header's delimiter, the columns it declares as strings, and its meta (JSON; {} where it is YAML)."""
    ecsv = bool(lines) and lines[0].startswith("%ECSV")
    delimiter = "," if not ecsv else " "
    strings, meta = set(), {}
    for line in lines:
        if line.startswith("delimiter:"):
            delimiter = line.split(":", 1)[1].strip().strip("'\"") or delimiter
        elif line.startswith("meta:"):
            try:
                meta = json.loads(line[len("meta:") :])
            except ValueError:  # astropy writes YAML here: its meta is not ours to read
                meta = {}
        elif (found := DECLARED.match(line)) and found.group(2) == "string":
            strings.add(found.group(1).strip())
    return delimiter, strings, meta if isinstance(meta, dict) else {}


def _typed(text, declared_text: bool) -> np.ndarray:
    """One column of text cells as int64, float64 (empty: NaN) or text, whichever holds every cell exactly."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = pc.utf8_trim_whitespace(text)
    as_text = np.asarray(cells.to_numpy(zero_copy_only=False), dtype=str)
    if declared_text or len(cells) == 0:
        return as_text
    empty = pc.equal(cells, "")
    integer = pc.match_substring_regex(cells, INTEGER)
    if pc.all(pc.or_(integer, empty)).as_py() and not pc.any(empty).as_py():
        try:
            return pc.cast(cells, pa.int64()).to_numpy()
        except pa.ArrowInvalid:  # an integer past int64: kept as written, never rounded
            return as_text
    long_integer = pc.and_(integer, pc.greater(pc.utf8_length(pc.utf8_ltrim(cells, "+-0")), EXACT_IN_FLOAT))
    if pc.any(long_integer).as_py():  # float64 would round it: text keeps it
        return as_text
    try:
        return pc.cast(pc.if_else(empty, "nan", cells), pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        return as_text


def _ragged(path: Path, header_lines: int):
    """pyarrow's handler of a line with too few or too many cells: the first is kept, to be named."""
    found: list = []

    def handler(row) -> str:
        if not found:
            found.append(row)
        return "skip"

    def check() -> None:
        if found:
            row = found[0]
            line = f"line {header_lines + row.number}" if row.number is not None else "a line"
            raise UserError(f"{path}: {line} has {row.actual_columns} cells, the header {row.expected_columns} "
                            "(a ragged or truncated line)")  # fmt: skip

    return handler, check


def _unprefixed(values: np.ndarray) -> np.ndarray:
    """Text cells as they were before cai-bench's writer prefixed them (``TEXT_PREFIX``)."""
    prefixed = np.char.startswith(values, TEXT_PREFIX)
    if prefixed.any():
        values = values.copy()
        values[prefixed] = np.char.replace(values[prefixed], TEXT_PREFIX, "", count=1)
    return values


def read_csv_table(path: Path, meta_key: str) -> tuple[dict[str, np.ndarray], dict]:
    """The columns of a CSV (with or without an ECSV header), each typed exactly, and what its ECSV ``meta`` holds
    under ``meta_key``. Text its writer prefixed against spreadsheet formulas (it says so there) reads as it was."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    data = path.read_bytes()
    data = data[len(BOM) :] if data.startswith(BOM) else data
    lines, at = _header(data)
    delimiter, strings, meta = _header_facts(lines)
    end = data.find(b"\n", at)
    names_line = data[at : len(data) if end < 0 else end].decode("utf-8").rstrip("\r")
    names = next(csv.reader([names_line], delimiter=delimiter), [])
    if not names:
        raise UserError(f"{path}: no header row (the names of the columns)")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: a column name appears twice in the header row ({', '.join(names)})")
    handler, check = _ragged(path, len(lines))
    table = pcsv.read_csv(
        io.BytesIO(data[at:]),
        read_options=pcsv.ReadOptions(use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler),
        convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False),
    )
    check()
    about = meta.get(meta_key) if isinstance(meta.get(meta_key), dict) else {}
    columns = {}
    for name in table.column_names:
        values = _typed(table.column(name).combine_chunks(), name in strings)
        columns[name] = _unprefixed(values) if about.get("csv_text_prefix") and values.dtype.kind == "U" else values
    return columns, about
