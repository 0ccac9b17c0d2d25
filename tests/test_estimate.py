"""``estimate``: the simulation against runs worked out by hand, profiles from records, the paper's calibration,
leave-one-out validation, and the command's answers to good and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import hand_record, write_store

from cai_bench import estimate as est
from cai_bench.backends.aws_lambda import pricing
from cai_bench.errors import UserError
from cai_bench.simulate import Profile, Scenario, simulate

PRICES = est.Prices(pricing.PRICES)


def flat_profile(rate=0.01, cold=2.0, excess=(0.0,), load=(0.0,), **kw) -> Profile:
    return Profile("hand", rate, np.array(excess, dtype=float), np.array(load, dtype=float), np.array([cold]), **kw)


# ---------------------------------------------------------------------------------------------- the simulation


def test_units_queue_on_the_slot_that_frees_first_and_only_a_slots_first_unit_is_cold():
    # 10 units of 100 samples at 0.01 s each (1 s), 3 slots, a 2 s cold start: the slots run 4, 3 and 3 units
    sim = simulate(flat_profile(), Scenario(np.full(10, 100), 20524, slots=3), trials=5, seed=0)
    assert sim.wall_s == pytest.approx(np.full(5, 2.0 + 4 * 1.0))
    assert sim.busy_s == pytest.approx(np.full(5, 3 * 2.0 + 10 * 1.0))
    assert sim.billed_ms == pytest.approx(np.full(5, 3 * 3000 + 7 * 1000))
    assert (sim.units, sim.slots) == (10, 3)


def test_slots_start_at_lambdas_scaling_rate():
    # 2,500 one-second units and room for 3,000 at once: 1,000 start at 0 s, 1,000 at 10 s, 500 at 20 s
    one_second = Scenario(np.full(2500, 100), 20524, slots=3000, ramp_every=1000, ramp_s=10.0)
    assert simulate(flat_profile(cold=0.0), one_second, 3, 0).wall_s == pytest.approx(np.full(3, 21.0))
    # 1,000 at once: the first 1,000 end at 1 s and the next take their warm environments, no ramp to wait for
    quota = replace(one_second, slots=1000)
    assert simulate(flat_profile(cold=0.0), quota, 3, 0).wall_s == pytest.approx(np.full(3, 3.0))


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


def test_the_paper_profile_is_calibrated_on_its_own_run_and_predicts_the_others():
    profile = est.paper_profile("lambda")
    assert profile.profile.compute_excess_s.shape == (517,)
    calibrated = est.estimate(profile, est.Target("lambda", 12.6, 25.0, orchestrator="stepfunctions"), PRICES)
    assert calibrated.units == 517 and calibrated.wall_s_p50 == pytest.approx(27.18)  # the median of its 3 runs
    assert calibrated.transitions == 518 and calibrated.requests == 517
    # Fewer, longer functions take longer: 259, 173 and 130 functions at 50, 75 and 100 MB
    walls = [est.estimate(profile, est.Target("lambda", 12.6, mb), PRICES).wall_s_p50 for mb in (50, 75, 100)]
    assert calibrated.wall_s_p50 < walls[0] < walls[1] < walls[2]
    checks = est.validate_paper(trials=50)
    assert sum(c.calibration for c in checks) == 3  # one per backend
    assert {(c.gb, c.partition_mb) for c in checks if c.backend == "lambda"} >= {(1.0, 25.0), (12.6, 100.0)}


def test_less_memory_is_a_smaller_cpu_share_and_slower_and_beyond_the_quota_environments_are_reused():
    profile = est.paper_profile("lambda")
    full = est.estimate(profile, est.Target("lambda", 4, 25), PRICES)
    small = est.estimate(profile, est.Target("lambda", 4, 25, memory_mb=1769), PRICES)  # 1 vCPU against 5.79
    assert small.wall_s_p50 > 3 * full.wall_s_p50 and small.memory_mb == 1769
    capped = est.estimate(profile, est.Target("lambda", 4, 25, concurrency=50), PRICES)
    # 164 functions through 50 environments: some run 4 units one after another, each at least the typical one
    typical_unit = profile.profile.unit_overhead_s + profile.profile.compute_s_per_sample * 1276
    assert capped.slots == 50 and capped.wall_s_p50 >= 4 * typical_unit > full.wall_s_p50


# ---------------------------------------------------------------------------------------------- stored runs


def hpc_run(gb, wall_s, per_sample=0.002, startup=1.0):
    """A one-worker hpc run whose partitions compute at ``per_sample`` s per sample after one start-up."""
    from cai_bench.plan import partition_sizes, samples_for_gb

    sizes = partition_sizes(samples_for_gb(gb), 2.0)
    phases = [(startup if i == 0 else 0.0, 0.0, 0.001 * n / 100, per_sample * n) for i, n in enumerate(sizes)]
    return hand_record("hpc", wall_s, gb=gb, partition_mb=2.0, phases=phases)


def test_a_profile_from_records_holds_their_rates_and_calibrates_the_rest_of_the_wall_per_run():
    runs = [hpc_run(0.02, 5.0), hpc_run(0.05, 8.0)]
    source = est.profile_from_records(runs, "hpc", "store")
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
    checks, skipped = est.validate_store_records(runs, "store")
    assert not skipped and [c.backend for c in checks] == ["hpc"] * 3
    assert all(abs(c.error) < 1e-9 for c in checks) and est.median_abs_error(checks) < 1e-9
    # A run whose machine was twice as slow is predicted at half its wall
    slow = hpc_run(0.05, 0.0, per_sample=0.004, startup=2.0)
    slow["summary"]["wall_s"] = 2 * runs[1]["summary"]["wall_s"]
    checks, _ = est.validate_store_records([*runs[:3], slow], "store")
    assert checks[-1].error == pytest.approx(-0.5, abs=0.05)


def test_a_lambda_runs_invocations_give_the_cold_and_warm_time_beyond_the_handlers_records():
    run = hand_record(
        "lambda", 9.0, gb=0.02, partition_mb=5.0, phases=[(1.0, 0.0, 0.1, 1.0)] + [(0.0, 0.0, 0.1, 1.0)] * 4
    )
    for i, worker in enumerate(run["workers"]):
        worker["worker_id"] = f"req-{i}"
    sent = [(True, 2.1 + 0.5), (False, 1.1 + 0.25), (False, 1.1 + 0.35), (False, 1.1 + 0.3), (False, 1.1 + 0.3)]
    run["backend_info"] = {"max_concurrency": 1, "memory_mb": 3538, "invocations": [
        {"request_id": f"req-{i}", "client_s": s, "cold": cold} for i, (cold, s) in enumerate(sent)]}  # fmt: skip
    source = est.profile_from_records([run], "lambda", "store")
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
    assert gpu["slots"] == 2 and gpu["cost_usd_p50"] == pytest.approx(gpu["wall_s_p50"] / 3600 * 2.5 * 2)
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
    checks, skipped = est.validate_store_records(repeats, "store", hold_out="run")
    assert len(checks) == 2 and not skipped
    checks, skipped = est.validate_store_records(repeats, "store", hold_out="point")
    assert not checks and len(skipped) == 2 and "no other hpc point" in skipped[0]
    checks, skipped = est.validate_store_records([*repeats, hpc_run(0.1, 12.0)], "store", hold_out="point")
    assert len(checks) == 3 and not skipped
    with pytest.raises(UserError, match="--hold-out must be one of"):
        est.validate_store_records(repeats, "store", hold_out="machine")


def test_each_backend_may_have_its_own_profile():
    assert est.profile_sources("paper", ("lambda", "hpc")) == {"lambda": "paper", "hpc": "paper"}
    assert est.profile_sources("lambda=paper,hpc=r/hpc", ("lambda", "hpc")) == {"lambda": "paper", "hpc": "r/hpc"}
    with pytest.raises(UserError, match="no source for gpu"):
        est.profile_sources("lambda=paper", ("lambda", "gpu"))
    with pytest.raises(UserError, match="backend=source pairs"):
        est.profile_sources("tpu=paper", ("lambda",))


def test_an_hpc_workers_lanes_split_its_partitions_and_its_threads_are_the_cpu_share_compute_scales_with():
    # One worker of 2 lanes x 1 thread computing at 0.002 s per sample; two workers of 1 thread at 0.004
    two_lanes = hpc_run(0.05, 4.0)
    two_lanes["backend_info"] = {"workers": 1, "lanes": 2, "threading": {"lanes": 2, "intra_op_threads": 1}}
    assert est.run_slots(two_lanes) == 1 and est.run_cpu_share(two_lanes) == 2
    one_thread = hpc_run(0.05, 4.0, per_sample=0.004)
    one_thread["backend_info"] = {"workers": 2, "threads_per_worker": 1}
    source = est.profile_from_records([two_lanes, one_thread], "hpc", "store")
    # The share of the runs' median (1.5 threads): both runs' compute is the same work per thread
    assert source.profile.cpu_share == 1.5 and source.profile.compute_s_per_sample == pytest.approx(0.004 / 1.5)
    assert source.profile.compute_excess_s == pytest.approx(np.zeros(len(source.profile.compute_excess_s)))
    one = est.estimate(source, est.Target("hpc", 10, 2, tasks=64, cores_per_task=1), PRICES)
    two = est.estimate(source, est.Target("hpc", 10, 2, tasks=64, cores_per_task=2), PRICES)
    assert one.slots == 64 and two.wall_s_p50 < 0.75 * one.wall_s_p50  # compute halves; start-up and reads do not
    priced = est.estimate(
        source, est.Target("hpc", 10, 2, tasks=64, cores_per_task=2), replace(PRICES, core_hour_usd=1)
    )
    assert priced.cost_usd_p50 > 0


def test_an_emulated_function_has_no_more_cpus_than_the_machine_shares_between_the_environments_at_once():
    run = hand_record("lambda", 5.0, gb=0.02, partition_mb=5.0)
    run["environment"]["cpu_affinity"] = 2
    run["backend_info"] = {"emulated": True, "cpu_share": 2, "max_concurrency": 2, "memory_mb": 10240}
    assert est.run_cpu_share(run) == 1.0  # two environments at once on 2 CPUs
    run["backend_info"]["max_concurrency"] = 1
    assert est.run_cpu_share(run) == 2.0
    run["backend_info"]["emulated"] = False  # on AWS: the memory's share
    assert est.run_cpu_share(run) == pytest.approx(10240 / 1769)
