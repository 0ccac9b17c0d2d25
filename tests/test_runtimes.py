"""The exported-model runtimes (ONNX Runtime, OpenVINO): export, predictions against torch, the precision rules,
the torch-free worker, and --runtime through the cpu, hpc and Lambda backends.

Exports take 10-15 s each (torch's exporter), so the exports of one weights file are made once per session."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyAstroMAE

from cai_bench.core.errors import UserError
from cai_bench.core.files import file_sha256
from cai_bench.core.plan import make_plan
from cai_bench.core.records import RANDOM_INIT, WeightsInfo
from cai_bench.data.catalogue import read_catalogue
from cai_bench.data.partitions import open_dataset
from cai_bench.inference import export as exporting
from cai_bench.inference import runtimes
from cai_bench.inference.engine import run_partition, start_worker
from cai_bench.inference.runtimes import openvino_runtime
from cai_bench.inference.worker import FORCE_PROBE_ENV, EngineOptions

FP32_TOLERANCE = 1e-5  # the issue's: each runtime in fp32 against torch fp32


def torch_fp32(refs, weights) -> tuple[np.ndarray, np.ndarray]:
    """The truth: torch's eager fp32 model (the reference engine's), partition by partition."""
    options = EngineOptions(batch_size=16, precision="fp32", engine="reference")
    worker = start_worker("torch", options, weights=str(weights))
    results = [run_partition(ref, worker, options) for ref in refs]
    return np.concatenate([r.object_id for r in results]), np.concatenate([r.prediction for r in results])


def runtime_predictions(refs, runtime, model, precision="fp32", lanes=2, batch_size=16):
    options = EngineOptions(batch_size=batch_size, precision=precision, runtime=runtime, lanes=lanes, intra_threads=1)
    worker = runtimes.start_worker("w", options, str(model))
    results = [runtimes.run_partition(runtimes.load_partition(ref, options), worker, options) for ref in refs]
    worker.close()
    ids = np.concatenate([r.object_id for r in results])
    return ids, np.concatenate([r.prediction for r in results]), worker


def test_an_export_is_checked_against_torch_and_names_its_weights(exports, weights_file):
    for fmt, directory in exports.items():
        export = runtimes.read_export(directory)
        assert export.format == fmt and all((directory / name).is_file() for name in export.files)
        assert export.weights.source == str(weights_file) and export.weights.sha256 == file_sha256(weights_file)
        assert 0 <= export.check["max_abs_dz"] <= exporting.EXPORT_TOLERANCE and export.check["batch"] == 64
        assert export.check["runtime"].startswith("onnxruntime " if fmt == "onnx" else "openvino ")
    assert runtimes.read_export(exports["openvino"]).files == ("model.xml", "model.bin")


@pytest.mark.parametrize(("runtime", "fmt"), [("onnxruntime", "onnx"), ("openvino", "openvino"), ("openvino", "onnx")])
def test_each_runtime_predicts_within_1e_5_of_torch_fp32(tiny_data, weights_file, exports, runtime, fmt):
    _, _, refs = open_dataset(tiny_data)
    truth_ids, truth = torch_fp32(refs, weights_file)
    ids, predicted, worker = runtime_predictions(refs, runtime, exports[fmt])
    assert ids.tolist() == truth_ids.tolist()
    assert np.abs(predicted - truth).max() <= FP32_TOLERANCE
    assert np.ptp(truth) > 0.1  # the outputs vary: agreement is not agreement on a constant
    assert worker.precision == "fp32" and worker.choices["runtime"] == runtime
    assert worker.choices["runtime_version"] and worker.choices["threading"]
    assert worker.weights.sha256 == file_sha256(weights_file)  # records name the weights, not the export


def test_an_export_outside_its_tolerance_writes_nothing(monkeypatch, tmp_path, tiny_model_exported):
    monkeypatch.setattr(exporting, "EXPORT_TOLERANCE", 0.0)
    monkeypatch.setattr(exporting, "max_difference", lambda a, b: 3e-6)  # what the check measured
    with pytest.raises(UserError, match=r"up to 3e-06 away from torch fp32 \(over 0\); nothing written"):
        exporting.export_model(None, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("difference", "kept"), [(1e-3, True), (2e-3, True), (2.5e-3, False), (float("nan"), False)])
def test_an_explicit_lower_precision_is_kept_only_within_tolerance(difference, kept):
    if kept:
        assert runtimes.judge_explicit("int8", difference)["max_difference"] == difference
    else:
        with pytest.raises(UserError, match=r"--precision int8: .* differ from fp32 by up to .* over the 0.002"):
            runtimes.judge_explicit("int8", difference)


def test_int8_on_onnxruntime_is_measured_on_the_probe_batch_and_kept_only_within_tolerance(
    tiny_data, exports, monkeypatch
):
    """The rule's inputs controlled: the same measured difference, judged against a tolerance above it, then
    against one below it."""
    _, _, refs = open_dataset(tiny_data)
    monkeypatch.setattr(runtimes, "PRECISION_TOLERANCE", 1.0)
    _, _, worker = runtime_predictions(refs[:1], "onnxruntime", exports["onnx"], precision="int8", lanes=1)
    probe = worker.choices["precision_probe"]
    assert worker.precision == "int8" == probe["chose"] and probe["tolerance"] == 1.0
    measured = probe["max_difference"]
    assert measured > 0  # the quantized model really is another model
    monkeypatch.setattr(runtimes, "PRECISION_TOLERANCE", measured / 2)
    with pytest.raises(UserError, match=rf"differ from fp32 by up to {measured:.3g} in redshift, over the"):
        runtime_predictions(refs[:1], "onnxruntime", exports["onnx"], precision="int8", lanes=1)


def test_onnxruntime_auto_is_fp32_whatever_the_probe_would_say(tiny_data, exports, monkeypatch):
    monkeypatch.setenv(FORCE_PROBE_ENV, "bf16")
    _, _, refs = open_dataset(tiny_data)
    _, _, worker = runtime_predictions(refs[:1], "onnxruntime", exports["onnx"], precision="auto", lanes=1)
    assert worker.precision == "fp32" and "no bf16" in worker.choices["precision_probe"]["why"]


class CompileSpy:
    """Every configuration the OpenVINO runtime compiles with, the real compile still done."""

    def __init__(self, monkeypatch):
        self.configurations = []
        real = openvino_runtime.ov.Core.compile_model

        def compile_model(core, model, device, config):
            self.configurations.append(dict(config))
            return real(core, model, device, config)

        monkeypatch.setattr(openvino_runtime.ov.Core, "compile_model", compile_model)


@pytest.mark.parametrize(
    ("native", "timings", "chose"),
    [
        (False, None, "fp32"),  # no native bf16: no probe compile at all
        (True, {"fp32_s": 1.0, "bf16_s": 0.5, "max_difference": 3e-4}, "bf16"),
        (True, {"fp32_s": 1.0, "bf16_s": 0.95, "max_difference": 3e-4}, "fp32"),  # not 10% faster
        (True, {"fp32_s": 1.0, "bf16_s": 0.5, "max_difference": 5e-3}, "fp32"),  # outside tolerance
    ],
)
def test_openvino_precision_is_always_set_explicitly_from_the_probe(
    tiny_data, exports, monkeypatch, native, timings, chose
):
    monkeypatch.delenv(FORCE_PROBE_ENV, raising=False)
    monkeypatch.setattr(openvino_runtime, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(openvino_runtime, "time_precisions", lambda core, model, threads: timings)
    spy = CompileSpy(monkeypatch)
    _, _, refs = open_dataset(tiny_data)
    _, _, worker = runtime_predictions(refs[:1], "openvino", exports["openvino"], precision="auto")
    assert worker.precision == chose == worker.choices["precision_probe"]["chose"]
    assert worker.choices["precision_hint"] == {"fp32": "f32", "bf16": "bf16"}[chose]
    # Every compile names its precision: OpenVINO's own default is never left to choose
    assert spy.configurations and all("INFERENCE_PRECISION_HINT" in c for c in spy.configurations)
    assert spy.configurations[-1]["INFERENCE_PRECISION_HINT"] == worker.choices["precision_hint"]
    assert spy.configurations[-1]["NUM_STREAMS"] == "2"


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_openvino_follows_a_forced_probe_with_its_precision_named(tiny_data, weights_file, exports,
                                                                         monkeypatch, forced):  # fmt: skip
    monkeypatch.setenv(FORCE_PROBE_ENV, forced)
    spy = CompileSpy(monkeypatch)
    _, _, refs = open_dataset(tiny_data)
    _, truth = torch_fp32(refs[:2], weights_file)
    _, predicted, worker = runtime_predictions(refs[:2], "openvino", exports["openvino"], precision="auto")
    assert worker.precision == forced and [c["INFERENCE_PRECISION_HINT"] for c in spy.configurations] == [
        {"fp32": "f32", "bf16": "bf16"}[forced]
    ]
    # A forced answer skips the tolerance check (bf16 can be over it on these weights); it is still this model
    assert np.abs(predicted - truth).max() <= (FP32_TOLERANCE if forced == "fp32" else 0.05)


def test_what_a_runtime_cannot_run_is_refused_before_anything_runs(tiny_data):
    _, summary, refs = open_dataset(tiny_data)
    cases = [
        ({"runtime": "onnxruntime"}, {"precision": "bf16"}, "--precision bf16: --runtime onnxruntime runs auto, fp32"),
        ({"runtime": "onnxruntime"}, {"precision": "bf16"}, "--runtime torch or openvino runs it"),
        ({}, {"precision": "int8"}, "--precision int8: --runtime torch runs auto, fp32, bf16; --runtime "
                                    "onnxruntime or openvino runs it"),
        ({"runtime": "openvino"}, {"engine": "reference"}, "--engine reference is torch's eager loop"),
        ({"runtime": "onnxruntime"}, {"compile": True}, "--compile is torch.compile"),
        ({"runtime": "tvm"}, {}, "--runtime must be one of torch, onnxruntime, openvino"),
    ]  # fmt: skip
    for options, changes, message in cases:
        with pytest.raises(UserError, match=message):
            make_plan("cpu", summary, refs, backend_options=options, **changes)


def test_a_bad_export_directory_is_one_clear_error(exports, tmp_path):
    import shutil

    with pytest.raises(UserError, match="not a model export"):
        runtimes.read_export(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exports["onnx"], broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(UserError, match="names 'model.onnx', which is not a file there"):
        runtimes.read_export(broken)
    meta = json.loads((exports["onnx"] / "export.json").read_text())
    (broken / "export.json").write_text(json.dumps({**meta, "files": ["../../etc/passwd"]}))
    with pytest.raises(UserError, match="which is not a file there"):
        runtimes.read_export(broken)
    (broken / "export.json").write_text(json.dumps({**meta, "kind": "something else"}))
    with pytest.raises(UserError, match="not a cai-bench model export"):
        runtimes.read_export(broken)
    with pytest.raises(UserError, match="a openvino export; --runtime onnxruntime reads onnx"):
        runtimes.read_export(exports["openvino"], "onnxruntime")
    (broken / "export.json").write_text(json.dumps({**meta, "files": [3]}))
    with pytest.raises(UserError, match="names 3, which is not a file there"):
        runtimes.read_export(broken)
    # A model file that is not one: the runtime's own error, as one line naming the export
    (broken / "export.json").write_text(json.dumps(meta))
    (broken / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"broken: onnxruntime cannot load the export \("):
        runtimes.start_worker("w", EngineOptions(runtime="onnxruntime", precision="fp32"), str(broken))


def test_a_worker_on_an_export_never_imports_torch(tiny_data, exports):
    """A worker process with torch (and the CLI's libraries) made unimportable: it must run all the same."""
    script = textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "timm", "torchvision", "typer", "rich", "pandas", "matplotlib"):
                    raise ImportError("refused: " + name)
        sys.meta_path.insert(0, Refuse())
        from cai_bench.data.partitions import open_dataset
        from cai_bench.inference.loop import model_worker, units_from, worker_loop
        from cai_bench.inference.worker import EngineOptions
        _, _, refs = open_dataset({str(tiny_data)!r})
        done = []
        for runtime, model in (("onnxruntime", {str(exports["onnx"])!r}), ("openvino", {str(exports["openvino"])!r})):
            options = EngineOptions(batch_size=16, precision="fp32", runtime=runtime, lanes=2)
            start, load, run = model_worker("w", options, model, 0)
            worker = worker_loop(start, units_from(list(enumerate(refs))), options,
                                 lambda i, r: done.append((runtime, r.record.samples)), load=load, run=run)
            worker.close()
        print(sum(n for _, n in done), len(done), "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(2 * 104), str(2 * len(open_dataset(tiny_data)[2])), "False"]


def test_run_on_each_runtime_records_what_ran(cli, tiny_data, exports, weights_file, tmp_path):
    for runtime, model in (("onnxruntime", exports["onnx"]), ("openvino", exports["openvino"])):
        code, out, err = cli("run", "--data", tiny_data, "--runtime", runtime, "--weights", model, "--precision",
                             "fp32", "--batch-size", "16", "--threads", "2", "--json",
                             "--results", tmp_path)  # fmt: skip
        assert code == 0, err
        (record,) = json.loads(out)
        info = record["backend_info"]
        assert record["plan"]["backend_options"]["runtime"] == runtime
        assert info["runtime"] == runtime and info["precision"] == "fp32" and info["runtime_version"]
        assert info["threading"] == (
            {"sessions": 2, "intra_op_threads": 1, "inter_op_threads": 1}
            if runtime == "onnxruntime"
            else {"streams": 2, "infer_requests": 2, "threads": 2, "performance_hint": "THROUGHPUT"}
        )
        assert record["weights"] == {"weights": str(weights_file), "sha256": file_sha256(weights_file)}
        assert all(w["precision"] == "fp32" for w in record["workers"])
    code, _, err = cli("report", "--results", tmp_path)
    assert code == 0 and "onnxruntime" in _ and "openvino" in _


def test_without_an_export_the_run_exports_into_the_cache_once(cli, tiny_data, tmp_path, monkeypatch,
                                                               tiny_model_exported):  # fmt: skip
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path / "cache"))  # empty: other tests' exports are elsewhere
    common = ["run", "--data", tiny_data, "--runtime", "onnxruntime", "--batch-size", "16", "--json"]
    code, out, err = cli(*common, "--results", tmp_path)
    assert code == 0, err
    (first,) = json.loads(out)
    code, out, err = cli(*common, "--results", tmp_path)
    (second,) = json.loads(out)
    assert first["backend_info"]["export_made"] is True and first["backend_info"]["export_s"] > 0
    assert second["backend_info"]["export_made"] is False
    assert first["weights"] == second["weights"] == {"weights": "random-init", "seed": 0}
    assert first["backend_info"]["precision"] == "fp32"  # onnxruntime's auto


def test_the_cached_ir_is_converted_from_the_cached_onnx_export_of_the_same_weights(tmp_path, monkeypatch,
                                                                                    tiny_model_exported):  # fmt: skip
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path / "cache"))
    exported, real = [], exporting._to_onnx
    monkeypatch.setattr(exporting, "_to_onnx", lambda model, path: exported.append(path) or real(model, path))
    onnx, _, _ = exporting.cached_export(None, "onnx", seed=4)
    ir, _, cached = exporting.cached_export(None, "openvino", seed=4)
    assert not cached and len(exported) == 1  # torch exported the model once, for both formats
    meta = json.loads((Path(ir.directory) / "export.json").read_text())
    assert meta["converted_from"] == str(Path(onnx.directory) / "model.onnx") and meta["check"]["max_abs_dz"] <= 1e-5


def test_model_export_command(cli, weights_file, tmp_path, tiny_model_exported):
    code, out, err = cli("model", "export", "--weights", weights_file, "--format", "onnx", "--out", tmp_path / "e")
    assert code == 0, err
    assert "onnx export of" in out and "--runtime onnxruntime --weights" in out
    code, _, err = cli("model", "export", "--format", "onnx", "--out", tmp_path / "e")
    assert code == 2 and "exists and is not empty; pass --force" in err
    code, _, err = cli("model", "export", "--weights", tmp_path / "e", "--format", "onnx", "--out", tmp_path / "f")
    assert code == 2 and "already an export; --weights takes the weights file" in err
    code, _, err = cli("run", "--runtime", "torch", "--weights", tmp_path / "e", "--gb", "0.002", "--results", tmp_path)
    assert code == 2 and "an exported model; run it with --runtime onnxruntime or openvino" in err


def test_hpc_workers_run_an_export(cli, tiny_data, exports, weights_file, tmp_path):
    common = ["predict", "--data", tiny_data, "--precision", "fp32", "-q", "--results", tmp_path / "r"]
    code, _, err = cli(*common, "--weights", weights_file, "--out", tmp_path / "torch.csv")
    assert code == 0, err
    code, _, err = cli(*common, "--weights", exports["onnx"], "--backend", "hpc", "--workers", "2", "--runtime",
                       "onnxruntime", "--out", tmp_path / "ort.csv")  # fmt: skip
    assert code == 0, err
    torch_out, ort_out = (read_catalogue(tmp_path / f"{n}.csv")[0] for n in ("torch", "ort"))
    assert ort_out["id"].tolist() == torch_out["id"].tolist()
    assert np.abs(ort_out["z_pred"] - torch_out["z_pred"]).max() <= FP32_TOLERANCE
    records = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert records[1]["backend_info"]["runtime"] == "onnxruntime" and records[1]["backend_info"]["workers"] == 2


def test_a_sweep_resolves_auto_once_per_runtime(cli, tmp_path, monkeypatch, weights_file, exports):
    monkeypatch.setenv(FORCE_PROBE_ENV, "bf16")
    code, out, err = cli("sweep", "--gb", "0.002", "--partition-mb", "0.52", "--batch-size", "16", "--runtime",
                         "torch,onnxruntime,openvino", "--weights", weights_file, "--results", tmp_path,
                         "--quiet")  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    ran = {r["plan"]["backend_options"]["runtime"]: r["plan"]["precision"] for r in records}
    assert ran == {"torch": "bf16", "onnxruntime": "fp32", "openvino": "bf16"}
    assert "auto ran as fp32 on onnxruntime" in out and "auto ran as bf16 on openvino" in out


@pytest.fixture
def tiny_model_exported(monkeypatch):
    """Exports made of ``TinyAstroMAE`` instead of the full model, through the same code path (exporter, runtime
    check, export.json, the cache), naming the weights they were asked for: for the tests of what an export does
    around the model, at a fraction of a full model's export time (seconds, not half a minute)."""

    def tiny(weights, seed):
        torch.manual_seed(seed)
        named = (
            WeightsInfo(str(weights), file_sha256(Path(weights))) if weights else WeightsInfo(RANDOM_INIT, seed=seed)
        )
        return TinyAstroMAE().eval(), named

    monkeypatch.setattr(exporting, "_torch_model", tiny)


class _LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_tiny_model_of_the_same_parts_exports_within_1e_5_on_its_runtime(tmp_path, fmt):
    torch.manual_seed(3)
    model = TinyAstroMAE()
    for module in model.modules():  # BatchNorm statistics away from 0 and 1, so that folding them matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    logged = _LogRecords()
    logging.getLogger("torch.onnx").addHandler(logged)  # torch's loggers do not propagate to the root's
    try:
        exporting.write_model_files(model, fmt, tmp_path)
    finally:
        logging.getLogger("torch.onnx").removeHandler(logged)
    assert not [r.getMessage() for r in logged.records if r.levelno >= logging.WARNING]  # nothing on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(exporting.FILES[fmt])
    image, magnitude = runtimes.probe_arrays(48)
    with torch.inference_mode():
        truth = model(torch.from_numpy(image), torch.from_numpy(magnitude))[:, 0].numpy()
    predicted, checked_by = exporting.predict_with_runtime(fmt, tmp_path / exporting.FILES[fmt][0], image, magnitude)
    assert checked_by.startswith("onnxruntime" if fmt == "onnx" else "openvino")
    assert np.ptp(truth) > 0.1 and np.abs(predicted - truth).max() <= FP32_TOLERANCE
