"""The one pre-run check that run, predict, bench and sweep share (``preflight.check_run``): what it refuses, in
one line each, before anything is made or run, and what it lets through."""

from __future__ import annotations

import pytest

from cai_bench.commands import preflight
from cai_bench.core.errors import UserError


@pytest.fixture
def results(tmp_path):
    return tmp_path / "results"


@pytest.mark.parametrize(
    ("backend", "points", "extra", "message"),
    [
        ("cpu", [({"workers": 2}, "auto")], {}, "--workers: not an option of --backend cpu"),
        ("cpu", [({}, "tf32")], {}, "--precision tf32: --backend cpu runs auto, fp32, bf16, int8"),
        ("cpu", [({"runtime": "onnxruntime"}, "bf16")], {}, "--precision bf16: --runtime onnxruntime runs auto, fp32"),
        ("cpu", [({"runtime": "openvino"}, "fp32")], {"engine": "reference"}, "--engine reference is torch's eager"),
        ("hpc", [({"workers": 1}, "fp32"), ({"workers": 0}, "fp32")], {}, "--workers must be at least 1, got 0"),
        ("hpc", [({"tasks": 2}, "fp32")], {}, "--tasks applies to SLURM arrays: add --slurm"),
        ("cpu", [({}, "fp32")], {"sizes": {"gb": float("inf")}}, "--gb must be a positive, finite number, got inf"),
        ("cpu", [({}, "fp32")], {"sizes": {"cycle_to_gb": 0}}, "--cycle-to-gb must be a positive, finite number"),
        ("cpu", [({}, "fp32")], {"detach": (1, 0)}, "--no-wait: --backend cpu runs while the command waits"),
        ("hpc", [({}, "fp32")], {"detach": (1, 0)}, "--no-wait submits a SLURM array: add --slurm"),
        ("cpu", [({}, "fp32")], {"weights": "s3://models/w.pt"}, "s3:// weights are fetched by Lambda functions"),
        ("tpu", [({}, "fp32")], {}, "unknown backend 'tpu'; available: cpu, hpc, gpu, lambda"),
        # what a plan is made of, checked here too (plan.check_settings), not once the data is there
        ("cpu", [({}, "fp32")], {"repeats": 0}, "--repeats must be at least 1, got 0"),
        ("cpu", [({}, "fp32")], {"warmup": -1}, "--warmup must be 0 or more, got -1"),
        ("cpu", [({}, "fp32")], {"batch_size": -4}, "--batch-size must be at least 1, got -4"),
        ("cpu", [({}, "bf16")], {"engine": "reference"}, "--engine reference is the eager float32 baseline"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("-") else None,
)
def test_what_cannot_run_is_one_line_before_anything_is_made(results, backend, points, extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        preflight.check_run(backend, points, results=results, **extra)


def test_a_run_asked_for_no_repeats_is_refused_before_its_data_is_generated(cli, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CAI_BENCH_CACHE", str(cache))
    code, _, err = cli("run", "--gb", "0.01", "--repeats", "0", "--results", tmp_path / "results")
    assert code == 2 and err.strip().endswith("--repeats must be at least 1, got 0")
    assert not cache.exists() or not any(cache.rglob("manifest.json"))  # no synthetic set was made first


def test_threads_over_what_this_process_may_use_are_refused_unless_oversubscribed(results, monkeypatch):
    monkeypatch.setattr(preflight, "allowed_cpus", lambda: 2)  # whatever this machine has
    with pytest.raises(UserError, match="--threads 3: this process may use 2 CPU"):
        preflight.check_run("cpu", [({}, "fp32")], results=results, threads=3)
    with pytest.raises(UserError, match="--lanes 4: .* pass --oversubscribe"):
        preflight.check_run("cpu", [({"lanes": 4}, "fp32")], results=results)
    with pytest.raises(UserError, match="--workers 3"):
        preflight.check_run("hpc", [({"workers": 1}, "fp32"), ({"workers": 3}, "fp32")], results=results)
    assert preflight.check_run("cpu", [({}, "fp32")], results=results, threads=3, oversubscribe=True)
    # A SLURM array's threads are on its nodes, not on this machine
    preflight.check_threads(64, {"slurm": True}, oversubscribe=False)


def test_a_results_directory_that_cannot_take_a_record_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write results here"):
        preflight.check_run("cpu", [({}, "fp32")], results=tmp_path / "file")


def test_weights_are_checked_once_as_every_worker_would_load_them(results, tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="w.safetensors: not a readable safetensors file"):
        preflight.check_run("cpu", [({}, "fp32")], results=results, weights=bad)
    named = preflight.check_run("lambda", [({"emulate": True}, "fp32")], results=results, weights="s3:/models/k.pt")
    assert named.weights == "s3://models/k.pt"  # as a Path folds it, named canonically


def test_what_passes_is_each_points_options_as_checked_the_default_batch_and_the_store(results):
    ready = preflight.check_run("hpc", [({"workers": 1, "lanes": None}, "fp32"), ({"workers": 2}, "bf16")],
                                results=results)  # fmt: skip
    # --runtime's default written out: auto on hpc, resolved by the runner before the run (tests/test_runtime_auto.py)
    assert ready.backend.name == "hpc" and ready.options == ({"workers": 1, "runtime": "auto"},
                                                             {"workers": 2, "runtime": "auto"})  # fmt: skip
    assert ready.batch_size == 512 and ready.weights is None
    assert ready.store.path == results / "runs.jsonl" and results.is_dir() and not ready.store.path.exists()
    assert preflight.check_run("cpu", [({}, "auto")], results=results, batch_size=64).batch_size == 64
