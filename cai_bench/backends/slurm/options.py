"""The options of ``hpc --slurm`` and how they are read and checked: apart from ``arrays.py`` so that listing
them imports neither submitit nor torch."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess

from cai_bench.backends.base import BackendOption
from cai_bench.core.choices import SLURM_EXECUTORS
from cai_bench.core.errors import UserError
from cai_bench.core.machine import machine_id, this_machine

DEFAULT_TIME_MIN = 60


def minutes(text: str) -> int:
    """A SLURM time limit in whole minutes, read as sbatch reads it: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    try:
        days, _, clock = str(text).strip().rpartition("-")
        parts = [int(x) for x in clock.split(":")]
        if not 1 <= len(parts) <= 3 or min(parts) < 0:
            raise ValueError
        if days:
            hours, mins, secs = [*parts, 0, 0][:3]
        else:
            hours, mins, secs = parts if len(parts) == 3 else [0, *parts, 0][:3]
        seconds = ((int(days or 0) * 24 + hours) * 60 + mins) * 60 + secs
    except ValueError:
        raise UserError(f"--time {text!r}: give minutes (90) or as sbatch takes it (1:30:00, 2-00:00:00)") from None
    if seconds < 60:
        raise UserError(f"--time {text!r}: at least one minute")
    return math.ceil(seconds / 60)


def gigabytes(text: str) -> float:
    """Memory as sbatch writes it: 4G, 3500M, 1T (plain numbers are MB, as sbatch takes them)."""
    units = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    value = str(text).strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1] in units else "M"
    try:
        number = float(value.rstrip("KMGT"))
    except ValueError:
        raise UserError(f"--mem {text!r}: give a size such as 4G or 3500M") from None
    if not number > 0:
        raise UserError(f"--mem {text!r}: must be positive")
    return number * units[unit]


def key_values(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--slurm-option {item!r}: give KEY=VALUE, e.g. --slurm-option account=astro")
        out[key] = value
    return out


OPTIONS = (
    BackendOption("slurm", bool, "A SLURM job array over partition groups.", False),
    BackendOption(
        "slurm_executor", str, "With --slurm: slurm (sbatch) or local (processes here, for tests/laptops).",
        "slurm", choices=SLURM_EXECUTORS,
    ),
    BackendOption("tasks", int, "With --slurm: array tasks, partitions split evenly.", minimum=1),
    BackendOption("partitions_per_task", int, "With --slurm: partitions per task, or give --tasks.", 1, minimum=1),
    BackendOption("slurm_partition", str, "With --slurm: the SLURM partition (queue)."),
    BackendOption(
        "time_min", int, "With --slurm: time limit per task, minutes or D-HH:MM:SS as sbatch takes it.",
        DEFAULT_TIME_MIN, minimum=1, identity=False, parse=minutes, cli="--time",
    ),
    BackendOption(
        "mem_gb", float, "With --slurm: memory per task (4G, 3500M).", identity=False, parse=gigabytes, cli="--mem",
        typed=lambda gb: f"{gb:g}G",
    ),
    BackendOption("cpus_per_task", int, "With --slurm: cores (threads) per task.", "--threads, else 1", minimum=1),
    BackendOption(
        "array_parallelism", int, "With --slurm: tasks running at once (slurm: all; local: cores/cpus-per-task).",
        minimum=1,
    ),
    BackendOption(
        "slurm_options", dict, "With --slurm: KEY=VALUE passed to sbatch as --KEY=VALUE; repeatable.",
        sweepable=False, parse=lambda text: key_values([text]), cli="--slurm-option",
    ),
)  # fmt: skip


def groups_of(count: int, tasks: int | None, per_task: int | None) -> int:
    """Units per array task: from --tasks (split evenly) or --partitions-per-task."""
    if tasks is not None and per_task is not None:
        raise UserError("give --tasks or --partitions-per-task, not both")
    return math.ceil(count / min(tasks, count)) if tasks else (per_task or 1)


def check(options: dict) -> None:
    kind = options.get("slurm_executor") or "slurm"
    if "workers" in options:
        raise UserError("--workers is for one node; an array has --tasks or --partitions-per-task")
    groups_of(1, options.get("tasks"), options.get("partitions_per_task"))
    try:
        import submitit  # noqa: F401 (the [hpc] extra: only whether it is there)
    except ImportError:
        raise UserError("--slurm needs submitit: pip install 'cai-bench[hpc]'") from None
    if kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError(
            "--slurm: no SLURM here (sbatch/srun not found); run on a login node or add --slurm-executor local"
        )
    if kind == "slurm":
        check_controller()


def check_controller() -> None:
    """A SLURM controller answers (``scontrol ping``), before anything is submitted: without one, sbatch fails
    with lines of its own after the data is made."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        raise UserError(f"--slurm: SLURM_CONF names {conf}, which is not a file; set it to your cluster's "
                        "slurm.conf, or add --slurm-executor local to run the array's tasks here")  # fmt: skip
    try:  # a configless client looks the controller up in DNS: where nothing answers, that takes a while
        done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        problem = f"scontrol ping: {type(exc).__name__}"
    else:
        said = (done.stdout + done.stderr).strip().splitlines()
        if done.returncode == 0 and any(" is UP" in line for line in said):
            return
        problem = next((line for line in said if "fatal" in line or "DOWN" in line), said[-1] if said else "no answer")
    raise UserError(f"--slurm: no SLURM controller answers here ({problem.strip()[:160]}); set SLURM_CONF to your "
                    "cluster's slurm.conf, or add --slurm-executor local to run the array's tasks here")  # fmt: skip


def cluster_name() -> str:
    """The SLURM cluster this login node submits to, as ``scontrol`` names it (its host name where it cannot)."""
    if os.environ.get("SLURM_CLUSTER_NAME"):
        return os.environ["SLURM_CLUSTER_NAME"]
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName" and value.strip():
            return value.strip()
    return socket.gethostname()


def machine(options: dict) -> str:
    """Where an array runs, known before it runs and the same in its record: the cluster and its partition
    (queue), whichever nodes the scheduler then picks; the local executor runs on this machine."""
    if (options.get("slurm_executor") or "slurm") == "local":
        return f"slurm-local | {machine_id(this_machine())}"
    return f"slurm | {cluster_name()} | {options.get('slurm_partition') or 'default partition'}"
