"""What the scheduler says of an array: its tasks' states (squeue, then sacct once they end), and the nodes
they ran on."""

from __future__ import annotations

import subprocess
import time

import psutil

from cai_bench.core.errors import describe

POLL_S = {"local": 0.5, "slurm": 10.0}  # squeue/sacct are shared by everyone on a cluster: ask them rarely


def job_running(kind: str, job) -> bool:
    if kind == "local" and getattr(job, "_process", None) is None:
        # rebuilt after the driver left: the local job id is the pid of submitit's controller process
        try:
            return psutil.Process(int(job.job_id)).status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, ValueError):
            return False
    return not job.done()


# ---------------------------------------------------------------------------------------------- the record


def state_of(job) -> str:
    try:
        return str(job.state)
    except Exception as exc:  # the scheduler's own tools failing (sacct down) must not lose the run
        return f"unknown ({type(exc).__name__})"


_SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "Elapsed", "NodeList")


_UNSETTLED = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def scheduler_view(kind: str, jobs: dict, settle_s: float = 30.0) -> dict:
    """What the scheduler says of each task: on SLURM sacct's state, exit code, start, end and nodes (one call,
    asked again for up to ``settle_s`` while a task is missing or still RUNNING there: the accounting hears of a
    start and an end a moment after the task); with the local executor, submitit's state of the process."""
    if kind != "slurm" or not jobs:
        return {task: {"state": state_of(job)} for task, job in sorted(jobs.items())}
    deadline = time.monotonic() + settle_s
    while True:
        view = _sacct_view(jobs)
        states = [v.get("state", "").split(" ")[0] for v in view.values() if isinstance(v, dict)]
        # A task sacct does not list yet (an array's pending tasks are one row until they start) is unsettled too
        settled = len(view) == len(jobs) and not any(s in _UNSETTLED for s in states)
        if "error" in view or settled or time.monotonic() > deadline:
            return view
        time.sleep(min(POLL_S["slurm"], 2.0))  # sacct is everyone's on a cluster: not faster than this


def _sacct_view(jobs: dict) -> dict:
    by_id = {job.job_id: task for task, job in jobs.items()}
    command = ["sacct", "-X", "-n", "--parsable2", "-o", ",".join(_SACCT_FIELDS), "-j", ",".join(by_id)]
    try:
        lines = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"sacct: {describe(exc)}"}
    view = {}
    for line in lines:
        fields = dict(zip(_SACCT_FIELDS, line.split("|"), strict=False))
        task = by_id.get(fields.get("JobID", ""))
        if task is not None:
            view[task] = {key.lower(): value for key, value in fields.items() if key != "JobID"}
            view[task]["job_id"] = fields["JobID"]
    return dict(sorted(view.items()))


def nodes_environment(ready: list[dict]) -> dict | None:
    """The record's machine is the nodes the tasks ran on, not the login node that submitted them.

    Its ``host`` is the cluster's name (stable from one array to the next, whichever nodes the scheduler
    picked), else the one node all tasks ran on; the nodes themselves are listed apart.
    """
    if not ready:
        return None
    first = ready[0]["environment"]
    nodes = sorted({e["environment"]["host"] for e in ready})
    models = sorted({e["environment"]["cpu_model"] for e in ready})
    out = {key: first[key] for key in ("os", "python", "packages", "cpu_physical_cores", "cpu_logical_cores")}
    out |= {key: first[key] for key in ("cpu_affinity", "cpu_capability", "memory_total_bytes", "gpus", "gpu_driver")}
    out["cpu_model"] = " + ".join(models)
    out["host"] = ready[0].get("cluster") or (nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes")
    out["nodes"] = nodes
    return out
