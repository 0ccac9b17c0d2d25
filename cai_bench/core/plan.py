"""Sizes as the paper counts them, the Plan of a run and the SweepSpec of a grid of runs.

Pure apart from reading a sweep config file: nothing here touches data, results or backends (what a backend
declares is handed in by the caller).

Sizes as the paper counts them: "GB"/"MB" are GiB/MiB; one sample is 20,524 bytes (image f32 [5,32,32] +
magnitudes f64 [5] + redshift f32); 164,160 bits per sample are counted as processed (``docs/measurements.md``).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from cai_bench.core.choices import CPU_PRECISIONS, ENGINES, PRECISIONS, RUNTIME_PRECISIONS, RUNTIMES
from cai_bench.core.errors import UserError, redact

BYTES_PER_SAMPLE = 20_480 + 40 + 4
BITS_PER_SAMPLE = (20_480 + 40) * 8  # image + magnitudes; the label is not input
MIB = 1 << 20
GIB = 1 << 30


def check_size(value: float, option: str) -> float:
    """A size option (GB, MB) as a positive, finite number; anything else is a UserError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{option} must be a positive, finite number, got {value}")
    return float(value)


def samples_for_gb(gb: float) -> int:
    """D GB of data holds floor(D * 2^30 / 20,524) samples."""
    if not (math.isfinite(gb) and gb > 0):
        raise UserError(f"data size must be a positive, finite number of GB, got {gb}")
    samples = math.floor(gb * GIB / BYTES_PER_SAMPLE)
    if samples < 1:
        raise UserError(f"{gb} GB is less than one sample ({BYTES_PER_SAMPLE} bytes)")
    return samples


def samples_per_partition(partition_mb: float) -> int:
    """A P MB partition holds at most ceil(P * 2^20 / 20,524) samples."""
    if not (math.isfinite(partition_mb) and partition_mb > 0):
        raise UserError(f"partition size must be a positive, finite number of MB, got {partition_mb}")
    return math.ceil(partition_mb * MIB / BYTES_PER_SAMPLE)


def partition_count(samples: int, partition_mb: float) -> int:
    """Number of partitions: ceil(data MB / P), as the paper counts its Lambda functions.

    For 12.6 GB this is 517/259/173/130 at 25/50/75/100 MB. Filling partitions to the brim instead would need
    one fewer for 25, 50 and 100 MB (the paper's real set held slightly more than 12.6 GiB), so samples are
    spread evenly over this count instead; no partition then exceeds ``samples_per_partition``.
    """
    samples_per_partition(partition_mb)  # a usable size
    count = math.ceil(samples * BYTES_PER_SAMPLE / (partition_mb * MIB))
    return max(1, min(samples, count))


def partition_sizes(samples: int, partition_mb: float) -> list[int]:
    """Balanced partition sizes (they differ by at most one sample), largest first."""
    count = partition_count(samples, partition_mb)
    base, extra = divmod(samples, count)
    return [base + 1] * extra + [base] * (count - extra)


def data_gb(samples: int) -> float:
    return samples * BYTES_PER_SAMPLE / GIB


@dataclass(frozen=True)
class PartitionRef:
    """One unit of work: a partition file and what its manifest promises about it."""

    path: str
    index: int
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DataSummary:
    """What a record says about its data; the partition list itself stays in the manifest."""

    path: str
    dataset_id: str
    source: dict
    samples: int
    data_gb: float
    partition_mb: float
    partitions: int
    has_labels: bool = True


@dataclass(frozen=True)
class Plan:
    backend: str
    data: DataSummary
    partitions: tuple[PartitionRef, ...]
    batch_size: int = 512
    precision: str = "auto"
    threads: int | None = None
    repeats: int = 1
    warmup: int = 0
    weights: str | None = None
    seed: int = 0
    verify_checksums: bool = True
    backend_options: dict = field(default_factory=dict)
    engine: str = "fast"
    compile: bool = False
    cycle_to_gb: float | None = None  # reuse the partitions in turn until this much data has been processed
    oversubscribe: bool = False  # more threads than this process may use, on purpose: reports mark the point
    work_dir: str | None = None  # where a backend's workers may write (the results directory); not measured
    # --runtime auto's answer: what it chose and why, with the probe's figures (runner.resolve_runtime); the
    # runtime and precision it chose are in backend_options and precision, where identities read them
    runtime_choice: dict | None = None

    def to_record(self) -> dict:
        """The plan as records keep it: everything but the per-partition list, and no password of a URL."""
        out = asdict(self)
        out.pop("partitions")
        out["backend_options"] = redacted_options(self.backend_options)
        return out


def redacted_options(options: dict) -> dict:
    """Backend options as records and saved jobs keep them: no password of a URL (``--comm redis://:PW@...``)."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in options.items()}


def plan_to_dict(plan: Plan) -> dict:
    """The whole plan, partitions included, as JSON can hold it (a detached job saves it to collect it later),
    with no password of a URL: what a job's workers need of --comm travels apart (``CommConfig.secret``)."""
    out = asdict(plan)
    out["backend_options"] = redacted_options(plan.backend_options)
    return out


def plan_from_dict(data: dict) -> Plan:
    data = dict(data)
    data["data"] = DataSummary(**data["data"])
    data["partitions"] = tuple(PartitionRef(**ref) for ref in data["partitions"])
    return Plan(**data)


def check_runtime(runtime: str, precision: str, engine: str, compile: bool) -> None:
    """Refuse what ``runtime`` cannot run: the reference loop and torch.compile are torch's, and each runtime runs
    its own precisions (choices.RUNTIME_PRECISIONS); "auto" is resolved to one of them before a worker starts
    (``runner.resolve_runtime``), the reference loop and torch.compile to torch."""
    if runtime == "auto":
        return
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "torch" and engine == "reference":
        raise UserError(f"--engine reference is torch's eager loop: it takes no --runtime {runtime}")
    if runtime != "torch" and compile:
        raise UserError(f"--compile is torch.compile: it takes no --runtime {runtime}")
    if precision in CPU_PRECISIONS and precision != "auto" and precision not in RUNTIME_PRECISIONS[runtime]:
        others = [r for r in RUNTIMES if precision in RUNTIME_PRECISIONS[r]]
        where = f"; --runtime {' or '.join(others)} runs it" if others else ""
        runs = ", ".join(RUNTIME_PRECISIONS[runtime])
        raise UserError(f"--precision {precision}: --runtime {runtime} runs auto, {runs}{where}")


def check_settings(
    *,
    batch_size: int = 512,
    precision: str = "auto",
    threads: int | None = None,
    repeats: int = 1,
    warmup: int = 0,
    engine: str = "fast",
    compile: bool = False,
    backend_options: dict | None = None,
    cycle_to_gb: float | None = None,
) -> str:
    """Refuse what a run cannot be asked, whatever its data: each problem one UserError naming the option. The
    precision the run is to use (the reference loop's is fp32)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    lanes = (backend_options or {}).get("lanes")
    if lanes is not None and (not isinstance(lanes, int) or lanes < 1):
        raise UserError(f"--lanes must be at least 1, got {lanes}")
    if engine == "reference":
        if precision not in ("auto", "fp32"):
            raise UserError(f"--engine reference is the eager float32 baseline: it takes no --precision {precision}")
        if compile:
            raise UserError("--engine reference is the eager float32 baseline: it takes no --compile")
        precision = "fp32"
        if cycle_to_gb is not None:
            raise UserError("--engine reference holds the whole data set in memory: it takes no --cycle-to-gb")
    check_runtime((backend_options or {}).get("runtime") or "torch", precision, engine, compile)
    if cycle_to_gb is not None:
        check_size(cycle_to_gb, "--cycle-to-gb")
        samples_for_gb(cycle_to_gb)  # at least one sample
    return precision


def make_plan(
    backend: str,
    data: DataSummary,
    partitions: tuple[PartitionRef, ...],
    *,
    batch_size: int = 512,
    precision: str = "auto",
    threads: int | None = None,
    repeats: int = 1,
    warmup: int = 0,
    weights: str | None = None,
    seed: int = 0,
    verify_checksums: bool = True,
    backend_options: dict | None = None,
    engine: str = "fast",
    compile: bool = False,
    cycle_to_gb: float | None = None,
    oversubscribe: bool = False,
    work_dir: str | None = None,
    runtime_choice: dict | None = None,
) -> Plan:
    """Build a Plan from options ``check_settings`` lets through (the commands check them before anything is
    generated; a program that calls this directly gets the same one-line errors here)."""
    precision = check_settings(
        batch_size=batch_size, precision=precision, threads=threads, repeats=repeats, warmup=warmup, engine=engine,
        compile=compile, backend_options=backend_options, cycle_to_gb=cycle_to_gb,
    )  # fmt: skip
    if not partitions:
        raise UserError(f"{data.path}: the data set has no partitions")
    return Plan(
        backend=backend,
        data=data,
        partitions=partitions,
        batch_size=batch_size,
        precision=precision,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        weights=weights,
        seed=seed,
        verify_checksums=verify_checksums,
        backend_options=dict(backend_options or {}),
        engine=engine,
        compile=compile,
        cycle_to_gb=cycle_to_gb,
        oversubscribe=oversubscribe,
        work_dir=work_dir,
        runtime_choice=runtime_choice,
    )


def work_units(plan: Plan) -> tuple[PartitionRef, ...]:
    """The partitions a run processes, in order: each once, or with ``cycle_to_gb`` the data set's partitions
    over and over (as the paper reached 1 TB from its 12.6 GB) until that many GB have been processed. Whole
    partitions only, so the last one may take the total past the target by less than a partition."""
    if plan.cycle_to_gb is None:
        return plan.partitions
    target = samples_for_gb(plan.cycle_to_gb)
    units, samples = [], 0
    for ref in itertools.cycle(plan.partitions):
        if samples >= target:
            break
        units.append(ref)
        samples += ref.samples
    return tuple(units)


def replace_plan(plan: Plan, **changes) -> Plan:
    """A copy of ``plan`` with some options changed, validated like a new one."""
    options = {f.name: getattr(plan, f.name) for f in fields(plan)}
    options.update(changes)
    return make_plan(options.pop("backend"), options.pop("data"), options.pop("partitions"), **options)


# ---------------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep's grid: a synthetic data size, its partitioning, a batch size, a precision, and the
    values of the backend options the sweep sets (sorted (name, value) pairs)."""

    gb: float
    partition_mb: float
    batch_size: int
    precision: str
    backend_options: tuple[tuple[str, object], ...] = ()

    def label(self) -> str:
        options = "".join(f" · {name.replace('_', '-')} {value}" for name, value in self.backend_options)
        return f"{self.gb:g} GB · {self.partition_mb:g} MB · batch {self.batch_size} · {self.precision}{options}"


@dataclass(frozen=True)
class Grid:
    """A full product of values; a sweep is the union of its grids (the paper varies one axis at a time)."""

    name: str
    gb: tuple[float, ...]
    partition_mb: tuple[float, ...]
    batch_size: tuple[int, ...]
    precision: tuple[str, ...] = ("auto",)
    backend_options: tuple[tuple[str, tuple], ...] = ()  # (option, its values): axes like the others

    def points(self) -> list[SweepPoint]:
        names = [name for name, _ in self.backend_options]
        axes = (self.gb, self.partition_mb, self.batch_size, self.precision, *(v for _, v in self.backend_options))
        return [SweepPoint(*p[:4], tuple(sorted(zip(names, p[4:], strict=True)))) for p in itertools.product(*axes)]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    backend: str
    grids: tuple[Grid, ...]
    repeats: int = 3
    warmup: int = 0
    threads: int | None = None
    seed: int = 0
    weights: str | None = None
    verify_checksums: bool = True
    description: str = ""
    engine: str = "fast"
    compile: bool = False
    oversubscribe: bool = False

    def points(self) -> list[SweepPoint]:
        """Every point once, in the order the grids list them."""
        return list(dict.fromkeys(p for grid in self.grids for p in grid.points()))


AXES = ("gb", "partition_mb", "batch_size", "precision")
DEFAULT_AXES = {"gb": (0.1,), "partition_mb": (25.0,), "batch_size": (512,), "precision": ("auto",)}
_SCALARS = {
    "name": str,
    "description": str,
    "backend": str,
    "repeats": int,
    "warmup": int,
    "threads": int,
    "seed": int,
    "weights": str,
    "verify_checksums": bool,
    "engine": str,
    "compile": bool,
    "oversubscribe": bool,
}
_GRID_KEYS = ("name", *AXES)
_KIND_NAMES = {str: "a string", int: "a whole number", bool: "true or false"}


def _axis_values(axis: str, values, where: str) -> tuple:
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}{axis} must be a non-empty list, e.g. {axis} = {list(DEFAULT_AXES[axis])}")
    out = []
    for value in values:
        if axis == "precision":
            if value not in PRECISIONS:
                raise UserError(f"{where}precision must be among {', '.join(PRECISIONS)}, got {value!r}")
        elif axis == "batch_size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}batch_size values must be whole numbers of at least 1, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise UserError(f"{where}{axis} values must be positive, finite numbers, got {value!r}")
        else:
            value = float(value)
        out.append(value)
    return tuple(dict.fromkeys(out))


def _option_values(option, values, where: str) -> tuple:
    """A backend option's values in a sweep: a list (an axis), or one value for every point."""
    values = values if isinstance(values, list) else [values]
    if not values:
        raise UserError(f"{where}{option.name} needs at least one value")
    if len(values) > 1 and not option.sweepable:
        raise UserError(f"{where}{option.name} takes one value in a sweep, not a list")
    try:
        checked = [option.check(v) for v in values]
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None
    # A table (KEY=VALUE options) is held as sorted pairs, so that a point stays hashable
    return tuple(dict.fromkeys(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in checked))


def _check_keys(table: dict, known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise UserError(f"{where}unknown key {key!r} (known: {', '.join(known)})")


def sweep_backend(config: dict | None, overrides: dict | None) -> str:
    """The backend a sweep runs on: the command line's, the config's, or cpu."""
    return (overrides or {}).get("backend") or (config or {}).get("backend") or "cpu"


def make_sweep(
    config: dict | None = None,
    *,
    where: str = "",
    overrides: dict | None = None,
    known=None,
) -> SweepSpec:
    """A validated SweepSpec from a config table (as read from TOML) and command-line overrides.

    An axis given on the command line replaces that axis in every grid; a scalar replaces the config's value.
    Without any grid, the top-level axes (or the defaults) make one grid. ``known`` is the backend the sweep runs
    on (``sweep_backend``), whose declared options and default batch size it takes, or None for one this
    cai-bench does not have (running such a sweep is refused where the backend is looked up).
    """
    config = dict(config or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    option_overrides = overrides.pop("backend_options", {})
    backend = sweep_backend(config, overrides)
    declared = {o.name: o for o in known.options} if known else {}
    batch = (getattr(known, "default_batch_size", DEFAULT_AXES["batch_size"][0]),)
    defaults = {**DEFAULT_AXES, "batch_size": batch}
    for name in option_overrides:
        if name not in declared:
            raise UserError(f"--{name.replace('_', '-')}: not an option of --backend {backend}")
    _check_keys(config, (*_SCALARS, *AXES, "grid", *declared), where)
    for key, kind in _SCALARS.items():
        value = config.get(key)
        # bool is an int in Python, but "repeats = true" is a mistake
        if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise UserError(f"{where}{key} must be {_KIND_NAMES[kind]}, got {value!r}")
    top = {axis: _axis_values(axis, config[axis], where) for axis in AXES if axis in config}
    top_options = {name: _option_values(declared[name], config[name], where) for name in declared if name in config}
    tables = config.get("grid", [{}])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables) or not tables:
        raise UserError(f"{where}grid must be a list of tables: [[grid]] sections")
    grids = []
    for number, table in enumerate(tables, start=1):
        at = f"{where}grid {number}: " if "grid" in config else where
        _check_keys(table, (*_GRID_KEYS, *declared), at)
        axes = {**defaults, **top, **{a: _axis_values(a, table[a], at) for a in AXES if a in table}}
        for axis in AXES:
            if axis in overrides:
                axes[axis] = _axis_values(axis, list(overrides[axis]), "")
        options = {**top_options, **{n: _option_values(declared[n], table[n], at) for n in declared if n in table}}
        options |= {n: _option_values(declared[n], v, "") for n, v in option_overrides.items()}
        name = str(table.get("name", f"grid {number}"))
        grids.append(Grid(name=name, **axes, backend_options=tuple(sorted(options.items()))))
    scalars = {k: overrides.get(k, config.get(k)) for k in _SCALARS if k in overrides or k in config}
    spec = SweepSpec(grids=tuple(grids), **{"name": "sweep", "backend": "cpu", **scalars})
    if spec.repeats < 1:
        raise UserError(f"{where}repeats must be at least 1, got {spec.repeats}")
    if spec.warmup < 0:
        raise UserError(f"{where}warmup must be 0 or more, got {spec.warmup}")
    if spec.threads is not None and spec.threads < 1:
        raise UserError(f"{where}threads must be at least 1, got {spec.threads}")
    if spec.engine not in ENGINES:
        raise UserError(f"{where}engine must be one of {', '.join(ENGINES)}, got {spec.engine!r}")
    return spec


def load_sweep_config(name_or_path: str | Path) -> tuple[dict, str]:
    """The table of a TOML sweep config (see configs/README.md), and how to name it in errors ("FILE: ").

    A preset of the package (``laptop-quick``, ``paper``, with or without ``.toml``) is found by name from any
    directory; anything else is a file. A missing, unreadable or malformed file is a UserError.
    """
    path = Path(name_or_path)
    preset = resources.files("cai_bench.configs").joinpath(path.name if path.suffix == ".toml" else f"{path.name}.toml")
    use_preset = not path.exists() and str(name_or_path) == path.name and preset.is_file()
    where = f"{path.stem} (preset)" if use_preset else str(path)
    try:
        data = preset.read_bytes() if use_preset else path.read_bytes()
        return tomllib.loads(data.decode("utf-8")), f"{where}: "
    except FileNotFoundError:
        names = sorted(p.name.removesuffix(".toml") for p in resources.files("cai_bench.configs").iterdir()
                       if p.name.endswith(".toml"))  # fmt: skip
        raise UserError(f"{path}: no such config file, nor a preset ({', '.join(names)})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a TOML config file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the config ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (TOML must be UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
