"""Sweeps: presets, grid expansion, and resuming after an interruption or a killed process."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY_GB, TINY_MB, default_sigint, hand_record, write_store

from cai_bench.analysis.results import point_key
from cai_bench.commands.sweep import make_sweep, run_sweep, sweep_state
from cai_bench.core.errors import UserError
from cai_bench.core.plan import SweepPoint, load_sweep_config
from cai_bench.data.datasets import synthetic_dir
from cai_bench.store.jsonl import ResultsStore

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROOT = CONFIGS.parent


def tiny_sweep(**overrides):
    axes = {"gb": [TINY_GB], "partition_mb": [TINY_MB], "batch_size": [16, 32], "repeats": 2, "threads": 1}
    return make_sweep(overrides={**axes, **overrides})


def ok_runs(store: ResultsStore) -> list[dict]:
    return store.runs()


# ---------------------------------------------------------------------------------------------- configs


def test_the_presets_load_and_expand():
    paper = make_sweep(load_sweep_config(CONFIGS / "paper.toml")[0])
    points = paper.points()
    assert paper.repeats == 3 and paper.name == "paper"
    # 7 sizes x 4 partition sizes at batch 512, plus batch 32..512 at 1 GB / 25 MB (512 counted once)
    assert len(points) == 7 * 4 + 5 - 1
    assert SweepPoint(12.6, 100.0, 512, "auto") in points and SweepPoint(1.0, 25.0, 32, "auto") in points
    quick = make_sweep(load_sweep_config(CONFIGS / "laptop-quick.toml")[0])
    assert len(quick.points()) == 7 and max(p.gb for p in quick.points()) <= 0.1
    # by name, from the package, wherever the command runs
    assert load_sweep_config("paper") == (load_sweep_config(CONFIGS / "paper.toml")[0], "paper (preset): ")
    assert load_sweep_config("laptop-quick.toml")[0] == load_sweep_config(CONFIGS / "laptop-quick.toml")[0]


def test_command_line_axes_replace_the_configs_and_scalars_override():
    config, _ = load_sweep_config(CONFIGS / "paper.toml")
    spec = make_sweep(config, overrides={"gb": [0.1], "backend": "gpu", "repeats": 1})
    assert {p.gb for p in spec.points()} == {0.1}
    assert {p.partition_mb for p in spec.points()} == {25.0, 50.0, 75.0, 100.0}
    assert (spec.backend, spec.repeats, spec.warmup) == ("gpu", 1, 0)


def test_backend_options_are_sweep_axes_in_presets_and_on_the_command_line(cli, tmp_path):
    node = make_sweep(load_sweep_config("hpc-node")[0])
    assert node.backend == "hpc" and [dict(p.backend_options) for p in node.points()] == [
        {"workers": 1},
        {"workers": 2},
    ]
    assert "workers 2" in node.points()[1].label()
    far = make_sweep(load_sweep_config("lambda-emulated")[0])
    assert far.backend == "lambda" and len(far.points()) == 4
    assert all(dict(p.backend_options) == {"emulate": True} for p in far.points())
    spec = make_sweep(load_sweep_config("hpc-node")[0], overrides={"backend_options": {"workers": [1, 4, 4]}})
    assert [dict(p.backend_options)["workers"] for p in spec.points()] == [1, 4]
    grid = {"backend": "hpc", "grid": [{"workers": [1]}, {"workers": 2, "lanes": [1, 2]}]}
    points = make_sweep(grid).points()
    assert [dict(p.backend_options) for p in points] == [{"workers": 1}, {"workers": 2, "lanes": 1},
                                                         {"workers": 2, "lanes": 2}]  # fmt: skip
    with pytest.raises(UserError, match="--workers must be at least 1, got 0"):
        make_sweep({"backend": "hpc", "workers": [1, 0]})
    with pytest.raises(UserError, match="unknown key 'workers'"):
        make_sweep({"backend": "cpu", "workers": [1, 2]})
    code, _, err = cli("sweep", "--backend", "cpu", "--workers", "1,2", "--results", tmp_path / "r")
    assert code == 2 and err.strip() == "error: --workers: not an option of --backend cpu"
    code, _, err = cli("sweep", "--backend", "hpc", "--workers", "1,two", "--results", tmp_path / "r")
    assert code == 2 and "--workers must be a whole number, got 'two'" in err
    assert not (tmp_path / "r" / "runs.jsonl").exists()


def test_defaults_make_one_point():
    assert make_sweep().points() == [SweepPoint(0.1, 25.0, 512, "auto")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("gbs = [1]", "unknown key 'gbs'"),
        ("[[grid]]\ngb = [1]\nbatch = [2]", "grid 1: unknown key 'batch'"),
        ("repeats = '3'", "repeats must be a whole number"),
        ("repeats = true", "repeats must be a whole number"),
        ("repeats = 0", "repeats must be at least 1"),
        ("gb = 1", "gb must be a non-empty list"),
        ("gb = [0]", "gb values must be positive"),
        ("batch_size = [32.5]", "batch_size values must be whole numbers"),
        ("precision = ['fp8']", "precision must be among auto, fp32, bf16, int8, tf32, fp16"),
        ("grid = 3", "grid must be a list of tables"),
        ("gb = [1", "not valid TOML"),
    ],
)
def test_bad_configs_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(UserError, match=message) as info:
        table, where = load_sweep_config(path)
        make_sweep(table, where=where)
    assert str(path) in str(info.value)


def test_a_missing_config_and_a_bad_list_option_exit_2(cli, tmp_path):
    code, _, err = cli("sweep", "--config", tmp_path / "nope.toml", "--results", tmp_path)
    assert code == 2 and "no such config file" in err
    code, _, err = cli("sweep", "--gb", "0.1,big", "--results", tmp_path)
    assert code == 2 and "--gb takes a comma-separated list of float values" in err
    code, _, err = cli("sweep", "--backend", "quantum", "--results", tmp_path)
    assert code == 2 and "quantum" in err


@pytest.mark.probe
def test_points_in_several_grids_run_once_and_points_on_the_same_data_run_together(tmp_path):
    table = {
        "grid": [
            {"gb": [0.1, 0.2], "batch_size": [512]},
            {"gb": [0.1], "batch_size": [32, 512]},
        ]
    }
    spec = make_sweep(table)
    assert len(spec.points()) == 3
    order = [(s.point.gb, s.point.batch_size) for s in sweep_state(spec, ResultsStore(tmp_path))]
    assert order == [(0.1, 512), (0.1, 32), (0.2, 512)]


# ---------------------------------------------------------------------------------------------- resuming


@pytest.mark.probe
def test_a_rerun_skips_what_the_store_holds_and_force_reruns_it(tmp_path):
    store = ResultsStore(tmp_path / "r")
    first = run_sweep(tiny_sweep(), store)
    assert len(first.records) == 4 and [s.todo for s in first.points] == [2, 2]
    again = run_sweep(tiny_sweep(), store)
    assert again.records == [] and [s.done for s in again.points] == [2, 2]
    assert len(ok_runs(store)) == 4
    forced = run_sweep(tiny_sweep(repeats=1), store, force=True)
    assert len(forced.records) == 2 and len(ok_runs(store)) == 6


@pytest.mark.probe
def test_more_repeats_later_runs_only_the_missing_ones(tmp_path):
    store = ResultsStore(tmp_path / "r")
    run_sweep(tiny_sweep(repeats=1), store)
    more = run_sweep(tiny_sweep(repeats=3), store)
    assert [(r.repeat, r.repeats) for r in more.records] == [(2, 3), (3, 3), (2, 3), (3, 3)]


@pytest.mark.probe
def test_records_of_other_machines_and_unfinished_runs_do_not_count(tmp_path):
    store = ResultsStore(tmp_path / "r")
    run_sweep(tiny_sweep(repeats=1, batch_size=[16]), store)
    (mine,) = store.read()
    other_machine = json.loads(json.dumps(mine))
    other_machine["environment"]["host"] = "elsewhere"
    failed = json.loads(json.dumps(mine))
    failed["status"] = "failed"
    write_store(tmp_path / "r", [other_machine, failed, hand_record("cpu", 1.0)])
    (state,) = sweep_state(tiny_sweep(repeats=1, batch_size=[16]), store)
    assert state.done == 0 and state.todo == 1
    assert state.key == point_key(mine["plan"], mine["environment"])


@pytest.mark.probe
def test_no_keep_data_deletes_only_what_the_sweep_generated(tmp_path):
    store = ResultsStore(tmp_path / "r")
    kept = synthetic_dir(TINY_GB, TINY_MB, 0)
    run_sweep(tiny_sweep(repeats=1, batch_size=[16]), store)  # generates and keeps the first data set
    assert kept.is_dir()
    spec = tiny_sweep(repeats=1, gb=[TINY_GB, 0.001], batch_size=[16, 32])
    run_sweep(spec, store, keep_data=False)
    assert kept.is_dir()
    assert not synthetic_dir(0.001, TINY_MB, 0).exists()
    assert len(ok_runs(store)) == 4


def _sweep_process(results: Path, cache: Path) -> subprocess.Popen:
    args = ["--gb", str(TINY_GB), "--partition-mb", str(TINY_MB), "--batch-size", "8,16,32", "--repeats", "2"]
    env = {**os.environ, "CAI_BENCH_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "cai_bench", "sweep", *args, "--threads", "1", "-q", "--results", str(results)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def _wait_for_records(path: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_bytes().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in {path} after {timeout} s")


def _repeats_per_point(store: ResultsStore) -> Counter:
    return Counter((r["plan"]["batch_size"], r["repeat"]) for r in store.runs())


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
@pytest.mark.probe
@pytest.mark.long
def test_a_sweep_stopped_mid_point_resumes_with_only_the_missing_repeats(tmp_path, how):
    """About 30 s on 2 cores: two sweep processes, each starting torch and the model and probing the precision,
    the first stopped for real mid-point."""
    results, cache = tmp_path / "r", tmp_path / "cache"
    store = ResultsStore(results)
    process = _sweep_process(results, cache)
    _wait_for_records(store.path, 3, process)  # point 2 of 3 has one of its two repeats: stop it mid-point
    process.send_signal(how)
    _, err = process.communicate(timeout=120)
    before = store.path.read_bytes()
    kept = ok_runs(store)
    assert 3 <= len(kept) < 6, "the sweep finished before it could be stopped"
    if how == signal.SIGINT:
        assert process.returncode == 130 and "Run the same command again to continue" in err
    else:
        assert process.returncode == -signal.SIGKILL

    process = _sweep_process(results, cache)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert store.path.read_bytes().startswith(before)  # nothing measured before was lost or rewritten
    # every point has exactly repeats 1 and 2, and the second sweep ran only what was missing
    assert _repeats_per_point(store) == Counter({(b, r): 1 for b in (8, 16, 32) for r in (1, 2)})
    assert f"{6 - len(kept)} record(s) appended" in out


def test_auto_points_resume_by_the_precision_they_run_as(tmp_path, monkeypatch):
    """The sweep probes 'auto' once: repeats measured as fp32 count for an auto point that runs as fp32, and
    not for one that runs as bf16 (the probe's answer forced each way, as on two kinds of CPU)."""
    store = ResultsStore(tmp_path / "r")
    run_sweep(tiny_sweep(repeats=1, batch_size=[16], precision=["fp32"]), store)
    monkeypatch.setenv("CAI_BENCH_FORCE_PROBE", "fp32")
    (as_fp32,) = sweep_state(tiny_sweep(repeats=1, batch_size=[16]), store)
    assert (as_fp32.precision, as_fp32.done, as_fp32.todo) == ("fp32", 1, 0)
    monkeypatch.setenv("CAI_BENCH_FORCE_PROBE", "bf16")
    (as_bf16,) = sweep_state(tiny_sweep(repeats=1, batch_size=[16]), store)
    assert (as_bf16.precision, as_bf16.done) == ("bf16", 0)
    outcome = run_sweep(tiny_sweep(repeats=1, batch_size=[16]), store)
    (record,) = outcome.records
    assert outcome.auto_precision["chose"] == "bf16"
    assert record.plan["precision"] == "bf16" and {w.precision for w in record.workers} == {"bf16"}


def test_records_from_before_a_plan_field_existed_are_still_repeats_of_their_point():
    record = hand_record("cpu", 1.0)
    older = json.loads(json.dumps(record))
    del older["plan"]["oversubscribe"], older["plan"]["cycle_to_gb"]
    assert point_key(older["plan"], older["environment"]) == point_key(record["plan"], record["environment"])
    marked = json.loads(json.dumps(record))
    marked["plan"]["oversubscribe"] = True
    assert point_key(marked["plan"], marked["environment"]) != point_key(record["plan"], record["environment"])
