"""``cai-bench model export``: pcm-AstroMAE exported once, with torch, for the runtimes that run without it.

The export is checked before it is kept: the exported file, run by the runtime that will run it (ONNX Runtime
for onnx, OpenVINO for openvino), must predict the fixed probe batch within EXPORT_TOLERANCE of torch's eager
fp32 model, or nothing is written. The largest difference and the weights' identity (the checkpoint's path and
sha256, or random-init and its seed) go into ``export.json`` beside the model, so records of runs on the export
still name the weights.

Exported: the eval-mode model as built and loaded (the runtimes fold BatchNorm and pick layouts themselves),
through torch's ONNX exporter (``torch.export``, opset 18) with a dynamic batch dimension, weights inside the
file; openvino converts that file to OpenVINO's IR with the weights kept in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cai_bench import __version__
from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, exclusive, file_sha256, staged_directory
from cai_bench.core.records import RANDOM_INIT, WeightsInfo
from cai_bench.inference.runtimes import max_difference, runtime_module
from cai_bench.inference.worker import probe_arrays
from cai_bench.model.astromae import build_model
from cai_bench.model.checkpoint import load_weights
from cai_bench.model.export_format import EXPORT_KIND, EXPORT_META, EXPORT_VERSION, Export, is_export, read_export

EXPORT_TOLERANCE = 1e-5  # largest redshift difference from torch fp32 an fp32 export may show on the probe batch
OPSET = 18
FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}


def _torch_model(weights: str | None, seed: int) -> tuple[torch.nn.Module, WeightsInfo]:
    model = build_model(seed=seed)
    info = load_weights(model, weights) if weights else WeightsInfo(source=RANDOM_INIT, seed=seed)
    return model.eval(), info


# Logs, at warning level, each torchvision operator it has no translation for when torchvision is not installed;
# pcm-AstroMAE uses none of them
ONNX_REGISTRY_LOG = "torch.onnx._internal.exporter._registration"


def _to_onnx(model: torch.nn.Module, path: Path) -> None:
    image, magnitude = (torch.from_numpy(a[:2]) for a in probe_arrays(2))
    batch = torch.export.Dim("batch", min=1)
    registry_log = logging.getLogger(ONNX_REGISTRY_LOG)
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals: nothing a user can act on
            torch.onnx.export(
                model, (image, magnitude), str(path), input_names=["image", "magnitude"], output_names=["redshift"],
                dynamic_shapes=({0: batch}, {0: batch}), opset_version=OPSET, dynamo=True, external_data=False,
                verbose=False,
            )  # fmt: skip
    finally:
        registry_log.setLevel(level)


def write_model_files(model: torch.nn.Module, fmt: str, folder: Path, onnx: Path | None = None) -> None:
    """``model`` (any module taking (image, magnitude) as pcm-AstroMAE does) as ``fmt``'s FILES in ``folder``;
    for openvino, ``onnx`` is an ONNX export of the same model to convert instead of exporting it again."""
    if fmt == "onnx" or onnx is None:
        onnx = folder / "model.onnx"
        _to_onnx(model, onnx)
    if fmt == "openvino":
        import openvino as ov  # the [openvino] extra, only for this format

        converted = ov.convert_model(str(onnx))
        ov.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)  # fp32 weights, as exported
        (folder / "model.onnx").unlink(missing_ok=True)


def predict_with_runtime(fmt: str, path: Path, image: np.ndarray, magnitude: np.ndarray) -> tuple[np.ndarray, str]:
    """The exported file run by the runtime that will run it, in fp32 (one thread: the check needs no speed)."""
    runtime = "onnxruntime" if fmt == "onnx" else "openvino"
    module = runtime_module(runtime)
    if fmt == "onnx":
        predict = module.predictor(module.session(str(path), 1))
    else:
        core = module.ov.Core()
        predict = module.predictor(module.compile_model(core, core.read_model(str(path)), "fp32", 1, 1))
    return predict(image, magnitude), f"{runtime} {module.version()}"


def export_model(
    weights: str | None, fmt: str, out: str | Path, seed: int = 0, overwrite: bool = False, onnx: Path | None = None
) -> tuple[Export, float]:
    """Export ``weights`` (None: random-init from ``seed``) as ``fmt`` into the directory ``out``, checked; returns
    the export and the seconds it took. ``onnx``: see ``write_model_files``."""
    started = time.perf_counter()
    if fmt not in FILES:
        raise UserError(f"--format must be one of {', '.join(FILES)}, got {fmt!r}")
    # refuses an unusable --out before any work
    with staged_directory(out, overwrite, "export", EXPORT_META) as staging:
        model, info = _torch_model(weights, seed)
        image, magnitude = probe_arrays()
        with torch.inference_mode():
            reference = model(torch.from_numpy(image), torch.from_numpy(magnitude))[:, 0].numpy()
        write_model_files(model, fmt, staging, onnx)
        try:  # on a batch of another size than the one traced: the batch dimension must have stayed dynamic
            predicted, checked_by = predict_with_runtime(fmt, staging / FILES[fmt][0], image, magnitude)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the {fmt} export does not run on its runtime ({first}); nothing written") from None
        difference = max_difference(predicted, reference)
        if not difference <= EXPORT_TOLERANCE:
            raise UserError(
                f"the {fmt} export predicts the check batch up to {difference:.3g} away from torch fp32 (over "
                f"{EXPORT_TOLERANCE:g}); nothing written"
            )
        meta = {
            "kind": EXPORT_KIND,
            "version": EXPORT_VERSION,
            "model": "pcm-AstroMAE",
            "format": fmt,
            "files": list(FILES[fmt]),
            "weights": {"source": info.source, "sha256": info.sha256, "seed": info.seed},
            "inputs": {"image": ["batch", 5, 32, 32, "float32"], "magnitude": ["batch", 5, "float64"]},
            "outputs": {"redshift": ["batch", 1, "float32"]},
            "check": {
                "batch": len(image),
                "max_abs_dz": difference,
                "tolerance": EXPORT_TOLERANCE,
                "against": "torch fp32 eager",
                "runtime": checked_by,
            },
            "exported_with": {"cai_bench": __version__, "torch": torch.__version__, "opset": OPSET},
            "converted_from": str(onnx) if onnx is not None and fmt != "onnx" else None,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")
    return read_export(out), time.perf_counter() - started


def export_command(weights: str | Path | None, fmt: str, out: str | Path, seed: int = 0,
                   overwrite: bool = False) -> tuple[Export, float]:  # fmt: skip
    """``cai-bench model export``: ``export_model``, after refusing an export given as the weights to export."""
    if weights is not None and is_export(str(weights)):
        raise UserError(f"{weights}: already an export; --weights takes the weights file it was made from")
    return export_model(str(weights) if weights else None, fmt, out, seed=seed, overwrite=overwrite)


def cache_key(weights: str | None, fmt: str, seed: int) -> str:
    """What names an export in the cache: the weights (their content and where they are), the format and the
    versions that made it."""
    # The path too: export.json names the weights as the run that made it named them, for every later record
    identity = f"{Path(weights).resolve()} {file_sha256(Path(weights))}" if weights else f"{RANDOM_INIT}-seed{seed}"
    text = f"{identity} {fmt} {__version__} {torch.__version__} {OPSET}"
    return f"{fmt}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def cached_export(weights: str | None, fmt: str, seed: int = 0) -> tuple[Export, float, bool]:
    """The export of ``weights`` as ``fmt`` from the cache, made there first when missing: (export, seconds it
    took now, whether it was already there)."""
    directory = cache_dir() / "exports" / cache_key(weights, fmt, seed)
    # OpenVINO's IR is converted from an ONNX export: the cached one of the same weights, where there is one,
    # saves exporting the model through torch a second time (most of an export's time)
    onnx = cache_dir() / "exports" / cache_key(weights, "onnx", seed)
    # Another command making the same export: wait for it, then reuse it
    with exclusive(directory.parent / ".locks" / f"{directory.name}.lock"):
        if (directory / EXPORT_META).is_file():
            return read_export(directory), 0.0, True
        source = onnx / FILES["onnx"][0] if fmt == "openvino" and (onnx / EXPORT_META).is_file() else None
        export, seconds = export_model(weights, fmt, directory, seed=seed, overwrite=True, onnx=source)
    return export, seconds, False
