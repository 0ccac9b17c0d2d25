"""The append-only JSON Lines results store: one complete record per line of ``RESULTS/runs.jsonl``, locked,
fsync'd, never rewritten; and what a line must hold to be a record reports can use.

The record schemas are in ``core/records.py``; what identifies a measured point is in ``analysis/results.py``."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: appends are still single writes, without the lock
    fcntl = None

from cai_bench.core.errors import UserError
from cai_bench.core.files import NO_FOLLOW
from cai_bench.core.records import SCHEMA_MAJOR, RunRecord
from cai_bench.core.shapes import INT, LIST, NUMBER, PARTITION, TABLE, TEXT, problem

STORE_FILE = "runs.jsonl"
# A run id as cai-bench makes them (20261207T144748Z-99677abf) or a plain name: what a record must carry to be read
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
COMM_FILE = "comm.jsonl"  # comm bench's points: latency of one collective per channel, world size and size


def _warn(message: str) -> None:
    """A line on stderr that does not stop the command, as the CLI prints its own warnings."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


_LATENCIES = ("batch_latency_p50_s", "batch_latency_p90_s", "batch_latency_p99_s")
# Optional fields that may also be null
_EFFICIENCY_SHAPE = {"flops_per_sample": INT, "gflops": NUMBER, "mfu": NUMBER}
_EFFICIENCY = tuple(_EFFICIENCY_SHAPE)
_NULLABLE = {"threads", "cycle_to_gb", "cost_usd", *_LATENCIES, *_EFFICIENCY, "accuracy", "error", "backend_info",
             "weights", "gpus", "validity"}  # fmt: skip
# What reports, plots and listings read of a record: each must be there with its type (None where allowed)
_RECORD_SHAPE = {
    "run_id": TEXT,
    "created_utc": TEXT,
    "status": TEXT,
    "backend": TEXT,
    "repeat": INT,
    "repeats": INT,
    "plan": TABLE,
    "environment": TABLE,
    "summary": TABLE,
    "workers": LIST,
}
_OPTIONAL_SHAPE = {"kind": TEXT, "backend_info": TABLE, "weights": TABLE, "accuracy": TABLE, "error": TEXT,
                   "validity": TABLE}  # fmt: skip
_SUMMARY_COUNTS = ("samples", "bits", "partitions", "workers", "peak_rss_bytes")
_SUMMARY_FIGURES = ("wall_s", "samples_per_s", "throughput_bps", "sum_worker_throughput_bps")
_PHASES = ("compute_s", "load_s", "wait_s", "startup_s")
# (where in the record, its fields, whether they may be missing), containers before what they contain
_SHAPES = (
    ("", _RECORD_SHAPE, False),
    ("", _OPTIONAL_SHAPE, True),
    ("plan", {"batch_size": INT, "precision": TEXT, "data": TABLE}, False),
    ("plan", {"backend_options": TABLE, "engine": TEXT, "threads": INT, "cycle_to_gb": NUMBER}, True),
    ("plan.data", {"samples": INT, "data_gb": NUMBER, "partition_mb": NUMBER, "partitions": INT}, False),
    ("plan.data", {"source": TABLE, "dataset_id": TEXT}, True),
    ("summary", {**dict.fromkeys(_SUMMARY_COUNTS, INT), **dict.fromkeys(_SUMMARY_FIGURES + _PHASES, NUMBER)}, False),
    ("summary", {"cost_usd": NUMBER, **dict.fromkeys(_LATENCIES, NUMBER), **_EFFICIENCY_SHAPE}, True),
    ("environment", {"host": TEXT, "cpu_model": TEXT, "gpus": LIST, "packages": TABLE, "isa_limits": TABLE}, True),
    ("validity", {"failed": LIST}, True),
    ("backend_info", {"threads": INT, "workers": INT, "tasks": INT}, True),
)
_COMM_SHAPE = {"run_id": TEXT, "channel": TEXT, "op": TEXT, "world_size": INT, "nbytes": INT, "median_s": NUMBER,
               "samples_s": LIST, "environment": TABLE}  # fmt: skip
_WORKER_SHAPE = {"samples": INT, **dict.fromkeys(_PHASES, NUMBER)}
_OPTIONAL_WORKER_SHAPE = {"precision": TEXT, "worker_id": TEXT, "host": TEXT, "pid": INT, "partition": PARTITION}


def record_problem(record: dict) -> str | None:
    """What makes a JSON object not a run record this cai-bench can report on (None: nothing). A field the
    record's ``non_finite`` names (a number JSON cannot hold, stored as null) may be null."""
    nulled = record.get("non_finite") if isinstance(record.get("non_finite"), dict) else {}
    for where, shape, optional in _SHAPES:
        table = record
        for step in where.split(".") if where else ():
            table = table.get(step) or {}
        prefix = f"{where}." if where else ""
        nullable = (_NULLABLE if optional else set()) | {n for n in shape if f"{prefix}{n}" in nulled}
        found = problem(table, shape, prefix, optional, nullable)
        if found:
            return found
    if not all(isinstance(g, str) for g in record["environment"].get("gpus") or []):
        return "environment.gpus must list names"
    if not all(isinstance(f, str) for f in (record.get("validity") or {}).get("failed") or []):
        return "validity.failed must list sentences"
    for number, worker in enumerate(record["workers"]):
        if not isinstance(worker, dict):
            return f"workers[{number}] is not an object"
        where = f"workers[{number}]."
        nullable = {n for n in _WORKER_SHAPE if f"{where}{n}" in nulled}
        found = problem(worker, _WORKER_SHAPE, where, nullable=nullable) or problem(
            worker, _OPTIONAL_WORKER_SHAPE, where, optional=True
        )
        if found:
            return found
    return None


# Never through a link (NO_FOLLOW), never waiting on a FIFO
_OWN_FILE = NO_FOLLOW | getattr(os, "O_NONBLOCK", 0)


def _open_own(path: Path, flags: int) -> int:
    """A descriptor on the store's own file ``path``, or a UserError: a link, a FIFO or device, or a file with a
    second name (a hard link to a file outside the store, which an append or a repair would change) is refused
    from what the opened descriptor is, not from what the name was a moment before."""
    refuse = "cai-bench keeps only plain files of its own in a results directory: remove it or give another --results"
    try:
        fd = os.open(path, flags | _OWN_FILE, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a link; {refuse}") from None
        raise
    info = os.fstat(fd)
    why = None if stat.S_ISREG(info.st_mode) else "not a regular file"
    if why is None and info.st_nlink != 1:
        why = f"one file with {info.st_nlink} names (a hard link)"
    if why is not None:
        os.close(fd)
        raise UserError(f"{path} is {why}; {refuse}")
    return fd


def _read_own(path: Path) -> bytes:
    """The whole of the store's file ``path`` (FileNotFoundError where there is none)."""
    fd = _open_own(path, os.O_RDONLY)
    with open(fd, "rb") as file:
        return file.read()


class ResultsStore:
    """``<dir>/runs.jsonl``: one complete JSON record per line, only ever appended to.

    Appends take an exclusive lock on the file, so two processes never interleave, and a torn last line (a
    writer killed mid-line) is moved aside to a file of its own before the next record is written, so that the
    new record stands on its own line.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / STORE_FILE
        self.skipped: list[str] = []  # what the last read() left out, for the caller to report

    def check_writable(self) -> None:
        """Refuse, before any work, a results directory that cannot take a record."""
        probe = self.directory / f".writable-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(self.directory / COMM_FILE):
                os.close(_open_own(self.directory / COMM_FILE, os.O_RDWR | os.O_APPEND))
            if os.path.lexists(self.path):
                os.close(_open_own(self.path, os.O_RDWR | os.O_APPEND))
            else:  # nothing recorded yet: leave no empty store behind
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            raise UserError(
                f"{self.path}: cannot write results here ({exc.strerror}); give another --results"
            ) from None

    def append(self, record: RunRecord) -> None:
        self._append_line(self.path, (record.to_json() + "\n").encode(), record.run_id)

    def append_comm(self, record: dict) -> None:
        """A ``comm bench`` point (``comm.jsonl`` beside the runs: its own schema), kept as a run record is."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        self._append_line(self.directory / COMM_FILE, line, record["run_id"])

    def read_comm(self) -> list[dict]:
        """The ``comm bench`` points, oldest first; a torn last line is skipped, a broken one is an error."""
        path = self.directory / COMM_FILE
        try:
            lines = _read_own(path).split(b"\n")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None
        points = []
        for number, point in _json_lines(path, lines, torn=lambda number, raw: None):
            found = problem(point, _COMM_SHAPE, "") if isinstance(point, dict) else "not an object"
            if found:
                raise UserError(f"{path}:{number}: not a comm bench record: {found}")
            points.append(point)
        return points

    def _append_line(self, path: Path, line: bytes, run_id: str) -> None:
        # One write() of one whole line on an O_APPEND descriptor under an exclusive lock: readers never see half
        # a record from us, and concurrent writers do not interleave.
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = _open_own(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            self._keep_elsewhere(run_id, line, exc.strerror, path)
        except UserError as exc:
            self._keep_elsewhere(run_id, line, str(exc), path)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._set_aside_torn_tail(fd, path)
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            self._keep_elsewhere(run_id, line, exc.strerror, path)
        finally:
            os.close(fd)

    def _set_aside_torn_tail(self, fd: int, path: Path) -> None:
        """Bytes after the last newline belong to no record: move them to a file of their own, named in a warning."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start, chunk = size, 1 << 16
        while start > 0:
            lo = max(0, start - chunk)
            block = os.pread(fd, start - lo, lo)
            newline = block.rfind(b"\n")
            if newline >= 0:
                start = lo + newline + 1
                break
            start = lo
        torn = os.pread(fd, size - start, start)
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")
        with open(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OWN_FILE, 0o644), "wb") as kept:
            kept.write(torn)
            os.fsync(kept.fileno())
        os.ftruncate(fd, start)  # the descriptor's own file, checked at its open: one name, the store's
        _warn(f"{path}: its last line was torn ({len(torn)} bytes, no record); moved aside to {aside}")

    def _keep_elsewhere(self, run_id: str, line: bytes, why: str, path: Path) -> None:
        """The store cannot take a record: print it, save it in a file of its own, and say where."""
        sys.stdout.write(line.decode())
        sys.stdout.flush()
        try:  # a new file only its user may read, never through a name someone else placed in /tmp first
            fd, name = tempfile.mkstemp(prefix=f"cai-bench-unsaved-{run_id}-", suffix=".jsonl")
            fallback = Path(name)
            with open(fd, "wb") as file:
                file.write(line)
            kept = f"printed above and saved in {fallback}; add it later with: cat {fallback} >> {path}"
        except OSError:
            kept = "printed above (no fallback file could be written either)"
        raise UserError(f"{path}: cannot write the record of run {run_id} ({why}); it is {kept}") from None

    def read(self) -> list[dict]:
        """All complete records, oldest first.

        A torn last line (a writer killed mid-line) is skipped and described in ``self.skipped``; a broken line
        elsewhere, a record that lacks what reports need, or a record of a newer schema major version than this
        cai-bench knows, is a UserError naming its line.
        """
        self.skipped = []
        try:
            data = _read_own(self.path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the results store ({exc.strerror})") from None
        records = []

        def torn(number: int, raw: bytes) -> None:
            self.skipped.append(f"{self.path}:{number}: skipped a torn last line ({len(raw)} bytes)")

        for number, record in _json_lines(self.path, data.split(b"\n"), torn):
            if not isinstance(record, dict):
                raise UserError(f"{self.path}:{number}: not a JSON record")
            version = str(record.get("schema_version", ""))
            try:
                major = int(version.split(".")[0])
            except ValueError:
                raise UserError(f"{self.path}:{number}: record has no valid schema_version ({version!r})") from None
            if major > SCHEMA_MAJOR:
                raise UserError(
                    f"{self.path}:{number}: record schema {version} is newer than this cai-bench reads "
                    f"({SCHEMA_MAJOR}.x); upgrade cai-bench to read it"
                )
            problem = record_problem(record)
            if problem:
                raise UserError(f"{self.path}:{number}: not a valid run record: {problem}")
            if not RUN_ID.fullmatch(record["run_id"]):  # shown, matched and named everywhere: kept, not read
                self.skipped.append(f"{self.path}:{number}: skipped a record whose run id is not one cai-bench makes")
                continue
            records.append(record)
        return records

    def runs(self) -> list[dict]:
        """The records of runs (kind "run") that finished (status "ok"): what reports and plots use. One whose
        figures reports need were not finite numbers stays in the store, left out here and said in ``skipped``."""
        kept = []
        for record in self.read():
            if record.get("kind") != "run" or record.get("status") != "ok":
                continue
            lost = _unreportable(record)
            if lost:
                self.skipped.append(f"{self.path}: run {record['run_id']} is kept but not reported: its {lost}")
                continue
            kept.append(record)
        return kept


_REPORTED = {f"summary.{name}" for name in (*_SUMMARY_COUNTS, *_SUMMARY_FIGURES, *_PHASES)}


def _unreportable(record: dict) -> str | None:
    """Which figure a report needs the record stored as null because it was not a finite number; None: none."""
    for path, value in (record.get("non_finite") or {}).items():
        in_a_worker = path.startswith("workers[") and path.rsplit(".", 1)[-1] in _WORKER_SHAPE
        if path in _REPORTED or in_a_worker:
            return f"{path} was {value}"
    return None


def _json_lines(path: Path, lines: list[bytes], torn: Callable[[int, bytes], None]) -> Iterator[tuple[int, object]]:
    """Each non-blank line parsed as JSON, with its number. The last line, where it does not parse, was torn by a
    writer that was killed: it goes to ``torn`` and is skipped; any other that does not parse is a UserError."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, an integer past the digit limit, too deep
            if number == len(lines):
                torn(number, raw)
                continue
            raise UserError(f"{path}:{number}: not a JSON record") from None
        yield number, parsed
