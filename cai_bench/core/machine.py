"""The machine a number is measured on, apart from the numbers: the CPUs this process may use, the default thread
count, the CPU's vector flags, the environment every record carries, and the names that identify a machine.

Nothing here imports torch until an environment is captured with ``with_torch`` (its version and CUDA devices).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import psutil

from cai_bench import __version__
from cai_bench.core.records import utc_now
from cai_bench.core.text import shown

_PACKAGES = (
    "cai-bench", "torch", "numpy", "safetensors", "typer", "rich", "psutil", "onnxruntime",
    "openvino", "nncf",
)  # fmt: skip
# The flags the runtimes' kernels are chosen by: what a record of CPU inference names of its machine
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "asimd")


# ---------------------------------------------------------------------------------------------- cores and flags


def allowed_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which can be fewer than the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Physical cores this process may use: hyper-threads share a core's vector units and rarely help here."""
    allowed = allowed_cpus()
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(physical, allowed))


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere): what the precision probes and the
    records name (avx512f, avx512_bf16, amx_bf16, ...)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return frozenset(next((line for line in fh if line.startswith(("flags", "Features"))), "").split()[2:])
    except OSError:
        return frozenset()


def vector_flags() -> list[str]:
    flags = cpu_flags()
    return [f for f in VECTOR_FLAGS if f in flags]


# What a limit on oneDNN's instruction sets (ONEDNN_MAX_CPU_ISA, which torch's and OpenVINO's oneDNN read) takes
# away from the CPU's flags: the runtimes cannot use what is over the limit, so the probes must not count on it
_OVER_LIMIT = {
    "avx512_core_bf16": ("amx_bf16", "amx_int8"),
    "avx512_core_vnni": ("avx512_bf16", "amx_bf16", "amx_int8"),
    "avx512_core": ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"),
    "avx2_vnni": ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"),
    "avx2": ("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8"),
}
_OVER_LIMIT.update(sse41=_OVER_LIMIT["avx2"] + ("avx2", "fma"), avx=_OVER_LIMIT["avx2"] + ("avx2", "fma"))


# The variables that cap which instruction sets the runtimes' kernels use: oneDNN's (torch, OpenVINO), MKL's and
# torch's own dispatch. A number measured under one is a number of a smaller CPU, and its record says so.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_limits() -> dict[str, str]:
    return {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}


def usable_cpu_flags() -> frozenset[str]:
    """The CPU's flags less what ONEDNN_MAX_CPU_ISA forbids the runtimes (all of them where it is unset)."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower()
    return cpu_flags() - frozenset(_OVER_LIMIT.get(limit, ()))


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX) within any instruction-set limit set;
    elsewhere bf16 is emulated, never faster."""
    flags = usable_cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def int8_dot_product_cpu() -> bool:
    """Whether this CPU has int8 dot products (VNNI or AMX) within any instruction-set limit set. Without them
    int8 runs on AVX2's multiply-adds: under an AVX2 limit OpenVINO's int8 model ran 0.74x its fp32 and moved
    predictions 5x more (docs/performance.md)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & usable_cpu_flags())


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
    root = Path(__file__).resolve().parents[2]  # the checkout: cai_bench/core/machine.py is two folders down
    if not (root / ".git").exists():
        return {}
    commit = _command_output("git", "-C", str(root), "rev-parse", "HEAD")
    dirty = _command_output("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    if commit is None or dirty is None:
        return {}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def tool_version() -> dict:
    """cai-bench's version and, from a checkout, its commit: what a file it writes says made it."""
    return {"cai_bench": __version__, **_git_commit()}


def _versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _torch_or_none(with_torch: bool):
    if not with_torch:
        return None
    try:
        import torch  # lazily: a worker image with an exported model and its runtime only has none
    except ImportError:
        return None
    return torch


@lru_cache(maxsize=2)
def _static_environment(with_torch: bool = True) -> dict:
    torch = _torch_or_none(with_torch)
    gpus = []
    if torch is not None and torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
        "cpu_model": _cpu_model(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "cpu_affinity": allowed_cpus(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if torch is not None else None,
        "cpu_flags": vector_flags(),
        "isa_limits": isa_limits(),
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


def this_machine() -> dict:
    """The environment fields that identify this machine (no timestamp), for comparing with records."""
    return _static_environment()


def machine_identity() -> dict:
    """What a measurement kept in the cache belongs to (the runtime probe's answer, the fp32 peak): host, CPU, its
    flags, the cores this process may use and the installed packages."""
    machine = this_machine()
    return {k: machine.get(k) for k in ("host", "cpu_model", "cpu_logical_cores", "cpu_affinity", "cpu_flags",
                                        "packages")}  # fmt: skip


# ---------------------------------------------------------------------------------------------- names


def machine_id(environment: dict) -> str:
    """Which machine a record comes from: where the backend names it (a SLURM cluster), that name; otherwise
    host, CPU model and GPUs (a host name alone can be reused)."""
    if environment.get("machine_id"):
        return str(environment["machine_id"])
    gpus = ",".join(environment.get("gpus") or [])
    limits = ",".join(f"{k}={v}" for k, v in sorted((environment.get("isa_limits") or {}).items()))
    return " | ".join(x for x in (environment.get("host", "?"), environment.get("cpu_model", "?"), gpus, limits) if x)


def machine_label(environment: dict) -> str:
    """A short name for tables and plot titles: host (GPU or CPU model, cores)."""
    gpus = environment.get("gpus") or []
    what = f"{len(gpus)}x {gpus[0]}" if gpus else str(environment.get("cpu_model", "?"))
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        what = what.replace(noise, "")
    cores = environment.get("cpu_physical_cores") or environment.get("cpu_logical_cores")
    host, what = shown(environment.get("host", "?"), 64), shown(" ".join(what.split()), 64)
    limit = (environment.get("isa_limits") or {}).get("ONEDNN_MAX_CPU_ISA")
    limited = f", limited to {shown(limit, 20)}" if limit else ""
    return f"{host} ({what}{f', {shown(cores, 12)} cores' if cores else ''}{limited})"
