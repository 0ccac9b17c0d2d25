"""The hpc backend: worker processes on this node (real spawned processes, one killed for real), and SLURM job
arrays through submitit's local executor (real task processes writing real files)."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import check_timeline, killing_the_other_worker

from cai_bench.backends import get_backend
from cai_bench.backends.base import PartitionsFailed
from cai_bench.commands.runner import execute
from cai_bench.core.errors import UserError
from cai_bench.core.machine import this_machine
from cai_bench.core.plan import make_plan, samples_for_gb, work_units
from cai_bench.data.partitions import open_dataset
from cai_bench.store.jsonl import ResultsStore

pytest.importorskip("submitit")


def plan_for(data: Path, backend: str = "hpc", **options):
    _, summary, refs = open_dataset(data)
    backend_options = options.pop("backend_options", None)
    return make_plan(backend, summary, refs, precision="fp32", backend_options=backend_options, **options)


def predictions(outcome) -> dict[int, float]:
    return {int(i): float(p) for r in outcome.results for i, p in zip(r.object_id, r.prediction, strict=True)}


def corrupt(data: Path, index: int) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    path = data / manifest["partitions"][index]["file"]
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------- one node


def test_two_workers_predict_what_the_cpu_backend_predicts(tiny_data):
    cpu = execute(plan_for(tiny_data, "cpu", threads=2), None)[0]
    hpc = execute(plan_for(tiny_data, threads=2, backend_options={"workers": 2}), None)[0]
    assert predictions(hpc).keys() == predictions(cpu).keys()
    ours, theirs = predictions(hpc), predictions(cpu)
    np.testing.assert_allclose([ours[k] for k in sorted(ours)], [theirs[k] for k in sorted(theirs)], atol=1e-5)
    record = hpc.record
    assert sorted(w.partition for w in record.workers) == [0, 1, 2, 3]
    assert all(w.pid != os.getpid() for w in record.workers)  # the work ran in the worker processes
    assert {w.worker_id for w in record.workers} <= {"hpc-0", "hpc-1"}
    assert record.backend_info["workers"] == 2
    assert record.backend_info["threads_per_worker"] == 1
    assert record.backend_info["crashes"] == []
    assert record.summary.wall_s >= max(w.total_s for w in record.workers)
    line = check_timeline(asdict(record))  # a lane per worker process that ran a unit
    assert {lane.name for lane in line.lanes} == {w.worker_id for w in record.workers}
    assert check_timeline(asdict(cpu.record), lanes=1).lanes[0].name == "cpu-0"  # the cpu worker, lanes inside


def test_a_worker_killed_mid_partition_loses_nothing(many_partitions):
    plan = plan_for(many_partitions, threads=2, batch_size=2, backend_options={"workers": 2, "retries": 1})
    emit, emitted, killed = killing_the_other_worker()
    run = get_backend("hpc").run(plan, emit)
    units = work_units(plan)
    assert killed, "the test never saw both workers at work"
    assert sorted(r.record.partition for r in emitted) == sorted(ref.index for ref in units)  # each exactly once
    (crash,) = run.info["crashes"]
    assert crash["pid"] == killed[0] and crash["exit"] == "signal 9"
    assert crash["partition"] is not None
    (redo,) = [r for r in emitted if r.record.partition == crash["partition"]]
    assert redo.record.pid != killed[0]
    assert run.info["retried"][0]["partition"] == crash["partition"]
    assert run.info["worker_processes_started"] == 3  # a replacement kept the node busy
    record = {"run_id": "r", "backend": "hpc", "summary": {"wall_s": run.wall_s}, "backend_info": run.info,
              "workers": [asdict(r.record) for r in emitted]}  # fmt: skip
    line = check_timeline(record)
    retried = {s.unit for lane in line.lanes for s in lane.segments if s.retried}
    assert len(retried) == 1 and any("lost running partition" in note for note in line.notes)


def test_partitions_that_fail_every_retry_fail_the_run_and_keep_the_rest(cli, data_copy, tmp_path):
    corrupt(data_copy, 2)
    args = ["run", "--backend", "hpc", "--workers", "2", "--threads", "2", "--retries", "1", "--precision", "fp32"]
    code, _, err = cli(*args, "--data", data_copy, "--results", tmp_path / "r", "--quiet")
    assert code == 1
    assert "1 partition(s) failed" in err and "partition 2 (unit 2), 2 attempt(s)" in err
    assert "sha256 does not match" in err
    (record,) = ResultsStore(tmp_path / "r").read()
    assert record["status"] == "failed"
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 3]
    (failure,) = record["backend_info"]["failed_partitions"]
    assert failure["partition"] == 2 and failure["attempts"] == 2
    assert record["summary"]["wall_s"] > 0


def test_a_worker_that_cannot_start_is_one_clear_error(cli, tiny_data, tmp_path):
    weights = tmp_path / "bad.safetensors"
    weights.write_text("not a weights file")
    args = ["run", "--backend", "hpc", "--workers", "2", "--weights", weights, "--data", tiny_data]
    code, _, err = cli(*args, "--results", tmp_path / "r", "--quiet")
    assert code == 2  # the command refuses the weights before any worker starts
    assert err.startswith("error: ") and "bad.safetensors: not a readable safetensors file" in err
    assert not (tmp_path / "r" / "runs.jsonl").exists()
    # and where weights go bad after that check, each worker's start says so
    plan = plan_for(tiny_data, backend_options={"workers": 2}, weights=str(weights))
    with pytest.raises(UserError, match=r"worker hpc-\d could not start: .*bad.safetensors"):
        get_backend("hpc").run(plan, lambda result: None)


def test_predict_with_a_partition_that_keeps_failing_says_so_and_keeps_the_rest(cli, data_copy, tmp_path):
    corrupt(data_copy, 1)
    out = tmp_path / "p.csv"
    args = ["predict", "--backend", "hpc", "--workers", "2", "--data", data_copy, "--out", out, "--precision", "fp32"]
    code, _, err = cli(*args, "--results", tmp_path / "r", "--quiet")
    assert code == 1
    assert "partition 1 (unit 1), 3 attempt(s)" in err and "run the same command again" in err
    assert "Traceback" not in err
    assert not out.exists()  # the file is written whole or not at all; the finished partitions wait as parts
    assert len(list(out.with_name("p.csv.parts").glob("part-*.npz"))) == 3


def test_cycle_to_gb_reuses_partitions_until_the_target_is_processed(tiny_data):
    # 4 partitions of 26 samples; 0.0048 GB is 251 samples: ten partitions (260 samples) reach it
    assert samples_for_gb(0.0048) == 251
    plan = plan_for(tiny_data, "cpu", threads=2, cycle_to_gb=0.0048)
    assert [ref.index for ref in work_units(plan)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    outcome = execute(plan, None)[0]
    assert outcome.record.summary.samples == 260
    assert outcome.record.summary.partitions == 10
    assert outcome.record.plan["cycle_to_gb"] == 0.0048
    hpc = execute(plan_for(tiny_data, threads=2, cycle_to_gb=0.0048, backend_options={"workers": 2}), None)[0]
    assert sorted(r.record.partition for r in hpc.results) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert hpc.record.backend_info["passes_over_data"] == 2.5


# ---------------------------------------------------------------------------------------------- SLURM arrays


def task_events(results: Path) -> list[list[dict]]:
    (job,) = (results / "hpc-jobs").iterdir()
    paths = sorted((job / "tasks").glob("task-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    return [[json.loads(line) for line in path.read_text().splitlines()] for path in paths]


def saved_job(results: Path) -> dict:
    (path,) = (results / "jobs").glob("*.json")
    return json.loads(path.read_text())


def test_a_local_job_array_runs_end_to_end_into_one_complete_record(cli, tiny_data, tmp_path):
    results = tmp_path / "r"
    args = ["run", "--backend", "hpc", "--slurm", "--slurm-executor", "local", "--tasks", "2", "--precision", "fp32"]
    args += ["--array-parallelism", "1"]
    code, out, err = cli(*args, "--data", tiny_data, "--results", results, "--json")
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["status"] == "ok"
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    assert {w["worker_id"] for w in record["workers"]} == {"task-0", "task-1"}
    assert record["summary"]["workers"] == 2 and record["summary"]["samples"] == 104
    info = record["backend_info"]
    assert info["executor"] == "local" and info["tasks"] == 2 and info["tasks_started"] == 2
    assert info["partitions_per_task"] == 2
    # wall = first task start to last task end, from the tasks' own files; queue wait apart
    tasks = task_events(results)
    first_start = min(events[0]["epoch"] for events in tasks)
    last_end = max(events[-1]["epoch"] for events in tasks)
    assert all(events[0]["event"] == "start" and events[-1]["event"] == "end" for events in tasks)
    assert tasks[1][0]["epoch"] >= tasks[0][-1]["epoch"]  # one at a time: task 1 started after task 0 ended
    assert record["summary"]["wall_s"] == pytest.approx(last_end - first_start)
    job = saved_job(results)["state"]
    assert info["queue_wait_s"] == pytest.approx(first_start - job["submit_epoch"])
    assert info["queue_wait_s"] >= 0
    assert info["queue_wait_max_s"] == pytest.approx(tasks[1][0]["epoch"] - job["submit_epoch"])
    assert info["rounds"] == 1 and info["retried_units"] == 0
    line = check_timeline(record, lanes=2)  # one lane per array task, task 1 after task 0 (array parallelism 1)
    assert [lane.name for lane in line.lanes] == ["task-0", "task-1"] and max(n for _, n in line.running()) == 1
    # the predictions came back with the records: the accuracy is the cpu backend's
    cpu = execute(plan_for(tiny_data, "cpu", threads=1), None)[0]
    assert record["accuracy"]["samples"] == 104
    assert record["accuracy"]["mae"] == pytest.approx(cpu.record.accuracy["mae"], abs=1e-6)
    assert ResultsStore(results).read()[0]["run_id"] == record["run_id"]
    # the machine is where the tasks ran (here: this one), as the nodes reported it
    here = this_machine()
    assert record["environment"]["nodes"] == [here["host"]]
    assert record["environment"]["host"] == here["host"]
    assert record["environment"]["cpu_model"] == here["cpu_model"]
    # the array was followed to its end and recorded: it cannot be collected into a second record
    code, _, err = cli("collect", job["job_id"], "--results", results)
    assert code == 2 and "already recorded" in err


def test_no_wait_then_collect_records_the_array_once(cli, tiny_data, tmp_path):
    results = tmp_path / "r"
    args = ["run", "--backend", "hpc", "--slurm", "--slurm-executor", "local", "--partitions-per-task", "4"]
    code, out, err = cli(*args, "--data", tiny_data, "--results", results, "--no-wait", "--precision", "fp32")
    assert code == 0, err
    assert "cai-bench collect" in out
    assert not (results / "runs.jsonl").exists()
    job_id = next((results / "hpc-jobs").iterdir()).name
    code, out, err = cli("collect", job_id, "--results", results, "--json")
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["status"] == "ok" and record["backend_info"]["tasks"] == 1
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    code, _, err = cli("collect", job_id, "--results", results)
    assert code == 2 and "already recorded" in err
    assert len(ResultsStore(results).read()) == 1


def test_a_failing_array_task_keeps_what_the_others_and_itself_finished(cli, data_copy, tmp_path):
    corrupt(data_copy, 3)  # the second partition of task 1
    results = tmp_path / "r"
    args = ["run", "--backend", "hpc", "--slurm", "--slurm-executor", "local", "--tasks", "2", "--precision", "fp32"]
    code, _, err = cli(*args, "--retries", "1", "--data", data_copy, "--results", results, "--quiet")
    assert code == 1
    assert "partition 3" in err and "sha256 does not match" in err and "2 attempt(s)" in err
    (record,) = ResultsStore(results).read()
    assert record["status"] == "failed"
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2]
    (failure,) = record["backend_info"]["failed_partitions"]
    assert failure["partition"] == 3 and failure["attempts"] == 2 and failure["workers"] == ["task-1", "task-2"]
    assert record["backend_info"]["rounds"] == 2  # the failed partition was resubmitted alone, and failed again


@pytest.mark.long
def test_a_killed_array_task_is_resubmitted_and_the_run_ends_ok_with_each_partition_once(many_partitions, tmp_path):
    """20 partitions in 2 tasks; once task 0 has finished one, task 1 is killed for real, mid-work. Over 30 s on
    2 cores: three task processes, each starting torch and the model, over 20 partitions at batch size 2."""
    options = {"slurm": True, "slurm_executor": "local", "tasks": 2, "array_parallelism": 2, "retries": 1}
    plan = plan_for(many_partitions, batch_size=2, backend_options=options, work_dir=str(tmp_path / "r"))
    killed = []

    def kill_task_1(result):
        if killed:
            return
        for _ in range(1200):  # it starts beside task 0: wait until its start line names its pid
            task_file = next((tmp_path / "r" / "hpc-jobs").glob("*/tasks/task-1.jsonl"), None)
            lines = task_file.read_text().splitlines() if task_file else []
            if lines:
                break
            time.sleep(0.05)
        pid = json.loads(lines[0])["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    outcome = execute(plan, ResultsStore(tmp_path / "r"), on_result=kill_task_1)[0]
    assert killed
    record = outcome.record
    assert record.status == "ok"
    assert sorted(w.partition for w in record.workers) == list(range(20))  # each exactly once
    info = record.backend_info
    assert info["rounds"] == 2 and info["retried_units"] >= 1
    assert [c["worker"] for c in info["crashes"]] == ["task-1"]
    assert "task-1 ended without finishing" in info["crashes"][0]["error"]
    rerun = {w.partition for w in record.workers if w.worker_id == "task-2"}
    assert rerun and rerun <= set(range(10, 20))  # the new array ran what task 1 had not finished


@pytest.mark.long
def test_a_sweep_of_arrays_resumes_without_repeating_what_it_holds(cli, tmp_path):
    """Over 30 s on 2 cores: four job arrays (two points, two repeats), six task processes each starting torch and
    the model, then the sweep again to see that it runs none."""
    args = ["sweep", "--backend", "hpc", "--slurm", "--slurm-executor", "local", "--tasks", "1,2", "--gb", "0.002"]
    args += ["--partition-mb", "0.52", "--repeats", "2", "--precision", "fp32", "--results", tmp_path / "r", "-q"]
    code, _, err = cli(*args)
    assert code == 0, err
    records = ResultsStore(tmp_path / "r").read()
    assert sorted((r["backend_info"]["tasks"], r["repeat"]) for r in records) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["environment"]["machine_id"].startswith("slurm-local | ") for r in records)
    code, out, err = cli(*args)
    assert "2 point(s) were already complete" in out
    assert code == 0, err
    assert len(ResultsStore(tmp_path / "r").read()) == 4  # nothing was run again


def test_slurm_submission_carries_every_option_to_sbatch(tiny_data, tmp_path, monkeypatch):
    """Submit through submitit's real SLURM executor to a stand-in sbatch that keeps the script it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kept = tmp_path / "sbatch-script"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {kept}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "Slurmctld(primary) at stand-in is UP"\n')  # its ping
    for name in ("sbatch", "srun", "scontrol"):
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    options = {
        "slurm": True,
        "tasks": 2,
        "slurm_partition": "debug",
        "time_min": 90,
        "mem_gb": 4.0,
        "cpus_per_task": 2,
        "array_parallelism": 1,
        "slurm_options": {"account": "astro"},
    }
    backend = get_backend("hpc")
    backend.check(options)
    job = backend.submit(plan_for(tiny_data, backend_options=options, work_dir=str(tmp_path / "r")))
    script = kept.read_text()
    for line in (
        "#SBATCH --partition=debug",
        "#SBATCH --time=90",
        "#SBATCH --mem=4GB",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --array=0-1%1",
        "#SBATCH --account=astro",
    ):
        assert line in script
    assert job.state["scheduler_ids"] == ["4242_0", "4242_1"]
    assert [task["units"] for task in job.state["tasks"].values()] == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "cpu", "--workers", "2"], "--workers: not an option of --backend cpu"),
        (["--backend", "hpc", "--tasks", "2"], "--tasks applies to SLURM arrays: add --slurm"),
        (["--backend", "hpc", "--workers", "0"], "--workers must be at least 1"),
        (["--backend", "hpc", "--slurm", "--slurm-executor", "pbs"], "'pbs' is not one of 'slurm', 'local'"),
        (["--backend", "hpc", "--slurm", "--slurm-executor", "local", "--tasks", "2", "--partitions-per-task", "2"],
         "give --tasks or --partitions-per-task, not both"),
        (["--backend", "hpc", "--slurm", "--slurm-executor", "local", "--time", "soon"], "--time 'soon'"),
        (["--backend", "hpc", "--slurm", "--slurm-executor", "local", "--mem", "lots"], "--mem 'lots'"),
        (["--backend", "hpc", "--slurm", "--slurm-executor", "local", "--slurm-option", "account"], "KEY=VALUE"),
        (["--backend", "hpc", "--slurm", "--slurm-executor", "local", "--no-wait", "--repeats", "2"],
         "--no-wait submits one run"),
        (["--backend", "hpc", "--workers", "2", "--no-wait"], "--no-wait submits a SLURM array: add --slurm"),
        (["--backend", "cpu", "--no-wait"], "--backend cpu runs while the command waits"),
        (["--backend", "cpu", "--engine", "reference", "--cycle-to-gb", "1"], "takes no --cycle-to-gb"),
    ],
)  # fmt: skip
def test_bad_hpc_options_are_one_clear_line_and_exit_2(cli, tiny_data, tmp_path, args, message):
    code, _, err = cli("run", *args, "--data", tiny_data, "--results", tmp_path / "r", "--quiet")
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "runs.jsonl").exists()


def test_no_slurm_on_this_machine_is_said_plainly(cli, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    code, _, err = cli("run", "--backend", "hpc", "--slurm", "--data", tiny_data, "--results", tmp_path / "r")
    assert code == 2 and "no SLURM here" in err and "--slurm-executor local" in err


@pytest.mark.parametrize(
    ("text", "minutes"), [("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-00:00:00", 2880), ("1-2", 1560)]
)
def test_time_limits_read_as_sbatch_reads_them(text, minutes):
    from cai_bench.backends.slurm.options import minutes as read_minutes

    assert read_minutes(text) == minutes


@pytest.mark.parametrize(("text", "gb"), [("4G", 4.0), ("4GB", 4.0), ("3584M", 3.5), ("3584", 3.5), ("1T", 1024.0)])
def test_memory_sizes_read_as_sbatch_reads_them(text, gb):
    from cai_bench.backends.slurm.options import gigabytes

    assert gigabytes(text) == gb


def test_partitions_failed_names_each_failure():
    from cai_bench.backends.base import BackendRun
    from cai_bench.core.records import WeightsInfo

    failed = [{"partition": i, "unit": i, "attempts": 3, "errors": [f"boom {i}"]} for i in range(5)]
    exc = PartitionsFailed(BackendRun(1.0, WeightsInfo("random-init", seed=0)), failed)
    assert str(exc).startswith("5 partition(s) failed: partition 0: boom 0; partition 1: boom 1")
    assert str(exc).endswith("and 2 more")


def test_where_array_files_go_and_retries_are_not_part_of_what_is_measured(tiny_data):
    from cai_bench.analysis.results import point_key

    def key(work_dir="a", **options):
        plan = plan_for(tiny_data, backend_options={"slurm": True, "tasks": 2, **options}, work_dir=work_dir)
        return point_key(plan.to_record(), this_machine())

    assert key("a") == key("b", retries=5, time_min=30)
    assert key("a") != key("a", cpus_per_task=2)
