"""``hpc --slurm`` against a real SLURM cluster (scripts/slurm-local.sh: munged, MariaDB, slurmdbd, slurmctld and
slurmd on loopback), through submitit's SLURM executor, as users run it: sbatch, array parallelism, time limits,
a killed task, scancel at Ctrl-C, sacct's states in the records, --no-wait then collect, --comm over the array.

Each test is long (array tasks start Python and the model); they run first, beside the rest of the suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, default_sigint

from cai_bench.backends.slurm import scheduler
from cai_bench.commands.runner import execute
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset
from cai_bench.store.jsonl import ResultsStore

pytest.importorskip("submitit")
pytestmark = pytest.mark.long


@pytest.fixture(autouse=True)
def _cluster(slurm_cluster, monkeypatch):
    # The driver asks sacct for its tasks every POLL_S (10 s on a shared cluster); this one is the tests' own
    monkeypatch.setitem(scheduler.POLL_S, "slurm", 1.0)
    return slurm_cluster


def _sacct(job_ids: list[str]) -> dict[str, dict]:
    fields = ["JobID", "State", "Start", "End"]
    out = subprocess.run(["sacct", "-X", "-n", "--parsable2", "-o", ",".join(fields), "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {line.split("|")[0]: dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()}


def _in_queue(ids: list[str]) -> set[str]:
    """The tasks slurmctld knows of (pending, running or lately ended), one line each."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return set(out.split())


def _task_events(results: Path, task: str) -> list[dict]:
    events = []
    for path in results.glob(f"hpc-jobs/*/tasks/{task}.jsonl"):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return events


def _wait_for(what, timeout_s: float = 180.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s")


def test_an_array_matches_a_node_run_and_the_scheduler_keeps_its_parallelism(cli, tiny_data, tmp_path):
    """2 tasks at --array-parallelism 1: the same predictions as one node's workers; sacct shows task 1 starting
    only once task 0 ended, and both COMPLETED, in the record."""
    base = ["--data", tiny_data, "--precision", "fp32", "--json"]
    code, out, err = cli("run", "--backend", "hpc", "--workers", "2", *base, "--results", tmp_path / "node")
    assert code == 0, err
    (node,) = json.loads(out)
    array = ["run", "--backend", "hpc", "--slurm", "--tasks", "2", "--array-parallelism", "1", "--time", "5"]
    code, out, err = cli(*array, *base, "--results", tmp_path / "array")
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["status"] == "ok" and record["backend_info"]["executor"] == "slurm"
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    assert record["accuracy"] == pytest.approx(node["accuracy"], abs=1e-6)
    assert record["summary"]["samples"] == node["summary"]["samples"] == 104
    scheduler = record["backend_info"]["scheduler"]
    assert [scheduler[t]["state"] for t in ("task-0", "task-1")] == ["COMPLETED", "COMPLETED"]
    # the limit is the scheduler's: its array spec, and its tasks' times as sacct has them
    (script,) = (tmp_path / "array").glob("hpc-jobs/*/submitit/*submission.sh")
    assert "#SBATCH --array=0-1%1" in script.read_text()
    assert scheduler["task-1"]["start"] >= scheduler["task-0"]["end"]
    assert record["environment"]["host"] == "cai-local"  # the cluster's name, from the tasks' SLURM_CLUSTER_NAME


def test_no_wait_then_collect_with_comm_over_the_array(cli, tiny_data, tmp_path, redis_url):
    """Submitted and left: squeue or sacct knows the array; collect follows it to one record, whose two tasks
    were the ranks of the closing collectives (rank 0's aggregate read once)."""
    results = tmp_path / "r"
    args = ["run", "--backend", "hpc", "--slurm", "--tasks", "2", "--precision", "fp32", "--comm", redis_url]
    code, out, err = cli(*args, "--data", tiny_data, "--results", results, "--no-wait")
    assert code == 0, err
    assert "cai-bench collect" in out and not (results / "runs.jsonl").exists()
    (saved,) = (results / "jobs").glob("*.json")
    ids = json.loads(saved.read_text())["state"]["scheduler_ids"]
    assert len(ids) == 2 and _in_queue(ids) == set(ids)  # the scheduler has them, whatever their state now
    job_id = next((results / "hpc-jobs").iterdir()).name
    code, out, err = cli("collect", job_id, "--results", results, "--json")
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["status"] == "ok" and sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    comm = record["backend_info"]["comm"]
    assert comm["world_size"] == 2 and comm["aggregate_reads"] == 1 and comm["unit_reads"] == 0
    assert [r["rank"] for r in comm["ranks"]] == [0, 1] and not any("error" in r for r in comm["ranks"])
    assert {s["state"] for s in record["backend_info"]["scheduler"].values()} == {"COMPLETED"}


@pytest.mark.full
def test_a_task_past_its_time_limit_and_one_killed_mid_unit_are_retried(tiny_data, tmp_path):
    """4 partitions in 2 tasks with a time limit of 1 minute; partitions 1 and 2 are FIFOs nobody writes (a read
    that never returns, as on a hung filesystem). Task 1 blocks on its first, so it runs into its limit; task 0
    finishes partition 0, blocks on 1 and is killed there (SIGKILL, mid-unit). The record says which timed out and
    which was killed, sacct's states beside, and a second array runs what they left (the partitions files again);
    each partition once. Over a minute and a half, almost all of it waiting: SLURM's time limits are whole minutes,
    so it runs in make test-full (a task killed mid-unit and resubmitted stays in make test, through the local
    executor: tests/test_hpc.py)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    options = {"slurm": True, "tasks": 2, "retries": 1, "time_min": 1, "array_parallelism": 2}
    _, summary, refs = open_dataset(data)
    plan = make_plan("hpc", summary, refs, precision="fp32", backend_options=options, work_dir=str(tmp_path / "r"))
    files = [data / p["file"] for p in json.loads((data / "manifest.json").read_text())["partitions"]]
    kept = {path: path.read_bytes() for path in files[1:3]}
    for path in kept:
        path.unlink()
        os.mkfifo(path)
    faults = []

    def events(task: str, kind: str) -> list[dict]:
        return [e for e in _task_events(tmp_path / "r", task) if e["event"] == kind]

    def fault():
        _wait_for(lambda: events("task-0", "unit"), 300)
        os.kill(events("task-0", "start")[0]["pid"], signal.SIGKILL)
        faults.append("killed")
        # Task 1 ends at its limit: the partitions are files again before the next array reads them
        _wait_for(lambda: events("task-1", "failed") or _task_events(tmp_path / "r", "task-2"), 300, 0.02)
        for path, data_bytes in kept.items():
            path.unlink()
            path.write_bytes(data_bytes)
        faults.append("restored")

    watcher = threading.Thread(target=fault, daemon=True)
    watcher.start()
    record = execute(plan, ResultsStore(tmp_path / "r"))[0].record
    watcher.join(5)
    assert faults == ["killed", "restored"] and record.status == "ok"
    assert sorted(w.partition for w in record.workers) == [0, 1, 2, 3]
    info = record.backend_info
    assert info["rounds"] == 2
    states = {task: view["state"] for task, view in info["scheduler"].items()}
    assert states["task-0"] in ("FAILED", "CANCELLED") and states["task-1"] in ("TIMEOUT", "FAILED")
    assert {states[t] for t in states if t not in ("task-0", "task-1")} == {"COMPLETED"}
    crashes = {c["worker"]: c["error"] for c in info["crashes"]}
    assert set(crashes) == {"task-0", "task-1"}
    assert "task-0 ended without finishing (the scheduler says" in crashes["task-0"]
    assert "timed out at its time limit (1 min)" in crashes["task-1"] and "timed out" not in crashes["task-0"]
    by_task = {w.partition: w.worker_id for w in record.workers}
    assert by_task[0] == "task-0" and {by_task[p] for p in (1, 2, 3)}.isdisjoint({"task-0", "task-1"})


def test_ctrl_c_cancels_the_array_and_keeps_the_finished_partitions(many_partitions, tmp_path):
    """The driver in a process of its own, given SIGINT once a task has finished a partition (and while task 1
    hangs on partition 15): scancel ends the array (nothing of it left in squeue, CANCELLED in sacct), the
    record is "interrupted" with what finished, and collect refuses the cancelled job."""
    results, data = tmp_path / "r", tmp_path / "data"
    shutil.copytree(many_partitions, data)
    stuck = data / json.loads((data / "manifest.json").read_text())["partitions"][15]["file"]
    args = ["run", "--backend", "hpc", "--slurm", "--tasks", "2", "--data", data, "--batch-size", "2",
            "--precision", "fp32", "--results", results, "-q"]  # fmt: skip
    driver = subprocess.Popen([sys.executable, "-m", "cai_bench", *map(str, args)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)  # fmt: skip
    killer = threading.Timer(300, driver.kill)
    killer.start()
    try:
        # Partition 15 a FIFO nobody writes, once the driver has checked the data: task 1 hangs there, so the
        # array is still running at the interrupt, however fast the rest goes
        _wait_for(lambda: list(results.glob("hpc-jobs/*/tasks")))
        stuck.unlink()
        os.mkfifo(stuck)
        _wait_for(lambda: any(e["event"] == "unit" for t in ("task-0", "task-1") for e in _task_events(results, t)))
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        killer.cancel()
    assert driver.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    (record,) = ResultsStore(results).read()
    assert record["status"] == "interrupted" and 0 < len(record["workers"]) < 20
    assert 15 not in {w["partition"] for w in record["workers"]}
    (saved,) = (results / "jobs").glob("*.json")
    state = json.loads(saved.read_text())["state"]
    ids = state["scheduler_ids"]
    assert state["cancelled"] and state["cancelled_utc"]
    squeue = ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)]
    # nothing of the array left running or waiting, once its tasks' ends are through (COMPLETING a moment)
    _wait_for(lambda: subprocess.run(squeue, capture_output=True, text=True).stdout.strip() == "", 30, 0.2)
    assert "CANCELLED" in {s["State"].split()[0] for s in _wait_for(lambda: _sacct(ids), 30).values()}
    finished = {w["partition"] for w in record["workers"]}
    in_files = {e["unit"] for t in ("task-0", "task-1") for e in _task_events(results, t) if e["event"] == "unit"}
    assert finished == in_files  # every partition a task wrote before it was cancelled, and no other
    job_id = next((results / "hpc-jobs").iterdir()).name
    code = subprocess.run([sys.executable, "-m", "cai_bench", "collect", job_id, "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert code.returncode == 2 and "cancelled" in code.stderr


def test_dask_jobqueue_puts_the_workers_on_slurm_and_cancels_them_after(cli, tiny_data, tmp_path):
    """``--dask-jobqueue slurm``: two Dask workers as SLURM jobs (dask-jobqueue's sbatch), TLS to a scheduler on
    loopback; the jobs end with the command, and the certificates' folder goes with them."""
    pytest.importorskip("dask_jobqueue")
    from cai_bench.backends.dask.cluster import close_clusters

    results = tmp_path / "r"
    code, _, err = cli("run", "--backend", "dask", "--dask-jobqueue", "slurm", "--workers", "2", "--threads", "2",
                       "--data", str(tiny_data), "--precision", "fp32", "--runtime", "torch", "--repeats", "1",
                       "--warmup", "0", "--results", str(results), "--dask-wait-s", "120")  # fmt: skip
    assert code == 0, err
    record = json.loads((results / "runs.jsonl").read_text().splitlines()[-1])
    about = record["backend_info"]["dask"]
    assert about["cluster"] == "jobqueue-slurm" and about["scheduler"].startswith("tls://127.0.0.1:")
    assert {w["name"] for w in about["workers"].values()} == {"cai-bench-0", "cai-bench-1"}
    assert all(w["address"].startswith("tls://127.0.0.1:") for w in about["workers"].values())
    assert sorted(w["partition"] for w in record["workers"]) == [0, 1, 2, 3]
    assert record["environment"]["machine_id"] == "dask-jobqueue | slurm"
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    assert "dask-worker" in jobs  # the workers are SLURM jobs, held for the command's later repeats
    (secrets,) = results.glob("cai-bench-dask-*")  # the certificates the jobs read, this user's alone
    assert secrets.stat().st_mode & 0o077 == 0
    close_clusters()  # what the command's exit does
    _wait_for(lambda: "dask-worker" not in subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True,
                                                           text=True, check=True).stdout)  # fmt: skip
    assert not list(results.glob("cai-bench-dask-*"))  # the run's certificates are gone
    assert list((results / "dask-jobqueue-logs").glob("*.out"))  # the jobs' output beside the results
