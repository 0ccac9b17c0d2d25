"""Which CUDA devices a run uses, what a device worker sees of them, and how many reader threads each gets."""

from __future__ import annotations

from cai_bench.core.errors import UserError
from cai_bench.core.machine import allowed_cpus

DEFAULT_BATCH_SIZE = 4096


PROBE_BATCH = 1024


NO_CUDA = (
    "--backend gpu: no CUDA device is visible here (torch.cuda.is_available() is False); run it on a machine with "
    "an NVIDIA GPU and a CUDA build of torch, or use --backend cpu or --backend hpc"
)


def parse_devices(text: str) -> str:
    """``0,1`` (or ``0+1``, which a sweep's comma lists leave whole) or ``all``, as the option holds it."""
    text = str(text).strip().lower()
    if text == "all":
        return text
    try:
        numbers = [int(t) for t in text.replace("+", ",").split(",") if t.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0 or len(set(numbers)) != len(numbers):
        raise UserError(f"--devices {text!r}: give CUDA device numbers (0,1 or 0+1) or all")
    return "+".join(str(n) for n in numbers)


def visible_devices(devices: str) -> list[str]:
    """The torch device names ``--devices`` selects; a UserError where there is no CUDA or no such device."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(NO_CUDA)
    count = torch.cuda.device_count()
    numbers = list(range(count)) if devices == "all" else [int(n) for n in parse_devices(devices).split("+")]
    missing = [n for n in numbers if n >= count]
    if missing:
        raise UserError(f"--devices: no CUDA device {missing[0]} here ({count} visible: 0-{count - 1})")
    return [f"cuda:{n}" for n in numbers]


def device_visibility(device: str, visible: str | None) -> tuple[dict[str, str], str]:
    """What a device worker sets before CUDA starts in it, and the name its device then has: only its own GPU is
    visible, as ``cuda:0``, so that nothing it does (a pinned allocation, a read before ``set_device``) opens a
    context on another GPU. ``visible`` is the CUDA_VISIBLE_DEVICES the run started under, whose entries
    ``cuda:N`` counts."""
    if not device.startswith("cuda"):
        return {}, device
    index = int(device.partition(":")[2] or 0)
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return {"CUDA_VISIBLE_DEVICES": entries[index] if entries else str(index)}, "cuda:0"


def default_read_ahead(devices: int) -> int:
    """Reader threads per device worker: the cores this process may use, shared between the devices, 2 to 8
    (reading, the sha256 check and decoding are the host's work; a device eats a 25 MB partition in milliseconds)."""
    return max(2, min(8, allowed_cpus() // max(1, devices)))
