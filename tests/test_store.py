"""The results store never loses a measurement: torn lines, unwritable directories, two writers, bad records."""

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY_GB, TINY_MB, hand_record, write_store
from test_cli import one_error_line

from cai_bench.commands import runner
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.core.records import RunRecord, summarize_run
from cai_bench.data import datasets
from cai_bench.data.partitions import open_dataset
from cai_bench.store.jsonl import ResultsStore

ROOT = Path(__file__).resolve().parent.parent


def _record(run_id: str) -> RunRecord:
    return RunRecord(
        run_id=run_id, created_utc="2026-12-01T00:00:00Z", status="ok", backend="cpu", repeat=1, repeats=1,
        plan=hand_record("cpu", 1.0)["plan"], weights={"weights": "random-init"}, environment={"host": "h"},
        summary=summarize_run([], 1.0), workers=[],
    )  # fmt: skip


def test_an_append_after_a_torn_last_line_moves_the_torn_bytes_aside(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.append(_record("first"))
    whole = store.path.read_bytes()
    torn = b'{"run_id": "killed mid-li'
    store.path.write_bytes(whole + torn)
    store.append(_record("second"))
    assert [r["run_id"] for r in store.read()] == ["first", "second"] and store.skipped == []
    assert store.path.read_bytes().startswith(whole)
    (aside,) = tmp_path.glob("runs.jsonl.torn-*")
    assert aside.read_bytes() == torn
    err = capsys.readouterr().err
    assert f"moved aside to {aside}" in err and f"({len(torn)} bytes" in err


def test_a_torn_store_with_no_newline_at_all_keeps_only_the_new_record(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.path.write_bytes(b'{"half": ')
    store.append(_record("only"))
    assert [r["run_id"] for r in store.read()] == ["only"]
    assert len(list(tmp_path.glob("runs.jsonl.torn-*"))) == 1
    assert "torn" in capsys.readouterr().err


def test_results_that_cannot_be_written_are_refused_before_any_work(cli, tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for results in (blocker, blocker / "below"):
        code, out, err = cli("run", "--data", tiny_data, "--results", results, "-q", "--threads", "1")
        assert code == 2 and out == ""
        assert "cannot write results here" in one_error_line(err)
    code, _, err = cli("sweep", "--gb", "0.001", "--precision", "fp32", "--results", blocker, "-q")
    assert code == 2 and "cannot write results here" in one_error_line(err)
    assert not datasets.synthetic_dir(0.001, 25.0, 0).exists()  # refused before its data was generated


def test_a_record_that_cannot_be_written_is_printed_and_kept_in_a_fallback_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    store = ResultsStore(tmp_path / "results")
    store.path.mkdir(parents=True)  # the store's file is now a directory: opening it for appending fails
    with pytest.raises(UserError, match="cannot write the record of run lost-1") as info:
        store.append(_record("lost-1"))
    (fallback,) = (tmp_path / "tmp").glob("cai-bench-unsaved-lost-1-*.jsonl")
    assert str(fallback) in str(info.value)
    assert fallback.stat().st_mode & 0o077 == 0  # its user's alone, as the store's directory may not be
    saved = json.loads(fallback.read_text())
    assert saved["run_id"] == "lost-1"
    assert json.loads(capsys.readouterr().out)["run_id"] == "lost-1"


def _sweep(results: Path, cache: Path) -> subprocess.Popen:
    args = ["--gb", str(TINY_GB), "--partition-mb", str(TINY_MB), "--batch-size", "8,16,32", "--repeats", "2"]
    args += ["--precision", "fp32"]
    env = {**os.environ, "CAI_BENCH_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "cai_bench", "sweep", *args, "--threads", "1", "-q", "--results", str(results)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.long
def test_two_sweeps_into_one_results_directory_measure_each_point_once(tmp_path, monkeypatch):
    """About 30 s on 2 cores: two sweep processes at once, on one lock per point."""
    results, cache = tmp_path / "r", tmp_path / "cache"
    monkeypatch.setenv("CAI_BENCH_CACHE", str(cache))
    datasets.cached_synthetic(TINY_GB, TINY_MB, 0)  # the data exists before either starts
    first = _sweep(results, cache)
    time.sleep(0.5)
    second = _sweep(results, cache)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    store = ResultsStore(results)
    counts = Counter((r["plan"]["batch_size"], r["repeat"]) for r in store.runs())
    assert counts == Counter({(b, r): 1 for b in (8, 16, 32) for r in (1, 2)})
    appended = [int(out.split(" record(s) appended")[0].split()[-1]) for out, _ in outputs]
    assert sum(appended) == 6


def _valid_record(tiny_data, tmp_path) -> dict:
    _, summary, refs = open_dataset(tiny_data)
    store = ResultsStore(tmp_path / "source")
    runner.execute(make_plan("cpu", summary, refs, threads=1, batch_size=32, precision="fp32"), store)
    return store.read()[0]


def _mutations(record: dict, rng: random.Random, count: int):
    """(where, record) pairs, each with one field deleted or replaced by a value of another type."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append((*path, key))
                if len(path) < 3:
                    walk(value, (*path, key))
        elif isinstance(node, list) and node and len(path) < 3:
            paths.append((*path, 0))
            walk(node[0], (*path, 0))

    walk(record, ())
    values = [None, "x", -1, 0, 1.5e308, [], {}, True, [1, "a"], {"k": None}]
    for _ in range(count):
        path = rng.choice(paths)
        mutated = {**json.loads(json.dumps(record)), "run_id": "mutant"}  # ``results show ID`` finds one record
        node = mutated
        for step in path[:-1]:
            node = node[step]
        if rng.random() < 0.3 and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = rng.choice(values)
        yield ".".join(map(str, path)), mutated


def test_malformed_records_are_one_line_naming_their_line_in_every_reader(cli, tiny_data, tmp_path):
    record = _valid_record(tiny_data, tmp_path)
    rng = random.Random(11)
    commands = [("results", "list"), ("results", "export"), ("results", "show", record["run_id"]), ("report",)]
    for number, (where, mutated) in enumerate(_mutations(record, rng, 240)):
        results = tmp_path / f"r{number}"
        write_store(results, [record, mutated])
        command = commands[number % len(commands)]
        code, _, err = cli(*command, "--results", results)
        assert code in (0, 2), (where, command, err)
        assert "Traceback" not in err, (where, command, err)
        if code == 2:
            assert ":2: " in one_error_line(err), (where, command, err)


@pytest.mark.long
@pytest.mark.parametrize("count", [6, pytest.param(25, marks=pytest.mark.full)])
def test_malformed_records_do_not_break_plot(cli, tiny_data, tmp_path, count):
    """Mutated stores, each plotted (matplotlib draws every figure each time: about 1 s a store on 2 cores):
    make test plots the first 6 mutations, make test-full all 25."""
    record = _valid_record(tiny_data, tmp_path)
    rng = random.Random(5)
    for number, (where, mutated) in enumerate(_mutations(record, rng, count)):
        results = tmp_path / f"r{number}"
        write_store(results, [record, mutated])
        code, _, err = cli("plot", "--results", results, "--out-dir", tmp_path / f"fig{number}")
        assert code in (0, 2) and "Traceback" not in err, (where, err)
        if code == 2:
            assert ":2: " in one_error_line(err), (where, err)


def test_a_valid_json_line_that_is_not_a_record_is_reported_with_its_line(cli, tmp_path):
    write_store(tmp_path, [hand_record("cpu", 1.0), {"schema_version": "1.0", "run_id": 7}])
    code, _, err = cli("report", "--results", tmp_path)
    assert code == 2
    assert one_error_line(err).endswith("runs.jsonl:2: not a valid run record: run_id is 7, expected a string")
