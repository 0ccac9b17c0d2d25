"""``cai-bench compare``: synthetic stores whose medians and spreads are chosen, through the command line; the
exact rank test against hand-counted values."""

from __future__ import annotations

import json

import pytest
from conftest import hand_record, write_store

from cai_bench.analysis.compare import p_greater

BASE = [20.0, 20.2, 19.8, 20.1, 19.9]  # each repeat over the 10 s a valid measurement needs


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
    assert p_greater([21, 21.1, 21.2, 21.3, 21.4], BASE) == pytest.approx(1 / 252)
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
    assert point["invalid"] == [] and point["p_holm"] == pytest.approx(1 / 252)  # one point: Holm changes nothing
    code, _, err = cli("compare", before.parent, after.parent, "--factor", "1.2")
    assert code == 0, err  # within the factor: not a failure, however sure
    code, out, _ = cli("compare", after.parent, before.parent)
    assert code == 0 and "no matched point worse" in out  # faster is never a failure


def test_the_same_medians_with_overlapping_spreads_pass(cli, tmp_path):
    noisy = [18.0, 23.0, 20.0, 17.4, 22.0]
    before, after = write_store(tmp_path / "a", runs(BASE)), write_store(tmp_path / "b", runs(noisy))
    code, out, err = cli("compare", before.parent, after.parent, "--format", "markdown")
    assert code == 0, err
    assert "| point |" in out and "ok" in out.splitlines()[2]


def test_samples_per_s_fails_when_it_falls(cli, tmp_path):
    before, after = write_store(tmp_path / "a", runs(BASE)), write_store(tmp_path / "b", runs([w * 1.1 for w in BASE]))
    code, out, _ = cli("compare", before.parent, after.parent, "--metric", "samples_per_s", "--format", "json")
    assert code == 1 and json.loads(out)["points"][0]["ratio"] == pytest.approx(1 / 1.1)


def test_a_point_the_candidate_lacks_fails_unless_allowed_and_one_it_adds_is_listed(cli, tmp_path):
    before = write_store(tmp_path / "a", runs(BASE) + runs(BASE, gb=2.0))
    after = write_store(tmp_path / "b", runs(BASE) + runs(BASE, gb=4.0))
    code, out, err = cli("compare", before.parent, after.parent)
    assert code == 1, err
    assert "only in the baseline: hpc · 2 GB" in " ".join(out.split()) and "MISSING from the candidate" in out
    code, out, err = cli("compare", before.parent, after.parent, "--allow-missing")
    assert code == 0, err
    assert "only in the baseline: hpc · 2 GB" in " ".join(out.split())
    assert "only in the candidate: hpc · 4 GB" in " ".join(out.split())


def test_commits_and_filters_pick_sides_from_one_store(cli, tmp_path):
    store = write_store(tmp_path / "r", runs(BASE, commit="aaaaaaa111", workers=1)
                        + runs([w * 1.2 for w in BASE], commit="bbbbbbb222", workers=2))  # fmt: skip
    code, _, err = cli("compare", "aaaaaaa", "bbbbbbb", "--results", store.parent, "--format", "json")
    # nothing measured on both sides is not a pass: the key that keeps them apart is named
    assert code == 2 and "the sides differ in workers" in err and "--across workers" in err
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


def test_ties_get_the_exact_permutation_p_not_the_normal_approximation():
    # 2 of the C(7, 3) = 35 ways to split the pooled values give a U this large: p = 0.057 (the approximation: 0.037)
    assert p_greater([1.5, 1.6, 1.7], [1.0, 1.1, 1.2, 1.5]) == pytest.approx(2 / 35)
    assert p_greater([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert p_greater([2.0, 2.0, 3.0], [1.0, 2.0, 1.0]) == pytest.approx(
        p_by_enumeration([2.0, 2.0, 3.0], [1.0, 2.0, 1.0])
    )


def p_by_enumeration(xs, ys):
    """Every split of the pooled values counted by brute force: the p the exact test must give."""
    from itertools import combinations

    pooled, n = xs + ys, len(xs)

    def u(a, b):
        return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)

    seen = u(xs, ys)
    splits = list(combinations(range(len(pooled)), n))
    hits = sum(u([pooled[i] for i in c], [pooled[i] for i in range(len(pooled)) if i not in c]) >= seen for c in splits)
    return hits / len(splits)


def test_a_candidate_with_tied_repeats_is_not_called_regressed_by_the_approximation(cli, tmp_path):
    before = write_store(tmp_path / "a", runs([10.0, 11.0, 12.0, 15.0]))
    after = write_store(tmp_path / "b", runs([15.0, 16.0, 17.0]))
    code, out, err = cli("compare", before.parent, after.parent, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["points"][0]["p_value"] == pytest.approx(2 / 35)


def test_too_few_repeats_to_ever_fail_is_refused_and_says_how_many_are_needed(cli, tmp_path):
    # 1.49x slower with 2 repeats a side: the smallest p is 1/6, so the test can never fail
    before = write_store(tmp_path / "a", runs([20.0, 20.2]))
    after = write_store(tmp_path / "b", runs([29.8, 30.0]))
    code, _, err = cli("compare", before.parent, after.parent)
    assert code == 2 and "repeats enough for the test to fail" in err and "3 a side" in err
    assert len(err.strip().splitlines()) == 1
    # beside a point that can fail, it is listed as such and not counted as a pass
    write_store(tmp_path / "a", runs([20.0, 20.2]) + runs(BASE, gb=2.0))
    write_store(tmp_path / "b", runs([29.8, 30.0]) + runs(BASE, gb=2.0))
    code, out, err = cli("compare", before.parent, after.parent)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "1 matched point(s) with too few repeats" in flat and "1 compared that could fail" in flat
    code, out, _ = cli("compare", before.parent, after.parent, "--format", "json")
    blind = [p for p in json.loads(out)["points"] if not p["can_fail"]]
    assert len(blind) == 1 and blind[0]["needs"].startswith("2 and 5 repeats, or 3 a side")


def test_an_empty_side_or_a_filter_that_matches_nothing_is_refused(cli, tmp_path):
    before = write_store(tmp_path / "a", runs(BASE))
    (tmp_path / "empty").mkdir()
    code, _, err = cli("compare", before.parent, tmp_path / "empty")
    assert code == 2 and "nothing to compare" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("compare", "workers=1", "workers=3", "--results", before.parent)
    assert code == 2 and "workers=1: no finished run" in err


def test_two_machines_are_two_points_unless_compared_across_them(cli, tmp_path):
    here = write_store(tmp_path / "a", runs(BASE))
    there_runs = runs([w * 1.3 for w in BASE])
    for record in there_runs:
        record["environment"].update(host="beta", cpu_model="Xeon B")
    there = write_store(tmp_path / "b", there_runs)
    code, _, err = cli("compare", here.parent, there.parent)
    assert code == 2 and "the sides differ in machine" in err and "--across machine" in err
    code, out, err = cli("compare", here.parent, there.parent, "--across", "machine", "--format", "json")
    assert code == 1, err
    assert json.loads(out)["points"][0]["ratio"] == pytest.approx(1.3)


def test_invalid_runs_are_not_compared_and_nothing_valid_is_exit_2(cli, tmp_path):
    tiny = [1.0, 1.1, 0.9, 1.05, 0.95]  # too short to be a measurement
    before = write_store(tmp_path / "a", runs(tiny))
    after = write_store(tmp_path / "b", runs([w * 3 for w in tiny]))
    code, _, err = cli("compare", before.parent, after.parent)
    assert code == 2 and "no matched point is a valid measurement, so nothing was compared" in err, err
    assert "under 10 s" in err and len(err.strip().splitlines()) == 1
    # beside a valid point: listed as not compared, and neither a pass nor a failure
    write_store(tmp_path / "a", runs(tiny) + runs(BASE, gb=2.0))
    write_store(tmp_path / "b", runs([w * 3 for w in tiny]) + runs(BASE, gb=2.0))
    code, out, err = cli("compare", before.parent, after.parent, "--format", "json")
    assert code == 0, err
    done = json.loads(out)
    assert done["not_comparable"] == 1 and done["correction"] == "Holm over 1 point(s)"
    (invalid,) = [p for p in done["points"] if not p["comparable"]]
    assert not invalid["regressed"] and invalid["p_holm"] is None


def test_a_zero_wall_gives_no_infinity_in_json(cli, tmp_path):
    zero = runs([20.0, 20.0, 20.0])
    for record in zero:
        record["summary"]["wall_s"] = 0.0
    before = write_store(tmp_path / "a", zero + runs(BASE, gb=2.0))
    after = write_store(tmp_path / "b", runs([20.0, 20.1, 20.2]) + runs(BASE, gb=2.0))
    code, out, err = cli("compare", before.parent, after.parent, "--format", "json")
    assert code == 0, err
    assert "Infinity" not in out and "NaN" not in out
    (point,) = [p for p in json.loads(out)["points"] if not p["comparable"]]
    assert point["ratio"] is None and "ran 0.0 s" in point["invalid"][0]


def test_a_record_appended_twice_counts_once(cli, tmp_path):
    before = write_store(tmp_path / "a", runs(BASE) + runs(BASE, gb=2.0))
    # one slow run written three times over (merged stores): one measurement, not three repeats
    after = write_store(tmp_path / "b", runs([26.0]) * 3 + runs(BASE, gb=2.0))
    code, out, err = cli("compare", before.parent, after.parent, "--format", "json")
    done = json.loads(out)
    assert code == 0 and done["duplicates"] == 2 and done["regressions"] == 0, err
    (once,) = [p for p in done["points"] if not p["can_fail"]]
    assert once["candidate"] == [26.0]
    code, out, _ = cli("compare", before.parent, after.parent)
    assert "2 record(s) appeared twice (the same run id" in " ".join(out.split())


def test_many_points_are_corrected_for_false_alarms(cli, tmp_path):
    """Eight points each 1.1x slower with p = 1/20 (3 repeats a side): any one alone passes ALPHA by a hair, but
    over eight Holm asks p <= 0.05 / 8 of the best, which three repeats cannot give: refused, not failed."""
    before = write_store(tmp_path / "a", [r for gb in range(1, 9) for r in runs([20.0, 20.1, 20.2], gb=gb)])
    after = write_store(tmp_path / "b", [r for gb in range(1, 9) for r in runs([22.0, 22.1, 22.2], gb=gb)])
    code, _, err = cli("compare", before.parent, after.parent)
    assert code == 2 and "Holm's correction asks p <= 0.0063" in err, err
    before = write_store(tmp_path / "a", [r for gb in range(1, 9) for r in runs(BASE, gb=gb)])
    after = write_store(tmp_path / "b", [r for gb in range(1, 9) for r in runs([w * 1.1 for w in BASE], gb=gb)])
    code, out, _ = cli("compare", before.parent, after.parent, "--format", "json")
    done = json.loads(out)
    assert code == 1 and done["regressions"] == 8  # 1/252 each: 8/252 < 0.05 still
    assert all(p["p_holm"] == pytest.approx(8 / 252) for p in done["points"])
