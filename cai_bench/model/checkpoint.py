"""Loading pcm-AstroMAE weights in the upstream key layout, without executing anything from the file.

Accepted: ``.safetensors`` files and ``.pt``/``.pth`` files that hold a plain state dict (read with
``torch.load(weights_only=True)``, which refuses every pickled global that is not a tensor building block).
Loading is strict: a missing, unexpected or wrongly shaped key is an error that names the key.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cai_bench import __version__
from cai_bench.core.choices import UPSTREAM_WEIGHTS, UPSTREAM_WEIGHTS_WHERE
from cai_bench.core.errors import UserError
from cai_bench.core.files import file_sha256
from cai_bench.core.records import RANDOM_INIT, WeightsInfo
from cai_bench.model.astromae import build_model, flops_per_sample
from cai_bench.model.restricted_unpickler import Placeholder, load_pickled_model, module_state_dict

# Prefixes that wrappers add to every key: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# One module, two names: upstream registers the first Inception convolution twice.
_ALIASED_KEYS = {
    "inception_model.conv2d_init.weight": "inception_model.vis_inception.0.weight",
    "inception_model.conv2d_init.bias": "inception_model.vis_inception.0.bias",
}


def unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler objected to, without the paragraph of advice around it."""
    text = " ".join(str(exc).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    return found.group(1).strip() if found else text[:200] or type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{key: tensor}`` mapping from a safetensors or plain-state-dict ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refused name: bytes that are no pickle at all
            raise UserError(f"{path}: not a readable PyTorch file ({unpickler_reason(exc)})") from None
        raise UserError(
            f"{path}: not a plain state dict; it holds pickled objects that are refused ({unpickler_reason(exc)}); "
            f"convert it safely with: cai-bench model convert {path} --out weights.safetensors"
        ) from None
    except Exception as exc:  # a corrupt file makes the unpickler and zip reader fail in many ways
        raise UserError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    return _as_flat_state_dict(obj, path)


def _as_flat_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(
            f"{path}: not a state dict (found {type(obj).__name__}, expected a mapping of names to tensors)"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: not a plain state dict: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(obj)


def filter_upstream_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path = "weights") -> dict:
    """Map a foreign checkpoint's keys onto ours (timm-style checkpoint filter).

    Our module names equal upstream's, so the mapping is: drop wrapper prefixes, and make sure the two names
    of the aliased first convolution carry the same tensor (loading would silently keep only one of them).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    for name, alias in _ALIASED_KEYS.items():
        if name in out and alias in out and not torch.equal(out[name], out[alias]):
            raise UserError(f"{path}: {name} and {alias} must hold the same tensor (one module, two names) but differ")
        if name in out and alias not in out:
            out[alias] = out[name]
        elif alias in out and name not in out:
            out[name] = out[alias]
    return out


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Strict comparison with the model's own state dict; the error names the offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, keys in (("missing key", missing), ("unexpected key", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{label}{'s' if len(keys) > 1 else ''}: {shown}")
    if problems:
        raise UserError(f"{path}: does not match pcm-AstroMAE: " + "; ".join(problems))
    not_float = [k for k, v in state_dict.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        raise UserError(f"{path}: {not_float[0]} holds {state_dict[not_float[0]].dtype}, expected a float tensor")


def checked_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> dict:
    """``state_dict`` in the model's dtypes, after a strict key/shape check and a check for NaN and inf."""
    check_keys(model, state_dict, path)
    expected = model.state_dict()
    try:
        converted = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    except (RuntimeError, TypeError) as exc:  # tensors that do not convert (quantized, sparse, complex)
        raise UserError(f"{path}: holds a tensor that is not plain numbers ({exc})") from None
    odd = next((k for k, v in converted.items() if v.layout != torch.strided or v.is_complex()), None)
    if odd is not None:
        raise UserError(f"{path}: {odd} is not a dense tensor of real numbers")
    non_finite = [k for k, v in converted.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise UserError(f"{path}: {non_finite[0]} holds NaN or inf values")
    return converted


def check_weights_file(path: str | Path) -> None:
    """Refuse, before anything runs, weights that ``load_weights`` would refuse in every worker."""
    path = Path(path)
    checked_state_dict(build_model(), filter_upstream_state_dict(read_state_dict(path), path), path)


def model_info(weights: str | Path | None = None) -> dict:
    """Parameters (total, frozen, learnable), state-dict keys, FLOPs per sample and the weights' source: what
    ``model info`` shows, of the model as ``weights`` load into it (random-init without)."""
    model = build_model()
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=0)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    return {
        "model": "pcm-AstroMAE",
        "parameters": total,
        "frozen_parameters": frozen,
        "learnable_parameters": total - frozen,
        "state_dict_keys": len(model.state_dict()),
        "flops_per_sample": flops_per_sample(model),
        **info.to_dict(),
    }


def load_weights(model: nn.Module, path: str | Path) -> WeightsInfo:
    """Load weights strictly into ``model``; returns where they came from (for the records)."""
    path = Path(path)
    state_dict = filter_upstream_state_dict(read_state_dict(path), path)
    model.load_state_dict(checked_state_dict(model, state_dict, path), strict=True)
    return WeightsInfo(source=str(path), sha256=file_sha256(path))


# ---------------------------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Conversion:
    source: str
    source_sha256: str
    source_kind: str  # "pickled model", "state dict" or "safetensors"
    out: str
    keys: int


def _read_any_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a safetensors file, a plain state dict or a whole pickled model, by upstream key."""
    if path.suffix == ".safetensors":
        return read_state_dict(path), "safetensors"
    obj = load_pickled_model(path)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, Placeholder)):
                obj = obj[key]
                break
    if isinstance(obj, Placeholder):
        return module_state_dict(obj, path), "pickled model"
    return _as_flat_state_dict(obj, path), "state dict"


def convert_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False) -> Conversion:
    """Write the pcm-AstroMAE tensors of ``src`` to a safetensors file in upstream key layout.

    ``src`` may be upstream's whole pickled DataParallel model (read without running any of it, see
    ``restricted_unpickler``), a plain state dict or a safetensors file. The result is checked strictly
    against our model (every key, shape, finite values) before anything is written.
    """
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise UserError(f"{src}: file not found; the fine-tuned weights are {UPSTREAM_WEIGHTS} in "
                        f"{UPSTREAM_WEIGHTS_WHERE}: download it, then cai-bench model convert PATH --out "
                        "weights.safetensors")  # fmt: skip
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: --out must end in .safetensors")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the .safetensors file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --force to replace it, or choose another --out")
    tensors, kind = _read_any_checkpoint(src)
    state_dict = filter_upstream_state_dict(tensors, src)
    checked = checked_state_dict(build_model(), state_dict, src)
    # safetensors refuses tensors that share memory: each key gets its own contiguous copy
    converted = {k: v.contiguous().clone() for k, v in checked.items()}
    digest = file_sha256(src)
    metadata = {"source": src.name, "source_sha256": digest, "source_kind": kind}
    metadata["converted_by"] = f"cai-bench {__version__}"
    staging = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(converted, str(staging), metadata=metadata)
        staging.replace(out)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise UserError(f"{out}: cannot write ({exc.strerror})") from None
    return Conversion(str(src), digest, kind, str(out), len(converted))
