"""The Lambda backend end to end on real protocols: boto3 -> the emulator's Invoke HTTP API -> the handler in
execution environments of their own (processes) -> S3 on moto's server, and back.

Fault tests run the handler in its no-model mode (read and verify each partition, hold it a while), so a unit
takes as long as the test needs; the end-to-end tests run the model."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from conftest import check_timeline

from cai_bench.backends.aws_lambda import handler
from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.emulator import Emulator
from cai_bench.backends.aws_lambda.environments import Faults, FunctionConfig, emulated_function_env
from cai_bench.backends.base import PartitionsFailed
from cai_bench.backends.dispatch import UNSTARTED_RETRIES
from cai_bench.benches import coldstart as bench_coldstart
from cai_bench.core import aws
from cai_bench.core.files import file_sha256
from cai_bench.core.plan import make_plan
from cai_bench.data.catalogue import read_catalogue
from cai_bench.data.partitions import open_dataset
from cai_bench.data.s3 import S3Prefix
from cai_bench.data.upload import upload_dataset

ALL = [0, 1, 2, 3]  # tiny_data's partitions


def lambda_plan(data, bucket: str, local_s3: str, **options):
    _, summary, refs = open_dataset(data)
    backend_options = {"emulate": True, "endpoint_url": local_s3, "bucket": f"s3://{bucket}", "max_concurrency": 2,
                       "memory_mb": 512, **options}  # fmt: skip
    return make_plan("lambda", summary, refs, precision="fp32", backend_options=backend_options)


def run_no_model(plan, faults: Faults | None = None, hold_s: float = 0.0):
    emitted = []
    run = run_lambda(plan, emitted.append, mode="no-model", hold_s=hold_s, emulator_faults=faults)
    return run, sorted(r.record.partition for r in emitted)


def test_throttled_calls_are_retried_with_backoff(s3, tiny_data, local_s3):
    run, emitted = run_no_model(lambda_plan(tiny_data, s3, local_s3), Faults(throttle_first=3))
    assert emitted == ALL
    assert run.info["throttled"] == 3 and run.info["emulator"]["throttled"] == 3
    assert run.info["retried_units"] == 0  # no unit ran when it was throttled: nothing is charged
    assert all(i["report"] is not None for i in run.info["invocations"])


def test_an_environment_killed_mid_unit_costs_that_unit_one_attempt(s3, tiny_data, local_s3):
    run, emitted = run_no_model(lambda_plan(tiny_data, s3, local_s3), Faults(kill={1: 1}, kill_after_s=0.2), 1.0)
    assert emitted == ALL  # each once: the retry's, and nothing from the killed attempt
    assert run.info["lost_workers"] == 1 and run.info["crashes"][0]["partition"] == 1
    died = [i for i in run.info["invocations"] if i["function_error"]]
    assert len(died) == 1 and died[0]["function_error"].startswith("Runtime.ExitError")
    assert run.info["retried"][0]["partition"] == 1 and run.info["retried"][0]["attempts"] == 1


def test_inits_past_lambdas_limit_run_again_in_the_invocation_and_the_record_says_so(s3, tiny_data, local_s3):
    """Every init overruns a limit lowered to 10 ms: each runs again inside its first invocation, as on Lambda,
    and the run finishes with nothing charged; the record counts the timed-out inits as cold starts."""
    run, emitted = run_no_model(lambda_plan(tiny_data, s3, local_s3, retries=0), Faults(init_limit_s=0.01))
    assert emitted == ALL and run.info["function_errors"] == 0 and run.info["retried_units"] == 0
    timed_out = [i["report"] for i in run.info["invocations"] if i["report"]["init_timeouts"]]
    assert timed_out and all(r["init_duration_ms"] is None and not r["init_failed"] for r in timed_out)
    assert run.info["init_timeouts"] == len(timed_out) == run.info["cold_starts"]
    assert run.info["emulator"]["cold_starts"] == 2 * len(timed_out)  # each dropped environment, and its fresh one


def test_units_whose_environment_never_came_up_go_back_uncharged_then_fail(s3, tiny_data, local_s3):
    """An init that overruns the function's timeout too (30 ms) never reaches the handler: with no retries, the
    unit is still tried on fresh environments, uncharged, UNSTARTED_RETRIES times, then fails for good."""
    plan = lambda_plan(tiny_data, s3, local_s3, retries=0, timeout_s=0.03, max_concurrency=1)
    plan = replace(plan, partitions=plan.partitions[:1])
    with pytest.raises(PartitionsFailed) as failed:
        run_no_model(plan, Faults(init_limit_s=0.01))
    info = failed.value.run.info
    assert info["invocations_made"] == UNSTARTED_RETRIES + 1 and info["units_returned_unstarted"] == UNSTARTED_RETRIES
    assert all(i["report"]["init_failed"] for i in info["invocations"])
    assert [c["started"] for c in info["crashes"]] == [False] * (UNSTARTED_RETRIES + 1)
    assert failed.value.failed[0]["errors"][-1].startswith("function error: Sandbox.Timedout")
    assert failed.value.kind == "time"  # what a benchmark's last line then says to lower: the concurrency


def test_the_timeline_of_a_lambda_run_marks_cold_starts_throttles_and_the_failed_invocation(s3, tiny_data, local_s3):
    """A lane per invoker, its invocations from the driver's log: an Init Duration where it was cold, a mark
    where it was throttled, the invocation whose environment was killed as failed, and its unit, run again
    elsewhere, hatched as retried."""
    emitted = []
    faults = Faults(throttle_first=2, kill={1: 1}, kill_after_s=0.2)
    run = run_lambda(lambda_plan(tiny_data, s3, local_s3), emitted.append, mode="no-model", hold_s=0.5,
                     emulator_faults=faults)  # fmt: skip
    record = {"run_id": "r", "backend": "lambda", "summary": {"wall_s": run.wall_s}, "backend_info": run.info,
              "workers": [asdict(r.record) for r in emitted]}  # fmt: skip
    line = check_timeline(record)
    invokers = {i["invoker"] for i in run.info["invocations"]}
    assert {lane.name for lane in line.lanes} == invokers
    marks = [what for lane in line.lanes for _, what in lane.marks]
    assert marks.count("cold start") == run.info["cold_starts"] and any(m.startswith("throttled") for m in marks)
    inits = [s for lane in line.lanes for s in lane.segments if s.kind == "init"]
    assert len(inits) == run.info["cold_starts"]
    (failed,) = [s for lane in line.lanes for s in lane.segments if s.kind == "failed"]
    assert failed.end_s > failed.start_s
    retried = [s for lane in line.lanes for s in lane.segments if s.retried and s.kind != "load"]
    assert len({s.unit for s in retried}) == 1  # the one unit whose environment was killed, hatched
    assert min(s.start_s for s in retried) >= failed.start_s  # its retry ran after the attempt that died


def test_a_unit_past_its_memory_is_killed_as_lambda_does_and_retried(s3, tiny_data, local_s3):
    run, emitted = run_no_model(lambda_plan(tiny_data, s3, local_s3, memory_mb=384), Faults(oom={2: 1}))
    assert emitted == ALL
    died = [i for i in run.info["invocations"] if i["function_error"]]
    assert len(died) == 1 and died[0]["function_error"].startswith("Runtime.OutOfMemory")
    assert died[0]["report"]["max_memory_used_mb"] == died[0]["report"]["memory_size_mb"] == 384
    assert run.info["memory_mb"] == 384


def test_max_memory_used_is_the_environments_own_not_the_drivers(s3, tiny_data, local_s3):
    """An environment is spawned from the driver's process; Linux carries a process's peak RSS across exec into
    ru_maxrss, so reading that reported the driver's memory as the function's. A driver holding 700 MB more
    must not move the figure (a no-model environment holds about 100 MB)."""
    held = np.ones(700 << 20, dtype=np.uint8)  # touched: resident in this process when the environments start
    run, emitted = run_no_model(lambda_plan(tiny_data, s3, local_s3, memory_mb=2048))
    assert emitted == ALL and held[-1] == 1
    used = [i["report"]["max_memory_used_mb"] for i in run.info["invocations"]]
    assert all(0 < mb < 400 for mb in used), used


def test_a_unit_past_its_timeout_fails_for_good_and_the_rest_is_kept(s3, tiny_data, local_s3):
    # 4 s: the others' attempts stay inside it at a 512 MB function's share of a core on a loaded machine
    plan = lambda_plan(tiny_data, s3, local_s3, timeout_s=4.0, retries=1)
    emitted = []
    with pytest.raises(PartitionsFailed) as failed:
        run_lambda(plan, emitted.append, mode="no-model", emulator_faults=Faults(hang={0: 10}))
    assert sorted(r.record.partition for r in emitted) == [1, 2, 3]
    (unit,) = failed.value.failed
    assert unit["partition"] == 0 and unit["attempts"] == 2
    assert all("Task timed out after 4.00 seconds" in error for error in unit["errors"])
    timed_out = [i for i in failed.value.run.info["invocations"] if i["function_error"]]
    assert [i["report"]["duration_ms"] for i in timed_out] == [4000.0, 4000.0]
    assert failed.value.run.cost_usd > 0  # what was billed is still counted


def test_a_partition_corrupted_in_s3_fails_every_attempt_and_the_rest_is_kept(s3, tiny_data, local_s3):
    upload_dataset(tiny_data, f"s3://{s3}/data")
    prefix = S3Prefix(s3, "data")
    _, _, refs = open_dataset(f"s3://{s3}/data")
    name = Path(refs[1].path).name
    data = bytearray(prefix.read(name))
    data[-10] ^= 0xFF  # same size, same header: only the checksum can tell
    prefix.write(name, bytes(data))
    _, summary, refs = open_dataset(f"s3://{s3}/data")
    options = {"emulate": True, "endpoint_url": local_s3, "max_concurrency": 2, "memory_mb": 512, "retries": 2}
    plan = make_plan("lambda", summary, refs, precision="fp32", backend_options=options)
    emitted = []
    with pytest.raises(PartitionsFailed) as failed:
        run_lambda(plan, emitted.append, mode="no-model")
    assert sorted(r.record.partition for r in emitted) == [0, 2, 3]
    (unit,) = failed.value.failed
    assert unit["partition"] == 1 and unit["attempts"] == 3
    assert all("sha256 does not match the manifest" in error for error in unit["errors"])
    assert failed.value.run.info["results"].startswith(f"s3://{s3}/data/runs/")  # beside the data, by default


def test_calls_beyond_the_concurrency_limit_get_429_and_are_retried(s3, tiny_data, local_s3, monkeypatch):
    extra = emulated_function_env(local_s3)
    emulator = Emulator(FunctionConfig(memory_mb=512), concurrency=1, extra_env=extra)
    url = emulator.serve()
    try:
        plan = lambda_plan(tiny_data, s3, local_s3, emulate=False, lambda_endpoint_url=url, max_concurrency=3)
        plan.backend_options.pop("emulate")
        plan.backend_options.pop("memory_mb")
        run, emitted = run_no_model(plan, hold_s=0.3)
    finally:
        emulator.stop()
    assert emitted == ALL
    assert emulator.throttled > 0 and run.info["throttled"] == emulator.throttled
    assert emulator.cold_starts == 1  # one environment at a time, reused warm
    reports = [i["report"] for i in run.info["invocations"]]
    assert sum(r["init_duration_ms"] is not None for r in reports) == 1
    assert run.info["memory_mb"] == 512  # read from the function's configuration


def test_every_unit_lands_once_with_many_invokers_and_several_units_each(s3, tiny_data, local_s3):
    plan = lambda_plan(tiny_data, s3, local_s3, max_concurrency=3, partitions_per_invocation=2)
    plan = type(plan)(**{**plan.__dict__, "partitions": plan.partitions * 3})  # 12 units over 4 partitions
    run, emitted = run_no_model(plan)
    assert emitted == sorted(ALL * 3)
    assert all(len(i["units"]) <= 2 for i in run.info["invocations"])
    aws.use_endpoints(local_s3, emulated=True)
    assert len(S3Prefix.parse(run.info["results"]).objects()) == 12  # one result object per unit


# ---------------------------------------------------------------------------------------------- with the model


def _records(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]


def test_an_emulated_run_goes_through_both_http_apis_end_to_end(cli, s3, local_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUSERSOWNKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "users-own-secret-never-to-be-seen-0000000")
    code, out, err = cli("run", "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--bucket",
                         f"s3://{s3}/cai", "--gb", "0.002", "--partition-mb", "0.52", "--precision", "fp32",
                         "--max-concurrency", "2", "--memory-mb", "3538", "--results", tmp_path / "r")  # fmt: skip
    assert code == 0, err
    (record,) = _records(tmp_path / "r")
    info, summary = record["backend_info"], record["summary"]
    assert record["status"] == "ok" and record["backend"] == "lambda" and summary["partitions"] == 4
    assert record["environment"]["machine_id"].startswith("lambda-emulator | ")
    assert len(info["invocations"]) == 4 and all(i["report"]["memory_size_mb"] == 3538 for i in info["invocations"])
    assert 1 <= info["cold_starts"] <= 2 and info["emulator"]["threads_per_environment"] >= 1
    billed = sum(i["report"]["billed_duration_ms"] for i in info["invocations"])
    expected = billed / 1000 * 3538 / 1024 * 0.0000166667 + 4 * 0.2e-6
    assert summary["cost_usd"] == pytest.approx(expected) and info["cost"]["requests"] == 4
    assert summary["throughput_bps"] > 0 and summary["sum_worker_throughput_bps"] > summary["throughput_bps"]
    assert summary["workers"] == 4  # each invocation is one function run, with its own throughput
    assert info["data"].startswith(f"s3://{s3}/cai/datasets/") and info["results"].startswith(f"s3://{s3}/cai/runs/")
    assert "cost $" in out and "cost: 4 requests" in out
    everything = (tmp_path / "r" / "runs.jsonl").read_text() + out + err
    assert "users-own-secret" not in everything and "AKIAUSERSOWNKEY" not in everything


def test_predict_on_lambda_with_weights_from_s3_writes_what_the_cpu_backend_writes(cli, s3, local_s3, tiny_data,
                                                                                  tmp_path):  # fmt: skip
    from safetensors.torch import save_file

    from cai_bench.model.astromae import build_model

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous().clone() for k, v in build_model(seed=5).state_dict().items()}, str(weights))
    S3Prefix(s3, "models").write("w.safetensors", weights.read_bytes())
    common = ["predict", "--data", tiny_data, "--precision", "fp32", "-q", "--results", tmp_path / "r"]
    code, _, err = cli(*common, "--weights", weights, "--out", tmp_path / "cpu.csv")
    assert code == 0, err
    code, _, err = cli(*common, "--weights", f"s3://{s3}/models/w.safetensors", "--backend", "lambda", "--emulate",
                       "--endpoint-url", local_s3, "--bucket", f"s3://{s3}", "--max-concurrency", "2",
                       "--out", tmp_path / "lambda.csv")  # fmt: skip
    assert code == 0, err
    cpu, far = (read_catalogue(tmp_path / f"{name}.csv")[0] for name in ("cpu", "lambda"))
    assert far["id"].tolist() == cpu["id"].tolist() == list(range(104))
    np.testing.assert_allclose(far["z_pred"], cpu["z_pred"], atol=1e-5)
    local, remote = (r["weights"] for r in _records(tmp_path / "r"))
    assert remote == {"weights": f"s3://{s3}/models/w.safetensors", "sha256": local["sha256"]}
    code, _, err = cli(*common, "--weights", f"s3://{s3}/models/w.safetensors", "--out", tmp_path / "x.csv")
    assert code == 2 and "s3:// weights are fetched by Lambda functions only" in err


def test_a_failed_unit_exits_1_and_every_finished_unit_is_recorded(cli, s3, local_s3, tiny_data, tmp_path):
    upload_dataset(tiny_data, f"s3://{s3}/data")
    prefix = S3Prefix(s3, "data")
    _, _, refs = open_dataset(f"s3://{s3}/data")
    name = Path(refs[3].path).name
    data = bytearray(prefix.read(name))
    data[-1] ^= 0x01
    prefix.write(name, bytes(data))
    code, _, err = cli("run", "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--data",
                       f"s3://{s3}/data", "--precision", "fp32", "--max-concurrency", "2", "--retries", "1",
                       "--results", tmp_path / "r", "-q")  # fmt: skip
    assert code == 1
    assert "partition 3" in err and "sha256 does not match" in err
    assert "to finish:" not in err  # nothing to lower: the partition itself is wrong
    (record,) = _records(tmp_path / "r")
    assert record["status"] == "failed" and sorted(w["partition"] for w in record["workers"]) == [0, 1, 2]
    assert record["summary"]["cost_usd"] > 0


@pytest.mark.full
def test_an_emulated_sweep_resumes_and_plots_beside_the_papers_lambda_curves(cli, tmp_path):
    """Over 20 s on 2 cores: two sweeps of two points each through the emulator, whose execution environments are
    processes that import the handler cold, then a plot. In make test-full: make test sweeps and resumes on the
    cpu, hpc and toy backends and runs the emulator in its other tests, and plots the paper's curves in
    tests/test_plot.py."""
    sweep = ["sweep", "--backend", "lambda", "--emulate", "--gb", "0.002", "--partition-mb", "0.52,1.04",
             "--precision", "fp32", "--repeats", "1", "--max-concurrency", "2",
             "--results", tmp_path / "r"]  # fmt: skip
    code, out, err = cli(*sweep)
    assert code == 0, err
    assert "2 record(s) appended" in out
    code, out, err = cli(*sweep)
    assert code == 0 and "0 record(s) appended" in out and "2 point(s) were already complete" in out
    assert all(r["summary"]["cost_usd"] > 0 for r in _records(tmp_path / "r"))
    code, _, err = cli("plot", "--results", tmp_path / "r", "--out-dir", tmp_path / "f", "--reference", "paper")
    assert code == 0, err
    assert (tmp_path / "f" / "wall-vs-partition-size.png").stat().st_size > 10_000
    assert (tmp_path / "f" / "wall-vs-data-size.png").stat().st_size > 10_000


@pytest.mark.long
def test_the_standalone_emulator_serves_runs_until_interrupted(cli, s3, local_s3, tiny_data, tmp_path):
    """About 30 s on 2 cores: the emulator started as its own command, a run through it, the emulator stopped by
    its signal."""
    import signal
    import subprocess
    import sys

    from conftest import default_sigint

    from cai_bench.backends.aws_lambda.local_s3 import free_port

    port = free_port()
    command = [sys.executable, "-m", "cai_bench", "lambda", "emulate", "--port", str(port), "--endpoint-url",
               local_s3, "--memory-mb", "2048", "--concurrency", "2"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=default_sigint)  # fmt: skip
    try:
        first = server.stdout.readline()
        assert first.startswith(f"Lambda Invoke API at http://127.0.0.1:{port}, function cai-bench (2048 MB")
        code, _, err = cli("run", "--backend", "lambda", "--lambda-endpoint-url", f"http://127.0.0.1:{port}",
                           "--endpoint-url", local_s3, "--bucket", f"s3://{s3}", "--data", tiny_data,
                           "--precision", "fp32", "--max-concurrency", "2", "--results", tmp_path / "r",
                           "-q")  # fmt: skip
        assert code == 0, err
        (record,) = _records(tmp_path / "r")
        assert record["backend_info"]["memory_mb"] == 2048  # the function's, read from its configuration
        assert record["environment"]["machine_id"].startswith("lambda-emulator | ")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            _, err = server.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0, err


def test_a_torch_free_function_runs_an_export_staged_in_s3(cli, s3, local_s3, tiny_data, tmp_path, weights_file,
                                                           exports):  # fmt: skip
    """--runtime onnxruntime on Lambda: the driver has the weights' export made where torch is (here, found in
    the cache, where the session's exports are) and stages it in S3; each execution environment fetches it once
    and never imports torch."""
    weights = weights_file
    common = ["predict", "--data", tiny_data, "--precision", "fp32", "-q", "--results", tmp_path / "r",
              "--weights", weights]  # fmt: skip
    code, _, err = cli(*common, "--out", tmp_path / "cpu.csv")
    assert code == 0, err
    code, _, err = cli(*common, "--backend", "lambda", "--emulate", "--endpoint-url", local_s3, "--bucket",
                       f"s3://{s3}", "--max-concurrency", "2", "--runtime", "onnxruntime",
                       "--out", tmp_path / "lambda.csv")  # fmt: skip
    assert code == 0, err
    cpu, far = (read_catalogue(tmp_path / f"{name}.csv")[0] for name in ("cpu", "lambda"))
    assert far["id"].tolist() == cpu["id"].tolist() == list(range(104))
    np.testing.assert_allclose(far["z_pred"], cpu["z_pred"], atol=1e-5)
    torch_run, lambda_run = _records(tmp_path / "r")
    info = lambda_run["backend_info"]
    assert info["runtime"] == "onnxruntime" and info["torch_imported"] is False and info["export_made"] is False
    assert lambda_run["weights"] == torch_run["weights"]  # named by the weights, not by the export
    assert S3Prefix.parse(info["staged_export"]).names() == ["export.json", "model.onnx"]


def test_an_export_in_the_image_is_read_there_and_checked_against_the_runs_weights(
    s3, local_s3, tiny_data, weights_file, exports
):
    """--export-in-image: no export staged in S3 and nothing fetched at a cold start (emulated, the image is this
    machine: the run's own export); an image export made from other weights is refused by the function."""
    plan = lambda_plan(tiny_data, s3, local_s3, runtime="onnxruntime", export_in_image=True)
    plan = replace(plan, weights=str(weights_file))
    emitted = []
    run = run_lambda(plan, emitted.append)
    assert sorted(r.record.partition for r in emitted) == ALL
    assert run.info["export_from"] == "image" and "staged_export" not in run.info
    assert run.info["startup"]["export_from"] == "image" and run.info["torch_imported"] is False
    assert not S3Prefix.parse(f"s3://{s3}/cai-bench/weights").names()
    made_from = {"source": "random-init", "sha256": None, "seed": 0}  # a run that names other weights
    with pytest.raises(ValueError, match="the image's export was made from"):
        handler._checked_export({"weights": str(exports["onnx"]), "export_weights": made_from})
    named = {"source": "elsewhere/seed7.safetensors", "sha256": file_sha256(weights_file), "seed": None}
    folder, figures = handler._checked_export({"weights": str(exports["onnx"]), "export_weights": named})
    assert folder == str(exports["onnx"]) and figures["export_from"] == "image"


def test_the_cold_start_benchmark_runs_each_arm_in_a_fresh_environment_at_the_batch_asked(
    tmp_path, weights_file, exports, capsys
):
    """make bench-coldstart shrunk: one cold start per arm, a 1 MB partition in batches of 16."""
    out = tmp_path / "cold.json"
    args = ["--runtimes", "onnxruntime", "--cold-starts", "1", "--partition-mb", "1", "--batch-size", "16",
            "--weights", str(weights_file), "--out", str(out)]  # fmt: skip
    assert bench_coldstart.main(args) == 0
    figures = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == figures and figures["batch_size"] == 16
    arms = figures["arms"]
    assert sorted(arms) == ["onnxruntime image", "onnxruntime s3"]
    for arm, source in (("onnxruntime s3", "s3"), ("onnxruntime image", "image")):
        (trial,) = arms[arm]["trials"]
        assert trial["cold"] and trial["export_from"] == source
        assert trial["batches"] == -(-figures["samples"] // 16) > 1
        assert trial["max_memory_used_mb"] > 0 and trial["duration_ms"] > 0
        assert arms[arm]["medians"]["first_invocation_ms"]["median"] == trial["duration_ms"]
    assert arms["onnxruntime s3"]["trials"][0]["fetch_s"] > arms["onnxruntime image"]["trials"][0]["fetch_s"]
