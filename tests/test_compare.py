"""``cai-bench compare``: synthetic stores whose medians and spreads are chosen, through the command line; the
exact rank test against hand-counted values."""

from __future__ import annotations

import json

import pytest
from conftest import hand_record, write_store

from cai_bench.compare import p_greater

BASE = [10.0, 10.1, 9.9, 10.05, 9.95]


def runs(walls: list[float], *, commit: str = "1111111aaaa", gb: float = 1.0, **options) -> list[dict]:
    out = []
    for wall in walls:
        record = hand_record("hpc", wall, gb=gb)
        record["environment"]["git_commit"] = commit
        record["plan"]["backend_options"] = dict(options)
        out.append(record)
    return out


def test_the_exact_rank_test_counts_orderings():
    assert p_greater([11, 11.1, 11.2], [10, 10.1, 10.2]) == pytest.approx(1 / 20)  # 1 of C(6,3) orderings
    assert p_greater([11, 11.1, 11.2, 11.3, 11.4], BASE) == pytest.approx(1 / 252)
    assert p_greater([10, 10.1, 10.2], [10.3, 10.4, 10.5]) == pytest.approx(1.0)
    assert 0.3 < p_greater([10.05, 10.3, 9.9], [10.0, 10.2, 9.8]) < 0.7


def test_a_ten_percent_slowdown_beyond_the_noise_fails_at_factor_1_05(cli, tmp_path):
    before, after = write_store(tmp_path / "a", runs(BASE)), write_store(tmp_path / "b", runs([w * 1.1 for w in BASE]))
    code, out, err = cli("compare", before.parent, after.parent, "--factor", "1.05", "--format", "json")
    assert code == 1, err
    done = json.loads(out)
    (point,) = done["points"]
    assert point["ratio"] == pytest.approx(1.1) and point["regressed"] and point["p_value"] == pytest.approx(1 / 252)
    assert done["regressions"] == 1 and done["test"].startswith("Mann-Whitney")
    code, _, err = cli("compare", before.parent, after.parent, "--factor", "1.2")
    assert code == 0, err  # within the factor: not a failure, however sure
    code, out, _ = cli("compare", after.parent, before.parent)
    assert code == 0 and "no matched point worse" in out  # faster is never a failure


def test_the_same_medians_with_overlapping_spreads_pass(cli, tmp_path):
    noisy = [9.0, 11.5, 10.0, 8.7, 11.0]
    before, after = write_store(tmp_path / "a", runs(BASE)), write_store(tmp_path / "b", runs(noisy))
    code, out, err = cli("compare", before.parent, after.parent, "--format", "markdown")
    assert code == 0, err
    assert "| point |" in out and "ok" in out.splitlines()[2]


def test_samples_per_s_fails_when_it_falls(cli, tmp_path):
    before, after = write_store(tmp_path / "a", runs(BASE)), write_store(tmp_path / "b", runs([w * 1.1 for w in BASE]))
    code, out, _ = cli("compare", before.parent, after.parent, "--metric", "samples_per_s", "--format", "json")
    assert code == 1 and json.loads(out)["points"][0]["ratio"] == pytest.approx(1 / 1.1)


def test_points_on_one_side_are_listed_not_failed(cli, tmp_path):
    before = write_store(tmp_path / "a", runs(BASE) + runs(BASE, gb=2.0))
    after = write_store(tmp_path / "b", runs(BASE) + runs(BASE, gb=4.0))
    code, out, err = cli("compare", before.parent, after.parent)
    assert code == 0, err
    assert "only in the baseline: hpc · 2 GB" in " ".join(out.split())
    assert "only in the candidate: hpc · 4 GB" in " ".join(out.split())


def test_commits_and_filters_pick_sides_from_one_store(cli, tmp_path):
    store = write_store(tmp_path / "r", runs(BASE, commit="aaaaaaa111", workers=1)
                        + runs([w * 1.2 for w in BASE], commit="bbbbbbb222", workers=2))  # fmt: skip
    code, out, _ = cli("compare", "aaaaaaa", "bbbbbbb", "--results", store.parent, "--format", "json")
    assert code == 0 and json.loads(out)["only_baseline"] and not json.loads(out)["points"]  # workers differ
    code, out, _ = cli("compare", "workers=1", "workers=2", "--results", store.parent, "--format", "json")
    assert code == 1 and json.loads(out)["points"][0]["ratio"] == pytest.approx(1.2)  # matched without workers
    code, out, _ = cli("compare", "backend=hpc,workers=2", "workers=1", "--results", store.parent)
    assert code == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("nowhere/at/all", "b"), "not a results directory, a git commit"),
        (("1234567", "workers=1"), "no finished run in"),
        (("workers", "workers=1"), "not a results directory"),
        (("a", "b", "--metric", "speed"), "--metric must be one of"),
        (("a", "b", "--factor", "0.9"), "--factor must be 1 or more"),
        (("a", "b", "--format", "html"), "--format must be"),
        (("backend=", "a"), "KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, says):
    store = write_store(tmp_path / "r", runs(BASE))
    for side in ("a", "b"):
        write_store(tmp_path / side, runs(BASE))
    named = [str(tmp_path / a) if a in ("a", "b") else a for a in args]
    code, _, err = cli("compare", *named, "--results", store.parent)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
