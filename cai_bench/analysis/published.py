"""The CAI paper's published figures, shipped as package data (``cai_bench/reference/``) so that they are there
wherever cai-bench is installed: its table of results (``paper-results.csv``; or any CSV of the same columns) and
the per-function records of its 517-function run of 12.6 GB in 25 MB partitions.

Plots draw the table beside our curves; ``estimate --profile paper`` builds its profile from both."""

from __future__ import annotations

import csv
import io
import json
import math
from importlib import resources
from pathlib import Path

from cai_bench.core.errors import UserError
from cai_bench.core.files import read_small_file
from cai_bench.core.plan import BITS_PER_SAMPLE

PAPER_RESULTS = "paper-results.csv"
REFERENCE_COLUMNS = ("experiment", "system", "data_gb", "partition_mb", "batch_size", "seconds", "seconds_kind", "bits")
PAPER_WORKERS = "cai-workers-12.6GB-25MB-run1.json"
PAPER_WORKERS_RUN = 1  # which of the paper's three 12.6 GB / 25 MB runs the records are of
PAPER_FUNCTION_MEMORY_MB = 10_240  # every function of the paper's Lambda runs
PAPER_BATCH_SIZE = 512
_CPU_TIME = "total_cpu_time (seconds)"
_BPS = "throughput_bps"


def _package_text(name: str) -> str:
    return resources.files("cai_bench.reference").joinpath(name).read_text()


REFERENCE_FILE_MAX = 64 << 20  # a table of published figures: some kB; far more is not one


def load_reference(path: str | Path) -> list[dict]:
    """Rows of a table of published results: ``paper`` names the CAI paper's, anything else is a CSV file of the
    same columns."""
    if str(path) != "paper" and not Path(path).exists():
        raise UserError(f"{path}: no such reference file")
    try:
        text = (
            _package_text(PAPER_RESULTS)
            if str(path) == "paper"
            else read_small_file(path, REFERENCE_FILE_MAX, "reference table").decode()
        )
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable reference table ({exc})") from None
    if not rows or any(c not in rows[0] for c in REFERENCE_COLUMNS):
        raise UserError(f"{path}: not a reference table (needs columns {', '.join(REFERENCE_COLUMNS)})")
    return rows


def published_seconds(rows: list[dict], system: str, kind: str, batch_size: int = PAPER_BATCH_SIZE) -> dict:
    """``{(data_gb, partition_mb or None): [seconds of each run]}`` of one system and kind of time, from the paper's
    data-size experiment at one batch size."""
    found: dict[tuple[float, float | None], list[float]] = {}
    for row in rows:
        if (row["experiment"], row["system"], row["seconds_kind"]) != ("vary-data-size", system, kind):
            continue
        if int(float(row["batch_size"])) != batch_size:
            continue
        partition = float(row["partition_mb"]) if row["partition_mb"] else None
        found.setdefault((float(row["data_gb"]), partition), []).append(float(row["seconds"]))
    return found


def paper_function_records() -> list[tuple[int, float]]:
    """``(samples, compute seconds)`` of each function of the paper's 12.6 GB / 25 MB run: its torch-profiler CPU
    time, and the samples it ran (its bits over 164,160 per sample; its own throughput is bits / that time)."""
    rows = json.loads(_package_text(PAPER_WORKERS))
    out = []
    for row in rows:
        seconds, bps = float(row[_CPU_TIME]), float(row[_BPS])
        out.append((round(bps * seconds / BITS_PER_SAMPLE), seconds))
    if not out or any(s < 1 or not math.isfinite(t) or t <= 0 for s, t in out):
        raise UserError(f"{PAPER_WORKERS}: per-function records without samples or times")
    return out
