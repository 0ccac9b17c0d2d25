import math

import numpy as np
import pytest
import torch

from cai_bench.backends import available_backends, get_backend
from cai_bench.core.errors import UserError
from cai_bench.core.plan import BITS_PER_SAMPLE, make_plan
from cai_bench.data.partitions import open_dataset, read_partition
from cai_bench.inference.engine import EngineOptions, run_partition, start_worker


@pytest.fixture(scope="module")
def worker_fp32():
    return start_worker("w0", EngineOptions(batch_size=8, precision="fp32"), seed=1)


def test_run_partition_predicts_what_the_model_predicts(tiny_data, worker_fp32):
    _, _, refs = open_dataset(tiny_data)
    partition = read_partition(refs[1])
    options = EngineOptions(batch_size=8, precision="fp32")
    result = run_partition(partition, worker_fp32, options, wait_s=0.25)
    with torch.inference_mode():
        expected = worker_fp32.model(partition.images, partition.magnitudes)[:, 0].numpy()
    np.testing.assert_allclose(result.prediction, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(result.object_id, np.arange(26, 52))
    assert np.array_equal(result.redshift, partition.redshift.numpy())

    rec = result.record
    assert rec.samples == 26 and rec.bits == 26 * BITS_PER_SAMPLE
    assert rec.batches == math.ceil(26 / 8) == len(rec.batch_latency_s)
    assert rec.partition == 1 and rec.partition_file == "part-00001.safetensors"
    assert rec.wait_s == 0.25 and rec.load_s == partition.load_s > 0
    assert 0 < sum(rec.batch_latency_s) <= rec.compute_s + 1e-3
    assert rec.total_s >= rec.wait_s + rec.compute_s
    assert rec.throughput_bps == pytest.approx(rec.bits / rec.compute_s)
    assert rec.batch_latency_p50_s <= rec.batch_latency_p99_s
    assert rec.peak_rss_bytes > 50 * 2**20


def test_predictions_do_not_depend_on_the_batch_size(tiny_data, worker_fp32):
    _, _, refs = open_dataset(tiny_data)
    small = run_partition(refs[0], worker_fp32, EngineOptions(batch_size=3, precision="fp32")).prediction
    large = run_partition(refs[0], worker_fp32, EngineOptions(batch_size=64, precision="fp32")).prediction
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-6)


def test_startup_is_charged_to_the_first_partition_only(tiny_data):
    _, _, refs = open_dataset(tiny_data)
    options = EngineOptions(batch_size=16, precision="fp32")
    worker = start_worker("w1", options)
    assert worker.startup_s >= worker.warmup_batch_s > 0
    first = run_partition(refs[0], worker, options).record
    second = run_partition(refs[1], worker, options).record
    assert first.startup_s == worker.startup_s
    assert second.startup_s == 0.0
    assert second.wait_s == pytest.approx(second.load_s, abs=0.05)


def test_bf16_runs_and_stays_near_fp32(tiny_data):
    _, _, refs = open_dataset(tiny_data)
    fp32_options = EngineOptions(precision="fp32")
    fp32 = run_partition(refs[0], start_worker("a", fp32_options), fp32_options)
    bf16_options = EngineOptions(precision="bf16")
    bf16 = run_partition(refs[0], start_worker("b", bf16_options), bf16_options)
    assert bf16.record.precision == "bf16" and bf16.prediction.dtype == np.float32
    spread = np.ptp(fp32.prediction) + 1e-3
    assert np.max(np.abs(bf16.prediction - fp32.prediction)) < 0.1 * spread + 0.02


def _plan(tiny_data, **options):
    _, summary, refs = open_dataset(tiny_data)
    return make_plan("cpu", summary, refs, **options)


@pytest.mark.probe
def test_cpu_backend_runs_every_partition_once_in_order(tiny_data):
    plan = _plan(tiny_data, batch_size=10, threads=1)
    emitted = []
    threads_before = torch.get_num_threads()
    run = get_backend("cpu").run(plan, emitted.append)
    assert torch.get_num_threads() == threads_before
    assert [r.record.partition for r in emitted] == [0, 1, 2, 3]
    ids = np.concatenate([r.object_id for r in emitted])
    assert np.array_equal(ids, np.arange(104))
    assert run.threads == 1 and run.workers == 1  # typed fields, which reports read
    assert {k: run.info[k] for k in ("lanes", "intra_op_threads", "engine")} == {
        "lanes": 1,
        "intra_op_threads": 1,
        "engine": "fast",
    }
    assert run.weights.source == "random-init"
    records = [r.record for r in emitted]
    assert records[0].startup_s > 0 and all(r.startup_s == 0 for r in records[1:])
    assert run.wall_s >= sum(r.compute_s for r in records) + records[0].startup_s


def test_cpu_backend_and_engine_agree(tiny_data, worker_fp32):
    plan = _plan(tiny_data, batch_size=8, seed=1, precision="fp32")
    emitted = []
    get_backend("cpu").run(plan, emitted.append)
    direct = run_partition(plan.partitions[2], worker_fp32, EngineOptions(batch_size=8, precision="fp32"))
    np.testing.assert_allclose(emitted[2].prediction, direct.prediction, rtol=1e-5, atol=1e-6)


def test_unknown_backend_lists_the_available_ones():
    assert "cpu" in available_backends()
    with pytest.raises(UserError, match="unknown backend 'tpu'; available: cpu"):
        get_backend("tpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16"),
        ({"backend_options": {"lanes": 0}}, "--lanes must be at least 1"),
        ({"threads": 0}, "--threads must be at least 1"),
        ({"repeats": 0}, "--repeats must be at least 1"),
        ({"warmup": -1}, "--warmup must be 0 or more"),
    ],
)
def test_bad_plan_options(tiny_data, options, message):
    with pytest.raises(UserError, match=message):
        _plan(tiny_data, **options)


def test_two_lanes_split_each_partition_and_predict_as_one(tiny_data):
    one, two = [], []
    get_backend("cpu").run(_plan(tiny_data, batch_size=10, threads=1, precision="fp32"), one.append)
    run = get_backend("cpu").run(_plan(tiny_data, batch_size=10, threads=2, precision="fp32"), two.append)
    assert (run.info["lanes"], run.info["intra_op_threads"]) == (2, 1)
    assert [r.record.partition for r in two] == [0, 1, 2, 3]
    # 26 samples in two shares of 13, each in batches of at most 10: 10 + 3 per lane
    assert all(r.record.batches == 4 and len(r.record.batch_latency_s) == 4 for r in two)
    assert [r.record.batches for r in one] == [3, 3, 3, 3]
    np.testing.assert_allclose(
        np.concatenate([r.prediction for r in two]), np.concatenate([r.prediction for r in one]), atol=1e-6
    )
    assert np.array_equal(np.concatenate([r.object_id for r in two]), np.arange(104))


@pytest.mark.probe
def test_a_bad_partition_stops_a_two_lane_run_with_its_error(data_copy):
    target = data_copy / "part-00001.safetensors"
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    plan = _plan(data_copy, batch_size=10, threads=2)
    emitted = []
    with pytest.raises(UserError, match="part-00001.safetensors: sha256 does not match"):
        get_backend("cpu").run(plan, emitted.append)
    assert [r.record.partition for r in emitted] == [0]
