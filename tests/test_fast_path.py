"""The fast path against the reference loop: same predictions within 2e-3, every choice recorded."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_GB, TINY_MB, TinyAstroMAE

from cai_bench.benches.cpu_runtimes import bench_plans
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset
from cai_bench.inference import engine
from cai_bench.inference.engine import EngineOptions, run_partition, run_reference, start_worker
from cai_bench.inference.runtime_choice import FORCE_RUNTIME_ENV
from cai_bench.model.astromae import build_model
from cai_bench.model.inference import fold_batchnorm, prepare_for_inference

TOLERANCE = 2e-3


def scaled_weights(tmp_path) -> str:
    """Weights whose outputs land in 0-0.6 like a trained model's, so that 2e-3 is a real bound."""
    from safetensors.torch import save_file

    state = build_model(seed=4).state_dict()
    state["concat_block.2.weight"] = state["concat_block.2.weight"] * 0.01
    state["concat_block.2.bias"] = torch.tensor([0.15])
    path = tmp_path / "scaled.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return str(path)


def predictions(refs, options: EngineOptions, weights) -> tuple[np.ndarray, np.ndarray, dict]:
    worker = start_worker("w", options, weights=weights)
    if options.engine == "reference":
        result = run_reference(refs, worker, options)
        return result.object_id, result.prediction, worker.choices
    results = [run_partition(ref, worker, options) for ref in refs]
    return (
        np.concatenate([r.object_id for r in results]),
        np.concatenate([r.prediction for r in results]),
        worker.choices,
    )


@pytest.mark.parametrize("weights", ["random-init", "scaled"])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
@pytest.mark.probe
def test_fast_path_predictions_stay_within_2e3_of_eager_fp32(tiny_data, tmp_path, weights, precision):
    torch.set_num_threads(1)
    _, _, refs = open_dataset(tiny_data)
    path = None if weights == "random-init" else scaled_weights(tmp_path)
    ref_ids, ref_pred, _ = predictions(refs, EngineOptions(batch_size=32, engine="reference", precision="fp32"), path)
    ids, pred, choices = predictions(refs, EngineOptions(batch_size=32, engine="fast", precision=precision), path)
    assert ids.tolist() == ref_ids.tolist()
    assert np.abs(pred - ref_pred).max() <= TOLERANCE
    if weights == "scaled":
        assert ref_pred.min() > 0.0 and ref_pred.max() < 0.6  # the bound is tested where outputs are redshifts
    assert choices["engine"] == "fast" and choices["channels_last"] is True and choices["fold_batchnorm"] == 42
    assert choices["precision"] == precision if precision != "auto" else choices["precision"] in ("fp32", "bf16")


def test_folding_batchnorm_keeps_the_outputs():
    model = build_model(seed=2).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    images, magnitudes = torch.rand(8, 5, 32, 32), 14 + 6 * torch.rand(8, 5, dtype=torch.float64)
    with torch.inference_mode():
        before = model(images, magnitudes)
        assert fold_batchnorm(model) == 42  # 30 Inception ConvBlocks + 12 PCMs
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        prepare_for_inference(model)  # a second time: nothing left to fold, layout already channels_last
        after = model(images.contiguous(memory_format=torch.channels_last), magnitudes)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("native", "fp32_s", "bf16_s", "difference", "expected"),
    [
        (False, 1.0, 0.1, 0.0, ("fp32", "no native bf16 on this device")),
        (True, 1.0, 0.95, 0.0, ("fp32", "not 10% faster")),
        (True, 1.0, 0.5, 3e-3, ("fp32", "outside tolerance")),
        (True, 1.0, 0.5, 1e-4, ("bf16", "faster and within tolerance")),
        (True, 1.0, 0.899, 2e-3, ("bf16", "faster and within tolerance")),
    ],
)
def test_the_probe_rule_answers_both_ways(native, fp32_s, bf16_s, difference, expected):
    assert engine.decide_precision(native, fp32_s, bf16_s, difference) == expected


@pytest.mark.parametrize("answer", ["fp32", "bf16"])
def test_auto_follows_what_the_probe_measured(monkeypatch, answer):
    """The probe's inputs controlled: a device with native bf16 whose timings and differences are chosen."""
    monkeypatch.delenv(engine.FORCE_PROBE_ENV, raising=False)
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    timings = {"fp32": {"fp32_s": 1.0, "bf16_s": 1.2, "max_difference": 1e-4}, "bf16": {
        "fp32_s": 1.0, "bf16_s": 0.4, "max_difference": 1e-4}}  # fmt: skip
    monkeypatch.setattr(engine, "time_precisions", lambda model, device, channels_last: timings[answer])
    worker = start_worker("w", EngineOptions(batch_size=8, precision="auto"))
    assert worker.precision == answer == worker.choices["precision"]
    assert worker.choices["precision_probe"]["chose"] == answer


def test_the_real_probe_keeps_fp32_without_native_bf16_or_outside_tolerance(monkeypatch):
    monkeypatch.delenv(engine.FORCE_PROBE_ENV, raising=False)
    model = build_model().eval()
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    assert engine.choose_precision(model, torch.device("cpu"), False) == (
        "fp32",
        {"chose": "fp32", "why": "no native bf16 on this device"},
    )
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    monkeypatch.setattr(engine, "PRECISION_TOLERANCE", 0.0)  # bf16 always differs a little: never close enough
    chose, probe = engine.choose_precision(model, torch.device("cpu"), False)
    assert chose == "fp32" and probe["max_difference"] > 0 and probe["why"] in ("outside tolerance", "not 10% faster")
    assert probe["fp32_s"] > 0 and probe["bf16_s"] > 0


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_the_environment_can_force_the_probe_for_a_test_run(monkeypatch, forced):
    monkeypatch.setenv(engine.FORCE_PROBE_ENV, forced)
    monkeypatch.setattr(engine, "time_precisions", lambda *a: pytest.fail("a forced probe measures nothing"))
    chose, probe = engine.choose_precision(build_model().eval(), torch.device("cpu"), False)
    assert (chose, probe["why"]) == (forced, f"forced by {engine.FORCE_PROBE_ENV}")
    monkeypatch.setenv(engine.FORCE_PROBE_ENV, "fp16")
    with pytest.raises(UserError, match="give fp32 or bf16"):
        engine.choose_precision(build_model().eval(), torch.device("cpu"), False)


def test_the_reference_loop_is_one_record_over_the_whole_data_set(tiny_data):
    _, _, refs = open_dataset(tiny_data)
    options = EngineOptions(batch_size=40, engine="reference", precision="fp32")
    worker = start_worker("ref", options)
    result = run_reference(refs, worker, options)
    r = result.record
    assert (r.partition, r.samples, r.batches, r.precision) == (-1, 104, 3, "fp32")  # 40 + 40 + 24
    assert r.partition_file == "all 4 partitions" and r.load_s > 0 and r.startup_s == worker.startup_s
    assert result.object_id.tolist() == sorted(result.object_id.tolist())


def test_plans_name_their_engine_and_reference_is_fp32_only(tiny_data):
    _, summary, refs = open_dataset(tiny_data)
    with pytest.raises(UserError, match="--engine must be one of fast, reference"):
        make_plan("cpu", summary, refs, engine="turbo")
    with pytest.raises(UserError, match="eager float32 baseline"):
        make_plan("cpu", summary, refs, engine="reference", precision="bf16")
    plans = bench_plans(
        make_plan("cpu", summary, refs, precision="auto", repeats=2), ["reference", "torch", "openvino"]
    )
    assert (plans["reference"].engine, plans["reference"].precision) == ("reference", "fp32")
    assert (plans["torch"].engine, plans["torch"].precision, plans["torch"].repeats) == ("fast", "auto", 2)
    assert plans["openvino"].backend_options["runtime"] == "openvino" and plans["openvino"].precision == "auto"


@pytest.mark.probe
def test_run_records_every_choice_of_the_fast_path(cli, tiny_data, tmp_path):
    code, out, _ = cli(
        "run", "--data", tiny_data, "--batch-size", "16", "--threads", "1", "--json", "--results", tmp_path
    )
    (record,) = json.loads(out)
    assert code == 0
    assert record["plan"]["engine"] == "fast" and record["plan"]["precision"] == "auto"
    info = record["backend_info"]
    assert info["engine"] == "fast" and info["precision_requested"] == "auto" and info["precision"] in ("fp32", "bf16")
    assert info["fold_batchnorm"] == 42 and info["channels_last"] is True and info["compile"] is False
    assert all(w["precision"] == info["precision"] for w in record["workers"])


def test_bench_alternates_every_runtime_with_the_reference_and_records_every_run(
    cli, tmp_path, weights_file, exports, monkeypatch
):
    """The weights are the session's, whose exports the session has already made: the bench makes none. The first
    test to ask for the exports (this one, as the suite is ordered) waits in its set-up for the session to make them,
    a minute or more on 2 cores. The default arm is what ``run`` does without flags, here with --runtime auto's
    answer pinned to onnxruntime fp32 (the bench runs it as its probe answered, once)."""
    monkeypatch.setenv(FORCE_RUNTIME_ENV, "onnxruntime:fp32")
    code, out, err = cli(
        "bench", "--gb", str(TINY_GB), "--partition-mb", str(TINY_MB), "--rounds", "2", "--warmup", "0",
        "--batch-size", "16", "--threads", "1", "--precision", "fp32", "--weights", weights_file,
        "--results", tmp_path, "--json",
    )  # fmt: skip
    assert code == 0, err
    figures = json.loads(out)
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    arms = ["reference", "torch", "onnxruntime", "openvino", "default"]  # all three runtimes are installed here
    assert list(figures["arms"]) == arms
    ran = [r["plan"]["engine"] if r["plan"]["engine"] == "reference" else r["plan"]["backend_options"].get("runtime")
           for r in records]  # fmt: skip
    assert ran == ["reference", "torch", "onnxruntime", "openvino", "onnxruntime"] * 2
    assert [r["repeat"] for r in records] == [1] * 5 + [2] * 5
    reference = [r["summary"]["samples_per_s"] for r in records[::5]]
    for offset, arm in enumerate(arms[1:], start=1):
        mine = [r["summary"]["samples_per_s"] for r in records[offset::5]]
        figure = figures["arms"][arm]
        assert figure["ratios"] == pytest.approx([m / r for m, r in zip(mine, reference, strict=True)])
        assert figure["median_ratio"] == pytest.approx(float(np.median(figure["ratios"])))
        assert figure["choices"]["precision"] == "fp32" and figure["choices"]["threading"]
        assert figure["choices"]["runtime"] == (arm if arm != "default" else "onnxruntime")
    choice = figures["arms"]["default"]["choices"]["runtime_choice"]
    assert choice["requested"] == "auto" and choice["chose"] == "onnxruntime" and FORCE_RUNTIME_ENV in choice["why"]
    assert [r["plan"]["runtime_choice"] is not None for r in records[:5]] == [False, False, False, False, True]
    assert figures["arms"]["reference"]["peak_rss_bytes"] > 0 and "machine" in figures
    assert isinstance(figures["cpu_flags"], list)
    # the store the bench wrote is read whole: the reference loop's one record covers partition -1
    code, out, err = cli("report", "--results", tmp_path)
    assert code == 0, err
    assert "reference" in out and "onnxruntime" in out


@pytest.mark.full
def test_compiled_fast_path_matches_eager(tiny_data, monkeypatch):
    """torch.compile through the engine (Inductor with weight freezing, the warm-up's full and partial batches
    compiled at start-up, the fast path's folded BatchNorm and channels-last) against the same engine in eager
    mode, on ``TinyAstroMAE``: the full model's two compiles take three to four minutes of this suite's time on 2
    cores, the miniature's 20 to 30 s, through the same code, which is still the largest share of make test's
    time that one option took: make test-full runs it."""

    def tiny(seed=0):
        torch.manual_seed(seed)
        model = TinyAstroMAE()
        for module in model.modules():  # BatchNorm statistics away from 0 and 1, so that folding them matters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        return model.eval()

    monkeypatch.setattr(engine, "build_model", tiny)
    torch.set_num_threads(2)
    _, _, refs = open_dataset(tiny_data)
    _, eager, _ = predictions(refs[:2], EngineOptions(batch_size=20, engine="fast", precision="fp32"), None)
    _, compiled, choices = predictions(
        refs[:2], EngineOptions(batch_size=20, engine="fast", precision="fp32", compile=True), None
    )
    assert choices["compile"] is True and choices["compile_s"] > 0 and choices["fold_batchnorm"] > 0
    assert np.ptp(eager) > 0.01 and np.abs(compiled - eager).max() <= TOLERANCE
