"""Valid or not: a result that ran too short, over too few galaxies, or unchecked against fp32 says so, in the
record, the report, the exports, compare and the figures; warm and cold Lambda runs are never one point."""

from __future__ import annotations

import csv
import io
import json

from conftest import hand_record, write_store

from cai_bench.analysis import report, validity


def long_run(wall: float = 30.0, gb: float = 1.0, precision: str = "fp32") -> dict:
    return hand_record("cpu", wall, gb=gb, precision=precision)  # 1 GB: 52,316 galaxies


def test_a_record_is_valid_when_long_enough_over_enough_galaxies_in_fp32():
    assert validity.failures(long_run()) == []
    short = validity.failures(long_run(wall=2.0, gb=0.02))
    assert short == ["ran 2.0 s, under 10 s", "1,046 galaxies, under 10,000"]
    assert validity.failures(long_run(wall=2.0, gb=0.02), validity.Rules(1.0, 1000)) == []
    assert validity.verdict_line(short).startswith("INVALID: ran 2.0 s")
    assert validity.verdict_line([]).startswith("VALID: at least 10 s and 10,000 galaxies")


def test_a_reduced_precision_is_valid_only_where_a_check_against_fp32_passed():
    unchecked = long_run(precision="bf16")
    assert validity.failures(unchecked) == [
        "torch bf16 was not checked against torch fp32 (--precision auto checks it)"
    ]
    checked = long_run(precision="bf16")
    checked["backend_info"]["precision_probe"] = {"chose": "bf16", "max_difference": 1e-3}
    assert validity.failures(checked) == []
    checked["backend_info"]["precision_probe"]["max_difference"] = 5e-3
    assert "is 0.005 from torch fp32 (the precision probe), over 0.002" in validity.failures(checked)[0]
    by_runtime = long_run(precision="bf16")
    by_runtime["plan"]["backend_options"]["runtime"] = "openvino"
    by_runtime["plan"]["runtime_choice"] = {"candidates": [
        {"runtime": "openvino", "precision": "bf16", "max_difference": 4e-4}]}  # fmt: skip
    assert validity.failures(by_runtime) == []


def test_the_report_and_its_exports_carry_the_verdict(cli, tmp_path):
    write_store(tmp_path, [long_run(30.0), long_run(31.0), long_run(2.0, gb=0.02), long_run(2.2, gb=0.02)])
    code, out, _ = cli("report", "--results", tmp_path)
    assert code == 0 and "VALID" in out
    assert "INVALID cpu · 0.02 GB · 25 MB · batch 512 · fp32 · fast: the shortest repeat ran 2.0 s, under 10 s" in out
    code, out, _ = cli("report", "--results", tmp_path, "--format", "json")
    big, small = sorted(json.loads(out), key=lambda row: -row["data_gb"])
    assert big["valid"] is True and small["valid"] is False and "galaxies" in small["invalid_why"]
    code, out, _ = cli("report", "--results", tmp_path, "--min-duration", "1", "--min-samples", "1000", "--format",
                       "json")  # fmt: skip
    assert all(row["valid"] for row in json.loads(out))  # the rules are options
    code, out, _ = cli("report", "--results", tmp_path, "--format", "markdown")
    assert "- INVALID cpu · 0.02 GB" in out


def test_a_new_record_carries_its_verdict_and_the_run_prints_it(cli, tiny_data, tmp_path):
    code, out, err = cli("run", "--data", tiny_data, "--precision", "fp32", "--threads", "1", "--results", tmp_path)
    assert code == 0, err
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["validity"]["valid"] is False and record["validity"]["rules"]["min_samples"] == 10_000
    assert "INVALID: ran" in out and "104 galaxies, under 10,000" in out
    code, _, _ = cli("results", "export", "--csv", "--results", tmp_path, "--out", tmp_path / "all.csv")
    (row,) = csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text()))
    assert row["valid"] == "False" and "under 10 s" in row["invalid_why"]


def test_warm_and_cold_lambda_runs_are_two_points():
    runs = []
    for cold in (True, False):
        run = hand_record("lambda", 20.0)
        run["backend_info"] = {"invocations": [{"request_id": "a", "cold": cold}, {"request_id": "b", "cold": False}]}
        runs.append(run)
    points = report.summarize_points(runs)
    assert sorted(p.start for p in points) == ["cold", "warm"]
