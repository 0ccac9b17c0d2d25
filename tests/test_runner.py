import json

import pytest
from conftest import hand_record

from cai_bench.commands import runner
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.core.records import SCHEMA_VERSION, summarize_run
from cai_bench.data import datasets
from cai_bench.data.partitions import open_dataset
from cai_bench.data.storage import MANIFEST
from cai_bench.store.jsonl import ResultsStore


def _plan(directory, **options):
    _, summary, refs = open_dataset(directory)
    return make_plan("cpu", summary, refs, threads=1, batch_size=16, **options)


@pytest.mark.probe
def test_each_repeat_is_appended_warmups_are_not(tiny_data, tmp_path):
    store = ResultsStore(tmp_path / "results")
    outcomes = runner.execute(_plan(tiny_data, repeats=2, warmup=1), store)
    saved = store.read()
    assert [r["repeat"] for r in saved] == [1, 2]
    assert [o.record.run_id for o in outcomes] == [r["run_id"] for r in saved]
    rec = saved[0]
    assert rec["schema_version"] == SCHEMA_VERSION and rec["status"] == "ok" and rec["kind"] == "run"
    assert rec["weights"] == {"weights": "random-init", "seed": 0}
    assert rec["plan"]["data"]["dataset_id"] == open_dataset(tiny_data)[1].dataset_id
    assert "partitions" not in rec["plan"]
    assert rec["backend_info"]["threads"] == 1
    env = rec["environment"]
    for key in ("host", "python", "packages", "cpu_model", "cpu_physical_cores", "gpus", "captured_utc"):
        assert key in env
    assert env["packages"]["torch"]


@pytest.mark.probe
def test_summary_is_derived_from_the_worker_records(tiny_data, tmp_path):
    store = ResultsStore(tmp_path)
    runner.execute(_plan(tiny_data), store)
    rec = store.read()[0]
    workers, s = rec["workers"], rec["summary"]
    assert len(workers) == s["partitions"] == 4 and s["workers"] == 1
    assert s["samples"] == sum(w["samples"] for w in workers) == 104
    assert s["bits"] == 104 * 164_160
    assert s["throughput_bps"] == pytest.approx(s["bits"] / s["wall_s"])
    assert s["samples_per_s"] == pytest.approx(104 / s["wall_s"])
    # one worker ran every partition: its throughput is its bits over its whole compute time
    assert s["sum_worker_throughput_bps"] == pytest.approx(s["bits"] / sum(w["compute_s"] for w in workers))
    assert s["peak_rss_bytes"] == max(w["peak_rss_bytes"] for w in workers)
    assert s["startup_s"] == workers[0]["startup_s"] > 0


@pytest.mark.probe
def test_sum_of_worker_throughput_counts_each_worker_once(tiny_data):
    from cai_bench.inference.engine import EngineOptions, run_partition, start_worker

    _, _, refs = open_dataset(tiny_data)
    options = EngineOptions(batch_size=16)
    a, b = start_worker("a", options), start_worker("b", options)
    records = [run_partition(ref, w, options).record for ref, w in zip(refs, (a, a, b, b), strict=True)]
    s = summarize_run(records, wall_s=10.0)
    expected = sum(
        sum(r.bits for r in records if r.worker_id == w) / sum(r.compute_s for r in records if r.worker_id == w)
        for w in ("a", "b")
    )
    assert s.workers == 2
    assert s.sum_worker_throughput_bps == pytest.approx(expected)
    assert s.throughput_bps == pytest.approx(s.bits / 10.0)


def _corrupt(directory, name):
    path = directory / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.probe
def test_a_run_that_fails_midway_keeps_earlier_results_and_what_it_finished(data_copy, tmp_path):
    store = ResultsStore(tmp_path)
    runner.execute(_plan(data_copy), store)
    before = store.path.read_bytes()
    _corrupt(data_copy, "part-00002.safetensors")
    with pytest.raises(UserError, match="part-00002.safetensors: sha256 does not match"):
        runner.execute(_plan(data_copy, repeats=2), store)
    after = store.path.read_bytes()
    assert after.startswith(before)
    records = store.read()
    assert [r["status"] for r in records] == ["ok", "failed"]
    failed = records[1]
    assert [w["partition"] for w in failed["workers"]] == [0, 1]
    assert "sha256 does not match" in failed["error"]


@pytest.mark.probe
def test_an_interrupted_run_records_the_partitions_it_finished(tiny_data, tmp_path):
    store = ResultsStore(tmp_path)

    class StopAfterTwo(runner.NoProgress):
        done = 0

        def advance(self, record):
            self.done += 1
            if self.done == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.execute(_plan(tiny_data), store, StopAfterTwo())
    (record,) = store.read()
    assert record["status"] == "interrupted" and len(record["workers"]) == 2


def test_store_skips_a_torn_last_line_but_not_a_broken_middle_one(tmp_path):
    store = ResultsStore(tmp_path)
    first, second = hand_record("cpu", 1.0), hand_record("cpu", 2.0)
    a, b = json.dumps(first), json.dumps(second)
    store.path.write_text(f'{a}\n{b}\n{{"c": ')
    assert [r["run_id"] for r in store.read()] == [first["run_id"], second["run_id"]]
    assert store.skipped == [f"{store.path}:3: skipped a torn last line (6 bytes)"]
    store.path.write_text(f"{a}\nnot json\n{b}\n")
    with pytest.raises(UserError, match="runs.jsonl:2: not a JSON record"):
        store.read()


@pytest.mark.probe
def test_records_are_whole_json_lines(tiny_data, tmp_path):
    store = ResultsStore(tmp_path)
    runner.execute(_plan(tiny_data, repeats=2), store)
    lines = store.path.read_text().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["summary"]["samples"] == 104 for line in lines)


def test_default_data_is_generated_once_then_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path))
    first = datasets.cached_synthetic(0.001, 0.3, seed=0)
    stamp = (first / MANIFEST).stat().st_mtime_ns
    again = datasets.cached_synthetic(0.001, 0.3, seed=0)
    assert again == first and (first / MANIFEST).stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "datasets"
