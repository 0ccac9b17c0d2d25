"""Environment capture, the append-only JSON Lines results store, and what identifies a measured point.

The record schemas are in ``records.py``; nothing here imports torch until a run captures its environment."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: appends are still single writes, without the lock
    fcntl = None

from cai_bench.errors import UserError
from cai_bench.metrics import allowed_cpus, vector_flags
from cai_bench.records import (  # noqa: F401 (the record types are named here too)
    SCHEMA_MAJOR,
    SCHEMA_VERSION,
    RunRecord,
    RunSummary,
    WorkerRecord,
    new_run_id,
    summarize_run,
    utc_now,
)
from cai_bench.shapes import INT, LIST, NUMBER, TABLE, TEXT, problem

STORE_FILE = "runs.jsonl"
_PACKAGES = (
    "cai-bench", "torch", "torchvision", "timm", "numpy", "safetensors", "typer", "rich", "psutil", "onnxruntime",
    "openvino",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_output(*args: str, timeout: float = 10) -> str | None:
    """Stdout of a helper command (git, nvidia-smi), or None where it is missing or fails."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> dict:
    """The tool's own commit when it runs from a checkout; nothing otherwise."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {}
    commit = _command_output("git", "-C", str(root), "rev-parse", "HEAD")
    dirty = _command_output("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    if commit is None or dirty is None:
        return {}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


@lru_cache(maxsize=2)
def _static_environment(with_torch: bool = True) -> dict:
    import psutil

    torch = None
    if with_torch:
        try:
            import torch
        except ImportError:  # a worker image with an exported model and its runtime only
            torch = None

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpus = []
    if torch is not None and torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "cpu_model": _cpu_model(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "cpu_affinity": allowed_cpus(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if torch is not None else None,
        "cpu_flags": vector_flags(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "torch_cuda": torch.version.cuda if torch is not None else None,
        "gpus": gpus,
        "gpu_driver": _nvidia_driver() if gpus else None,
        **_git_commit(),
    }


def _nvidia_driver() -> str | None:
    out = _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return out.split()[0] if out else None


def capture_environment(with_torch: bool = True) -> dict:
    """Where a number was measured: machine and software. (The threads a run used are in its backend_info.)
    ``with_torch=False``: for a worker that must not import torch (its torch figures are then None)."""
    return {**_static_environment(with_torch), "captured_utc": utc_now()}


# ---------------------------------------------------------------------------------------------- store


def _warn(message: str) -> None:
    """A line on stderr that does not stop the command, as the CLI prints its own warnings."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


_LATENCIES = ("batch_latency_p50_s", "batch_latency_p90_s", "batch_latency_p99_s")
# Optional fields that may also be null
_NULLABLE = {"threads", "cycle_to_gb", "cost_usd", *_LATENCIES, "accuracy", "error", "backend_info", "weights", "gpus"}
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
_OPTIONAL_SHAPE = {"kind": TEXT, "backend_info": TABLE, "weights": TABLE, "accuracy": TABLE, "error": TEXT}
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
    ("summary", {"cost_usd": NUMBER, **dict.fromkeys(_LATENCIES, NUMBER)}, True),
    ("environment", {"host": TEXT, "cpu_model": TEXT, "gpus": LIST, "packages": TABLE}, True),
    ("backend_info", {"threads": INT, "workers": INT, "tasks": INT}, True),
)
_WORKER_SHAPE = {"samples": INT, **dict.fromkeys(_PHASES, NUMBER)}
_OPTIONAL_WORKER_SHAPE = {"precision": TEXT, "worker_id": TEXT, "host": TEXT, "pid": INT, "partition": INT}


def record_problem(record: dict) -> str | None:
    """What makes a JSON object not a run record this cai-bench can report on (None: nothing)."""
    for where, shape, optional in _SHAPES:
        table = record
        for step in where.split(".") if where else ():
            table = table.get(step) or {}
        found = problem(table, shape, f"{where}." if where else "", optional, _NULLABLE if optional else ())
        if found:
            return found
    if not all(isinstance(g, str) for g in record["environment"].get("gpus") or []):
        return "environment.gpus must list names"
    for number, worker in enumerate(record["workers"]):
        if not isinstance(worker, dict):
            return f"workers[{number}] is not an object"
        where = f"workers[{number}]."
        found = problem(worker, _WORKER_SHAPE, where) or problem(worker, _OPTIONAL_WORKER_SHAPE, where, optional=True)
        if found:
            return found
    return None


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
            if self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
            else:  # nothing recorded yet: leave no empty store behind
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            raise UserError(
                f"{self.path}: cannot write results here ({exc.strerror}); give another --results"
            ) from None

    def append(self, record: RunRecord) -> None:
        # One write() of one whole line on an O_APPEND descriptor under an exclusive lock: readers never see half
        # a record from us, and concurrent writers do not interleave.
        line = (record.to_json() + "\n").encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self._keep_elsewhere(record.run_id, line, exc)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._set_aside_torn_tail(fd)
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            self._keep_elsewhere(record.run_id, line, exc)
        finally:
            os.close(fd)

    def _set_aside_torn_tail(self, fd: int) -> None:
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
        aside = self.path.with_name(f"{STORE_FILE}.torn-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")
        aside.write_bytes(torn)
        os.ftruncate(fd, start)
        _warn(f"{self.path}: its last line was torn ({len(torn)} bytes, no record); moved aside to {aside}")

    def _keep_elsewhere(self, run_id: str, line: bytes, exc: OSError) -> None:
        """The store cannot take a record: print it, save it in a file of its own, and say where."""
        sys.stdout.write(line.decode())
        sys.stdout.flush()
        fallback = Path(tempfile.gettempdir()) / f"cai-bench-unsaved-{run_id}.jsonl"
        try:
            fallback.write_bytes(line)
            kept = f"printed above and saved in {fallback}; add it later with: cat {fallback} >> {self.path}"
        except OSError:
            kept = "printed above (no fallback file could be written either)"
        raise UserError(
            f"{self.path}: cannot write the record of run {run_id} ({exc.strerror}); it is {kept}"
        ) from None

    def read(self) -> list[dict]:
        """All complete records, oldest first.

        A torn last line (a writer killed mid-line) is skipped and described in ``self.skipped``; a broken line
        elsewhere, a record that lacks what reports need, or a record of a newer schema major version than this
        cai-bench knows, is a UserError naming its line.
        """
        self.skipped = []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the results store ({exc.strerror})") from None
        records = []
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                if number == len(lines):  # the last line, with no newline after it: torn
                    self.skipped.append(f"{self.path}:{number}: skipped a torn last line ({len(raw)} bytes)")
                    continue
                raise UserError(f"{self.path}:{number}: not a JSON record") from None
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
            records.append(record)
        return records

    def runs(self) -> list[dict]:
        """The records of runs (kind "run") that finished (status "ok"): what reports and plots use."""
        return [r for r in self.read() if r.get("kind") == "run" and r.get("status") == "ok"]


# ---------------------------------------------------------------------------------------------- identities


def identity_options(backend: str, options: dict) -> dict:
    """The backend options that make a measurement what it is, as the backend declares them (workers: yes;
    retries, where files go: no). Options of a backend this cai-bench does not know all count."""
    from cai_bench.backends.base import get_backend

    try:
        declared = {o.name: o.identity for o in get_backend(backend).options}
    except UserError:
        return dict(options)
    return {k: v for k, v in options.items() if declared.get(k, False) and v is not None and v is not False}


def machine_id(environment: dict) -> str:
    """Which machine a record comes from: where the backend names it (a SLURM cluster), that name; otherwise
    host, CPU model and GPUs (a host name alone can be reused)."""
    if environment.get("machine_id"):
        return str(environment["machine_id"])
    gpus = ",".join(environment.get("gpus") or [])
    return " | ".join(x for x in (environment.get("host", "?"), environment.get("cpu_model", "?"), gpus) if x)


def machine_label(environment: dict) -> str:
    """A short name for tables and plot titles: host (GPU or CPU model, cores)."""
    gpus = environment.get("gpus") or []
    what = f"{len(gpus)}x {gpus[0]}" if gpus else str(environment.get("cpu_model", "?"))
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        what = what.replace(noise, "")
    cores = environment.get("cpu_physical_cores") or environment.get("cpu_logical_cores")
    return f"{environment.get('host', '?')} ({' '.join(what.split())}{f', {cores} cores' if cores else ''})"


def data_identity(data: dict) -> str:
    """Which data a plan ran on. Synthetic data is fully given by generator, seed, size and partitioning, so
    that is its identity (a sweep can tell a point is done without generating its data); other data is
    identified by the checksums of its partitions (dataset_id)."""
    source = data.get("source") or {}
    if source.get("kind") == "synthetic":
        return (
            f"synthetic-v{source.get('generator_version')}-seed{source.get('seed')}-"
            f"{data.get('samples')}x{float(data.get('partition_mb', 0)):g}MB"
        )
    return f"dataset-{data.get('dataset_id')}"


_NOT_PART_OF_A_POINT = ("repeats", "warmup", "data", "work_dir")


def ran_precision(record: dict) -> str:
    """The precision a record's partitions ran in, never "auto": the probe's answer can differ between two runs
    on one machine, so repeats of "auto" are grouped by what they ran. Workers that resolved "auto" differently
    in one run give a mixed name (``bf16+fp32``), a point of its own."""
    ran = {w.get("precision") for w in record.get("workers") or [] if isinstance(w, dict)} - {None}
    if ran:
        return "+".join(sorted(str(p) for p in ran))
    info = record.get("backend_info") or {}
    return str(info.get("precision") or (record.get("plan") or {}).get("precision"))


def point_key(plan: dict, environment: dict, precision: str | None = None) -> str:
    """What makes two runs repeats of the same measurement: the plan (but how often it is repeated, and where
    its data lives) in the precision that ran (``precision``; the plan's where that is not known yet) on the
    same machine. New plan fields take part automatically; a field that is off (None, False) counts as absent,
    so records written before the field existed stay repeats of the same point."""
    fields = {k: v for k, v in plan.items() if k not in _NOT_PART_OF_A_POINT and v is not None and v is not False}
    options = fields.get("backend_options") or {}
    fields["backend_options"] = identity_options(str(plan.get("backend")), options)
    fields["data"] = data_identity(plan.get("data") or {})
    fields["machine"] = machine_id(environment)
    fields["precision"] = precision or plan.get("precision")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def record_point_key(record: dict) -> str:
    """The point a stored record is a repeat of."""
    return point_key(record["plan"], record["environment"], ran_precision(record))


def this_machine() -> dict:
    """The environment fields that identify this machine (no timestamp), for comparing with records."""
    return _static_environment()


def record_row(record: dict) -> dict:
    """One record as a flat row (CSV export): identity, plan, where, and the summary's figures."""
    plan, data, env, summary = record["plan"], record["plan"]["data"], record["environment"], record["summary"]
    return {
        "run_id": record["run_id"],
        "created_utc": record["created_utc"],
        "kind": record.get("kind"),
        "status": record["status"],
        "backend": record["backend"],
        "repeat": record["repeat"],
        "repeats": record["repeats"],
        "data": data_identity(data),
        "data_gb": data["data_gb"],
        "samples_planned": data["samples"],
        "partition_mb": data["partition_mb"],
        "partitions_planned": data["partitions"],
        "batch_size": plan["batch_size"],
        "precision": plan["precision"],
        "threads": record.get("backend_info", {}).get("threads", plan.get("threads")),
        "weights": (record.get("weights") or {}).get("weights"),
        **summary,
        "machine": machine_label(env),
        "host": env.get("host"),
        "cpu_model": env.get("cpu_model"),
        "gpus": ";".join(env.get("gpus") or []),
        "torch": (env.get("packages") or {}).get("torch"),
        "git_commit": env.get("git_commit"),
        "error": record.get("error"),
    }


# ---------------------------------------------------------------------------------------------- analysis


def load(results_dir: str | Path = "results", *, finished_only: bool = False):
    """The store as two pandas DataFrames, for notebooks: ``(runs, partitions)``.

    ``runs`` has one row per record, its plan, summary, environment and backend facts flattened into columns
    (``plan.batch_size``, ``summary.wall_s``, ``environment.cpu_model``, ...) beside ``machine`` (a short label)
    and ``point`` (which measurement it repeats); ``partitions`` has one row per worker record (one partition
    of one run), with the run's id, backend and repeat. ``finished_only`` keeps timing runs that ended ok.
    """
    import pandas as pd

    store = ResultsStore(results_dir)
    records = store.runs() if finished_only else store.read()
    rows, partitions = [], []
    for record in records:
        flat = {k: v for k, v in record.items() if k != "workers"}
        flat["machine"] = machine_label(record["environment"])
        flat["point"] = record_point_key(record)
        rows.append(flat)
        run = {"run_id": record["run_id"], "backend": record["backend"], "repeat": record["repeat"]}
        partitions += [{**run, **worker} for worker in record["workers"]]
    runs = pd.json_normalize(rows, sep=".") if rows else pd.DataFrame(columns=["run_id"])
    return runs, pd.DataFrame(partitions, columns=None if partitions else ["run_id"])
