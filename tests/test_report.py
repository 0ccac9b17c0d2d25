"""Reports and plots from hand-made stores: the figures must be exactly what the records hold."""

import csv
import io
import json

import numpy as np
import pytest
from conftest import hand_record, write_store

from cai_bench.analysis import report, results
from cai_bench.core.errors import UserError
from cai_bench.core.plan import BITS_PER_SAMPLE, samples_for_gb
from cai_bench.measure.metrics import spread
from cai_bench.store.jsonl import ResultsStore

CPU_WALLS = [100.0, 110.0, 130.0]
GPU_WALLS = [10.0, 12.0, 11.0, 40.0]  # one slow repeat: max/min 4 > 1.5, so the point is noisy


def several_machines() -> list[dict]:
    """cpu on two machines, gpu on a third, a second data size, and records a report must ignore."""
    records = [
        hand_record("cpu", w, host="alpha", cpu="Xeon A", peak_rss=(i + 1) * 2**30) for i, w in enumerate(CPU_WALLS)
    ]
    records += [hand_record("cpu", w, host="beta", cpu="EPYC B") for w in (200.0, 220.0)]
    records += [hand_record("gpu", w, host="gamma", cpu="Xeon C", gpus=("NVIDIA H100",)) for w in GPU_WALLS]
    records += [hand_record("cpu", 50.0, host="alpha", cpu="Xeon A", gb=0.5)]
    records += [hand_record("cpu", 1.0, host="alpha", cpu="Xeon A", status="failed")]
    records += [hand_record("cpu", 2.0, host="alpha", cpu="Xeon A", status="interrupted")]
    return records  # fmt: skip


def by_label(points):
    return {(p.backend, p.machine_id.split(" | ")[0], p.samples): p for p in points}


def test_report_figures_equal_what_the_records_hold():
    points = by_label(report.summarize_points(several_machines()))
    assert len(points) == 4  # failed and interrupted repeats are not points
    cpu = points[("cpu", "alpha", samples_for_gb(1.0))]
    assert cpu.repeats == 3
    assert cpu.wall_s.median == 110.0 and cpu.wall_s.min == 100.0 and cpu.wall_s.max == 130.0
    q1, q3 = np.percentile(CPU_WALLS, [25, 75])
    assert cpu.wall_s.iqr == pytest.approx(q3 - q1)
    samples = samples_for_gb(1.0)
    assert cpu.samples_per_s.median == pytest.approx(samples / 110.0)
    assert cpu.throughput_bps.max == pytest.approx(samples * BITS_PER_SAMPLE / 100.0)
    assert cpu.peak_rss_bytes == 3 * 2**30  # the highest of the repeats
    assert not cpu.noisy
    gpu = points[("gpu", "gamma", samples)]
    assert gpu.wall_s.median == pytest.approx(11.5) and gpu.noisy
    assert gpu.machine == "gamma (1x NVIDIA H100, 2 cores)"


def test_worker_breakdown_is_the_mean_per_worker_median_over_repeats():
    phases = [(1.0, 0.5, 2.0, 6.0), (0.0, 0.1, 2.0, 8.0)]
    records = [hand_record("cpu", 20.0, gb=0.002, partition_mb=0.52, phases=[*phases, *phases]) for _ in range(2)]
    (point,) = report.summarize_points(records)
    # one worker ran all four partitions: its phases add up
    assert point.worker_breakdown_s == pytest.approx(
        {"startup_s": 2.0, "wait_s": 1.2, "load_s": 8.0, "compute_s": 28.0}
    )


def test_speedup_is_against_the_baseline_on_the_same_data():
    points = report.summarize_points(several_machines())
    report.add_speedups(points, "cpu")
    found = by_label(points)
    samples = samples_for_gb(1.0)
    # gpu ran on gamma, where there is no cpu record: of the other machines' cpu points on the same data, the
    # one with the most repeats is chosen, and named
    gpu = found[("gpu", "gamma", samples)]
    assert gpu.speedup == pytest.approx(110.0 / 11.5)
    assert gpu.baseline.startswith("cpu · 1 GB") and "alpha" in gpu.baseline
    assert found[("cpu", "alpha", samples)].speedup == pytest.approx(1.0)
    assert found[("cpu", "beta", samples)].speedup == pytest.approx(1.0)  # its own machine's cpu
    assert found[("cpu", "alpha", samples_for_gb(0.5))].speedup == pytest.approx(1.0)
    fresh = report.summarize_points(several_machines())
    report.add_speedups(fresh, "lambda")  # no such records: no speedup claimed
    assert all(p.speedup is None and p.baseline is None for p in fresh)


def test_speedup_against_an_engine_of_a_backend():
    fast, reference = hand_record("cpu", 60.0), hand_record("cpu", 90.0)
    reference["plan"]["engine"] = "reference"
    points = report.summarize_points([fast, reference])
    report.add_speedups(points, "cpu:reference")
    speedups = {p.engine: p.speedup for p in points}
    assert speedups == {"fast": pytest.approx(1.5), "reference": pytest.approx(1.0)}
    assert all("reference engine" in p.baseline for p in points)


def test_a_cycled_run_is_reported_at_the_size_it_processed():
    # 0.5 GB of partitions reused until 1 GB was processed: compared with a plain 1 GB run, not a 0.5 GB one
    cycled = hand_record("hpc", 50.0, gb=0.5)
    cycled["plan"]["cycle_to_gb"] = 1.0
    cycled["summary"]["samples"] = samples_for_gb(1.0)
    points = report.summarize_points([cycled, hand_record("cpu", 100.0, gb=1.0), hand_record("cpu", 40.0, gb=0.5)])
    report.add_speedups(points, "cpu")
    (hpc,) = [p for p in points if p.backend == "hpc"]
    assert hpc.samples == samples_for_gb(1.0)
    assert hpc.data_gb == pytest.approx(1.0, abs=1e-4)
    assert hpc.speedup == pytest.approx(2.0)


def test_speedup_prefers_the_same_machine():
    records = [hand_record("cpu", 100.0, host="alpha"), hand_record("cpu", 300.0, host="beta")]
    records += [hand_record("gpu", 10.0, host="beta")]
    points = report.summarize_points(records)
    report.add_speedups(points, "cpu")
    (gpu,) = [p for p in points if p.backend == "gpu"]
    assert gpu.speedup == pytest.approx(30.0)
    assert "beta" in gpu.baseline


def test_csv_and_json_exports_keep_the_exact_figures():
    points = report.summarize_points(several_machines())
    rows = list(csv.DictReader(io.StringIO(results.to_csv([report.export_row(p) for p in points]))))
    assert len(rows) == len(points)
    for row, p in zip(rows, points, strict=True):
        assert float(row["wall_s_median"]) == p.wall_s.median
        assert float(row["samples_per_s_median"]) == p.samples_per_s.median
        assert row["machine"] == p.machine
    exported = json.loads(report.to_json(points))
    assert [r["wall_s_max"] for r in exported] == [p.wall_s.max for p in points]
    assert [r["noisy"] for r in exported] == [p.noisy for p in points]


def test_spread():
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.iqr == pytest.approx(np.percentile([1, 2, 3, 10], 75) - np.percentile([1, 2, 3, 10], 25))
    assert s.noisy and not spread([1.0, 1.4]).noisy and not spread([5.0]).noisy


# ---------------------------------------------------------------------------------------------- CLI


def test_report_command_formats(cli, tmp_path):
    write_store(tmp_path, several_machines())
    code, out, _ = cli("report", "--results", tmp_path, "--format", "markdown")
    assert code == 0
    table_rows = [line for line in out.splitlines() if line.startswith("| cpu") or line.startswith("| gpu")]
    assert len(table_rows) == 4
    assert "NOISY" in out and "gamma (1x NVIDIA H100, 2 cores)" in out
    code, out, _ = cli("report", "--results", tmp_path, "--format", "json", "--backend", "gpu")
    (row,) = json.loads(out)
    assert row["wall_s_median"] == 11.5 and row["repeats"] == 4
    code, out, _ = cli("report", "--results", tmp_path)
    assert code == 0 and "110.00" in out and "100.00-130.00" in out


def test_report_rejects_a_bad_format_and_an_empty_store(cli, tmp_path):
    code, _, err = cli("report", "--results", tmp_path, "--format", "xml")
    assert code == 2 and "--format" in err
    code, _, err = cli("report", "--results", tmp_path)
    assert code == 2 and "no finished runs" in err


def test_torn_last_line_is_reported_and_skipped(cli, tmp_path):
    path = write_store(tmp_path, several_machines())
    with open(path, "a") as fh:
        fh.write('{"run_id": "half a rec')
    code, out, err = cli("report", "--results", tmp_path, "--format", "csv")
    assert code == 0
    assert "warning:" in err and "torn last line" in err
    assert len(out.splitlines()) == 5  # header + 4 points


def test_a_newer_schema_major_version_is_refused(cli, tmp_path):
    records = several_machines()
    records[2]["schema_version"] = "2.0"
    write_store(tmp_path, records)
    code, _, err = cli("report", "--results", tmp_path)
    assert code == 2
    assert "runs.jsonl:3: record schema 2.0 is newer" in err and "upgrade cai-bench" in err
    records[2]["schema_version"] = "1.7"  # a newer minor version only adds fields: readable
    write_store(tmp_path, records)
    assert ResultsStore(tmp_path).read()[2]["schema_version"] == "1.7"


def test_a_broken_middle_line_is_an_error(tmp_path):
    path = write_store(tmp_path, several_machines()[:2])
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(UserError, match="runs.jsonl:1: not a JSON record"):
        ResultsStore(tmp_path).read()


def test_results_list_show_export(cli, tmp_path):
    records = several_machines()
    write_store(tmp_path, records)
    code, out, _ = cli("results", "list", "--results", tmp_path, "--last", "0")
    assert code == 0
    assert all(r["run_id"] in out for r in records)
    assert "interrupted" in out and "gamma" in out
    code, out, _ = cli("results", "show", records[5]["run_id"][:25], "--results", tmp_path, "--json")
    assert json.loads(out) == records[5]
    code, out, _ = cli("results", "show", records[0]["run_id"], "--results", tmp_path)
    assert code == 0 and "wall_s" in out and "100" in out
    code, _, err = cli("results", "show", "nope", "--results", tmp_path)
    assert code == 2 and "no record with id 'nope'" in err
    code, _, _ = cli("results", "export", "--csv", "--results", tmp_path, "--out", tmp_path / "all.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text())))
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in records]
    assert [float(r["wall_s"]) for r in rows] == [r["summary"]["wall_s"] for r in records]
    assert {r["status"] for r in rows} == {"ok", "failed", "interrupted"}
    code, out, _ = cli("results", "export", "--json", "--results", tmp_path)
    assert json.loads(out) == records


def _ran_as(precision_ran: str, wall_s: float, planned: str = "auto") -> dict:
    record = hand_record("cpu", wall_s, precision=planned)
    for worker in record["workers"]:
        worker["precision"] = precision_ran
    return record


def test_points_are_the_precision_that_ran_never_auto():
    """Three runs asked for auto: two ran fp32, one bf16 (the probe answered differently once). The bf16 run is
    a point of its own; the fp32 runs are repeats of the same point as an explicit fp32 run."""
    records = [_ran_as("fp32", 10.0), _ran_as("bf16", 5.0), _ran_as("fp32", 12.0), _ran_as("fp32", 11.0, "fp32")]
    points = report.summarize_points(records)
    by_precision = {p.precision: p for p in points}
    assert sorted(by_precision) == ["bf16", "fp32"]
    assert by_precision["fp32"].repeats == 3 and by_precision["fp32"].wall_s.median == 11.0
    assert by_precision["bf16"].repeats == 1 and by_precision["bf16"].wall_s.median == 5.0


def test_oversubscribed_points_are_marked(cli, tmp_path):
    marked = hand_record("cpu", 3.0, threads=64)
    marked["plan"]["oversubscribe"] = True
    write_store(tmp_path, [hand_record("cpu", 2.0), marked])
    points = report.summarize_points(ResultsStore(tmp_path).read())
    assert [p.oversubscribed for p in points] == [False, True]
    code, out, _ = cli("report", "--results", tmp_path, "--format", "markdown")
    assert code == 0 and "64 OVERSUB" in out and "| 2 |" in out


def test_a_record_is_found_by_the_start_of_its_id_or_of_its_hash_part(cli, tmp_path):
    records = several_machines()[:3]
    for record, suffix in zip(records, ("35599c21", "35599d00", "8a7f0001"), strict=True):
        record["run_id"] = f"20261127T000000Z-{suffix}"
    write_store(tmp_path, records)
    code, out, err = cli("results", "show", "8a7f", "--results", tmp_path, "--json")
    assert code == 0 and json.loads(out)["run_id"].endswith("8a7f0001"), err
    code, out, _ = cli("results", "show", "35599c", "--results", tmp_path, "--json")
    assert json.loads(out)["run_id"].endswith("35599c21")
    code, _, err = cli("results", "show", "35599", "--results", tmp_path)
    assert code == 2 and "2 records start with '35599'" in err


def test_exports_and_listings_say_what_ran_and_what_kind_of_record(cli, tmp_path):
    ran = _ran_as("bf16", 3.0)
    ran["backend_info"] = {"runtime": "openvino", "engine": "exported"}
    predicted = _ran_as("fp32", 2.0)  # planned auto, as predict plans it, resolved to fp32
    predicted["kind"] = "predict"
    write_store(tmp_path, [ran, predicted])
    code, _, _ = cli("results", "export", "--csv", "--results", tmp_path, "--out", tmp_path / "all.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text())))
    assert (rows[0]["runtime"], rows[0]["engine"], rows[0]["precision_ran"]) == ("openvino", "exported", "bf16")
    assert rows[1]["runtime"] == "torch" and rows[1]["precision_ran"] == "fp32" and rows[1]["kind"] == "predict"
    code, out, _ = cli("results", "list", "--results", tmp_path)
    assert code == 0
    lines = [line for line in out.splitlines() if ran["run_id"][:12] in line or predicted["run_id"][:12] in line]
    assert "bf16" in lines[0] and "auto" not in out and "predict" in out
