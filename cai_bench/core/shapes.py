"""The fields and types a reader needs of a JSON object that a user hands it (a data set's manifest, a results
record), so that a damaged or hand-edited file is one message naming the field, never an error deep in a reader."""

from __future__ import annotations

import json
import math

NUMBER, INT = "a number (0 or more)", "a whole number (0 or more)"
TEXT, FLAG, TABLE, LIST = "a string", "true or false", "an object", "a list"
# A partition's index, or -1 for a record that covers the whole data set (the reference loop's one record)
PARTITION = "a whole number (0 or more), or -1 for the whole data set"
LARGEST = 1e18  # more than any measurement or data set holds (a petabyte is 9e15 bits): a larger figure is damage


def _is_figure(value: object, whole: bool = False) -> bool:
    # bool is an int to Python, never to a manifest or a record
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    return math.isfinite(value) and 0 <= value < LARGEST


_CHECKS = {
    NUMBER: _is_figure,
    INT: lambda v: _is_figure(v, whole=True),
    PARTITION: lambda v: (v == -1 and not isinstance(v, bool)) or _is_figure(v, whole=True),
    TEXT: lambda v: isinstance(v, str),
    FLAG: lambda v: isinstance(v, bool),
    TABLE: lambda v: isinstance(v, dict),
    LIST: lambda v: isinstance(v, list),
}


def problem(table: dict, shape: dict[str, str], where: str = "", optional: bool = False, nullable=()) -> str | None:
    """What is wrong with ``table`` against ``shape`` (field -> kind), or None. With ``optional`` a field may be
    missing; a field named in ``nullable`` may also be null."""
    for name, kind in shape.items():
        if name not in table:
            if optional:
                continue
            return f"{where}{name} is missing"
        value = table[name]
        if value is None and name in nullable:
            continue
        if not _CHECKS[kind](value):
            return f"{where}{name} is {json.dumps(value, default=str)[:40]}, expected {kind}"
    return None
