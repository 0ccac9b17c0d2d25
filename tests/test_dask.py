"""The dask backend on real Dask clusters on loopback: the embedded LocalCluster (TLS, nanny-restarted worker
processes, one killed for real), and a scheduler and workers started apart with Dask's own command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import check_timeline, dask_apart, killing_the_other_worker

from cai_bench.backends import get_backend
from cai_bench.commands.runner import execute
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan, work_units
from cai_bench.data.partitions import open_dataset

pytest.importorskip("distributed")


def plan_for(data: Path, backend: str = "dask", **options):
    _, summary, refs = open_dataset(data)
    backend_options = {"runtime": "torch", **(options.pop("backend_options", None) or {})}
    return make_plan(backend, summary, refs, precision="fp32", backend_options=backend_options, **options)


def predictions(outcome) -> dict[int, float]:
    return {int(i): float(p) for r in outcome.results for i, p in zip(r.object_id, r.prediction, strict=True)}


def test_embedded_cluster_predicts_what_the_cpu_backend_predicts(tiny_data):
    cpu = execute(plan_for(tiny_data, "cpu", threads=2), None)[0]
    dask = execute(plan_for(tiny_data, threads=2, backend_options={"workers": 2}), None)[0]
    ours, theirs = predictions(dask), predictions(cpu)
    assert ours.keys() == theirs.keys()
    np.testing.assert_allclose([ours[k] for k in sorted(ours)], [theirs[k] for k in sorted(theirs)], atol=1e-5)
    record = dask.record
    about = record.backend_info["dask"]
    assert about["cluster"] == "embedded" and about["scheduler"].startswith("tls://127.0.0.1:")
    assert sorted(w.partition for w in record.workers) == [0, 1, 2, 3]
    assert {w.worker_id for w in record.workers} <= set(about["workers"])
    assert all(w["address"].startswith("tls://127.0.0.1:") for w in about["workers"].values())
    # the nanny's MALLOC_TRIM_THRESHOLD_ (every large tensor a fresh mmap) is kept out, as from an hpc worker
    assert all("MALLOC_TRIM_THRESHOLD_" not in w["environ"] for w in about["workers"].values())
    assert all(w.pid != os.getpid() for w in record.workers)  # the work ran in the worker processes
    assert record.backend_info["threads_per_worker"] == 1
    # the model started once per worker process: start-up is charged to each process's first unit only
    for pid in {w.pid for w in record.workers}:
        assert sum(w.startup_s > 0 for w in record.workers if w.pid == pid) == 1
    line = check_timeline(asdict(record))
    assert {lane.name for lane in line.lanes} == {w.worker_id for w in record.workers}
    for lane in line.lanes:  # each lane says where its Dask worker was
        assert about["workers"][lane.name]["address"] == f"tls://{lane.where}" and lane.where in lane.label


def test_a_scheduler_started_apart_runs_the_partitions_on_its_own_workers(cli, tiny_data, external_cluster, tmp_path):
    code, _, err = cli("run", "--backend", "dask", "--scheduler", external_cluster["address"], "--data",
                          str(tiny_data), "--precision", "fp32", "--runtime", "torch", "--repeats", "1", "--warmup",
                          "0", "--results", str(tmp_path / "r"))  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "r" / "runs.jsonl").read_text().splitlines()[-1])
    about = record["backend_info"]["dask"]
    assert about["cluster"] == "scheduler" and about["scheduler"] == external_cluster["address"]
    assert {w["name"] for w in about["workers"].values()} == {"apart-0", "apart-1"}
    assert {w["pid"] for w in record["workers"]} <= external_cluster["worker_pids"]  # they ran the partitions
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    assert record["status"] == "ok"


@pytest.mark.long
def test_a_killed_worker_loses_nothing_and_the_record_says_so(many_partitions):
    """20 partitions on two embedded workers; once both have finished one, the other is killed for real (SIGKILL)
    mid-partition, and its nanny starts another. Over 30 s on 2 cores: the cluster, three model start-ups."""
    plan = plan_for(many_partitions, threads=2, batch_size=2, backend_options={"workers": 2, "retries": 1})
    emit, emitted, killed = killing_the_other_worker()
    run = get_backend("dask").run(plan, emit)
    assert killed, "the test never saw both workers at work"
    assert sorted(r.record.partition for r in emitted) == sorted(ref.index for ref in work_units(plan))
    (crash,) = run.info["crashes"]
    assert crash["partition"] is not None and "left the scheduler" in crash["error"]
    (redo,) = [r for r in emitted if r.record.partition == crash["partition"]]
    assert redo.record.pid != killed[0]
    assert run.info["retried"][0]["partition"] == crash["partition"]
    record = {"run_id": "r", "backend": "dask", "summary": {"wall_s": run.wall_s}, "backend_info": run.info,
              "workers": [asdict(r.record) for r in emitted]}  # fmt: skip
    line = check_timeline(record)
    assert any("lost running partition" in note for note in line.notes)


@pytest.mark.parametrize(
    "address, message",
    [
        ("http://127.0.0.1:8786", "give tcp://HOST:PORT or tls://HOST:PORT"),
        ("tcp://10.1.2.3:8786", "plain tcp:// is neither encrypted nor authenticated"),
        ("tls://user:secret@10.1.2.3:8786", "holds no credentials"),
        ("tcp://127.0.0.1:9", "no Dask scheduler answered there"),
    ],
)
def test_a_scheduler_address_it_cannot_use_is_one_line(cli, tiny_data, tmp_path, address, message):
    code, out, err = cli("run", "--backend", "dask", "--scheduler", address, "--data", str(tiny_data),
                          "--results", str(tmp_path / "r"), "--dask-wait-s", "2")  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "secret" not in out + err
    assert "Traceback" not in err


def test_a_scheduler_address_from_a_preset_is_checked_as_from_the_command_line():
    with pytest.raises(UserError, match="plain tcp:// is neither encrypted nor authenticated"):
        get_backend("dask").check({"scheduler": "tcp://10.1.2.3:8786"})


def test_workers_with_a_scheduler_is_refused(cli, tiny_data, tmp_path):
    code, _, err = cli("run", "--backend", "dask", "--scheduler", "tcp://127.0.0.1:8786", "--workers", "2",
                        "--data", str(tiny_data), "--results", str(tmp_path / "r"))  # fmt: skip
    assert code == 2 and "a --scheduler's workers are those it has" in err


def test_the_side_by_side_bench_runs_both_backends_on_the_same_partitions(tiny_data, tmp_path, capsys):
    """bench-dask's script on tiny data: it measures nothing worth keeping here, but its figures come from real
    records of both backends, over the same partitions."""
    from cai_bench.benches import dask_vs_hpc

    code = dask_vs_hpc.main(["--gb", "0.002", "--partition-mb", "0.52", "--repeats", "1", "--workers", "2",
                             "--results", str(tmp_path / "r"), "--out", str(tmp_path / "bench.json")])  # fmt: skip
    assert code == 0
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert json.loads(capsys.readouterr().out) == figures
    records = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in records] == ["hpc", "dask"]
    for record in records:
        side = figures["backends"][record["backend"]]
        assert side["run_ids"] == [record["run_id"]]
        assert side["samples_per_s"]["median"] == record["summary"]["samples_per_s"]
        assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
        workers = len({w["worker_id"] for w in record["workers"]})
        overhead = (workers * record["summary"]["wall_s"] - sum(w["total_s"] for w in record["workers"])) / 4
        assert side["overhead_per_partition_s"]["median"] == pytest.approx(overhead)
        assert side["peak_tree_pss_bytes"] > 0 and side["start_before_clock_s"] > 0
    rates = {name: side["samples_per_s"]["median"] for name, side in figures["backends"].items()}
    assert figures["dask_throughput_vs_hpc"] == pytest.approx(rates["dask"] / rates["hpc"])


def test_a_scheduler_that_stops_mid_run_is_one_line_and_the_finished_partitions_are_kept(many_partitions, tmp_path):
    """predict through a scheduler started apart, which is stopped once a partition's predictions are kept: one
    error line and exit 2 (once the client gives up reconnecting: --dask-wait-s), and a failed record and the
    parts keep what finished."""
    out, results = tmp_path / "z.parquet", tmp_path / "r"
    with dask_apart(tmp_path, workers=1) as (address, started):
        run = subprocess.Popen(
            [sys.executable, "-m", "cai_bench", "predict", "--backend", "dask", "--scheduler", address, "--data",
             str(many_partitions), "--out", str(out), "--batch-size", "2", "--precision", "fp32", "--runtime",
             "torch", "--dask-wait-s", "3", "--results", str(results)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        parts = tmp_path / "z.parquet.parts"
        deadline = time.monotonic() + 120
        while not list(parts.glob("part-*.npz")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        started[0].kill()  # the scheduler
        _, err = run.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1, err
    assert "the Dask scheduler stopped answering" in errors[0] and "Traceback" not in err
    kept = sorted(int(p.stem.split("-")[1]) for p in parts.glob("part-*.npz"))
    (record,) = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]
    assert record["status"] == "failed" and 0 < len(kept) < 20
    assert sorted(w["partition"] for w in record["workers"]) == kept  # what the record keeps, the parts keep


def test_a_worker_that_cannot_start_stops_the_run_with_its_reason(tiny_data, tmp_path):
    weights = tmp_path / "bad.safetensors"
    weights.write_text("not a weights file")  # past the command's own check: each worker's start says so
    plan = plan_for(tiny_data, threads=2, weights=str(weights), backend_options={"workers": 2})
    with pytest.raises(UserError, match=r"dask worker dask-\d+ could not start: .*bad.safetensors"):
        get_backend("dask").run(plan, lambda result: None)


def test_a_partition_that_keeps_failing_fails_alone_and_predict_keeps_the_rest(cli, data_copy, tmp_path):
    manifest = json.loads((data_copy / "manifest.json").read_text())
    path = data_copy / manifest["partitions"][1]["file"]
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # its sha256 no longer matches: every read of it fails, on whichever worker
    path.write_bytes(bytes(raw))
    out = tmp_path / "p.csv"
    code, _, err = cli("predict", "--backend", "dask", "--workers", "2", "--data", data_copy, "--out", out,
                       "--precision", "fp32", "--runtime", "torch", "--results", tmp_path / "r", "--quiet")  # fmt: skip
    assert code == 1 and "partition 1 (unit 1), 3 attempt(s)" in err and "Traceback" not in err
    assert len(list(out.with_name("p.csv.parts").glob("part-*.npz"))) == 3
    (record,) = [json.loads(line) for line in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    assert record["status"] == "failed" and sorted(w["partition"] for w in record["workers"]) == [0, 2, 3]
    (failure,) = record["backend_info"]["failed_partitions"]
    assert failure["attempts"] == 3 and len(failure["errors"]) == 3  # --retries 2: tried three times, each said
