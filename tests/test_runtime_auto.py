"""--runtime auto: the rule apart from the timing, the probe on this machine (whatever it picks), the answer pinned
both ways through CAI_BENCH_FORCE_RUNTIME into the record, the point's identity and a sweep's resume, and where
auto is torch without a probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_GB, TINY_MB

from cai_bench.analysis.results import point_key, record_point_key
from cai_bench.commands.runner import resolve_runtime
from cai_bench.core.choices import REPROBE_ENV
from cai_bench.core.errors import UserError
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset
from cai_bench.inference import runtime_choice
from cai_bench.inference.runtime_choice import FORCE_RUNTIME_ENV, Candidate, Layout, candidates_for, decide_runtime


def c(runtime: str, precision: str, seconds: float | None, difference: float = 0.0, skipped: str | None = None):
    return Candidate(runtime, precision, seconds, difference, skipped)


@pytest.mark.parametrize(
    ("candidates", "chosen"),
    [
        # the fastest fp32 runtime wins, however little faster, unless within 3% (a tie: the fixed order decides)
        ([c("torch", "fp32", 1.0), c("onnxruntime", "fp32", 0.95)], ("onnxruntime", "fp32")),
        ([c("torch", "fp32", 1.0), c("onnxruntime", "fp32", 0.99)], ("torch", "fp32")),
        ([c("openvino", "fp32", 0.99), c("onnxruntime", "fp32", 1.0)], ("onnxruntime", "fp32")),
        # openvino timed fastest: openvino runs (it was onnxruntime under the old 10%-over-the-last-choice rule)
        ([c("torch", "fp32", 1.0), c("onnxruntime", "fp32", 0.85), c("openvino", "fp32", 0.8)],
         ("openvino", "fp32")),
        # the fastest is outside the tolerance of torch fp32: the next within it wins
        ([c("torch", "fp32", 1.0), c("openvino", "bf16", 0.3, 0.01), c("torch", "bf16", 0.6, 3e-4)], ("torch", "bf16")),
        # a reduced precision must be 10% faster than the fastest fp32, as the precision probe asks
        ([c("torch", "fp32", 1.0), c("torch", "bf16", 0.95, 3e-4)], ("torch", "fp32")),
        # a slower candidate never wins, however close
        ([c("onnxruntime", "fp32", 1.2), c("torch", "fp32", 1.0)], ("torch", "fp32")),
        # no torch (an export given as --weights): the fastest of the others
        ([c("torch", "fp32", None, skipped="x"), c("onnxruntime", "fp32", 1.0), c("openvino", "fp32", 0.95)],
         ("openvino", "fp32")),
    ],
)  # fmt: skip
def test_the_rule_takes_a_faster_candidate_only_10_percent_ahead_and_within_tolerance(candidates, chosen):
    choice, why = decide_runtime(candidates, tolerance=2e-3)
    assert (choice.runtime, choice.precision) == chosen and why


def test_with_nothing_that_started_the_rule_says_what_was_skipped():
    with pytest.raises(UserError, match="onnxruntime fp32: not installed"):
        decide_runtime([c("onnxruntime", "fp32", None, skipped="not installed")])


def test_candidates_are_each_runtimes_precisions_reduced_ones_only_where_native():
    assert candidates_for("auto", native_bf16=False) == [
        ("torch", "fp32"),
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
    ]
    assert set(candidates_for("auto", native_bf16=True)) == {
        ("torch", "fp32"),
        ("torch", "bf16"),
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
    }
    assert candidates_for("bf16", native_bf16=False) == [("torch", "bf16"), ("openvino", "bf16")]
    # OpenVINO's int8 under auto only with int8 dot products; ONNX Runtime's only when asked for
    assert ("openvino", "int8") not in candidates_for("auto", native_bf16=True, native_int8=False)
    assert set(candidates_for("auto", native_bf16=False, native_int8=True)) == {
        ("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "int8")}  # fmt: skip
    assert candidates_for("int8", native_bf16=True) == [("onnxruntime", "int8"), ("openvino", "int8")]


@pytest.mark.parametrize("bad", ["tensorflow", "onnxruntime:bf16", "torch:int8"])
def test_a_bad_forced_answer_is_one_clear_error(monkeypatch, bad):
    monkeypatch.setenv(FORCE_RUNTIME_ENV, bad)
    with pytest.raises(UserError, match=FORCE_RUNTIME_ENV):
        runtime_choice.forced_runtime()


def test_a_forced_runtime_that_cannot_run_the_asked_precision_is_refused(monkeypatch):
    monkeypatch.setenv(FORCE_RUNTIME_ENV, "onnxruntime")
    with pytest.raises(UserError, match="runs no --precision bf16"):
        runtime_choice.choose_runtime(None, 0, Layout(1, 1), "bf16")


def test_a_candidate_that_does_not_start_is_left_out_with_why_and_the_others_timed(tmp_path):
    options = runtime_choice.EngineOptions(batch_size=runtime_choice.PROBE_PER_LANE, lanes=1, intra_threads=1)
    wanted = [Candidate("torch", "fp32"), Candidate("onnxruntime", "fp32")]
    timed = runtime_choice.time_candidates(wanted, options, {"torch": None, "onnxruntime": str(tmp_path)}, seed=0)
    assert timed[0].seconds > 0 and timed[0].max_difference == 0.0 and timed[0].skipped is None
    assert timed[1].seconds is None and timed[1].skipped.startswith("did not start") and "not" in timed[1].skipped
    choice, _ = decide_runtime(timed)
    assert (choice.runtime, choice.precision) == ("torch", "fp32")


def test_the_probe_times_every_installed_runtime_and_names_a_missing_one(monkeypatch, weights_file, exports):
    """The real probe on the session's weights (exports already cached), in fp32 so three candidates: each timed
    candidate ran the probe partition and predicts within the exports' own check of torch; what it chose is the
    rule's answer on its own figures, whichever that is on this machine. openvino stands for a missing package."""
    monkeypatch.delenv(FORCE_RUNTIME_ENV)
    monkeypatch.setattr(runtime_choice, "installed", lambda runtime: runtime != "openvino")
    runtime, precision, probe = runtime_choice.choose_runtime(str(weights_file), 0, Layout(1, 1), "fp32")
    weighed = [Candidate(**x) for x in probe["candidates"]]
    assert [(x.runtime, x.precision) for x in weighed] == [("torch", "fp32"), ("onnxruntime", "fp32"),
                                                            ("openvino", "fp32")]  # fmt: skip
    torch_fp32, onnx, openvino = weighed
    assert torch_fp32.seconds > 0 and onnx.seconds > 0 and torch_fp32.max_difference == 0.0
    assert onnx.max_difference < 1e-5
    assert (
        openvino.seconds is None and "not installed" in openvino.skipped and "cai-bench[openvino]" in openvino.skipped
    )
    expected, why = decide_runtime(weighed)
    assert (runtime, precision) == (expected.runtime, expected.precision) and probe["why"] == why
    assert probe["samples"] == runtime_choice.PROBE_PER_LANE and probe["requested"] == "auto"


def _run(cli, tiny_data, results, *extra):
    code, out, err = cli("run", "--data", tiny_data, "--batch-size", "16", "--threads", "1", "--json",
                         "--results", results, *extra)  # fmt: skip
    assert code == 0, err
    (record,) = json.loads(out)
    return record


@pytest.mark.parametrize(("forced", "runtime", "precision"),
                         [("torch:fp32", "torch", "fp32"), ("onnxruntime", "onnxruntime", "fp32")])  # fmt: skip
def test_the_record_names_what_auto_ran_and_the_point_is_that_runtimes(
    cli, tiny_data, tmp_path, monkeypatch, weights_file, exports, forced, runtime, precision
):
    """Pinned both ways: the record's plan holds the runtime that ran (never auto), the choice and why, and the
    point is the same as that of a run asked for that runtime by name."""
    monkeypatch.setenv(FORCE_RUNTIME_ENV, forced)
    record = _run(cli, tiny_data, tmp_path, "--weights", weights_file)
    assert record["plan"]["backend_options"]["runtime"] == runtime
    assert record["backend_info"]["runtime"] == runtime and record["backend_info"]["precision"] == precision
    choice = record["plan"]["runtime_choice"]
    assert choice["requested"] == "auto" and choice["chose"] == runtime and FORCE_RUNTIME_ENV in choice["why"]
    named = _run(cli, tiny_data, tmp_path, "--weights", weights_file, "--runtime", runtime, "--precision", precision)
    assert named["plan"]["runtime_choice"] is None
    assert record_point_key(record) == record_point_key(named)


def test_a_record_from_before_runtime_was_written_out_is_a_repeat_of_torch(cli, tiny_data, tmp_path):
    record = _run(cli, tiny_data, tmp_path, "--precision", "fp32")  # auto, pinned to torch by conftest
    older = json.loads(json.dumps(record))
    del older["plan"]["backend_options"]["runtime"]
    older["plan"].pop("runtime_choice")
    assert record["plan"]["backend_options"]["runtime"] == "torch"
    assert record_point_key(older) == record_point_key(record)


def test_a_sweep_asks_once_and_resumes_by_what_ran(cli, tmp_path, monkeypatch, weights_file, exports):
    """Two batch sizes under auto pinned to onnxruntime: one question per batch size (the probe runs the run's
    batch), one answer each; the same sweep again finds them done; with the answer torch they are other points,
    measured anew."""
    asked = []
    real = runtime_choice.choose_runtime

    def counting(*args, **kwargs):
        asked.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr("cai_bench.commands.runner.choose_runtime", counting)
    monkeypatch.setenv(FORCE_RUNTIME_ENV, "onnxruntime")
    sweep = ("sweep", "--gb", str(TINY_GB), "--partition-mb", str(TINY_MB), "--batch-size", "16,32", "--repeats", "1",
             "--threads", "1", "--weights", weights_file, "--results", tmp_path, "--quiet")  # fmt: skip
    code, out, err = cli(*sweep)
    assert code == 0, err
    assert sorted(a[4] for a in asked) == [16, 32]
    assert "runtime auto ran as onnxruntime" in out and "asked once for the sweep's points of one batch" in out
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["plan"]["backend_options"]["runtime"] for r in records] == ["onnxruntime"] * 2
    code, out, err = cli(*sweep)
    assert code == 0 and "2 point(s) were already complete" in out
    monkeypatch.setenv(FORCE_RUNTIME_ENV, "torch:fp32")
    code, out, err = cli(*sweep)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["plan"]["backend_options"]["runtime"] for r in records] == ["onnxruntime"] * 2 + ["torch"] * 2


def _plan(tiny_data, backend: str, **changes):
    _, summary, refs = open_dataset(tiny_data)
    return make_plan(backend, summary, refs, **{"threads": 1, **changes})


def test_auto_is_torch_without_a_probe_where_the_probe_cannot_speak_for_the_workers(tiny_data, monkeypatch):
    monkeypatch.delenv(FORCE_RUNTIME_ENV)
    monkeypatch.setattr("cai_bench.commands.runner.choose_runtime", lambda *a, **k: pytest.fail("no probe expected"))
    cases = [
        (_plan(tiny_data, "cpu", engine="reference", backend_options={"runtime": "auto"}), "torch's"),
        (_plan(tiny_data, "hpc", backend_options={"runtime": "auto", "slurm": True, "executor": "local"}),
         "other machines"),
    ]  # fmt: skip
    for plan, why in cases:
        resolved = resolve_runtime(plan)
        assert resolved.backend_options["runtime"] == "torch" and why in resolved.runtime_choice["why"]
        assert resolved.precision == plan.precision  # the workers still resolve their own precision
    explicit = _plan(tiny_data, "cpu", backend_options={"runtime": "openvino"})
    assert resolve_runtime(explicit) is explicit


def test_the_probe_starts_each_runtime_as_the_backends_workers_run(tiny_data, monkeypatch):
    """cpu: one worker on all the threads, in lanes; hpc: each worker process's share. The answer is the probe's,
    runtime and precision, whatever was asked."""
    monkeypatch.delenv(FORCE_RUNTIME_ENV)
    layouts = []

    def probe(weights, seed, layout, precision, batch_size, say=None):
        layouts.append(layout)
        assert batch_size == 512  # the run's batch size: the probe times what the workers will run
        return "openvino", "bf16", {"requested": "auto", "chose": "openvino"}

    monkeypatch.setattr("cai_bench.commands.runner.choose_runtime", probe)
    cpu = resolve_runtime(_plan(tiny_data, "cpu", backend_options={"runtime": "auto"}, threads=2))
    hpc = resolve_runtime(_plan(tiny_data, "hpc", backend_options={"runtime": "auto", "workers": 2}, threads=2))
    assert layouts == [Layout(lanes=2, intra_threads=1), Layout(lanes=1, intra_threads=1)]
    for plan in (cpu, hpc):
        assert plan.backend_options["runtime"] == "openvino" and plan.precision == "bf16"
        assert plan.runtime_choice["chose"] == "openvino"


def test_lambda_takes_no_runtime_auto(cli, tiny_data, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("run", "--backend", "lambda", "--emulate", "--data", tiny_data, "--runtime", "auto",
                         "--results", tmp_path)  # fmt: skip
    assert code == 2 and "--runtime auto" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_point_keys_ignore_the_probes_figures(tiny_data):
    plan = _plan(tiny_data, "cpu", backend_options={"runtime": "openvino"}, precision="bf16")
    with_choice = make_plan(plan.backend, plan.data, plan.partitions, threads=1, precision="bf16",
                            backend_options={"runtime": "openvino"}, runtime_choice={"candidates": [1, 2]})  # fmt: skip
    environment = {"host": "h", "cpu_model": "c"}
    assert point_key(plan.to_record(), environment) == point_key(with_choice.to_record(), environment)


def test_the_accuracy_check_runs_where_torch_fp32_is_not_a_candidate():
    """--precision bf16 asked for: no torch fp32 among the candidates, so a torch fp32 pass is made for the check
    alone, and the bf16 candidate's difference is measured from it (before, it passed unchecked)."""
    options = runtime_choice.EngineOptions(batch_size=32, lanes=1, intra_threads=1)
    (timed,) = runtime_choice.time_candidates([Candidate("torch", "bf16")], options, {"torch": None}, seed=0)
    assert timed.seconds > 0 and timed.checked_against == "torch fp32 (a pass for the check alone)"
    assert timed.max_difference is not None and 0 < timed.max_difference < 0.05  # bf16 rounds; within reason


def test_without_torch_an_fp32_export_stands_in_and_without_fp32_nothing_reduced_is_chosen():
    predicted = np.linspace(0, 1, 8)
    options = runtime_choice.EngineOptions(batch_size=8, lanes=1, intra_threads=1)
    reference, against = runtime_choice._reference({Candidate("onnxruntime", "fp32"): predicted}, options, {}, 0)
    assert reference is predicted and against.startswith("onnxruntime fp32, standing in: torch cannot run")
    reference, against = runtime_choice._reference({Candidate("openvino", "bf16"): predicted}, options, {}, 0)
    assert reference is None and against.startswith("no fp32 reference")
    unchecked = Candidate("openvino", "bf16", seconds=0.5)  # fastest, but nothing to check it against
    fp32 = Candidate("onnxruntime", "fp32", seconds=1.0)
    assert decide_runtime([unchecked, fp32])[0] is fp32
    with pytest.raises(UserError, match="no candidate passed the check against torch fp32"):
        decide_runtime([unchecked])


def test_the_probes_answer_is_kept_for_the_same_question_and_asked_again_when_it_changes(
    cli, tiny_data, tmp_path, monkeypatch
):
    """A first run probes (and says so while it does), a second identical run takes the kept answer at once with
    when it was measured in its record; another batch size, or --reprobe, probes again."""
    monkeypatch.delenv(FORCE_RUNTIME_ENV)
    monkeypatch.setenv(REPROBE_ENV, "")  # --reprobe sets it for the process: undone when the test ends
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime_choice, "installed", lambda runtime: runtime == "torch")  # one candidate: fast
    probes = []
    real = runtime_choice.time_candidates

    def counted(*args, **kwargs):
        probes.append(args[1].batch_size)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_choice, "time_candidates", counted)

    def run(*extra):
        code, _, err = cli("run", "--data", tiny_data, "--batch-size", "16", "--threads", "1", "--precision",
                             "fp32", "--results", tmp_path / "r", *extra)  # fmt: skip
        assert code == 0, err
        return err

    first = run()
    assert probes == [16] and "choosing the fastest runtime: torch fp32 each timed on 16 galaxies" in first
    assert "runtime probe: torch fp32" in first
    second = run()
    assert probes == [16] and "as the probe of" in second  # the kept answer: no probe
    from cai_bench.store.jsonl import ResultsStore

    records = ResultsStore(tmp_path / "r").read()
    assert "cached_from" not in records[0]["plan"]["runtime_choice"]
    assert records[1]["plan"]["runtime_choice"]["cached_from"].startswith("20")
    assert record_point_key(records[0]) == record_point_key(records[1])  # the same point: a repeat
    run("--batch-size", "32")
    assert probes == [16, 32]
    run("--reprobe")
    assert probes == [16, 32, 16]
    monkeypatch.setenv(REPROBE_ENV, "")
    # a file in the cache that is not an answer is no answer: the probe runs
    for kept in (tmp_path / "cache" / "probes").iterdir():
        kept.write_text("{not json")
    run()
    assert probes == [16, 32, 16, 16]


def test_a_rerun_of_a_sweep_with_auto_adds_no_record_though_the_machine_would_answer_otherwise(
    cli, tmp_path, monkeypatch
):
    """Under load a second probe may time another runtime fastest: the kept answer makes the rerun ask the same
    question with the same answer, so it resumes (nothing left to measure) instead of measuring new points."""
    monkeypatch.delenv(FORCE_RUNTIME_ENV)
    monkeypatch.setenv(REPROBE_ENV, "")
    monkeypatch.setenv("CAI_BENCH_CACHE", str(tmp_path / "cache"))
    answers = iter([("torch", "fp32"), ("torch", "bf16")])  # what two probes under different load would say

    def probe(*args):
        runtime, precision = next(answers)
        return runtime, precision, {"requested": "auto", "chose": runtime, "precision": precision, "why": "test"}

    monkeypatch.setattr(runtime_choice, "_probe", probe)
    args = ["sweep", "--gb", "0.002", "--partition-mb", "1", "--batch-size", "64", "--threads", "1", "--repeats", "1",
            "--results", tmp_path / "r", "--json"]  # fmt: skip
    assert cli(*args)[0] == 0
    from cai_bench.store.jsonl import ResultsStore

    assert len(ResultsStore(tmp_path / "r").read()) == 1
    code, _, err = cli(*args)
    assert code == 0, err
    assert len(ResultsStore(tmp_path / "r").read()) == 1  # resumed: the kept answer, the same point
