"""Predictions: every object exactly once, resumable; accuracy figures as the upstream evaluation defines them."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from cai_bench.commands import predict
from cai_bench.core.plan import make_plan
from cai_bench.data.catalogue import read_catalogue
from cai_bench.data.partitions import open_dataset
from cai_bench.measure.photoz import point_metrics, point_metrics_by_bin, upstream_paper_metrics
from cai_bench.model.astromae import build_model
from cai_bench.render.figures import predictions

# Five objects whose figures were worked out by hand (dz = (z' - z) / (1 + z)):
#   errors 0.02, -0.02, 0.03, 0, 0.1;  dz = 0.0181818, -0.0166667, 0.0230769, 0, 0.0666667
TRUE = [0.1, 0.2, 0.3, 0.4, 0.5]
PREDICTED = [0.12, 0.18, 0.33, 0.40, 0.60]


def test_the_upstream_papers_metrics_equal_the_hand_computed_figures():
    m = upstream_paper_metrics(PREDICTED, TRUE)
    assert m["samples"] == 5
    assert m["mae"] == pytest.approx(0.17 / 5)  # (0.02 + 0.02 + 0.03 + 0 + 0.1) / 5
    assert m["mse"] == pytest.approx(0.0117 / 5)  # (0.0004 + 0.0004 + 0.0009 + 0 + 0.01) / 5
    assert m["bias"] == pytest.approx((0.02 / 1.1 - 0.02 / 1.2 + 0.03 / 1.3 + 0.1 / 1.5) / 5)
    # median dz = 0.0181818; |dz - median| = 0, 0.0348485, 0.0048951, 0.0181818, 0.0484848; their median 0.0181818
    assert m["nmad"] == pytest.approx(1.4826 * 0.02 / 1.1)
    # SS_res = 0.0117, SS_tot = 0.1 (mean 0.3): R2 = 1 - 0.117
    assert m["r2"] == pytest.approx(0.883)
    assert m["outlier_fraction"] == pytest.approx(0.2)  # only |0.0667| > 0.05
    assert upstream_paper_metrics([0.2, 0.2], [0.2, 0.2])["r2"] is None  # no spread in the truth: R2 undefined
    with pytest.raises(ValueError):
        upstream_paper_metrics([0.1], [0.1, 0.2])


def plan_for(directory, weights=None, precision="fp32"):
    _, summary, refs = open_dataset(directory)
    return make_plan("cpu", summary, refs, batch_size=16, threads=1, weights=weights, precision=precision)


def read_parquet(path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


@pytest.fixture
def scaled_weights(tmp_path):
    """Weights whose outputs land in 0-0.6, like a trained model's: meaningful accuracy figures."""
    model = build_model(seed=4)
    state = model.state_dict()
    state["concat_block.2.weight"] = state["concat_block.2.weight"] * 0.01
    state["concat_block.2.bias"] = torch.tensor([0.15])
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def test_predict_writes_every_object_once_with_labels(tiny_data, tmp_path, scaled_weights):
    out = tmp_path / "p.parquet"
    outcome = predict.predict(plan_for(tiny_data, scaled_weights), out, None)
    columns = read_parquet(out)
    assert list(columns) == ["id", "z_pred", "z_true", "flags"]  # synthetic: no ra, dec; ids are positions
    assert sorted(columns["id"].tolist()) == list(range(104))
    assert outcome.objects == 104 and outcome.partitions_run == 4 and outcome.partitions_reused == 0
    assert outcome.accuracy["meaningful"] is True and "synthetic" in outcome.accuracy["note"]
    expected = upstream_paper_metrics(columns["z_pred"], columns["z_true"])
    assert outcome.accuracy["mae"] == pytest.approx(expected["mae"])
    assert columns["z_pred"].min() > 0 and columns["z_pred"].max() < 0.6
    assert not predict.parts_dir(out).exists()


def test_predict_interrupted_then_rerun_writes_each_object_exactly_once(tiny_data, tmp_path, monkeypatch):
    clean = tmp_path / "clean.parquet"
    predict.predict(plan_for(tiny_data), clean, None)

    out = tmp_path / "p.parquet"
    real_write = predict._write_part
    written = []

    def write_two_then_stop(parts, result, ran):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(parts, result, ran)
        written.append(result.record.partition)

    monkeypatch.setattr(predict, "_write_part", write_two_then_stop)
    with pytest.raises(KeyboardInterrupt):
        predict.predict(plan_for(tiny_data), out, None)
    assert not out.exists()
    parts = predict.parts_dir(out)
    assert sorted(p.name for p in parts.glob("part-*.npz")) == ["part-000000.npz", "part-000001.npz"]
    (parts / ".part-000002.npz.tmp-999").write_bytes(b"half a part from a killed process")

    monkeypatch.setattr(predict, "_write_part", real_write)
    outcome = predict.predict(plan_for(tiny_data), out, None)
    assert (outcome.partitions_run, outcome.partitions_reused) == (2, 2)
    got, want = read_parquet(out), read_parquet(clean)
    assert got["id"].tolist() == want["id"].tolist() == list(range(104))
    np.testing.assert_array_equal(got["z_pred"], want["z_pred"])
    assert outcome.accuracy["meaningful"] is False


def test_parts_of_another_job_are_not_mixed_in(tiny_data, tmp_path, monkeypatch, scaled_weights):
    out = tmp_path / "p.csv"

    def stop(parts, result, ran):
        raise KeyboardInterrupt

    real_write = predict._write_part
    monkeypatch.setattr(predict, "_write_part", lambda *a: (real_write(*a), stop(*a)))
    with pytest.raises(KeyboardInterrupt):
        predict.predict(plan_for(tiny_data), out, None)
    monkeypatch.setattr(predict, "_write_part", real_write)
    from cai_bench.core.errors import UserError

    with pytest.raises(UserError, match="holds predictions of another job .different weights, sha256"):
        predict.predict(plan_for(tiny_data, scaled_weights), out, None)
    with pytest.raises(UserError, match="different precision"):
        predict.predict(plan_for(tiny_data, precision="bf16"), out, None)
    outcome = predict.predict(plan_for(tiny_data, scaled_weights), out, None, force=True)
    assert outcome.partitions_reused == 0
    rows = [row for row in out.read_text().splitlines() if not row.startswith("#")]  # under the ECSV header
    assert rows[0] == "id,z_pred,z_true,flags" and len(rows) == 105
    with pytest.raises(UserError, match="exists; pass --force"):
        predict.predict(plan_for(tiny_data), out, None)


@pytest.mark.probe
def test_predict_command_and_its_plot(cli, tiny_data, tmp_path, scaled_weights):
    out = tmp_path / "p.parquet"
    code, stdout, err = cli(
        "predict", "--data", tiny_data, "--weights", scaled_weights, "--out", out, "--results", tmp_path, "-q"
    )
    assert code == 0, err
    assert "104 objects" in stdout and "accuracy over 104 objects (upstream paper's metrics): MAE" in stdout
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["kind"] == "predict" and record["accuracy"]["meaningful"] is True
    assert f"run id: {record['run_id']}" in stdout
    code, stdout, err = cli("plot", "--predictions", out, "--out-dir", tmp_path / "figs", "--format", "png")
    assert code == 0, err
    assert (tmp_path / "figs" / "p-vs-true.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli("plot", "--predictions", tmp_path / "nope.parquet")
    assert code == 2 and "file not found" in err


def test_prediction_figure_shows_every_object_and_the_metrics(tiny_data, tmp_path):
    columns = {"z_pred": np.array(PREDICTED), "z_true": np.array(TRUE)}
    fig = predictions.predictions_figure(columns, "hand-made")
    ax = fig.axes[0]
    (points,) = ax.collections
    assert len(points.get_offsets()) == 5
    legend = "\n".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "MAE 0.03400" in legend and "outliers (|dz/(1+z)| > 0.05) 20.00%" in legend and "y = x" in legend


@pytest.mark.probe
def test_run_records_accuracy_labelled_meaningless_with_random_weights(cli, tiny_data, tmp_path):
    code, stdout, _ = cli("run", "--data", tiny_data, "--batch-size", "16", "--threads", "1", "--results", tmp_path)
    assert code == 0
    assert "MEANINGLESS accuracy over 104 objects in the last repeat" in stdout
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["accuracy"]["meaningful"] is False and "random-init" in record["accuracy"]["note"]
    assert set(record["accuracy"]) >= {"mae", "mse", "bias", "nmad", "r2", "outlier_fraction"}


def test_predict_on_hpc_workers_writes_what_the_cpu_backend_writes(cli, tiny_data, tmp_path, scaled_weights):
    common = ["predict", "--data", tiny_data, "--weights", scaled_weights, "--precision", "fp32", "-q"]
    code, _, err = cli(*common, "--out", tmp_path / "cpu.csv", "--results", tmp_path / "r")
    assert code == 0, err
    code, _, err = cli(
        *common, "--backend", "hpc", "--workers", "2", "--out", tmp_path / "hpc.csv", "--results", tmp_path / "r"
    )
    assert code == 0, err
    cpu, hpc = (read_catalogue(tmp_path / f"{name}.csv")[0] for name in ("cpu", "hpc"))
    assert hpc["id"].tolist() == cpu["id"].tolist() == list(range(104))  # every object once, in order
    np.testing.assert_allclose(hpc["z_pred"], cpu["z_pred"], atol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in records] == ["cpu", "hpc"]
    assert records[1]["backend_info"]["workers"] == 2


def test_the_photoz_point_metrics_by_hand():
    # dz = z' - z at z = 0: -0.1, 0, 0.1, 0.2, 0.5; quartiles 0 and 0.2
    m = point_metrics([-0.1, 0.0, 0.1, 0.2, 0.5], [0.0] * 5)
    assert m["point_bias"] == pytest.approx(0.1) and m["point_sigma_iqr"] == pytest.approx(0.2 / 1.349)
    assert m["point_sigma_mad"] == pytest.approx(1.4826 * 0.1)
    assert m["outlier_bound"] == pytest.approx(3 * 0.2 / 1.349)
    assert m["point_outlier_rate"] == pytest.approx(0.2)  # only 0.5 is beyond 0.445
    assert point_metrics([0.0, 0.01], [0.0, 0.0])["outlier_bound"] == 0.06  # the floor
    rows = point_metrics_by_bin([0.1, 0.2, 1.5], [0.1, 0.25, 1.4], (0.0, 0.2, 0.4, 1.0, 2.0))
    assert [(r["z_low"], r["objects"]) for r in rows] == [(0.0, 1), (0.2, 1), (1.0, 1)]  # the empty bin left out
    by_r = point_metrics_by_bin([0.1, 0.2, 1.5], [0.1, 0.25, 1.4], (10.0, 16.0, 20.0), by=[15.0, 17.0, 18.0], name="r")
    assert [(r["r_low"], r["objects"]) for r in by_r] == [(10.0, 1), (16.0, 2)]


def test_random_init_predictions_say_so_in_the_output_the_file_and_the_figure(cli, tiny_data, tmp_path):
    from cai_bench.commands.predict import predictions_about, read_predictions
    from cai_bench.render.figures.predictions import predictions_figure

    out = tmp_path / "p.parquet"
    code, stdout, err = cli("predict", "--data", tiny_data, "--out", out, "--precision", "fp32", "--results",
                            tmp_path, "-q")  # fmt: skip
    assert code == 0, err
    assert "weights: random-init (the timings are real; the predicted redshifts are not)" in stdout
    assert "MEANINGLESS photo-z point metrics (RAIL's) of dz/(1+z): PointBias" in stdout and "  z 0-0.1: " in stdout
    assert " mag: PointBias " in stdout  # per bin of r magnitude, read from the partitions
    about = predictions_about(out)
    assert about["random_init"] is True and "mean nothing" in about["meaning"]
    figure = predictions_figure(read_predictions(out), str(out), about)
    assert any("RANDOM-INIT WEIGHTS" in t.get_text() for t in figure.texts)
    (residual,) = [ax for ax in figure.axes if ax.get_ylabel() == "dz / (1 + z)"]  # the residual panel
    assert residual.get_ylabel() == "dz / (1 + z)" and any("outlier bounds" in t for t in
                                                           residual.get_legend_handles_labels()[1])  # fmt: skip
    trained = predictions_figure(read_predictions(out), str(out), {"random_init": False})
    assert not any("RANDOM-INIT" in t.get_text() for t in trained.texts)
