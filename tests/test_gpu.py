"""The gpu backend. Without CUDA (this machine, CI) it refuses in one line; its whole device-worker path
(pinned-buffer pool, double-buffered padded batches, device stats, one process per device on the dispatcher)
runs here on the CPU device, chosen explicitly. Only what needs a real GPU is skipped, and says so."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import check_timeline

from cai_bench.backends.gpu.backend import run_devices
from cai_bench.backends.gpu.devices import parse_devices
from cai_bench.backends.gpu.host_buffers import PinnedPool
from cai_bench.commands.runner import execute
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible here)")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where no CUDA device is visible")


def plan_for(data, backend="gpu", **options):
    _, summary, refs = open_dataset(data)
    return make_plan(backend, summary, refs, precision="fp32", **options)


def by_object(results) -> dict[int, float]:
    return {int(i): float(p) for r in results for i, p in zip(r.object_id, r.prediction, strict=True)}


@no_cuda
def test_without_cuda_run_and_sweep_say_so_in_one_line(cli, tiny_data, tmp_path):
    code, _, err = cli("run", "--backend", "gpu", "--data", tiny_data, "--results", tmp_path / "r")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert "no CUDA device is visible here" in err and "--backend cpu" in err
    args = ["sweep", "--backend", "gpu", "--batch-size", "1024,4096", "--gb", "0.002", "--results", tmp_path / "r"]
    code, _, sweep_err = cli(*args)
    assert code == 2 and sweep_err == err
    assert not (tmp_path / "r" / "runs.jsonl").exists()


def test_the_device_worker_path_on_the_cpu_device_predicts_what_the_cpu_backend_predicts(tiny_data):
    # 4 partitions of 26 samples in batches of 10 that span partitions, both slots, two device workers
    cpu = execute(plan_for(tiny_data, "cpu", threads=1, batch_size=10), None)[0]
    emitted = []
    plan = plan_for(tiny_data, batch_size=10, backend_options={"read_ahead": 2})
    run = run_devices(plan, emitted.append, ["cpu", "cpu"])  # two device workers, one queue
    ours, theirs = by_object(emitted), by_object(cpu.results)
    assert ours.keys() == theirs.keys()
    np.testing.assert_allclose([ours[k] for k in sorted(ours)], [theirs[k] for k in sorted(theirs)], atol=1e-5)
    assert sorted(r.record.partition for r in emitted) == [0, 1, 2, 3]
    for result in emitted:
        record = result.record
        # 26 rows of a batch stream of 10 rows: in 3 batches, or 4 where they straddle a batch's edges
        assert record.batches in (3, 4) and record.batch_size == 10 and record.device == "cpu"
        assert len(result.prediction) == record.samples == 26  # the padding's outputs are dropped
        stats = record.device_stats
        assert stats["h2d_bytes"] == 26 * 20_520 and stats["h2d_s"] > 0
        assert 0 < stats["busy_s"] <= record.compute_s
    assert {r.record.worker_id for r in emitted} <= {"gpu-0", "gpu-1"}
    assert run.workers == 2 and run.info["devices"] == ["cpu", "cpu"]
    assert 0 < run.info["busy_fraction"] <= 1 and run.info["h2d_gbps"] > 0
    assert run.info["precision"] == "fp32" and run.info["cuda_graphs"] is False
    record = {"run_id": "r", "backend": "gpu", "summary": {"wall_s": run.wall_s}, "backend_info": run.info,
              "workers": [asdict(r.record) for r in emitted]}  # fmt: skip
    line = check_timeline(record, units_overlap=True)  # a lane per device; its batches span partitions
    assert {lane.name for lane in line.lanes} == {r.record.worker_id for r in emitted}


def test_a_device_worker_that_cannot_run_a_precision_says_so(tiny_data):
    plan = make_plan("gpu", *open_dataset(tiny_data)[1:], precision="fp16", batch_size=8)
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA device"):
        run_devices(plan, lambda result: None, ["cpu"])


def test_cpu_backends_refuse_the_cuda_precisions_in_one_line(cli, tiny_data, tmp_path):
    code, _, err = cli("run", "--backend", "cpu", "--precision", "fp16", "--data", tiny_data, "--results", tmp_path)
    assert code == 2 and err.strip() == "error: --precision fp16: --backend cpu runs auto, fp32, bf16, int8"


def test_the_pinned_pool_hands_out_a_fixed_number_of_reused_buffers():
    pool = PinnedPool(2, capacity=7, pin=False)
    first, second = pool.acquire(), pool.acquire()
    assert first.images.shape == (7, 5, 32, 32) and second.magnitudes.shape == (7, 5)
    assert first.magnitudes.dtype == torch.float64 and first is not second
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # both buffers are out: the third reader waits
    pool.release(first)
    waiter.join(5)
    assert got == [first]  # and gets the same memory back, not a new buffer


@pytest.mark.parametrize(("text", "held"), [("all", "all"), ("0,1", "0+1"), ("1+0", "1+0"), (" 2 ", "2")])
def test_devices_read_as_given(text, held):
    assert parse_devices(text) == held


@pytest.mark.parametrize("text", ["", "gpu0", "0,0", "-1"])
def test_bad_devices_are_one_clear_error(text):
    with pytest.raises(UserError, match="--devices"):
        parse_devices(text)


def test_the_gpu_benchmark_script_runs_end_to_end_shrunk_on_the_cpu(tmp_path, monkeypatch):
    from cai_bench.benches import gpu as bench_gpu

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    disk_pass = []
    real_run_devices = bench_gpu.backend.run_devices

    def spied(plan, emit, devices):
        disk_pass.append(plan.precision)
        return real_run_devices(plan, emit, devices)

    monkeypatch.setattr(bench_gpu.backend, "run_devices", spied)
    figures = bench_gpu.main(["--shrink", "--work-dir", str(tmp_path / "work")])
    assert figures["device"] == "cpu" and figures["shrunk"] is True
    assert disk_pass == [figures["precision"]] and figures["precision"] != "auto"  # chosen once, run by both
    assert figures["max_abs_dz"] <= 2e-3
    assert figures["target_samples"] >= figures["base_samples"] > 0
    for key in ("wall_s_host_memory", "wall_s_with_disk_reads", "samples_per_s_host_memory", "h2d_gbps"):
        assert figures[key] > 0
    # busy time as the records' parts add it up: the union of the forward passes, within the active time
    assert 0 < figures["device_busy_s"] <= figures["device_active_s"] <= figures["wall_s_host_memory"]
    assert figures["busy_fraction"] == pytest.approx(figures["device_busy_s"] / figures["device_active_s"])
    written = json.loads((tmp_path / "out" / "bench-gpu.json").read_text())
    assert written == figures


@needs_cuda
def test_on_a_gpu_the_chosen_precision_stays_within_tolerance_of_fp32(tiny_data):
    fp32, auto = [], []
    run_devices(plan_for(tiny_data, batch_size=64), fp32.append, ["cuda:0"])
    plan = make_plan("gpu", *open_dataset(tiny_data)[1:], precision="auto", batch_size=64)
    run_devices(plan, auto.append, ["cuda:0"])
    ours, theirs = by_object(auto), by_object(fp32)
    assert max(abs(ours[k] - theirs[k]) for k in ours) <= 2e-3


def test_a_device_worker_that_dies_loses_only_its_unit_which_another_device_runs(tmp_path):
    import os
    import signal

    from cai_bench.data.partitions import synthesize

    data = tmp_path / "data"
    synthesize(data, 0.01, 0.52, seed=5)  # 20 partitions of 26 samples
    plan = plan_for(data, batch_size=2, backend_options={"retries": 1, "read_ahead": 1})
    emitted, pids, killed = [], [], []

    def emit(result):
        emitted.append(result)
        if result.record.pid not in pids:
            pids.append(result.record.pid)
        if not killed and len(pids) == 2:  # both devices at work: kill the one that did not just report
            victim = next(p for p in pids if p != result.record.pid)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    run = run_devices(plan, emit, ["cpu", "cpu"])
    assert killed, "the test never saw both device workers at work"
    assert sorted(r.record.partition for r in emitted) == list(range(20))  # each exactly once
    (crash,) = run.info["crashes"]
    assert crash["pid"] == killed[0] and crash["exit"] == "signal 9"
    assert run.info["workers_started"] == 2  # no replacement on a device that failed: the other took its units
    redo = [r for r in emitted if r.record.partition == crash["partition"]]
    assert len(redo) == 1 and redo[0].record.pid != killed[0]


def test_make_bench_gpu_runs_the_venv_as_it_is_even_where_its_install_stamp_is_stale():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("needs make")
    root = Path(__file__).resolve().parent.parent
    # -W: as if pyproject.toml had just changed, which makes the install stamp stale; -n: print, run nothing
    stale = subprocess.run(["make", "-n", "-W", "pyproject.toml", "bench-gpu"], cwd=root, capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "cai_bench.benches.gpu" in stale and "pip install" not in stale
    dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", "bench-gpu-dry"], cwd=root, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "pip install" in dry  # the dry run, on a machine with a network, still installs first


@pytest.mark.parametrize(("cuda", "says"), [(None, "is a CPU build"), ("12.8", "sees no CUDA device")])
def test_where_bench_gpu_cannot_run_it_says_what_is_missing_in_one_line(monkeypatch, cuda, says):
    from cai_bench.benches import gpu as bench_gpu

    monkeypatch.setattr(torch.version, "cuda", cuda)
    line = bench_gpu.no_cuda_line()
    assert says in line and "\n" not in line


def test_a_gpu_runs_no_int8_neither_asked_for_nor_forced_on_the_probe(monkeypatch, tiny_data):
    from cai_bench.backends.gpu import backend, start
    from cai_bench.backends.registry import check_precision
    from cai_bench.inference.worker import EngineOptions

    with pytest.raises(UserError, match="--backend gpu runs auto, fp32, tf32, bf16, fp16"):
        check_precision(backend.create(), "int8")
    options = EngineOptions(batch_size=16, precision="int8", device="cpu")
    with pytest.raises(UserError, match="a device worker runs"):
        start.start_gpu_worker("w", options, None, 0, False)
    monkeypatch.setenv("CAI_BENCH_FORCE_PROBE", "int8")
    with pytest.raises(UserError, match="give fp32 or tf32 or bf16 or fp16"):
        start.choose_gpu_precision(None, torch.device("cpu"), True)


def test_tf32_is_set_from_the_precision_of_the_worker_whose_partition_runs(tiny_data):
    from cai_bench.backends.gpu import host_buffers, pipeline, start
    from cai_bench.inference.worker import EngineOptions

    _, _, refs = open_dataset(tiny_data)
    options = EngineOptions(batch_size=16, precision="fp32", device="cpu")
    labelled_tf32 = start.start_gpu_worker("a", options, None, 0, False)
    labelled_tf32.precision = "tf32"  # as a tf32 worker is on a GPU; the CPU device only stands in for one
    fp32 = start.start_gpu_worker("b", options, None, 0, False)  # a later worker, as bench-gpu's reference
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        pipeline.run_gpu_partition(host_buffers.read_into(None, refs[0], True), labelled_tf32, 0.0)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        pipeline.run_gpu_partition(host_buffers.read_into(None, refs[0], True), fp32, 0.0)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True  # torch's default


def test_the_devices_busy_time_is_given_over_the_wall_too_gaps_between_partitions_included():
    from types import SimpleNamespace

    from cai_bench.backends.gpu.backend import DeviceTotals

    totals = DeviceTotals()
    for busy, compute in ((0.8, 1.0), (0.9, 1.0)):  # two partitions, with a second's gap between them
        totals.add(SimpleNamespace(device_stats={"busy_s": busy, "active_s": compute, "h2d_bytes": 10, "h2d_s": 1e-9}))
    figures = totals.figures(wall_s=3.0)
    assert figures["busy_fraction"] == pytest.approx(0.85) and figures["busy_fraction_of_wall"] == pytest.approx(
        1.7 / 3
    )
    assert totals.figures(wall_s=3.0, devices=2)["busy_fraction_of_wall"] == pytest.approx(1.7 / 6)


@pytest.mark.parametrize(
    ("device", "visible", "environment", "local"),
    [
        ("cuda:1", None, {"CUDA_VISIBLE_DEVICES": "1"}, "cuda:0"),
        ("cuda:1", "4,6", {"CUDA_VISIBLE_DEVICES": "6"}, "cuda:0"),  # cuda:N counts the run's visible entries
        ("cuda:0", "GPU-5b1c", {"CUDA_VISIBLE_DEVICES": "GPU-5b1c"}, "cuda:0"),
        ("cpu", "3", {}, "cpu"),
    ],
)
def test_each_device_worker_sees_only_its_own_gpu(device, visible, environment, local):
    from cai_bench.backends.gpu.devices import device_visibility

    assert device_visibility(device, visible) == (environment, local)


def test_a_device_workers_records_name_the_device_as_the_run_does(tiny_data):
    from cai_bench.backends.gpu import host_buffers, pipeline, start
    from cai_bench.inference.worker import EngineOptions

    _, _, refs = open_dataset(tiny_data)
    options = EngineOptions(batch_size=16, precision="fp32", device="cpu")
    worker = start.start_gpu_worker("w", options, None, 0, False, label="cpu (as cuda:3)")
    result = pipeline.run_gpu_partition(host_buffers.read_into(None, refs[0], True), worker, 0.0)
    assert result.record.device == "cpu (as cuda:3)" == worker.choices["device"]


def test_under_bf16_the_output_layer_computes_in_float32_on_the_same_weights():
    from cai_bench.model.astromae import build_model
    from cai_bench.model.inference import Float32Linear, output_in_float32

    model = build_model(seed=3).eval()
    keys = list(model.state_dict())
    features = torch.randn(256, 1024)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = model.concat_block[2](features)
    assert rounded.dtype == torch.bfloat16
    assert output_in_float32(model) == "concat_block.2" and isinstance(model.concat_block[2], Float32Linear)
    assert list(model.state_dict()) == keys  # the weights keep their names
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept = model.concat_block[2](features)
    assert kept.dtype == torch.float32
    exact = features @ model.concat_block[2].weight.T.float() + model.concat_block[2].bias
    assert torch.allclose(kept, exact, atol=1e-5) and not torch.equal(kept, kept.bfloat16().float())


def test_a_bf16_device_worker_runs_its_output_layer_in_float32():
    from cai_bench.backends.gpu import start
    from cai_bench.inference.worker import EngineOptions
    from cai_bench.model.inference import Float32Linear

    bf16 = start.start_gpu_worker("w", EngineOptions(batch_size=16, precision="bf16", device="cpu"), None, 0, False)
    assert bf16.choices["float32_output_layer"] == "concat_block.2"
    assert isinstance(bf16.model.concat_block[2], Float32Linear)
    fp32 = start.start_gpu_worker("w", EngineOptions(batch_size=16, precision="fp32", device="cpu"), None, 0, False)
    assert "float32_output_layer" not in fp32.choices


def test_batches_span_partitions_and_give_each_its_outputs_once_in_order_equal_to_a_plain_forward(tiny_data):
    from cai_bench.backends.gpu import host_buffers, pipeline, start
    from cai_bench.data.partitions import read_partition
    from cai_bench.inference.worker import EngineOptions

    _, _, refs = open_dataset(tiny_data)  # 4 partitions of 26 galaxies
    units = [*refs, refs[0]]  # the first one twice, as --cycle-to-gb runs it
    options = EngineOptions(batch_size=16, precision="fp32", device="cpu")
    worker = start.start_gpu_worker("w", options, None, 0, False)
    stream = pipeline.PartitionStream(worker)
    finished = []
    for position, ref in enumerate(units):
        finished += stream.feed(position, host_buffers.read_into(None, ref, True), 0.0)
    # 130 rows in batches of 16: 8 launched while feeding; the last 2 rows, and the last unit, wait for the drain
    assert len(finished) == 4 and finished[-1][0] == 3
    finished += stream.drain()
    assert [position for position, _ in finished] == [0, 1, 2, 3, 4]  # each once, in order
    with torch.inference_mode():
        for position, result in finished:
            partition = read_partition(units[position])
            images = partition.images.contiguous(memory_format=torch.channels_last)
            plain = worker.model(images, partition.magnitudes.float())[:, 0].numpy()
            np.testing.assert_allclose(result.prediction, plain, atol=1e-5)
            assert result.record.partition == units[position].index and result.record.samples == 26
            assert result.record.batches == len(result.record.batch_latency_s) in (2, 3)


def test_where_a_batch_fails_every_partition_in_flight_fails_with_it(tiny_data, monkeypatch):
    from cai_bench.backends.gpu import host_buffers, pipeline, start
    from cai_bench.inference.worker import EngineOptions

    _, _, refs = open_dataset(tiny_data)
    options = EngineOptions(batch_size=32, precision="fp32", device="cpu")
    worker = start.start_gpu_worker("w", options, None, 0, False)
    stream = pipeline.PartitionStream(worker)
    assert stream.feed(7, host_buffers.read_into(None, refs[0], True), 0.0) == []  # 26 rows: the batch is not full yet

    def broken(worker, slot):
        raise RuntimeError("device lost")

    monkeypatch.setattr(pipeline, "forward_batch", broken)
    failed = stream.feed(8, host_buffers.read_into(None, refs[1], True), 0.0)  # fills the batch, which fails
    assert [position for position, _ in failed] == [7, 8] and all("device lost" in m for _, m in failed)
    monkeypatch.undo()
    again = stream.feed(9, host_buffers.read_into(None, refs[2], True), 0.0) + stream.drain()  # the stream starts empty
    assert [position for position, _ in again] == [9] and not isinstance(again[0][1], str)


def test_a_worker_checks_a_partitions_sha256_on_its_first_read_only(tiny_data):
    from cai_bench.backends.gpu.host_buffers import once_checked

    _, _, refs = open_dataset(tiny_data)
    reads = []
    load = once_checked(lambda ref, verify: reads.append((ref.index, verify)) or ref.index, verify=True)
    for ref in [*refs[:2], *refs[:2], refs[0]]:  # cycled, as --cycle-to-gb reads them
        load(ref)
    assert reads == [(0, True), (1, True), (0, False), (1, False), (0, False)]

    checks = []

    def corrupt_once(ref, verify):  # the first read fails its check: the next one checks again
        checks.append(verify)
        if len(checks) == 1:
            raise ValueError("sha256 mismatch")

    failing = once_checked(corrupt_once, verify=True)
    with pytest.raises(ValueError):
        failing(refs[0])
    failing(refs[0])
    failing(refs[0])
    assert checks == [True, True, False]
    unchecked = once_checked(lambda ref, verify: reads.append((ref.index, verify)), verify=False)
    unchecked(refs[3])
    assert reads[-1] == (3, False)


def test_reader_threads_are_the_cores_shared_between_the_devices_two_to_eight(monkeypatch):
    from cai_bench.backends.gpu import devices as gpu_devices

    for cores, devices, threads in ((2, 1, 2), (16, 1, 8), (16, 4, 4), (64, 8, 8), (4, 8, 2)):
        monkeypatch.setattr(gpu_devices, "allowed_cpus", lambda cores=cores: cores)
        assert gpu_devices.default_read_ahead(devices) == threads


def test_a_union_of_intervals_grows_by_what_each_new_one_extends_it():
    from cai_bench.backends.gpu.pipeline import DeviceUnion

    union = DeviceUnion()
    # [0, 2], [1, 3] overlapping, [3, 3.5] touching, [1.5, 2.5] inside, [5, 6] after a gap
    added = [union.add(a, b) for a, b in ((0, 2), (1, 3), (3, 3.5), (1.5, 2.5), (5, 6))]
    assert added == pytest.approx([2, 1, 0.5, 0, 1]) and union.total == pytest.approx(4.5)


def test_partitions_sharing_batches_split_the_devices_busy_time_and_their_parts_add_up_to_it(tiny_data, monkeypatch):
    """On the CPU stand-in: 26-row partitions in 16-row batches, so each partition's latency overlaps its
    neighbours'. The device's busy time, clocked here around every forward pass, is what the partitions' parts add
    up to; their latencies add up to more."""
    import time

    from cai_bench.backends.gpu import backend, host_buffers, pipeline, start
    from cai_bench.core.records import summarize_run
    from cai_bench.inference.worker import EngineOptions

    _, _, refs = open_dataset(tiny_data)
    worker = start.start_gpu_worker("w", EngineOptions(batch_size=16, precision="fp32", device="cpu"), None, 0, False)
    forwards, plain = [], pipeline.forward_batch

    def clocked(worker, slot):
        began = time.perf_counter()
        out = plain(worker, slot)
        forwards.append(time.perf_counter() - began)
        return out

    monkeypatch.setattr(pipeline, "forward_batch", clocked)
    stream, finished = pipeline.PartitionStream(worker), []
    for position, ref in enumerate(refs):
        finished += stream.feed(position, host_buffers.read_into(None, ref, True), 0.0)
    finished += stream.drain()
    records = [result.record for _, result in finished]
    totals = backend.DeviceTotals()
    for record in records:
        totals.add(record)
    parts = sum(r.busy_s for r in records)
    assert len(forwards) == 7  # 104 rows in batches of 16
    assert parts == pytest.approx(stream.busy.total, rel=1e-9) == pytest.approx(totals.busy_s, rel=1e-9)
    # the stream's batch clock holds the forward pass and the cast and copy-out around it
    assert sum(forwards) <= parts <= sum(forwards) * 1.5 + 0.01
    assert sum(r.compute_s for r in records) > 1.2 * parts  # latencies overlap: their sum counts batches twice
    assert totals.active_s == pytest.approx(stream.active.total) and parts <= totals.active_s
    assert totals.figures(wall_s=10.0)["busy_fraction"] == pytest.approx(parts / totals.active_s)
    summary = summarize_run(records, wall_s=10.0)  # the run's compute and rates are of busy time
    assert summary.compute_s == pytest.approx(parts)
    assert all(r.samples_per_s == pytest.approx(r.samples / r.busy_s) for r in records)


def test_the_gpu_precision_probe_times_its_candidates_taking_turns(monkeypatch):
    from cai_bench.backends.gpu import start

    order = []
    monkeypatch.setattr(start, "_time_once", lambda run, device, p: (order.append(p) or {"a": 2.0, "b": 1.0}[p],
                                                                    torch.zeros(1)))  # fmt: skip
    seconds, outputs = start._probe_seconds({"a": None, "b": None}, torch.device("cpu"), rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b"] and seconds == {"a": 2.0, "b": 1.0} and set(outputs) == {"a", "b"}


def test_bf16_is_native_on_a_gpu_only_without_emulation(monkeypatch):
    from cai_bench.inference import engine

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)  # fmt: skip
    assert engine.native_bf16(torch.device("cuda:0")) is False and asked == [False]
