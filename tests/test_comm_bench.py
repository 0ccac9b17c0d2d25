"""``cai-bench comm bench``, ``comm rendezvous`` and what the store, ``report`` and ``plot`` make of comm points."""

from __future__ import annotations

import json

import pytest

from cai_bench.inference.gathering import measured_models
from cai_bench.store.jsonl import COMM_FILE, ResultsStore


def test_comm_bench_stores_a_point_per_op_world_and_size_that_report_and_plot_show(cli, redis_url, tmp_path):
    results = tmp_path / "results"
    code, out, err = cli("comm", "bench", "--channel", redis_url, "--world-sizes", "1,3", "--sizes", "8,4096",
                         "--repeats", "3", "--warmup", "1", "--results", str(results))  # fmt: skip
    assert code == 0, err
    every = ResultsStore(results).read_comm()
    points = [p for p in every if p["channel"] != "seal"]
    # what the seal adds to each message of each size, measured on its own
    assert sorted((p["op"], p["world_size"], p["nbytes"]) for p in every if p["channel"] == "seal") == [
        ("seal+open", 1, 8), ("seal+open", 1, 4096)]  # fmt: skip
    assert all(0 < p["median_s"] < 0.01 for p in every if p["channel"] == "seal")
    assert sorted({(p["op"], p["world_size"], p["nbytes"]) for p in points}) == sorted(
        [("barrier", 1, 0), ("barrier", 3, 0)] + [(op, p, n) for op in ("bcast", "allreduce") for p in (1, 3)
                                                  for n in (8, 4096)])  # fmt: skip
    for p in points:
        assert len(p["samples_s"]) == 3 and p["min_s"] <= p["median_s"] <= p["max_s"]
        assert p["environment"]["cpu_model"] and p["channel"] == "redis"
    code, out, err = cli("report", "--results", str(results))
    assert code == 0, err
    assert "comm.jsonl: 12 points" in out and "allreduce" in out and "seal+open" in out
    code, out, err = cli("plot", "--results", str(results), "--out-dir", str(tmp_path / "figs"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["comm-latency-4096B.png", "comm-latency-8B.png"]


def test_measured_latency_replaces_the_policys_default_model_of_that_channel(tmp_path):
    from cai_bench.core.machine import capture_environment

    store = ResultsStore(tmp_path)
    here = capture_environment(with_torch=False)
    for nbytes, seconds in ((8, 0.001), (1_000_008, 0.011)):
        store.append_comm({"run_id": "r", "channel": "redis", "op": "bcast", "world_size": 2, "nbytes": nbytes,
                           "median_s": seconds, "samples_s": [seconds], "environment": here})  # fmt: skip
    models = measured_models(tmp_path)
    assert models["redis"].overhead_s == pytest.approx(0.001)
    assert models["redis"].bandwidth_Bps == pytest.approx(1e8)
    assert models["redis"].source == "comm bench"
    assert models["direct"].overhead_s == pytest.approx(0.34e-3)  # not measured: FMI's


def test_a_torn_last_comm_line_is_skipped_and_a_broken_one_named(tmp_path):
    store = ResultsStore(tmp_path)
    good = {"run_id": "r", "channel": "s3", "op": "barrier", "world_size": 2, "nbytes": 0, "median_s": 0.1,
            "samples_s": [0.1], "environment": {}}  # fmt: skip
    store.append_comm(good)
    (tmp_path / COMM_FILE).open("a").write('{"run_id": "torn')
    assert store.read_comm() == [good]
    (tmp_path / COMM_FILE).write_text(json.dumps({"run_id": "r"}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(Exception, match=r"comm.jsonl:1: not a comm bench record: channel is missing"):
        store.read_comm()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--channel", "tcp://x:1"], "a channel is direct://HOST:PORT"),
        (["--channel", "direct://nowhere"], "write direct://HOST:PORT"),
        (["--channel", "redis://127.0.0.1:1/0", "--ops", "alltoall"], "--ops: one or more of barrier"),
        (["--channel", "redis://127.0.0.1:1/0", "--world-sizes", "0"], "--world-sizes from 1"),
        (["--channel", "redis://127.0.0.1:1/0", "--world-sizes", "2"], "rank 0 failed"),
    ],
)
def test_bad_comm_bench_input_is_one_line_and_exit_2(cli, tmp_path, args, message):
    code, _out, err = cli("comm", "bench", *args, "--repeats", "1", "--results", str(tmp_path))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_runs_comm_configuration_carries_this_machines_measured_models_and_a_fresh_key(tmp_path):
    from cai_bench.core.machine import capture_environment
    from cai_bench.inference.gathering import config_for_run

    here = capture_environment(with_torch=False)
    ResultsStore(tmp_path).append_comm({"run_id": "r", "channel": "s3", "op": "bcast", "world_size": 2, "nbytes": 8,
                                        "median_s": 0.02, "samples_s": [0.02], "environment": here})  # fmt: skip
    options = {"comm": "s3://bucket/p, redis://127.0.0.1:6379/0", "comm_hint": "cheap", "comm_timeout_s": 5.0}
    first, second = config_for_run(options, 8, str(tmp_path)), config_for_run(options, 8, str(tmp_path))
    assert first.urls == ("s3://bucket/p", "redis://127.0.0.1:6379/0") and first.world_size == 8
    assert first.hint == "cheap" and first.timeout_s == 5.0
    assert first.models == {"s3": {**first.models["s3"], "overhead_s": 0.02, "poll_s": 0.0, "source": "comm bench"}}
    assert first.key != second.key and first.run_id != second.run_id
    assert config_for_run({}, 8, str(tmp_path)) is None
