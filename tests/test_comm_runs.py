"""Runs with --comm: an emulated Lambda run and an hpc run give the same per-partition results and accuracy as
without it, and the driver reads one aggregate; a worker that dies makes the others name it within their
deadline, and the driver falls back to the units' own results; a run whose ranks cannot all be alive at once
is refused before anything runs."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from cai_bench.backends import get_backend
from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.environments import Faults
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset
from cai_bench.measure.photoz import upstream_paper_metrics

pytest.importorskip("submitit")


def _plan(data, backend: str, **options):
    _, summary, refs = open_dataset(data)
    return make_plan(backend, summary, refs, precision="fp32", batch_size=16, threads=2, backend_options=options)


def by_partition(results) -> dict[int, tuple]:
    return {r.record.partition: (r.object_id.tolist(), r.prediction.tolist(), r.redshift.tolist()) for r in results}


def _global(results) -> dict:
    return upstream_paper_metrics(
        np.concatenate([r.prediction for r in results]), np.concatenate([r.redshift for r in results])
    )


def _same_accuracy(from_sums: dict, computed: dict) -> None:
    for name in ("mae", "mse", "bias", "r2", "outlier_fraction"):
        assert from_sums[name] == pytest.approx(computed[name], rel=1e-9, abs=1e-12), name
    assert from_sums["samples"] == computed["samples"]


def test_an_emulated_lambda_run_with_comm_gives_the_same_results_and_its_driver_reads_one_aggregate(
    s3, tiny_data, local_s3, redis_url, weights_file, exports
):
    """Two emulated Lambda runs of the model (with and without --comm) on ONNX Runtime, whose execution
    environments start without importing torch (the session's export of the weights, from the cache)."""
    base = {"emulate": True, "endpoint_url": local_s3, "bucket": f"s3://{s3}", "max_concurrency": 2,
            "partitions_per_invocation": 2, "memory_mb": 3008, "runtime": "onnxruntime"}  # fmt: skip
    alone, together = [], []
    plan = _plan(tiny_data, "lambda", **base)
    run_lambda(type(plan)(**{**plan.__dict__, "weights": str(weights_file)}), alone.append)
    plan = _plan(tiny_data, "lambda", **base, comm=redis_url, comm_timeout_s=30.0)
    run = run_lambda(type(plan)(**{**plan.__dict__, "weights": str(weights_file)}), together.append)
    assert by_partition(together) == by_partition(alone)
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 1 and comm["unit_reads"] == 0  # one object read, not one per unit
    assert comm["world_size"] == 2 and [r["rank"] for r in comm["ranks"]] == [0, 1]
    assert not any("error" in r for r in comm["ranks"])
    _same_accuracy(comm["accuracy"], _global(alone))
    assert comm["compute_s_sum"] == pytest.approx(sum(r.record.compute_s for r in together))
    per_rank: dict[str, float] = {}  # a rank is one invocation: its units' compute, summed
    for r in together:
        per_rank[r.record.worker_id] = per_rank.get(r.record.worker_id, 0.0) + r.record.compute_s
    assert len(per_rank) == 2 and comm["compute_s_max"] == pytest.approx(max(per_rank.values()))
    assert all(r.record.comm_s is not None and r.record.comm_s > 0 for r in together)


@pytest.mark.parametrize("backend", ["hpc", "dask"])
def test_a_node_run_with_comm_gives_the_same_results_and_reads_one_aggregate(tiny_data, rendezvous_url, backend):
    """hpc's worker processes, and dask's embedded workers (each joins the collectives in a task of its own)."""
    if backend == "dask":
        pytest.importorskip("distributed")
    alone, together = [], []
    get_backend(backend).run(_plan(tiny_data, backend, workers=2, runtime="torch"), alone.append)
    plan = _plan(tiny_data, backend, workers=2, runtime="torch", comm=rendezvous_url, comm_timeout_s=30.0)
    run = get_backend(backend).run(plan, together.append)
    assert by_partition(together) == by_partition(alone)
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 1 and comm["world_size"] == 2
    assert sorted(r["worker"] for r in comm["ranks"]) == [f"{backend}-0", f"{backend}-1"]
    assert all(r["comm_s"] > 0 and "error" not in r for r in comm["ranks"])
    _same_accuracy(comm["accuracy"], _global(alone))
    assert comm["operations"]["barrier"]["channel"] == "direct"
    # The collectives run while the workers stop, after the last result: apart from the wall, not inside it
    assert max(r["comm_s"] for r in comm["ranks"]) <= run.info["workers_stop_s"] + 0.05


def test_an_invocation_that_dies_is_named_by_the_other_ranks_and_the_units_own_results_are_read(
    s3, tiny_data, local_s3, redis_url
):
    plan = _plan(tiny_data, "lambda", emulate=True, endpoint_url=local_s3, bucket=f"s3://{s3}", max_concurrency=4,
                 memory_mb=512, comm=redis_url, comm_timeout_s=3.0)  # fmt: skip
    emitted = []
    run = run_lambda(plan, emitted.append, mode="no-model", hold_s=0.5, emulator_faults=Faults(kill={1: 1}))
    assert sorted(r.record.partition for r in emitted) == [0, 1, 2, 3]  # nothing lost: the retry ran alone
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 0 and comm["unit_reads"] >= 3
    by_rank = {r["rank"]: r for r in comm["ranks"]}
    assert by_rank[1]["error"].startswith("function error")
    for rank in (0, 2, 3):
        assert "rank(s) 1 of run" in by_rank[rank]["error"], by_rank[rank]


def test_an_hpc_worker_killed_mid_run_is_named_and_every_partition_still_comes_back(many_partitions, redis_url):
    plan = _plan(many_partitions, "hpc", workers=2, retries=1, comm=redis_url, comm_timeout_s=3.0)
    emitted, killed = [], []

    def emit(result):
        emitted.append(result)
        if not killed and result.record.worker_id == "hpc-0":
            victim = next((r.record.pid for r in emitted if r.record.worker_id == "hpc-1"), None)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

    run = get_backend("hpc").run(plan, emit)
    assert killed
    assert len(emitted) == 20 and len({r.record.partition for r in emitted}) == 20
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 0
    (survivor,) = [r for r in comm["ranks"] if r["rank"] == 0]
    assert "rank(s) 1 of run" in survivor["error"]


def test_a_lambda_run_whose_ranks_cannot_all_be_alive_at_once_is_refused_before_anything_runs(tiny_data):
    plan = _plan(tiny_data, "lambda", emulate=True, max_concurrency=3, comm="redis://127.0.0.1:1/0")
    with pytest.raises(UserError, match=r"--comm needs all 4 invocations \(1 partition\(s\) each\) alive at once, but "
                                        r"--max-concurrency is 3"):  # fmt: skip
        run_lambda(plan, lambda result: pytest.fail("nothing may run"))
    with pytest.raises(UserError, match="a channel is direct://HOST:PORT"):
        get_backend("lambda").check({"comm": "tcp://x:1", "emulate": True})


def test_a_step_functions_map_with_comm_gives_every_unit_through_one_aggregate(s3, tiny_data, redis_url):
    """The Map's items learn their ranks from their units (each handler works its own out)."""
    plan = _plan(tiny_data, "lambda", emulate=True, orchestrator="stepfunctions", max_concurrency=4, memory_mb=512,
                 comm=redis_url, comm_timeout_s=30.0)  # fmt: skip
    emitted = []
    run = run_lambda(plan, emitted.append, mode="no-model")
    assert sorted(r.record.partition for r in emitted) == [0, 1, 2, 3]
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 1 and comm["unit_reads"] == 0 and comm["world_size"] == 4
    assert [r["rank"] for r in comm["ranks"]] == [0, 1, 2, 3] and not any("error" in r for r in comm["ranks"])
    assert comm["accuracy"] is None  # no model, no predictions: nothing to sum


def test_a_slurm_array_with_comm_gives_the_same_results_and_its_driver_reads_one_aggregate(
    tiny_data, redis_url, tmp_path, weights_file, exports
):
    """On ONNX Runtime: the array tasks start without importing torch (the session's export, from the cache)."""
    slurm = {"slurm": True, "slurm_executor": "local", "tasks": 2, "array_parallelism": 2, "runtime": "onnxruntime"}
    alone, together = [], []
    plan = _plan(tiny_data, "hpc", **slurm)
    plan = type(plan)(**{**plan.__dict__, "weights": str(weights_file), "work_dir": str(tmp_path / "a")})
    get_backend("hpc").run(plan, alone.append)
    plan = _plan(tiny_data, "hpc", **slurm, comm=redis_url, comm_timeout_s=30.0)
    plan = type(plan)(**{**plan.__dict__, "weights": str(weights_file), "work_dir": str(tmp_path / "b")})
    run = get_backend("hpc").run(plan, together.append)
    assert by_partition(together) == by_partition(alone)
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 1 and comm["unit_reads"] == 0 and comm["world_size"] == 2
    assert [r["rank"] for r in comm["ranks"]] == [0, 1] and not any("error" in r for r in comm["ranks"])
    _same_accuracy(comm["accuracy"], _global(alone))
    assert all(r.record.comm_s > 0 for r in together)


def test_an_array_whose_tasks_cannot_all_run_at_once_is_refused_with_comm(tiny_data, tmp_path):
    plan = _plan(tiny_data, "hpc", slurm=True, slurm_executor="local", tasks=4, array_parallelism=2,
                 comm="redis://127.0.0.1:1/0")  # fmt: skip
    plan = type(plan)(**{**plan.__dict__, "work_dir": str(tmp_path)})
    with pytest.raises(UserError, match=r"--comm needs all 4 array tasks alive at once, but at most 2 run at a time"):
        get_backend("hpc").run(plan, lambda result: pytest.fail("nothing may run"))


def test_an_array_task_killed_after_its_unit_is_named_and_every_unit_is_read_from_its_own_file(
    tiny_data, redis_url, tmp_path, weights_file, exports
):
    import json
    import threading
    import time

    plan = _plan(tiny_data, "hpc", slurm=True, slurm_executor="local", tasks=2, array_parallelism=2,
                 runtime="onnxruntime", comm=redis_url, comm_timeout_s=2.0)  # fmt: skip
    plan = type(plan)(**{**plan.__dict__, "weights": str(weights_file), "work_dir": str(tmp_path)})
    killed = []

    def kill_rank_1_after_its_unit():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for path in tmp_path.glob("hpc-jobs/*/tasks/task-1.jsonl"):
                events = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
                if any(e["event"] == "unit" for e in events):
                    os.kill(events[0]["pid"], signal.SIGKILL)
                    killed.append(events[0]["pid"])
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_rank_1_after_its_unit, daemon=True)
    watcher.start()
    emitted = []
    run = get_backend("hpc").run(plan, emitted.append)
    watcher.join(5)
    assert killed
    assert sorted(r.record.partition for r in emitted) == [0, 1, 2, 3]
    comm = run.info["comm"]
    assert comm["aggregate_reads"] == 0 and comm["unit_reads"] >= 3  # each unit's own file (the killed task's
    by_rank = {r["rank"]: r for r in comm["ranks"]}  # second unit: its own, or a retry's)
    assert 1 not in by_rank  # it died before it could say anything
    assert "rank(s) 1 of run" in by_rank[0]["error"], by_rank[0]
