"""What a new user meets in the first hour: mistakes answered in one line that says what to do (exit 2)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import hand_record, write_store

from cai_bench.backends.base import failure_kind
from cai_bench.benches import lambda_fanout
from cai_bench.benches.ending import finish
from cai_bench.core.errors import UserError
from cai_bench.render.run_views import FAILURE_ADVICE


def test_a_batch_size_of_zero_is_refused_not_replaced(cli, tmp_path, tiny_data):
    for command in (("run",), ("predict", "--data", tiny_data, "--out", tmp_path / "c.csv"), ("sweep",)):
        code, _, err = cli(*command, "--batch-size", "0", "--results", tmp_path)
        assert code == 2 and "at least 1, got 0" in err and len(err.strip().splitlines()) == 1, (command, err)
    assert not (tmp_path / "runs.jsonl").exists()


def test_slurm_without_a_controller_is_one_line_naming_what_to_do(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
    code, _, err = cli("run", "--backend", "hpc", "--slurm", "--gb", "0.001", "--partition-mb", "0.5",
                       "--results", tmp_path)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--slurm-executor local" in err and ("SLURM_CONF" in err or "sbatch/srun not found" in err), err
    assert not (tmp_path / "runs.jsonl").exists()


def test_a_catalogue_without_true_redshifts_says_that_is_what_it_lacks(cli, tmp_path):
    pq.write_table(pa.table({"id": np.arange(4), "z_pred": np.full(4, 0.1), "z_true": np.full(4, np.nan)}),
                   tmp_path / "z.parquet")  # fmt: skip
    code, _, err = cli("plot", "--predictions", tmp_path / "z.parquet", "--out-dir", tmp_path / "figs")
    assert code == 2 and "holds no true redshifts for its predictions" in err and "predict --truth" in err, err


def test_a_compare_filter_key_no_record_has_names_the_keys_there_are(cli, tmp_path):
    write_store(tmp_path, [hand_record("hpc", 20.0 + i / 10) for i in range(3)])
    code, _, err = cli("compare", "partition_mb=1", "partition_mb=5", "--results", tmp_path)
    assert code == 2 and "has 'partition_mb'; a filter names one of: backend, batch_size" in err, err


def test_where_the_real_weights_come_from_is_said_where_a_user_looks(cli, tmp_path):
    code, out, _ = cli("model", "--help")
    flat = " ".join(out.split()).replace("- ", "-")  # the help wraps at a hyphen
    assert code == 0 and "UVA-MLSys/AI-for-Astronomy" in flat and "Fine_Tune_Model" in flat
    code, _, err = cli("model", "convert", tmp_path / "Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt",
                       "--out", tmp_path / "w.safetensors")  # fmt: skip
    assert code == 2 and "file not found; the fine-tuned weights are" in err and "AI-for-Astronomy" in err, err


def test_the_slurm_option_help_says_key_value(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0 and "KEY=VALUE passed to sbatch" in " ".join(out.split())


def test_make_demo_runs_enough_galaxies_to_be_a_valid_measurement():
    """The README's main command: its data meets the validity rule on galaxies on any machine, and its time on a
    2-core one (the wall is the machine's: 0.3 GB took 15.3 s, 0.2 GB 11.5 s, on a 2-vCPU AMD EPYC, openvino bf16)."""
    import re
    from pathlib import Path

    from cai_bench.analysis.validity import MIN_SAMPLES
    from cai_bench.core.plan import DEFAULT_AXES, samples_for_gb

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t(.*)$", makefile, re.MULTILINE).group(1)
    given = re.search(r"--gb ([0-9.]+)", demo)
    gb = float(given.group(1)) if given else DEFAULT_AXES["gb"][0]
    assert samples_for_gb(gb) >= MIN_SAMPLES, (demo, samples_for_gb(gb))


def test_the_notes_under_a_report_say_only_what_applies_to_its_rows(cli, tmp_path):
    steady = tmp_path / "steady"
    write_store(steady, [hand_record("hpc", 20.0 + i / 10) for i in range(3)])
    for fmt in ("table", "markdown"):
        code, out, err = cli("report", "--results", steady, "--format", fmt)
        flat = " ".join(out.split())
        assert code == 0 and "Medians over n repeats." in flat, err
        for absent in ("NOISY", "INVALID", "speedup:", "OVERSUB", "Map s:", "mem. MB:"):
            assert absent not in flat, (fmt, absent, flat)
        # one name per idea: the column says what ran (--runtime), torch's engine beside it, never "engine"
        assert "runtime" in flat and "torch fast" in flat and "engine" not in flat.split("Medians")[0], flat
    shaky = tmp_path / "shaky"
    write_store(shaky, [hand_record("hpc", w) for w in (20.0, 35.0, 5.0)])  # noisy, and one repeat too short
    code, out, _ = cli("report", "--results", shaky, "--format", "markdown")
    assert "NOISY: the slowest repeat" in out and "INVALID: what failed is named below the table" in out
    assert "- INVALID" in out


def test_figures_show_their_axis_label_and_no_curve_of_one_batch_size():
    from test_plot import sweep_like_records

    from cai_bench.analysis import report
    from cai_bench.render.figures import scaling

    points = report.summarize_points(sweep_like_records())
    figure = scaling.build_figures(points)["wall-vs-data-size"]
    figure.canvas.draw()
    ax = figure.axes[0]
    label, legend = ax.xaxis.label.get_window_extent(), ax.get_legend().get_window_extent()
    assert not label.overlaps(legend), (label, legend)  # the legend sits below the x-axis label
    one_batch = [r for r in sweep_like_records() if r["plan"]["batch_size"] == 512]
    figures = scaling.build_figures(report.summarize_points(one_batch))
    assert "throughput-vs-batch-size" not in figures and "wall-vs-data-size" in figures


def test_a_sweep_names_each_point_it_took_from_the_store_with_when_and_which_command(cli, tmp_path):
    common = ["--precision", "fp32", "--threads", "1", "--results", tmp_path, "--batch-size", "64"]
    code, _, err = cli("run", "--gb", "0.002", "--partition-mb", "1", *common)
    assert code == 0, err
    code, out, err = cli("sweep", "--gb", "0.002", "--partition-mb", "1,2", "--repeats", "1", *common)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "REUSED" in flat and "1 repeat(s) from the store" in flat and "by cai-bench run, not by this sweep" in flat
    assert flat.count("REUSED") == 1  # the 2 MB point was measured here
    from cai_bench.store.jsonl import ResultsStore

    assert [r["command"] for r in ResultsStore(tmp_path).read()] == ["run", "sweep"]


def test_predict_with_truth_keeps_the_redshifts_the_data_set_carried(cli, tiny_data, tmp_path):
    samples = 104
    pq.write_table(
        pa.table({"objid": np.arange(0, samples, 2), "z": np.full(samples // 2, 0.3)}), tmp_path / "t.parquet"
    )
    out = tmp_path / "c.parquet"
    code, _, err = cli("predict", "--data", tiny_data, "--out", out, "--truth", tmp_path / "t.parquet",
                       "--precision", "fp32", "--results", tmp_path, "-q")  # fmt: skip
    assert code == 0, err
    from cai_bench.data.catalogue import read_catalogue
    from cai_bench.data.partitions import open_dataset, read_partition_arrays

    columns, about = read_catalogue(out)
    labels = np.concatenate([read_partition_arrays(ref)["redshift"] for ref in open_dataset(tiny_data)[2]])
    np.testing.assert_allclose(columns["z_data"], labels, rtol=1e-6)  # the data set's own, all of them
    assert np.isfinite(columns["z_true"]).sum() == samples // 2 and about["z_data"] == "the data set's labels"


def test_the_lambda_benchmark_that_cannot_finish_ends_in_one_line_naming_what_to_change(capsys):
    """make bench-lambda shrunk, at a memory no environment fits in (1 MB): every unit runs out of memory on a
    fresh environment each try, and the script ends in one line, not a traceback, naming --memory-mb."""
    assert lambda_fanout.main(["--invocations", "2", "--concurrency", "2", "--memory-mb", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("bench-lambda: could not finish: 2 partition(s) failed") and "Runtime.OutOfMemory" in err
    assert err.endswith("raise --memory-mb (now 1) or lower --partition-mb (now 1)"), err


def test_a_benchmark_ending_names_what_to_lower_for_each_kind_of_failure(capsys):
    advice = {"memory": "lower --batch-size", "time": "lower --concurrency", "other": "see the errors"}

    class OutOfMemoryError(RuntimeError):  # the name torch gives a CUDA allocation that failed
        pass

    def cuda_full() -> int:
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def bad_option() -> int:
        raise UserError("--gb must be positive")

    def a_bug() -> int:
        raise RuntimeError("something else")

    assert finish("bench-gpu", cuda_full, advice) == 1
    assert capsys.readouterr().err == (
        "bench-gpu: could not finish: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; "
        "lower --batch-size\n"
    )
    assert finish("bench-x", bad_option, advice) == 2
    assert capsys.readouterr().err == "bench-x: --gb must be positive\n"
    with pytest.raises(RuntimeError, match="something else"):  # not a failure of size: a bug shows itself
        finish("bench-x", a_bug, advice)
    assert failure_kind(["function error: Sandbox.Timedout: Task timed out after 3.00 seconds"]) == "time"
    assert failure_kind(["worker w1 ran one unit for more than 60 s"]) == "time"
    assert failure_kind(["sha256 does not match"]) == "other"


def test_a_run_that_ran_out_of_memory_ends_naming_what_to_lower(cli, s3, local_s3, tiny_data, tmp_path):
    """The emulated function at Lambda's least memory (128 MB) cannot hold torch: each unit runs out of memory,
    and the last line says what to lower. A failure of another kind (a corrupted partition) gets no such line."""
    code, _, err = cli("run", "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--data", tiny_data,
                       "--bucket", f"s3://{s3}", "--memory-mb", "128", "--retries", "0", "--max-concurrency", "2",
                       "--precision", "fp32", "--results", tmp_path, "-q")  # fmt: skip
    assert code == 1 and "Runtime.OutOfMemory" in err, err
    assert err.strip().splitlines()[-1] == "to finish: " + FAILURE_ADVICE["memory"]
