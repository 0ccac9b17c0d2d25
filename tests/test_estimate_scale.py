"""The mechanisms that grow with scale, each against a schedule worked out by hand: Lambda's scaling rate, a
scheduler's launch rate, a start rate (a Distributed Map's child executions, S3 GETs on one prefix), a write rate
(S3 PUTs on one prefix), and a straggler tail that grows with the number of units."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cai_bench.analysis import estimate
from cai_bench.analysis.estimate_model import Prices, Target
from cai_bench.analysis.estimate_profiles import BackendProfile
from cai_bench.backends.aws_lambda import pricing
from cai_bench.core.plan import samples_per_partition
from cai_bench.measure.simulate import Profile, Scenario, exponential_tail_scale, simulate

PRICES = Prices(pricing.PRICES)


def flat(cold=0.0, excess=(0.0,), **kw) -> Profile:
    excess = np.array(excess, dtype=float)
    return Profile("hand", 0.01, excess, np.zeros(len(excess)), np.array([cold]), **kw)


def units(count: int, seconds: float) -> np.ndarray:
    return np.full(count, round(seconds * 100))  # samples at 0.01 s each


def test_ten_thousand_units_through_a_scaling_rate_of_1000_every_10_s():
    """10,000 units of 100 s, room for 10,000 at once: environments come 1,000 every 10 s and none frees before
    the ramp's last step at 90 s, so the last thousand start at 90 s and end at 190 s; their path says 90 s of
    waiting for an environment and 100 s of compute."""
    scenario = Scenario(units(10_000, 100.0), 1, slots=10_000, create_every=1000, create_s=10.0)
    sim = simulate(flat(), scenario, 2, 0)
    assert sim.wall_s == pytest.approx([190.0, 190.0]) and list(sim.created) == [10_000] * 2
    assert sim.terms["waited_for_a_worker_s"] == pytest.approx([90.0] * 2)
    assert sim.terms["compute_s"] == pytest.approx([100.0] * 2)
    total = sum(sim.terms[name] for name in sim.terms)
    assert total == pytest.approx(sim.wall_s)  # the terms are the wall, all of it


def test_an_array_whose_tasks_start_2_per_second():
    """10 tasks of one 5 s unit, all 10 may run at once, but the scheduler starts 2 a second: task j starts at
    j / 2 s, the last at 4.5 s, and ends at 9.5 s."""
    scenario = Scenario(units(10, 5.0), 1, slots=10, create_every=1, create_s=0.5, groups=(1,) * 10)
    sim = simulate(flat(), scenario, 1, 0)
    assert sim.wall_s == pytest.approx([9.5])
    assert sim.terms["waited_for_a_worker_s"] == pytest.approx([4.5]) and sim.terms["compute_s"] == pytest.approx([5])


def test_a_prefix_saturated_at_3500_puts_a_second():
    """7,000 one-second units all at once: they all end at 1 s, and their 7,000 results are written one after
    another at 3,500 a second, the last at 1 + 7,000 / 3,500 = 3 s."""
    scenario = Scenario(units(7000, 1.0), 1, slots=7000, finish_per_s=3500.0)
    sim = simulate(flat(), scenario, 1, 0)
    assert sim.wall_s == pytest.approx([3.0])
    assert sim.terms["results_write_s"] == pytest.approx([2.0])
    # Units that end spread out are not held up: 700 units, one ending every 0.1 s
    spread = Scenario(np.arange(1, 701) * 10, 1, slots=700, finish_per_s=3500.0)
    assert simulate(flat(), spread, 1, 0).wall_s == pytest.approx([70.0 + 1 / 3500])


def test_units_start_no_faster_than_the_start_rate():
    """11,000 one-second units with room for all at once, released at 5,500 a second (the GETs of one prefix):
    the last starts at 10,999 / 5,500 s. With workers reused, the rate holds too."""
    scenario = Scenario(units(11_000, 1.0), 1, slots=11_000, start_per_s=5500.0)
    sim = simulate(flat(), scenario, 1, 0)
    assert sim.wall_s == pytest.approx([10_999 / 5500 + 1.0])
    assert sim.terms["start_rate_s"] == pytest.approx([10_999 / 5500])
    # 4 workers and 8 one-second units released 1 a second: each unit starts at its release, the last at 7 s
    slow = Scenario(units(8, 1.0), 1, slots=4, start_per_s=1.0)
    assert simulate(flat(), slow, 1, 0).wall_s == pytest.approx([8.0])


def test_a_fitted_tail_lets_the_slowest_unit_grow_with_the_number_of_units():
    """Measured excesses 0 to 1 s: drawn as measured, 10,000 units never take more than the slowest measured (1 s
    beyond typical); with the exponential tail fitted past the p90, the slowest of 10,000 goes past it, and the
    slowest of more units is slower."""
    excess = np.linspace(0.0, 1.0, 101)
    scale = exponential_tail_scale(excess)
    assert scale == pytest.approx(np.mean(excess[excess > 0.9] - 0.9))
    measured = flat(excess=excess)
    tailed = flat(excess=excess, tail_scale_s=scale)
    many = Scenario(units(10_000, 1.0), 1, slots=10_000)
    assert simulate(measured, many, 20, 3).wall_s.max() <= 2.0 + 1e-9
    walls = [np.median(simulate(tailed, Scenario(units(n, 1.0), 1, slots=n), 40, 3).wall_s) for n in (100, 10_000)]
    assert walls[1] > 2.0 and walls[0] < walls[1]
    assert exponential_tail_scale(np.zeros(20)) is None  # nothing past the p90: no tail to fit


def test_a_distributed_maps_throttled_children_back_off_and_try_again():
    """3,000 units of 50 s at a quota of 3,000: environments come 1,000 every 10 s, and every child of the Map
    tries at once. 1,000 run at 0 s; the rest are throttled and try again after 1, 2, 4, 8, ... s: the tries at
    1, 3 and 7 s find nothing, at 15 s a thousand get the environments created from 10 s, the last thousand wait
    on to 15 + 16 = 31 s (20 s: their environments) and end at 81 s, not at the 20 + 50 s a unit taking each
    environment the moment it may exist would."""
    scenario = Scenario(units(3000, 50.0), 1, slots=3000, create_every=1000, create_s=10.0,
                        retry_s=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0), in_flight=10_000)  # fmt: skip
    sim = simulate(flat(), scenario, 1, 0)
    assert sim.wall_s == pytest.approx([81.0]) and list(sim.created) == [3000]
    assert sim.terms["throttled_s"] == pytest.approx([31.0]) and sim.terms["waited_for_a_worker_s"] == [0.0]
    assert simulate(flat(), Scenario(units(3000, 50.0), 1, 3000, 1000, 10.0), 1, 0).wall_s == pytest.approx([70.0])
    assert list(sim.exhausted) == [0]  # the last thousand got theirs at the 5th of 6 retries
    one_retry = simulate(flat(), replace(scenario, retry_s=(1.0,)), 1, 0)
    assert list(one_retry.exhausted) == [2000]  # on AWS their children fail: the estimate says so
    # At most 2 children in flight: the third tries when the first ends, on its environment, warm
    few = Scenario(units(3, 50.0), 1, slots=10, retry_s=(1.0,), in_flight=2)
    sim = simulate(flat(cold=5.0), few, 1, 0)
    assert sim.wall_s == pytest.approx([105.0]) and list(sim.created) == [2]


# ---------------------------------------------------------------------------------------------- the named terms


def hand_source(**kw) -> BackendProfile:
    return BackendProfile(flat(**kw), 1, 1, 10_240, (), largest_gb=1.0)


def lambda_target(gb: float, mb: float, *terms, **kw) -> Target:
    return Target("lambda", gb, mb, concurrency=10_000, orchestrator="stepfunctions", terms=tuple(terms), **kw)


def test_each_term_changes_the_run_it_names_and_says_where_the_time_went():
    """5 GB in 10 MB partitions: 512 units of 5.11 s (511 samples a MB at the hand profile's 0.01 s each).
    Through a Map at 10,000 they all run at once, each reading in 2 GETs of 8 MB from a prefix that serves
    5,500 a second: the last starts at 511 / 2,750 s. Then one unit's time, and one page of listing (50 ms)."""
    source = hand_source()
    base = estimate.estimate(source, lambda_target(5, 10), PRICES, trials=1)
    unit_s = 0.01 * samples_per_partition(10)
    assert base.units == 512 and base.terms["start_rate_s"] == pytest.approx(511 / 2750)
    assert base.time_s_p50 == pytest.approx(511 / 2750 + unit_s + 0.05, abs=0.01)
    # Results written at 100 a second (and GETs in 10 MB parts): from the first unit's end, one every 10 ms; the
    # last unit ended 511 / 5,500 s after the first, and waited the rest
    put = estimate.estimate(source, lambda_target(5, 10, ("s3_put_per_s", 100.0), ("s3_part_mb", 10.0)), PRICES,
                            trials=1)  # fmt: skip
    assert put.time_s_p50 == pytest.approx(unit_s + 512 / 100 + 0.05)
    assert put.terms["results_write_s"] == pytest.approx(512 / 100 - 511 / 5500, abs=0.02)  # 510 or 511 samples
    # The Map starting 50 children a second: the last starts at 511 / 50 s
    start = estimate.estimate(source, lambda_target(5, 10, ("map_start_per_s", 50.0)), PRICES, trials=1)
    assert start.terms["start_rate_s"] == pytest.approx(511 / 50)
    # 4 partitions a child: 128 invocations of 4 units one after another; a GET and a PUT still per partition
    batched = estimate.estimate(source, lambda_target(5, 10, ("items_per_batch", 4.0)), PRICES, trials=1)
    assert batched.requests == 128 and batched.transitions == 129 and batched.cost["s3_puts"] == 512
    assert batched.time_s_p50 == pytest.approx(127 / (5500 / 5) + 4 * unit_s + 0.05, abs=0.02)  # 5 GETs each
    # A scaling rate of 100 every 10 s: children throttled, backing off to the environments the ramp adds
    ramp = estimate.estimate(source, lambda_target(5, 10, ("lambda_scaling_per_10s", 100.0)), PRICES, trials=1)
    assert ramp.terms["throttled_s"] > 30 and ramp.map_retries_exhausted == 0


@pytest.mark.parametrize(
    ("term", "says"),
    [
        ("no_such=1", "NAME one of lambda_scaling_per_10s"),
        ("s3_put_per_s", "NAME=VALUE"),
        ("s3_put_per_s=fast", "'fast' is not a number"),
        ("s3_put_per_s=0", "must be a positive number"),
        ("map_start_per_s=-5", "must be a positive number"),
    ],
)
def test_a_bad_term_is_one_line_and_exit_2(cli, term, says):
    code, _, err = cli("estimate", "--profile", "paper", "--gb", "10", "--term", term)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_the_command_prints_where_the_time_goes_and_warns_past_10x_and_of_a_failing_map(cli):
    code, out, err = cli("estimate", "--profile", "paper", "--gb", "1000", "--partition-mb", "100",
                         "--orchestrator", "stepfunctions", "--concurrency", "1000", "--map-concurrency", "10000",
                         "--trials", "5")  # fmt: skip
    assert code == 0, err
    text = " ".join(out.split())
    assert "1000 GB is 79x the largest size its profile was calibrated on (12.6 GB)" in text
    assert "children of the Map stay throttled past their last retry" in text
    assert (
        "where the time goes, lambda 10,240 MB x1,000, 1000 GB in 100 MB" in text and "throttled, backing off" in text
    )


def test_validate_paper_prints_error_and_coverage_by_extrapolation_and_draws_them(cli, tmp_path):
    figure = tmp_path / "validate.png"
    code, out, err = cli("estimate", "--validate", "paper", "--trials", "20", "--figure", figure)
    assert code == 0, err
    text = " ".join(out.split())
    assert "lambda calibrated from <= 4 GB only, the larger sizes predicted: 16 point(s)" in text
    for band in ("within the range (x <= 1)", "1-2x", "2-4x"):
        assert f"lambda extrapolated {band}:" in text
    assert figure.stat().st_size > 10_000
    code, out, _ = cli("estimate", "--validate", "paper", "--trials", "20", "--figure", figure, "--json")
    found = json.loads(out)
    assert {c["held_out"] for c in found["checks"]} >= {"from <= 4 GB", "12.6 GB left out"}
    assert [b["extrapolation"] for b in found["by_extrapolation"]["lambda"]] == ["within the range (x <= 1)", "1-2x",
                                                                               "2-4x"]  # fmt: skip


def test_an_arrays_tasks_at_once_are_held_to_the_free_cores():
    """8 tasks of one 1 MB unit (0.51 s), 8 at once unless the cluster has only 4 free cores for tasks of 2:
    then 2 at once, 4 rounds."""
    source = hand_source()
    target = Target("hpc", 8 / 1024, 1.0, tasks=8, array_tasks=8, cores_per_task=2)
    alone = estimate.estimate(source, target, PRICES, trials=1)
    held = estimate.estimate(source, replace(target, terms=(("free_cores", 4.0),)), PRICES, trials=1)
    unit_s = alone.time_s_p50  # 51 samples, and under a millisecond of reading through the shared file system
    assert unit_s == pytest.approx(0.51, abs=0.002) and held.time_s_p50 == pytest.approx(4 * unit_s, abs=0.004)
    assert held.terms["waited_for_a_worker_s"] == pytest.approx(3 * unit_s, abs=0.003)
