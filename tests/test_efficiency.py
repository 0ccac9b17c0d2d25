"""How close to the hardware a run ran: the model's FLOPs counted from the model, GFLOP/s and MFU in every record of
a run on this CPU, the peak measured once per machine, threads and instruction-set limit, and the report's
columns; and which reduced precisions the probes may count on under an instruction-set limit."""

from __future__ import annotations

import json

import pytest
from conftest import hand_record

from cai_bench.analysis.report import export_row, summarize_points
from cai_bench.core import machine
from cai_bench.measure import efficiency
from cai_bench.model import astromae, flops


def test_the_flops_are_the_models_own_count_kept_once_per_architecture(monkeypatch):
    counted = flops.model_flops_per_sample()
    assert counted == astromae.flops_per_sample(astromae.build_model(seed=0))
    # 2 per multiply-add of the 12 blocks' token-wise products alone: 17 tokens x 192 x (576+192+768) + x 768 x 192
    blocks = 12 * 2 * 17 * (192 * (576 + 192 + 768) + 768 * 192)
    assert blocks < counted < 1.3 * blocks
    monkeypatch.setattr(astromae, "build_model", lambda **kw: pytest.fail("counted again, not read from the cache"))
    assert flops.model_flops_per_sample() == counted


def test_the_peak_is_a_timed_product_kept_per_threads_and_instruction_set_limit(monkeypatch):
    measured = efficiency.measure_gemm_peak(1, size=256, repeats=2)
    assert measured["gflops"] > 0 and measured["threads"] == 1 and "torch.mm" in measured["how"]
    calls = []

    def measure(threads):
        calls.append(threads)
        return {"gflops": 100.0 * threads, "threads": threads}

    box = {"host": "h", "cpu_model": "c"}
    assert efficiency.gemm_peak(box, 2, measure)["gflops"] == 200.0
    assert efficiency.gemm_peak(box, 2, measure)["cached"] is True and calls == [2]
    efficiency.gemm_peak(box, 1, measure)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    efficiency.gemm_peak(box, 2, measure)
    assert calls == [2, 1, 2]  # other threads, another limit: measured again


def test_gflops_and_mfu_arithmetic():
    assert efficiency.achieved_gflops(500.0, 200_000_000) == pytest.approx(100.0)
    assert efficiency.mfu(100.0, {"gflops": 400.0}) == pytest.approx(0.25)
    assert efficiency.achieved_gflops(500.0, None) is None and efficiency.mfu(100.0, None) is None


def test_a_cpu_runs_record_holds_its_gflops_and_mfu_and_the_report_shows_them(cli, tiny_data, tmp_path):
    code, out, err = cli("run", "--data", tiny_data, "--batch-size", "16", "--threads", "1", "--precision", "fp32",
                         "--results", tmp_path, "--json")  # fmt: skip
    assert code == 0, err
    (record,) = json.loads(out)
    summary, peak = record["summary"], record["environment"]["fp32_peak"]
    assert summary["flops_per_sample"] == flops.model_flops_per_sample()
    assert summary["gflops"] == pytest.approx(summary["samples_per_s"] * summary["flops_per_sample"] / 1e9)
    assert peak["threads"] == 1 and summary["mfu"] == pytest.approx(summary["gflops"] / peak["gflops"])
    (point,) = summarize_points([record])
    row = export_row(point)
    assert row["gflops"] == pytest.approx(summary["gflops"]) and row["mfu"] == pytest.approx(summary["mfu"])
    assert row["max_abs_dz"] == 0.0  # torch fp32: the reference itself
    code, out, _ = cli("report", "--results", tmp_path)
    assert code == 0 and "GFLOP/s" in out and "MFU" in out and f"{summary['mfu']:.0%}" in out


def test_a_record_without_a_peak_has_no_mfu():
    record = hand_record("lambda", 20.0)
    assert record["summary"].get("mfu") is None
    (point,) = summarize_points([record])
    assert point.mfu is None


LIMITS = [(None, True, True), ("AVX2", False, False), ("AVX512_CORE_VNNI", False, True), ("avx512_core", False, False)]


@pytest.mark.parametrize(("limit", "bf16", "int8"), LIMITS)
def test_an_instruction_set_limit_takes_reduced_precisions_from_the_probes(monkeypatch, limit, bf16, int8):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni",
                                                                 "avx512_bf16"}))  # fmt: skip
    if limit:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert machine.native_bf16_cpu() is bf16 and machine.int8_dot_product_cpu() is int8


def test_a_limited_machine_is_another_machine_in_the_records(monkeypatch):
    environment = {"host": "h", "cpu_model": "AMD EPYC", "cpu_physical_cores": 2}
    limited = {**environment, "isa_limits": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
    assert machine.machine_id(limited) != machine.machine_id(environment)
    assert "limited to AVX2" in machine.machine_label(limited)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine.isa_limits() == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_a_reduced_precision_carries_its_measured_error_into_report_rows_and_figure_labels():
    from cai_bench.render.figures.scaling import _series

    records = []
    for gb, difference in ((0.5, 1.2e-3), (1.0, 1.7e-3)):
        record = hand_record("cpu", 20.0 * gb, gb=gb)  # as OpenVINO int8 ran it
        record["plan"].update(precision="int8", backend_options={"runtime": "openvino"})
        for worker in record["workers"]:
            worker["precision"] = "int8"
        record["backend_info"].update(runtime="openvino", precision="int8",
                                      precision_probe={"max_difference": difference})  # fmt: skip
        records.append(record)
    fp32 = [hand_record("cpu", 10.0 * gb, gb=gb) for gb in (0.5, 1.0)]
    points = summarize_points(records + fp32)
    assert sorted(p.max_dz for p in points if p.precision == "int8") == [1.2e-3, 1.7e-3]
    labels = [label for label, _ in _series(points, "data_gb")[0]]
    assert any("int8" in label and "max |dz| 1.7e-03" in label for label in labels)
    assert not any("max |dz|" in label for label in labels if "int8" not in label)
