"""OpenVINO int8: NNCF's post-training quantization of the transformer's token-wise matrix products, searched
until its predictions stay within the tolerance of fp32, made once per export into the cache as an export of its
own (staged to S3 and read by workers as any export is) and checked again at every start on the machine it runs
on, against fp32's predictions kept in it.

What is quantized, and why (measured on a 2-vCPU AMD EPYC with avx512_vnni, on weights whose outputs spread like
a trained model's; docs/performance.md): the 48 token-wise matrix products (qkv, proj, fc1 and fc2 of the 12
blocks, the matrix products with rank-3 activations and constant weights) hold 82% of the model's FLOPs. All of
them in int8 ran 1.8-2.0x OpenVINO fp32, while any one kind alone ran 0.96-1.2x: the conversions between int8 and
fp32 around a lone int8 layer eat its gain. The convolutions and the heads in int8 were no faster and moved
predictions 5-10x more, so they stay fp32, as do the attention's own products and the layer norms.

The accuracy control: SmoothQuant's alpha moves where the rounding error lands, and no one value was best for
every set of weights, so the search quantizes with each of ``ATTEMPTS`` in turn and keeps the first whose largest
difference from fp32 on a validation batch is within ``SEARCH_SHARE`` of the tolerance (room for the batches it
is checked on later); failing every one, int8 is refused with what each attempt measured. Calibration, validation
and the checks at start-up use three different seeds of the realistic synthetic galaxies.

The magnitude input becomes float32 in the int8 model: OpenVINO's CPU plugin compiles no float64 next to int8,
and the network converts magnitudes to float32 first in any case, so the answer is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from cai_bench.core.errors import UserError
from cai_bench.core.files import cache_dir, exclusive, file_sha256, staged_directory
from cai_bench.data.synthetic import generate
from cai_bench.inference.worker import PRECISION_TOLERANCE, probe_arrays
from cai_bench.model.export_format import EXPORT_META, Export, read_export

INT8_FILE = "model-int8.xml"
SEARCH_VERSION = 1  # the search's rules: a change makes every kept int8 model again
# (SmoothQuant alpha for the matrix products, or None: NNCF's default; the kinds of token-wise product in int8)
ALL_KINDS = ("qkv", "proj", "fc1", "fc2")
ATTEMPTS = ((0.2, ALL_KINDS), (0.3, ALL_KINDS), (-1.0, ALL_KINDS), (None, ALL_KINDS), (0.2, ("qkv", "proj", "fc1")))
SEARCH_SHARE = 0.8  # the validation batch must be within this share of the tolerance
CALIBRATION_SEED, VALIDATION_SEED, HELD_OUT_SEED = 7001, 7002, 7003
CALIBRATION_SAMPLES, VALIDATION_SAMPLES, HELD_OUT_SAMPLES = 512, 256, 256


def galaxies(seed: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Realistic synthetic galaxies as the int8 model takes them: images, and magnitudes as float32."""
    batch = generate(seed=seed, start=0, stop=samples)
    return batch.images, batch.magnitudes.astype(np.float32)


def magnitudes_as_f32(model: ov.Model) -> ov.Model:
    """``model`` with its float64 magnitude input replaced by a float32 one (the conversion after it dropped)."""
    old = model.inputs[1].get_node()
    new = ops.parameter(old.get_partial_shape(), ov.Type.f32, name=old.get_friendly_name())
    new.output(0).get_tensor().set_names(old.output(0).get_names())
    for target in list(old.output(0).get_target_inputs()):
        user = target.get_node()
        if user.get_type_name() == "Convert" and user.get_output_element_type(0) == ov.Type.f32:
            for consumer in list(user.output(0).get_target_inputs()):
                consumer.replace_source_output(new.output(0))
        else:  # its shape, read for the batch size
            target.replace_source_output(new.output(0))
    return ov.Model(model.get_results(), [model.inputs[0].get_node(), new], model.get_friendly_name())


def token_products(model: ov.Model) -> dict[str, list[str]]:
    """The token-wise matrix products by kind, told apart by their weights' shapes (qkv: 3C x C, proj: C x C,
    fc1: 4C x C, fc2: C x 4C) among the MatMuls with rank-3 activations and constant weights."""
    found: dict[tuple[int, int], list[str]] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.input(0).get_partial_shape().rank.get_length() != 3:
            continue
        weight = op.input(1).get_source_output().get_node()
        if weight.get_type_name() == "Constant":
            found.setdefault(tuple(weight.get_output_shape(0)), []).append(op.get_friendly_name())
    dims = {shape[1] for shape in found if shape[0] == shape[1]}
    if len(dims) != 1:
        raise UserError("int8: the export's transformer blocks were not recognised (no C x C products)")
    c = dims.pop()
    shapes = {"qkv": (3 * c, c), "proj": (c, c), "fc1": (4 * c, c), "fc2": (c, 4 * c)}
    return {kind: found.get(shape, []) for kind, shape in shapes.items()}


def quantize(model: ov.Model, kinds: tuple[str, ...], alpha: float | None, products: dict[str, list[str]]):
    """NNCF's post-training quantization of the ``kinds`` of token-wise products, everything else ignored."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    nncf.set_log_level(logging.ERROR)  # its notes on each layer it leaves out are not the user's to act on

    keep = {name for kind in kinds for name in products[kind]}
    others = [op.get_friendly_name() for op in model.get_ops()
              if op.get_type_name() in ("MatMul", "Convolution", "GroupConvolution")
              and op.get_friendly_name() not in keep]  # fmt: skip
    advanced = None if alpha is None else AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))  # fmt: skip
    images, magnitudes = galaxies(CALIBRATION_SEED, CALIBRATION_SAMPLES)
    items = [(images[i : i + 64], magnitudes[i : i + 64]) for i in range(0, len(images), 64)]
    # Its progress bars are printed on stdout, where --json's answer goes: kept out of it
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(
            model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(names=others, types=["ScaledDotProductAttention"], validate=False),
            advanced_parameters=advanced,
        )  # fmt: skip


def predict_all(compiled, images: np.ndarray, magnitudes: np.ndarray, batch: int = 128) -> np.ndarray:
    request, out = compiled.create_infer_request(), []
    for start in range(0, len(images), batch):
        request.infer([images[start : start + batch], magnitudes[start : start + batch]])
        out.append(request.get_output_tensor(0).data[:, 0].copy())
    return np.concatenate(out).astype(np.float64)


def one_stream(threads: int) -> dict:
    """OpenVINO's configuration for the search and its checks: f32 where not quantized, one stream."""
    return {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": threads}


def search(core: ov.Core, fp32: ov.Model, compiled_fp32, threads: int, tolerance: float) -> tuple[ov.Model, dict]:
    """The first of ATTEMPTS within SEARCH_SHARE of ``tolerance`` on the validation batch (``compiled_fp32``'s
    predictions the reference), and every attempt's figures; a UserError with those figures where none is."""
    config = one_stream(threads)
    images, magnitudes = galaxies(VALIDATION_SEED, VALIDATION_SAMPLES)
    reference = predict_all(compiled_fp32, images, magnitudes)
    products, tried = token_products(fp32), []
    for alpha, kinds in ATTEMPTS:
        started = time.perf_counter()
        model = quantize(fp32, kinds, alpha, products)
        predicted = predict_all(core.compile_model(model, "CPU", config), images, magnitudes)
        difference = float(np.abs(predicted - reference).max())
        tried.append({"smooth_quant_alpha": alpha, "kinds": list(kinds), "max_abs_dz": difference,
                      "seconds": round(time.perf_counter() - started, 2)})  # fmt: skip
        if difference <= SEARCH_SHARE * tolerance:
            quantized = sum(len(products[k]) for k in kinds)
            return model, {"kept": tried[-1], "attempts": tried, "quantized_products": quantized,
                           "validation": {"seed": VALIDATION_SEED, "samples": VALIDATION_SAMPLES}}  # fmt: skip
    figures = ", ".join(f"alpha {t['smooth_quant_alpha']} {'+'.join(t['kinds'])}: {t['max_abs_dz']:.2g}" for t in tried)
    raise UserError(f"--precision int8: no quantization of these weights stayed within {SEARCH_SHARE:g} x "
                    f"{tolerance:g} of fp32 on the validation batch ({figures}); run fp32 or auto")  # fmt: skip


def _cache_directory(export: Export, tolerance: float) -> Path:
    import nncf

    key = {"export": file_sha256(Path(export.directory) / EXPORT_META), "nncf": nncf.__version__,
           "openvino": ov.get_version(), "search": SEARCH_VERSION, "tolerance": tolerance}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "exports" / f"openvino-int8-{digest}"


def check_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The batches an int8 model is checked on at every start: the probe batch, and a held-out batch of a seed
    neither the calibration nor the search saw."""
    image, magnitude = probe_arrays()
    return {"probe": (image, magnitude.astype(np.float32)), "held_out": galaxies(HELD_OUT_SEED, HELD_OUT_SAMPLES)}


def _write_int8_export(staging: Path, export: Export, model: ov.Model, fp32, found: dict, tolerance: float) -> None:
    """An export of its own: the int8 model, the source export's weights, the search's figures, and fp32's
    predictions on the check batches (so a worker checks int8 at its start without the fp32 model)."""
    ov.save_model(model, str(staging / INT8_FILE))
    kept = found["kept"]
    meta = {
        **export.meta,
        "files": [INT8_FILE, INT8_FILE.replace(".xml", ".bin")],
        "precision": "int8",
        "inputs": {**export.meta["inputs"], "magnitude": [*export.meta["inputs"]["magnitude"][:-1], "float32"]},
        "check": {
            "batch": VALIDATION_SAMPLES,
            "max_abs_dz": kept["max_abs_dz"],
            "tolerance": tolerance,
            "against": "the export's fp32 on OpenVINO",
            "runtime": f"openvino {ov.get_version()}",
        },
        "quantization": {**found, "from_export": export.meta.get("check"), "tolerance": tolerance},
        "fp32_predictions": {name: predict_all(fp32, *batch).tolist() for name, batch in check_batches().items()},
    }
    (staging / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")


def cached_int8_export(export: Export, threads: int, tolerance: float | None = None) -> tuple[Export, dict]:
    """The int8 export of the OpenVINO export ``export`` from the cache, searched and made there first where
    missing: (the int8 export, {"int8_made": bool, "int8_s": seconds it took now})."""
    tolerance = PRECISION_TOLERANCE if tolerance is None else tolerance
    try:
        import nncf  # noqa: F401 (only its presence, here)
    except ImportError:
        raise UserError("--runtime openvino --precision int8 needs nncf: pip install 'cai-bench[openvino]'") from None
    directory = _cache_directory(export, tolerance)
    with exclusive(directory.parent / ".locks" / f"{directory.name}.lock"):
        if (directory / EXPORT_META).is_file():
            return read_export(directory, "openvino"), {"int8_made": False}
        started = time.perf_counter()
        core = ov.Core()
        source = magnitudes_as_f32(core.read_model(export.model_file))
        compiled = core.compile_model(source, "CPU", one_stream(threads))  # once: the search's and the checks' fp32
        model, found = search(core, source, compiled, threads, tolerance)
        with staged_directory(directory, True, "int8 export", EXPORT_META) as staging:
            _write_int8_export(staging, export, model, compiled, found, tolerance)
        seconds = time.perf_counter() - started
    return read_export(directory, "openvino"), {"int8_made": True, "int8_s": round(seconds, 3)}


def check(export: Export, compiled_int8) -> dict[str, float]:
    """The int8 model's largest difference from the export's fp32 on each check batch, on this machine."""
    fp32 = export.meta.get("fp32_predictions") or {}
    out = {}
    for name, batch in check_batches().items():
        reference = np.asarray(fp32.get(name, []), np.float64)
        if reference.shape != (len(batch[0]),):
            raise UserError(f"{export.directory}: its fp32 predictions for the {name} batch are missing or cut")
        out[name] = float(np.abs(predict_all(compiled_int8, *batch) - reference).max())
    return out
