"""Timelines: where a unit's pieces go, and the command that draws them (each backend's own timeline is checked
where its tests run it: tests/test_hpc.py, test_gpu.py, test_lambda.py, through conftest.check_timeline)."""

from __future__ import annotations

import json
import shutil

import pytest

from cai_bench.measure.timeline import Lane, Segment, Timeline, unit_segments


def test_a_units_pieces_end_where_it_ended_and_its_read_ends_where_it_began():
    unit = {"ended_epoch_s": 1000.0, "total_s": 4.0, "startup_s": 1.0, "wait_s": 0.5, "compute_s": 2.0,
            "load_s": 0.8}  # fmt: skip
    pieces = {s.kind: (s.start_s, s.end_s) for s in unit_segments(unit, origin=990.0, index=3)}
    assert pieces["startup"] == (6.0, 7.0) and pieces["wait"] == (7.0, 7.5)
    assert pieces["other"] == (7.5, 8.0) and pieces["compute"] == (8.0, 10.0)
    assert pieces["load"] == pytest.approx((6.7, 7.5))  # in the background, done by the time the unit ran
    assert {s.unit for s in unit_segments(unit, 990.0, index=3)} == {3}


def test_workers_busy_count_bridges_a_short_handover_but_not_a_real_pause():
    lanes = [Lane("a", [Segment(0, 1, "compute"), Segment(1.01, 2, "compute"), Segment(3, 4, "compute")]),
             Lane("b", [Segment(0.5, 3.5, "compute"), Segment(0, 0.5, "load")])]  # fmt: skip
    steps = Timeline("r", "hpc", 4.0, lanes).running()
    assert max(n for _, n in steps) == 2
    counts = {t: n for t, n in steps}
    assert counts[2] == 1 and counts[3] == 2 and counts[3.5] == 1 and counts[4] == 0  # a was idle from 2 to 3


def test_plot_draws_a_runs_timeline_and_each_backends_last(cli, measured_store, tmp_path):
    results = tmp_path / "r"
    results.mkdir()
    shutil.copy(measured_store, results / "runs.jsonl")
    (record,) = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]
    code, _, err = cli("plot", "--results", results, "--out-dir", tmp_path / "one", "--timeline",
                         record["run_id"][:20])  # fmt: skip
    assert code == 0, err
    (drawn,) = list((tmp_path / "one").iterdir())
    assert drawn.name == f"timeline-cpu-{record['run_id']}.png" and drawn.read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli("plot", "--results", results, "--out-dir", tmp_path / "all")
    assert code == 0, err
    assert (tmp_path / "all" / drawn.name).is_file()
    record["backend_info"]["crashes"] = [7]  # damaged where only a timeline reads it
    (results / "runs.jsonl").write_text(json.dumps(record) + "\n")
    code, _, err = cli("plot", "--results", results, "--out-dir", tmp_path / "bad", "--timeline", record["run_id"])
    assert code == 2 and "damaged where a timeline reads it" in err and len(err.strip().splitlines()) == 1
    record["backend_info"]["crashes"] = []
    for unit in record["workers"]:
        unit.pop("ended_epoch_s")  # as a record from before schema 1.1 holds it
    (results / "runs.jsonl").write_text(json.dumps(record) + "\n")
    code, _, err = cli("plot", "--results", results, "--out-dir", tmp_path / "old", "--timeline", record["run_id"])
    assert code == 2 and "no unit end times" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("plot", "--results", results, "--out-dir", tmp_path / "old")
    assert code == 0, err
    assert not [p for p in (tmp_path / "old").iterdir() if p.name.startswith("timeline")]
