"""``estimate``: the simulation against runs worked out by hand, profiles from records, the paper's calibration,
leave-one-out validation, and the command's answers to good and bad input."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import hand_record, write_store

from cai_bench.analysis import estimate, estimate_checks, estimate_model, estimate_profiles
from cai_bench.backends.aws_lambda import pricing
from cai_bench.core.errors import UserError
from cai_bench.measure.simulate import Profile, Scenario, simulate

PRICES = estimate_model.Prices(pricing.PRICES)


def flat_profile(rate=0.01, cold=2.0, excess=(0.0,), load=(0.0,), **kw) -> Profile:
    return Profile("hand", rate, np.array(excess, dtype=float), np.array(load, dtype=float), np.array([cold]), **kw)


# ---------------------------------------------------------------------------------------------- the simulation


def test_units_go_to_the_worker_that_frees_first_and_only_a_new_workers_first_unit_is_cold():
    # 10 units of 100 samples at 0.01 s each (1 s), 3 workers at once, a 2 s cold start: each worker starts cold
    # at 0 and ends its first unit at 3 s; the other 7 run warm, 3 + 3 + 1 one after another: the last ends at 6 s
    sim = simulate(flat_profile(), Scenario(np.full(10, 100), 20524, slots=3), trials=5, seed=0)
    assert sim.wall_s == pytest.approx(np.full(5, 6.0))
    assert sim.busy_s == pytest.approx(np.full(5, 3 * 2.0 + 10 * 1.0))
    assert sim.billed_ms == pytest.approx(np.full(5, 3 * 3000 + 7 * 1000))
    assert (sim.units, sim.slots) == (10, 3) and list(sim.created) == [3] * 5


def test_environments_are_created_at_lambdas_scaling_rate_and_any_free_one_takes_the_next_unit():
    # 2,500 one-second units and room for 3,000 at once: 1,000 environments at 0 s run the first 1,000 units and
    # stay warm; at 1 s they take the next 1,000, at 2 s the last 500. No unit waits for the ramp's 10 s step
    one_second = Scenario(np.full(2500, 100), 20524, slots=3000, create_every=1000, create_s=10.0)
    sim = simulate(flat_profile(cold=0.0), one_second, 3, 0)
    assert sim.wall_s == pytest.approx(np.full(3, 3.0)) and list(sim.created) == [1000] * 3
    # 8 s units, a 1 s cold start: the first 1,000 end at 9 s and take units 1,000-1,999 warm (ending at 17 s);
    # units 2,000-2,499 find none free at 10 s, the ramp's second step, and get new environments: 10 + 1 + 8 s
    eight = Scenario(np.full(2500, 800), 20524, slots=3000, create_every=1000, create_s=10.0)
    sim = simulate(flat_profile(cold=1.0), eight, 2, 0)
    assert sim.wall_s == pytest.approx(np.full(2, 19.0)) and list(sim.created) == [1500] * 2
    assert sim.busy_s == pytest.approx(np.full(2, 2500 * 8.0 + 1500 * 1.0))


@pytest.mark.parametrize("cold", [0.0, 0.5])
def test_more_concurrency_is_never_slower_all_else_equal(cold):
    # The case: 5,000 one-second units. Before, environment k could not start before (k // 1000) x 10 s
    # even with environment 0 long free: 5.0 s at 1,000, 11.0 s at 2,000, 41.0 s at 5,000
    units = Scenario(np.full(5000, 100), 20524, slots=1000, create_every=1000, create_s=10.0)
    walls = [simulate(flat_profile(cold=cold), replace(units, slots=c), 3, 0).wall_s for c in (1000, 2000, 5000)]
    assert all(w == pytest.approx(np.full(3, 5.0 + cold)) for w in walls)
    # Drawn units of several lengths, and many quotas: the same draws, and never slower with more
    profile = flat_profile(cold=cold, excess=np.linspace(0, 3, 17), load=np.zeros(17))
    scenario = Scenario(np.full(300, 100), 20524, slots=1, create_every=40, create_s=2.0)
    walls = [simulate(profile, replace(scenario, slots=c), 20, 4).wall_s for c in (1, 2, 5, 20, 39, 40, 41, 80, 300)]
    for fewer, more in itertools.pairwise(walls):
        assert (more <= fewer + 1e-9).all()


def test_a_new_environment_is_taken_even_where_its_cold_start_ends_later_than_a_busy_one_would_free():
    # What AWS does, so what more concurrency can cost: 1,500 units of 8 s, a 5 s cold start. At a quota of
    # 1,000 units 1,000-1,499 wait for warm environments: they start at 13 s and end at 21 s. At 2,000 they get
    # new environments at 10 s, which end at 10 + 5 + 8 = 23 s
    units = Scenario(np.full(1500, 800), 20524, slots=1000, create_every=1000, create_s=10.0)
    at_quota = simulate(flat_profile(cold=5.0), units, 1, 0).wall_s[0]
    raised = simulate(flat_profile(cold=5.0), replace(units, slots=2000), 1, 0).wall_s[0]
    assert (at_quota, raised) == pytest.approx((21.0, 23.0))


def test_an_array_runs_each_task_on_its_group_cold_as_slots_free_and_the_scheduler_launches():
    # 6 tasks of 2 one-second units, 2 at once, a 1 s start-up, launched one per 0.5 s: tasks start at 0, 0.5,
    # then as slots free (3, 3.5, 6, 6.5) and each takes 1 + 2 s
    scenario = Scenario(np.full(12, 100), 20524, slots=2, create_every=1, create_s=0.5, groups=(2,) * 6)
    sim = simulate(flat_profile(cold=1.0), scenario, 2, 0)
    assert sim.wall_s == pytest.approx(np.full(2, 9.5)) and list(sim.created) == [6, 6]
    assert sim.busy_s == pytest.approx(np.full(2, 6 * 3.0))
    # All 6 at once, reading 2,052,400 bytes per unit through 4.1 MB/s shared by 6: +3 s a unit
    shared = replace(scenario, slots=6, create_every=0, create_s=0.0, shared_read_bytes_per_s=6 * 20524 * 100 / 3)
    assert simulate(flat_profile(cold=1.0), shared, 1, 0).wall_s == pytest.approx([1.0 + 2 * 4.0])
    with pytest.raises(ValueError, match="groups must hold every unit"):
        replace(scenario, groups=(2, 2))


def test_a_stragglers_delay_does_not_grow_with_the_unit_and_the_cpu_share_scales_compute_not_reading():
    profile = flat_profile(cold=0.0, excess=(0.0, 5.0), load=(1e-6, 1e-6))
    scenario = Scenario(np.array([1000]), 1000, slots=1, compute_factor=2.0)
    walls = set(np.round(simulate(profile, scenario, 200, 1).wall_s, 9))
    # compute 10 s x 2, a delay of 0 or 5 s x 2, reading 1,000,000 bytes at 1 us each: 1 s
    assert walls == {21.0, 31.0}


def test_the_same_seed_gives_the_same_estimate_and_another_seed_other_draws():
    profile = flat_profile(excess=np.linspace(0, 3, 50), load=np.linspace(0, 1e-7, 50))
    scenario = Scenario(np.full(300, 1278), 20524, slots=40)
    first, again = simulate(profile, scenario, 50, 7), simulate(profile, scenario, 50, 7)
    other = simulate(profile, scenario, 50, 8)
    assert np.array_equal(first.wall_s, again.wall_s) and np.array_equal(first.billed_ms, again.billed_ms)
    assert not np.array_equal(first.wall_s, other.wall_s)


# ---------------------------------------------------------------------------------------------- the paper


def test_the_paper_profile_is_calibrated_on_the_points_it_is_given_and_predicts_the_others():
    one = estimate_profiles.paper_profile("lambda", calibrate_on=((12.6, 25.0),))
    assert one.profile.compute_excess_s.shape == (517,) and one.profile.unit_overhead_s_per_mb == 0  # one size
    target = estimate_model.Target("lambda", 12.6, 25.0, orchestrator="stepfunctions")
    calibrated = estimate.estimate(one, target, PRICES)
    assert calibrated.units == 517 and calibrated.time_s_p50 == pytest.approx(27.18)  # the median of its 3 runs
    assert calibrated.transitions == 518 and calibrated.requests == 517
    # All 28 points: an overhead per function and per MB (reading), fitted; fewer, longer functions take longer
    profile = estimate_profiles.paper_profile("lambda")
    assert profile.profile.unit_overhead_s_per_mb > 0 and profile.largest_gb == 12.6
    walls = [estimate.estimate(profile, replace(target, partition_mb=mb), PRICES).time_s_p50 for mb in (25, 50, 100)]
    assert walls[0] < walls[1] < walls[2]
    checks = estimate_checks.validate_paper(trials=50)
    assert not any(c.calibration for c in checks)  # every check is of a point its profile was not calibrated on
    lambda_checks = [c for c in checks if c.backend == "lambda"]
    assert len([c for c in lambda_checks if c.held_out.endswith("left out")]) == 28
    extrapolated = [c for c in lambda_checks if c.held_out == "from <= 4 GB"]
    assert len(extrapolated) == 16 and min(c.extrapolation for c in extrapolated) == 1.5


def test_extrapolating_the_papers_lambda_from_4_gb_holds_its_error_and_its_interval():
    """The issue's bar: calibrated on the sizes up to 4 GB, the 16 published points from 6 GB on are predicted
    within a median 15%, and the 80% interval (from those points' own errors, each held out) covers 70% or more."""
    checks = [
        c for c in estimate_checks.validate_paper(trials=100, backends=("lambda",)) if c.held_out.startswith("from")
    ]
    (summary,) = estimate_checks.by_extrapolation_summary(checks)
    assert summary["checks"] == 16 and summary["median_abs_error"] <= 0.15
    assert summary["covered"] / summary["bounded"] >= 0.7
    bands = {b["extrapolation"]: b for b in estimate_checks.by_extrapolation(checks)}
    assert set(bands) == {"1-2x", "2-4x"} and bands["2-4x"]["checks"] == 8  # 10 and 12.6 GB over 4 GB


def test_less_memory_is_a_smaller_cpu_share_and_slower_and_beyond_the_quota_environments_are_reused():
    profile = estimate_profiles.paper_profile("lambda")
    full = estimate.estimate(profile, estimate_model.Target("lambda", 4, 25), PRICES)
    small = estimate.estimate(
        profile, estimate_model.Target("lambda", 4, 25, memory_mb=1769), PRICES
    )  # 1 vCPU against 5.79
    assert small.time_s_p50 > 3 * full.time_s_p50 and small.memory_mb == 1769
    capped = estimate.estimate(profile, estimate_model.Target("lambda", 4, 25, concurrency=50), PRICES)
    # 164 functions through 50 environments: some run 4 units one after another, each at least the typical one
    overhead = profile.profile.unit_overhead_s + profile.profile.unit_overhead_s_per_mb * 25
    typical_unit = overhead + profile.profile.compute_s_per_sample * 1276
    assert capped.slots == 50 and capped.time_s_p50 >= 4 * typical_unit and capped.time_s_p50 > full.time_s_p50


# ---------------------------------------------------------------------------------------------- stored runs


def hpc_run(gb, wall_s, per_sample=0.002, startup=1.0):
    """A one-worker hpc run whose partitions compute at ``per_sample`` s per sample after one start-up."""
    from cai_bench.core.plan import partition_sizes, samples_for_gb

    sizes = partition_sizes(samples_for_gb(gb), 2.0)
    phases = [(startup if i == 0 else 0.0, 0.0, 0.001 * n / 100, per_sample * n) for i, n in enumerate(sizes)]
    return hand_record("hpc", wall_s, gb=gb, partition_mb=2.0, phases=phases)


def test_a_profile_from_records_holds_their_rates_and_calibrates_the_rest_of_the_wall_per_run():
    runs = [hpc_run(0.02, 5.0), hpc_run(0.05, 8.0)]
    source = estimate_profiles.profile_from_records(runs, "hpc", "store")
    assert source.profile.compute_s_per_sample == pytest.approx(0.002)
    assert list(source.profile.cold_s) == [1.0, 1.0] and source.slots == 1
    # Each run's own units take 1 s + 0.002 s x its samples; what is left of its wall is the run overhead
    own = [1.0 + sum(w["compute_s"] + w["load_s"] for w in r["workers"]) for r in runs]
    assert source.profile.run_overhead_s == pytest.approx(np.median([5.0 - own[0], 8.0 - own[1]]))


def test_each_stored_run_is_predicted_from_the_others():
    # Three runs of one machine whose walls are their units plus 2 s: each predicted from the other two exactly
    runs = []
    for gb in (0.02, 0.05, 0.1):
        run = hpc_run(gb, 0.0)
        run["summary"]["wall_s"] = 2.0 + sum(w["startup_s"] + w["load_s"] + w["compute_s"] for w in run["workers"])
        runs.append(run)
    runs.append(hand_record("cpu", 3.0))  # not a backend the estimate simulates: left out
    checks, skipped = estimate_checks.validate_store_records(runs, "store")
    assert not skipped and [c.backend for c in checks] == ["hpc"] * 3
    assert all(abs(c.error) < 1e-9 for c in checks)
    assert estimate_checks.errors_by_backend(checks, "store")["hpc"].median_abs_error < 1e-9
    # A run whose machine was twice as slow is predicted at half its wall
    slow = hpc_run(0.05, 0.0, per_sample=0.004, startup=2.0)
    slow["summary"]["wall_s"] = 2 * runs[1]["summary"]["wall_s"]
    checks, _ = estimate_checks.validate_store_records([*runs[:3], slow], "store")
    assert checks[-1].error == pytest.approx(-0.5, abs=0.05)


def _repeats_that_sit_together() -> list[dict]:
    """Three repeats of one point whose walls are their units plus 2 s, and one run of another point plus 6 s."""
    runs = []
    for gb, overhead in ((0.02, 2.0), (0.02, 2.0), (0.02, 2.0), (0.05, 6.0)):
        run = hpc_run(gb, 0.0)
        run["summary"]["wall_s"] = overhead + sum(w["startup_s"] + w["load_s"] + w["compute_s"] for w in run["workers"])
        runs.append(run)
    return runs


def test_a_run_is_predicted_without_the_repeats_of_its_own_point():
    runs = _repeats_that_sit_together()
    by_run, _ = estimate_checks.validate_store_records(runs, "store", hold_out="run")
    assert max(abs(c.error) for c in by_run[:3]) < 1e-9  # its own repeats told it its overhead: no error at all
    by_point, _ = estimate_checks.validate_store_records(runs, "store")  # the default: its point held out
    assert min(abs(c.error) for c in by_point[:3]) > 0.05  # predicted from the other point alone: the truth
    # the estimate's interval is made from the same, honest, errors
    profile = estimate.load_profile_from_records(runs, "hpc", "store")
    assert "other points' runs" in profile.error.made_from
    assert profile.error.median_abs_error > 0.05


def test_a_profile_whose_runs_are_shorter_than_their_units_is_one_line():
    runs = _repeats_that_sit_together()
    for run in runs:
        run["summary"]["wall_s"] = 0.5  # far below what its units add up to: a run overhead below zero
    with pytest.raises(UserError, match="which is no time: its runs' walls are shorter than their units"):
        estimate_checks.validate_store_records(runs, "store")


def test_a_lambda_runs_invocations_give_the_cold_and_warm_time_beyond_the_handlers_records():
    run = hand_record(
        "lambda", 9.0, gb=0.02, partition_mb=5.0, phases=[(1.0, 0.0, 0.1, 1.0)] + [(0.0, 0.0, 0.1, 1.0)] * 4
    )
    for i, worker in enumerate(run["workers"]):
        worker["worker_id"] = f"req-{i}"
    sent = [(True, 2.1 + 0.5), (False, 1.1 + 0.25), (False, 1.1 + 0.35), (False, 1.1 + 0.3), (False, 1.1 + 0.3)]
    run["backend_info"] = {"max_concurrency": 1, "memory_mb": 3538, "invocations": [
        {"request_id": f"req-{i}", "client_s": s, "cold": cold} for i, (cold, s) in enumerate(sent)]}  # fmt: skip
    source = estimate_profiles.profile_from_records([run], "lambda", "store")
    # start-up 1 s, and the cold invocation's 0.5 s beyond its records less the 0.3 s every invocation has
    assert list(source.profile.cold_s) == pytest.approx([1.2])
    assert source.profile.unit_overhead_s == pytest.approx(0.3)  # the warm invocations' median gap
    assert source.profile.cpu_share == pytest.approx(2.0) and source.memory_mb == 3538


# ---------------------------------------------------------------------------------------------- the command


def test_the_command_prints_a_table_and_draws_the_figure_for_several_sizes(cli, tmp_path):
    figure = tmp_path / "fig.png"
    code, out, err = cli("estimate", "--profile", "paper", "--backend", "lambda,gpu", "--gb", "1,12.6",
                         "--gpu-hour-price", "2.5", "--gpus", "2", "--tasks", "64", "--figure", str(figure),
                         "--json")  # fmt: skip
    assert code == 0, err
    found = json.loads(out)
    assert [(e["backend"], e["gb"]) for e in found["estimates"]] == [("lambda", 1.0), ("lambda", 12.6),
                                                                     ("gpu", 1.0), ("gpu", 12.6)]  # fmt: skip
    gpu = found["estimates"][3]  # two GPUs (--tasks is hpc's), each held for the whole run
    # the paper's GPU figure is profiler time: the JSON names each time by its kind, never as a wall clock
    assert gpu["time_kind"] == "compute" and "wall_s_p50" not in gpu
    assert found["estimates"][0]["time_kind"] == "wall" and "wall_s_p50" in found["estimates"][0]
    assert gpu["slots"] == 2 and gpu["cost_usd_p50"] == pytest.approx(gpu["compute_s_p50"] / 3600 * 2.5 * 2)
    assert figure.stat().st_size > 10_000 and found["figure"] == str(figure)


def test_validate_over_a_store_prints_each_run_and_the_median_error(cli, tmp_path):
    write_store(tmp_path / "r", [hpc_run(0.02, 5.0), hpc_run(0.05, 8.0), hpc_run(0.1, 12.0)])
    code, out, err = cli("estimate", "--validate", str(tmp_path / "r"))
    assert code == 0, err
    assert "median absolute error" in out and out.count("hpc") >= 3


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gb", "-1"], "data size must be a positive"),
        (["--gb", "1", "--partition-mb", "0"], "partition size must be a positive"),
        (["--gb", "1", "--concurrency", "0"], "--concurrency must be at least 1"),
        (["--gb", "1", "--trials", "0"], "--trials must be at least 1"),
        (["--gb", "1", "--backend", "tpu"], "--backend must be among"),
        (["--gb", "1", "--memory-mb", "64"], "--memory-mb must be between"),
        (["--backend", "lambda"], "needs --gb"),
        (["--validate", "paper", "--trials", "0"], "--trials must be at least 1"),
        (["--gb", "1000000", "--partition-mb", "10"], "more than one simulation holds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, says):
    code, _, err = cli("estimate", "--profile", "paper", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_a_profile_with_no_usable_records_is_one_line_and_exit_2(cli, tmp_path):
    failed = hand_record("hpc", 5.0, status="failed")
    write_store(tmp_path / "r", [failed, hand_record("cpu", 3.0)])
    code, _, err = cli("estimate", "--backend", "hpc", "--gb", "1", "--profile", str(tmp_path / "r"))
    assert code == 2 and "no finished hpc run" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("estimate", "--gb", "1", "--profile", str(tmp_path / "nothing"))
    assert code == 2 and "no results store" in err


def test_holding_out_the_point_leaves_a_runs_own_repeats_out_of_its_profile():
    repeats = [hpc_run(0.05, 8.0), hpc_run(0.05, 9.0)]
    checks, skipped = estimate_checks.validate_store_records(repeats, "store", hold_out="run")
    assert len(checks) == 2 and not skipped
    checks, skipped = estimate_checks.validate_store_records(repeats, "store", hold_out="point")
    assert not checks and len(skipped) == 2 and "no other hpc point" in skipped[0]
    checks, skipped = estimate_checks.validate_store_records([*repeats, hpc_run(0.1, 12.0)], "store", hold_out="point")
    assert len(checks) == 3 and not skipped
    with pytest.raises(UserError, match="--hold-out must be one of"):
        estimate_checks.validate_store_records(repeats, "store", hold_out="machine")


def test_each_backend_may_have_its_own_profile():
    assert estimate.profile_sources("paper", ("lambda", "hpc")) == {"lambda": "paper", "hpc": "paper"}
    assert estimate.profile_sources("lambda=paper,hpc=r/hpc", ("lambda", "hpc")) == {"lambda": "paper", "hpc": "r/hpc"}
    with pytest.raises(UserError, match="no source for gpu"):
        estimate.profile_sources("lambda=paper", ("lambda", "gpu"))
    with pytest.raises(UserError, match="backend=source pairs"):
        estimate.profile_sources("tpu=paper", ("lambda",))


def test_an_hpc_workers_lanes_split_its_partitions_and_its_threads_are_the_cpu_share_compute_scales_with():
    # One worker of 2 lanes x 1 thread computing at 0.002 s per sample; two workers of 1 thread at 0.004
    two_lanes = hpc_run(0.05, 4.0)
    two_lanes["backend_info"] = {"workers": 1, "lanes": 2, "threading": {"lanes": 2, "intra_op_threads": 1}}
    assert estimate_profiles.run_slots(two_lanes) == 1 and estimate_profiles.run_cpu_share(two_lanes) == 2
    one_thread = hpc_run(0.05, 4.0, per_sample=0.004)
    one_thread["backend_info"] = {"workers": 2, "threads_per_worker": 1}
    source = estimate_profiles.profile_from_records([two_lanes, one_thread], "hpc", "store")
    # The share of the runs' median (1.5 threads): both runs' compute is the same work per thread
    assert source.profile.cpu_share == 1.5 and source.profile.compute_s_per_sample == pytest.approx(0.004 / 1.5)
    assert source.profile.compute_excess_s == pytest.approx(np.zeros(len(source.profile.compute_excess_s)))
    one = estimate.estimate(source, estimate_model.Target("hpc", 10, 2, tasks=64, cores_per_task=1), PRICES)
    two = estimate.estimate(source, estimate_model.Target("hpc", 10, 2, tasks=64, cores_per_task=2), PRICES)
    assert one.slots == 64 and two.time_s_p50 < 0.75 * one.time_s_p50  # compute halves; start-up and reads do not
    priced = estimate.estimate(
        source, estimate_model.Target("hpc", 10, 2, tasks=64, cores_per_task=2), replace(PRICES, core_hour_usd=1)
    )
    assert priced.cost_usd_p50 > 0


def test_an_emulated_function_has_no_more_cpus_than_the_machine_shares_between_the_environments_at_once():
    run = hand_record("lambda", 5.0, gb=0.02, partition_mb=5.0)
    run["environment"]["cpu_affinity"] = 2
    run["backend_info"] = {"emulated": True, "cpu_share": 2, "max_concurrency": 2, "memory_mb": 10240}
    assert estimate_profiles.run_cpu_share(run) == 1.0  # two environments at once on 2 CPUs
    run["backend_info"]["max_concurrency"] = 1
    assert estimate_profiles.run_cpu_share(run) == 2.0
    run["backend_info"]["emulated"] = False  # on AWS: the memory's share
    assert estimate_profiles.run_cpu_share(run) == pytest.approx(10240 / 1769)


# ---------------------------------------------------------------------------------------------- honest answers


def test_the_interval_factor_is_the_conformal_rank_of_the_scores_and_needs_enough_points():
    from cai_bench.measure import uncertainty as u

    scores = [0.1, 0.4, 0.2, 0.3]  # ceil(5 x 0.8) = 4th smallest: 0.4
    assert u.error_factor(scores) == pytest.approx(np.exp(0.4))
    assert u.error_factor(scores[:3]) is None and u.least_points() == 4
    assert u.interval(9.0, 10.0, 12.0, 1.1) == pytest.approx((9.0, 12.0))  # the trials' spread is wider
    assert u.interval(9.9, 10.0, 10.1, 1.5) == pytest.approx((10 / 1.5, 15.0))
    # Five points: four predicted within 10%, one off by a factor of 3. Held out, the far one is not covered
    points = [u.Point(m, 10, 10, 10) for m in (10.5, 9.5, 11.0, 9.2, 30.0)]
    assert u.leave_one_out_coverage(points) == (4, 5)
    error = u.ModelError(tuple(points), "hand")
    assert "covered 4 of 5" in error.describe() and error.median_abs_error == pytest.approx(0.8 / 9.2)
    assert "at least 4 needed" in u.ModelError(tuple(points[:2]), "hand").describe()


def test_the_paper_profile_states_its_error_and_its_interval_covers_at_least_80_percent_held_out():
    checks = [c for c in estimate_checks.validate_paper(trials=50) if c.backend == "lambda"]
    assert len(checks) == 44 and not any(c.calibration for c in checks)
    error = estimate_checks.errors_by_backend(checks, "paper")["lambda"]
    covered, bounded = error.coverage()
    assert bounded == 44 and covered / bounded >= 0.8
    source = estimate.load_profile("paper", "lambda")
    near = estimate.estimate(source, estimate_model.Target("lambda", 10, 100, orchestrator="stepfunctions"), PRICES)
    far = estimate.estimate(source, estimate_model.Target("lambda", 1000, 100, orchestrator="stepfunctions"), PRICES)
    # Within the calibrated sizes the interval is the model's error there; 79x beyond them it is stretched by
    # 1 + ln 79, and says so
    assert near.extrapolation < 1 and far.extrapolation == pytest.approx(1000 / 12.6)
    factor = source.error.factor
    assert factor > 1 and near.time_s_high == pytest.approx(max(near.time_s_p50 * factor, near.time_s_p90))
    assert far.time_s_high == pytest.approx(max(far.time_s_p50 * factor ** (1 + np.log(1000 / 12.6)), far.time_s_p90))
    assert "44 predictions" in far.interval and "1 + ln 79.4" in far.interval and far.time_kind == "wall"


def test_the_papers_hpc_and_gpu_are_compute_time_and_an_hpc_task_is_priced_for_its_cores():
    hpc = estimate.load_profile("paper", "hpc")
    unpriced = estimate.estimate(hpc, estimate_model.Target("hpc", 100, 25), replace(PRICES, core_hour_usd=0.05))
    assert unpriced.time_kind == "compute" and unpriced.cost_usd_p50 is None  # the paper gives no core count
    node = estimate.estimate(
        hpc, estimate_model.Target("hpc", 100, 25, cores_per_task=40), replace(PRICES, core_hour_usd=0.05)
    )
    assert node.cost_usd_p50 == pytest.approx(node.time_s_p50 / 3600 * 40 * 0.05, rel=1e-6)
    assert node.cost["core_hours"] == pytest.approx(node.time_s_p50 / 3600 * 40, rel=1e-6)
    assert estimate.load_profile("paper", "gpu").time_kind == "compute"


def test_a_deadline_ranks_only_wall_clock_settings_by_cost_and_marks_the_frontier():
    from cai_bench.analysis.decide import decide, frontier, parse_deadline

    request = estimate.EstimateRequest(("lambda", "gpu"), (100.0,), (25.0, 100.0), PRICES, "paper",
                                  memory_mbs=(2048, 10240), trials=20)  # fmt: skip
    decision = decide(request, parse_deadline("2m"), None)
    assert decision.left_out and decision.left_out[0].startswith("gpu: its profile is compute time only")
    assert {c.estimate.backend for c in decision.candidates} == {"lambda"} and len(decision.candidates) == 4
    meeting = [c for c in decision.candidates if c.meets]
    assert meeting and all(c.estimate.time_s_high <= 120 for c in meeting)
    assert [c.estimate.cost_usd_p50 for c in meeting] == sorted(c.estimate.cost_usd_p50 for c in meeting)
    assert all("past the deadline" in c.why_not for c in decision.candidates if not c.meets)
    edge = frontier([c.estimate for c in decision.candidates])
    for e in edge:  # nothing else is both at least as fast and cheaper
        assert not any(o.time_s_high <= e.time_s_high and o.cost_usd_p50 < e.cost_usd_p50
                       for c in decision.candidates for o in [c.estimate])  # fmt: skip
    assert {id(e) for e in edge} == {id(c.estimate) for c in decision.candidates if c.frontier}
    cost = decision.chosen.estimate.cost
    assert cost["usd"] == pytest.approx(cost["duration_usd"] + cost["request_usd"] + cost["s3_usd"])
    assert cost["s3_puts"] == decision.chosen.estimate.units


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--deadline", "soon"], "--deadline takes a positive time"),
        (["--deadline", "10m", "--gb", "1,2"], "give one --gb"),
        (["--budget", "-3"], "--budget takes a positive amount"),
        (["--deadline", "10m", "--backend", "gpu"], "no profile of wall-clock time to rank"),
        (["--array-tasks", "0", "--backend", "hpc"], "--array-tasks must be at least 1"),
    ],
)
def test_bad_decision_input_is_one_line_and_exit_2(cli, args, says):
    base = ["estimate", "--profile", "paper"] + ([] if "--gb" in args else ["--gb", "100"])
    code, _, err = cli(*base, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_the_deadline_command_prints_the_ranking_and_draws_the_frontier(cli, tmp_path):
    figure = tmp_path / "decide.png"
    code, out, err = cli("estimate", "--profile", "paper", "--gb", "1000", "--deadline", "15m", "--trials", "20",
                         "--partition-mb", "100", "--figure", str(figure), "--json")  # fmt: skip
    assert code == 0, err
    found = json.loads(out)
    assert found["chosen"]["estimate"]["memory_mb"] == 10240 and found["deadline_s"] == 900
    assert found["chosen"]["estimate"]["prices"]["architecture"] == "x86_64"
    assert figure.stat().st_size > 10_000


def slurm_run(gb, wall_s, offsets, parallelism=2, per_task=3):
    run = hpc_run(gb, wall_s)
    run["backend_info"] = {
        "slurm": True,
        "tasks": -(-len(run["workers"]) // per_task),
        "partitions_per_task": per_task,
        "array_parallelism": parallelism,
        "task_start_offsets_s": offsets,
        "cpus_per_task": 1,
    }
    return run


def test_slurm_runs_make_an_array_profile_with_the_launch_rate_their_tasks_started_at():
    runs = [slurm_run(0.02, 6.0, [0.0, 0.25]), slurm_run(0.05, 9.0, [0.0, 0.75, 3.0]), slurm_run(0.05, 9.5, [0.0, 0.0])]
    assert (
        estimate_profiles.run_groups(runs[1]) == (3, 3, 3, 3, 3, 3, 3, 3, 2)
        and estimate_profiles.run_slots(runs[1]) == 2
    )  # 26 units
    assert [estimate_profiles.array_launch_rate(r) for r in runs] == [4.0, pytest.approx(1 / 0.75), None]
    source = estimate_profiles.profile_from_records(runs, "hpc", "store")
    assert source.array.runs == 3 and source.array.launch_per_s == pytest.approx((4.0 + 1 / 0.75) / 2)
    target = estimate_model.Target("hpc", 1, 2, tasks=8, array_tasks=64)
    e = estimate.estimate(source, target, replace(PRICES, core_hour_usd=1.0))
    assert e.array_tasks == 64 and e.slots == 8 and e.label == "hpc array 64 tasks, 8 at once"
    slower = estimate.estimate(source, replace(target, shared_read_gbps=0.001), PRICES)
    assert slower.time_s_p50 > 2 * e.time_s_p50  # 1 GB through 1 MB/s shared
    checks, _ = estimate_checks.validate_store_records(runs, "store", trials=20)
    assert len(checks) == 3 and all(c.group == estimate_profiles.ARRAY_GROUP for c in checks)


def test_a_gpu_profile_takes_each_units_busy_time_not_its_overlapping_latency():
    run = hand_record("gpu", 5.0, gb=0.02, partition_mb=2.0)
    for worker in run["workers"]:
        worker["busy_s"] = worker["compute_s"] / 4  # batches shared with neighbours: 4 latencies per busy second
    source = estimate_profiles.profile_from_records([run], "gpu", "store")
    per_sample = np.median([w["compute_s"] / 4 / w["samples"] for w in run["workers"]])
    assert source.profile.compute_s_per_sample == pytest.approx(per_sample)


@pytest.mark.parametrize("kind", ["device", "fifo", "large"])
def test_a_price_file_is_a_regular_file_of_bounded_size(cli, tmp_path, kind):
    import os

    path = {"device": "/dev/zero", "fifo": tmp_path / "prices", "large": tmp_path / "prices.json"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a plain read would wait for ever
    elif kind == "large":
        path.write_bytes(b" " * (pricing.PRICE_FILE_MAX + 1))
    code, _, err = cli("estimate", "--profile", "paper", "--backend", "lambda", "--gb", "1", "--price-file", path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("not a regular file" if kind != "large" else "at most 1,048,576 are read") in err


@pytest.mark.parametrize(
    "command",
    [("estimate", "--profile", "paper", "--backend", "hpc", "--gb", "1"), ("run",), ("sweep", "--gb", "0.001"),
     ("data", "synth", "--gb", "0.001", "--out", "never"), ("model", "export", "--format", "onnx", "--out", "never")],
    ids=lambda c: " ".join(c[:2]),
)  # fmt: skip
def test_a_negative_seed_is_one_line_in_every_command_that_takes_one(cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*command, "--seed", "-1")
    assert code == 2 and "--seed" in err and "greater than or equal to 0" in err, err
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_the_cost_at_the_upper_bound_scales_durations_not_fees():
    source = estimate.load_profile("paper", "lambda")
    target = estimate_model.Target("lambda", 1.0, 25.0, orchestrator="stepfunctions")
    done = estimate.estimate(source, target, estimate.Prices(pricing.load_prices(), "x86_64"))
    fees = sum(done.cost[name] for name in ("request_usd", "transitions_usd", "s3_usd"))
    assert fees > 0 and done.time_s_high > done.time_s_p50
    scaled = done.cost["duration_usd"] * done.time_s_high / done.time_s_p50
    assert done.cost_usd_high == pytest.approx(fees + scaled)
    assert done.cost_usd_high < done.cost_usd_p50 * done.time_s_high / done.time_s_p50  # what it was before
