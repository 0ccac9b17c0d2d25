"""A record whose figures were not finite numbers when measured is kept with them stored as null (``non_finite``
names them): every reader leaves it out of what it computes, says how many, and never fails on it."""

from __future__ import annotations

import json

import pytest
from conftest import hand_record, write_store


def _store(tmp_path):
    """Five good hpc runs (a valid point) and one whose wall, rate and a worker's compute were NaN or inf."""
    records = [hand_record("hpc", 20.0 + i / 10) for i in range(5)]
    nulled = hand_record("hpc", 21.0)
    nulled["summary"].update(wall_s=None, samples_per_s=None)
    nulled["workers"][0]["compute_s"] = None
    nulled["non_finite"] = {"summary.wall_s": "inf", "summary.samples_per_s": "nan", "workers[0].compute_s": "nan"}
    return write_store(tmp_path / "store", [*records, nulled]).parent, nulled["run_id"]


@pytest.mark.parametrize(
    "args",
    [
        ("report",),
        ("report", "--format", "csv"),
        ("report", "--format", "json"),
        ("estimate", "--backend", "hpc", "--gb", "2", "--profile"),
        ("estimate", "--validate"),
    ],
)
def test_every_reader_leaves_a_nulled_record_out_and_says_so(cli, tmp_path, args):
    store, _ = _store(tmp_path)
    tail = (store,) if args[-1] in ("--profile", "--validate") else ("--results", store)
    code, out, err = cli(*args, *tail)
    assert code == 0, err
    assert "1 record(s) left out: figures that were not finite numbers" in " ".join(err.split()), err
    assert "summary.wall_s" in err and "NaN" not in out and "nan" not in out.lower().replace("nanos", "")


def test_the_report_counts_only_the_measured_repeats(cli, tmp_path):
    store, _ = _store(tmp_path)
    code, out, err = cli("report", "--results", store, "--format", "json")
    assert code == 0, err
    (point,) = json.loads(out)
    assert point["repeats"] == 5


def test_the_list_marks_the_nulled_figures_and_show_shows_the_record(cli, tmp_path):
    store, run_id = _store(tmp_path)
    code, out, err = cli("results", "list", "--results", store)
    assert code == 0, err
    row = next(line for line in out.splitlines() if run_id[:20] in line)
    assert row.count("null") == 2 and "1 record(s) hold figures that were not finite numbers" in " ".join(out.split())
    code, out, err = cli("results", "show", run_id, "--results", store)
    assert code == 0 and run_id in out, err


def test_compare_leaves_a_nulled_repeat_out(cli, tmp_path):
    store, _ = _store(tmp_path)
    code, out, err = cli("compare", store, store, "--format", "json")
    assert code == 0, err
    assert len(json.loads(out)["points"][0]["baseline"]) == 5
    assert "is kept but not reported: its summary.wall_s was inf" in " ".join(err.split())
